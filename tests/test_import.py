"""``memory import``: precomputed embeddings (parquet, clip-retrieval shards) into a bank without an encoder run."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import pytest
from click.testing import CliRunner

from decapflow.bank.corpus import content_hash
from decapflow.bank.importer import run_import
from decapflow.bank.ingest import run_ingest
from decapflow.bank.memory import Registry
from decapflow.cli import main
from decapflow.errors import BankError


def unit(n: int, d: int = 32, seed: int = 0) -> np.ndarray:
    v = np.random.default_rng(seed).standard_normal((n, d)).astype(np.float32)
    return v / np.linalg.norm(v, axis=1, keepdims=True)


def write_parquet(path: Path, texts: list, vectors: np.ndarray, text: str = "caption", vector: str = "vector") -> Path:
    pq.write_table(pa.table({text: texts, vector: [list(map(float, row)) for row in vectors]}), path)
    return path


def test_parquet_import_cleans_dedupes_normalises_and_reruns_idempotently(tmp_path: Path) -> None:
    vectors = unit(6)
    vectors[2] *= 3.0  # not unit length: re-normalised
    vectors[4] = 0.0  # no direction: refused
    texts = ["a dog", "a  dog", "a cat ", "", "a bird", "a fox"]  # "a  dog" cleans to a duplicate
    src = write_parquet(tmp_path / "emb.parquet", texts, vectors)
    report = run_import(src, "pets", "tiny:random", chunk_size=2)
    assert (report.read, report.written, report.duplicates, report.empty, report.invalid_vectors,
            report.normalised) == (6, 3, 1, 1, 1, 1)
    bank = Registry().open("pets")
    stored, got = bank.arrays()
    assert sorted(stored) == ["a cat", "a dog", "a fox"] and np.allclose(np.linalg.norm(got, axis=1), 1, atol=1e-6)
    assert np.allclose(got[stored.index("a cat")], vectors[2] / 3.0, atol=1e-6)
    assert bank.encoder == "tiny:random" and bank.dim == 32
    again = run_import(src, "pets", chunk_size=4)
    assert again.written == 0 and again.already_stored == 4 and len(Registry().open("pets")) == 3  # both dogs


def test_clip_retrieval_layout(tmp_path: Path) -> None:
    out = tmp_path / "clip_out"
    (out / "text_emb").mkdir(parents=True)
    (out / "metadata").mkdir()
    for shard, words in enumerate((["red car", "blue car"], ["green car", "red car"])):
        np.save(out / "text_emb" / f"text_emb_{shard}.npy", unit(2, seed=shard).astype(np.float16))
        pq.write_table(pa.table({"caption": words}), out / "metadata" / f"metadata_{shard}.parquet")
    result = CliRunner().invoke(main, ["memory", "import", str(out), "--memory", "cars", "--encoder", "e:1",
                                       "--json"])
    assert result.exit_code == 0, result.output
    report = json.loads(result.stdout)
    assert report["written"] == 3 and report["duplicates"] == 1
    assert sorted(Registry().open("cars").arrays()[0]) == ["blue car", "green car", "red car"]


def test_import_is_checked_against_the_bank(tmp_path: Path, tiny_encoder_spec: str) -> None:
    corpus = tmp_path / "c.txt"
    corpus.write_text("a red circle\na blue square\n")
    run_ingest(corpus, "shapes", tiny_encoder_spec)
    wrong_dim = write_parquet(tmp_path / "w.parquet", ["a star"], unit(1, d=16))
    with pytest.raises(BankError, match="holds 32-d vectors"):
        run_import(wrong_dim, "shapes")
    with pytest.raises(BankError, match="holds embeddings of encoder"):
        run_import(write_parquet(tmp_path / "e.parquet", ["a star"], unit(1)), "shapes", "ViT-B-32:openai")
    with pytest.raises(BankError, match="name the encoder"):
        run_import(wrong_dim, "brand-new")
    odd = write_parquet(tmp_path / "odd.parquet", ["a star"], unit(1), text="sentence", vector="emb")
    with pytest.raises(BankError, match="no text column"):
        run_import(odd, "shapes")
    report = run_import(odd, "shapes", text_field="sentence", vector_field="emb")
    # The same sentence ingested and imported is stored once: the same cleaning and content hash.
    both = write_parquet(tmp_path / "b.parquet", ["a red circle", "a green moon"], unit(2))
    assert run_import(both, "shapes").already_stored == 1 and report.written == 1
    bank = Registry().open("shapes")
    assert len(bank) == 4 and content_hash("a green moon") in bank.hashes()
