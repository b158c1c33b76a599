from __future__ import annotations

import json
from datetime import datetime, timezone
from pathlib import Path

import numpy as np
import pytest

from decapflow.bank.memory import BankError, Registry, check_name


def unit(rows: int, dim: int, seed: int = 0) -> np.ndarray:
    v = np.random.default_rng(seed).standard_normal((rows, dim)).astype(np.float32)
    return v / np.linalg.norm(v, axis=1, keepdims=True)


def add(bank, texts: list[str], vectors: np.ndarray) -> int:
    return bank.add([f"h{t}" for t in texts], texts, vectors, source="test.txt",
                    added_at=datetime.now(timezone.utc))


def test_names_are_checked() -> None:
    for good in ("coco", "my-bank_2", "A" * 64):
        assert check_name(good) == good
    for bad in ("", "a b", "../x", "bank.v1", "é", "A" * 65):
        with pytest.raises(BankError):
            check_name(bad)


def test_create_add_describe_and_versions(decapflow_home: Path) -> None:
    registry = Registry()
    assert registry.uri == str(decapflow_home / "banks") and registry.names() == []
    bank = registry.create("demo", "tiny.json:random", 8)
    assert add(bank, ["a cat", "a dog"], unit(2, 8)) == 2
    assert add(bank, ["a bird"], unit(1, 8, 1)) == 1
    info = Registry().open("demo").describe()
    assert (info["name"], info["rows"], info["encoder"], info["dim"]) == ("demo", 3, "tiny.json:random", 8)
    assert [v["rows"] for v in info["versions"]] == [0, 2, 3]
    assert info["version"] == 3 and info["size_bytes"] > 0
    assert info["ingests"][0]["source"] == "test.txt"
    assert sum(i["rows"] for i in info["ingests"]) == 3
    assert bank.hashes() == {"ha cat", "ha dog", "ha bird"}
    json.dumps(info)  # serialisable as is


def test_encoder_mismatch_is_refused() -> None:
    registry = Registry()
    registry.create("b", "ViT-B-32:openai", 512)
    with pytest.raises(BankError, match="ViT-B-32:openai"):
        registry.open_or_create("b", "ViT-L-14:openai", 768)
    with pytest.raises(BankError, match="expected vectors"):
        add(registry.open("b"), ["x"], unit(1, 8))
    with pytest.raises(BankError, match="already exists"):
        registry.create("b", "ViT-B-32:openai", 512)


def test_missing_bank_error_lists_banks() -> None:
    registry = Registry()
    registry.create("alpha", "e", 4)
    with pytest.raises(BankError, match="alpha") as err:
        registry.open("beta")
    assert "decapflow ingest" in str(err.value)


def test_search_and_vector_cache(decapflow_home: Path) -> None:
    bank = Registry().create("s", "e", 16)
    vectors = unit(50, 16)
    add(bank, [f"s{i}" for i in range(50)], vectors)
    hits = bank.search(vectors[7], k=3)
    assert hits[0].text == "s7" and hits[0].score == pytest.approx(1.0, abs=1e-5)
    assert hits[0].score >= hits[1].score >= hits[2].score
    cached, texts = bank.vector_cache()
    np.testing.assert_array_equal(cached, vectors)
    assert texts[7].as_py() == "s7"
    add(bank, ["new"], unit(1, 16, 5))  # a new version gets a new cache
    cached, texts = bank.vector_cache()
    assert len(cached) == 51 and texts[50].as_py() == "new"


def test_vector_cache_streams_in_batches_and_has_a_bfloat16_copy(decapflow_home: Path, monkeypatch) -> None:
    import decapflow.bank.cache as cache

    monkeypatch.setattr(cache, "CACHE_BATCH_ROWS", 16)  # several batches, a partial last one
    bank = Registry().create("s", "e", 8)
    vectors = unit(50, 8)
    add(bank, [f"s{i}" for i in range(50)], vectors)
    half, texts = bank.vector_cache("bfloat16")  # written first: the texts come with it
    assert half.nbytes == 50 * 8 * 2 and [t.as_py() for t in texts] == [f"s{i}" for i in range(50)]
    np.testing.assert_allclose(half[:], vectors, atol=4e-3)
    full, texts = bank.vector_cache()
    np.testing.assert_array_equal(full, vectors)
    assert len(texts) == 50
    with pytest.raises(ValueError, match="precision"):
        bank.vector_cache("float16")


def test_known_version_appends_only_while_no_one_else_wrote(decapflow_home: Path) -> None:
    """A writer that filtered against hashes() appends; after another writer's commit it joins on hash again."""
    reg = Registry()
    mine, theirs = reg.create("k", "e", 8), reg.open
    known = mine.hashes()
    assert known == set() and mine.known_version == mine.version
    now = datetime.now(timezone.utc)
    assert mine.add(["a", "b"], ["a", "b"], unit(2, 8), "x", now, known_version=mine.known_version) == 2
    assert mine.known_version == mine.version  # appended: the next chunk may append too
    other = theirs("k")
    assert other.add(["c"], ["c"], unit(1, 8, 1), "y", now) == 1  # another writer, unseen by `mine`
    # `mine` has not seen "c": its stale known_version must not let a second "c" in
    assert mine.add(["c", "d"], ["c", "d"], unit(2, 8, 2), "x", now, known_version=mine.known_version) == 1
    assert mine.known_version is None
    column = mine.table.search().select(["hash"]).limit(None).to_arrow().column("hash").to_pylist()
    assert sorted(column) == ["a", "b", "c", "d"]


def test_export_and_delete(tmp_path: Path) -> None:
    registry = Registry()
    bank = registry.create("e", "enc", 4)
    add(bank, ["one", "two"], unit(2, 4))
    assert bank.export(tmp_path / "out.txt") == 2
    assert (tmp_path / "out.txt").read_text() == "one\ntwo\n"
    bank.export(tmp_path / "out.jsonl")
    rows = [json.loads(line) for line in (tmp_path / "out.jsonl").read_text().splitlines()]
    assert rows[0]["text"] == "one" and rows[0]["hash"] == "hone"
    import pyarrow.parquet as pq

    bank.export(tmp_path / "out.parquet")
    assert pq.read_table(tmp_path / "out.parquet").num_rows == 2
    with pytest.raises(BankError):
        bank.export(tmp_path / "out.xlsx")
    assert registry.drop("e") == 2
    assert registry.names() == []
    with pytest.raises(BankError):
        registry.drop("e")


def test_ann_index_finds_stored_rows() -> None:
    bank = Registry().create("ann", "e", 32)
    vectors = unit(6000, 32, seed=3)
    add(bank, [f"s{i}" for i in range(6000)], vectors)
    assert not bank.has_index() and bank.index_kind() is None
    bank.build_index()
    assert bank.index_kind() == "ivf_flat"
    neighbours, texts = bank.ann_neighbors(vectors[:20], k=5, nprobes=1000)  # every partition: exact
    assert neighbours.shape == (20, 5, 32)
    assert all(t[0] == f"s{i}" for i, t in enumerate(texts))  # each row is its own nearest neighbour
    np.testing.assert_allclose(neighbours[0, 0], vectors[0], atol=1e-6)
    exact = np.argsort(-(vectors[:20] @ vectors.T), axis=1)[:, :5]
    assert [[f"s{i}" for i in row] for row in exact] == texts  # flat: exact distances, same order
    one, one_texts = bank.ann_neighbors(vectors[3], k=5, nprobes=1000)  # a single [D] query
    assert one.shape == (1, 5, 32) and one_texts == texts[3:4]
    bank.build_index("ivf_pq")
    assert bank.index_kind() == "ivf_pq"
    _, texts = bank.ann_neighbors(vectors[:20], k=5)  # compressed, re-ranked 10x by default
    assert sum(t[0] == f"s{i}" for i, t in enumerate(texts)) >= 18
    with pytest.raises(BankError, match="unknown index kind"):
        bank.build_index("hnsw")
    from click.testing import CliRunner

    from decapflow.cli import main

    result = CliRunner().invoke(main, ["memory", "index", "ann", "--partitions", "8", "--iterations", "2"])
    assert result.exit_code == 0, result.output
    assert "ivf_flat index over 6,000 rows" in result.output and Registry().open("ann").index_kind() == "ivf_flat"
    assert "in-process IVF (8 partitions)" in result.output and Registry().open("ann").has_ivf()  # topk's
    small = Registry().create("small", "e", 4)
    with pytest.raises(BankError, match="too few for an ANN index"):
        small.build_index()
