"""Banks and decoders on an object store: ingest -> train -> caption with ``--store s3://...`` against moto's
S3-compatible server on 127.0.0.1."""

from __future__ import annotations

import json
import logging
import uuid
from collections.abc import Iterator
from pathlib import Path

import pytest
from click.testing import CliRunner

from decapflow.cli import main
from tests.conftest import free_port

DECODER_FILES = {"config.json", "model.safetensors", "vocab.json", "meta.json"}
AWS_ENV = {"AWS_ACCESS_KEY_ID": "test", "AWS_SECRET_ACCESS_KEY": "test", "AWS_REGION": "us-east-1",
           "AWS_DEFAULT_REGION": "us-east-1", "AWS_ALLOW_HTTP": "true"}


def invoke(*args: str):
    return CliRunner().invoke(main, list(args))


@pytest.fixture(scope="module")
def moto_endpoint() -> Iterator[str]:
    """moto's standalone S3 server on a free 127.0.0.1 port, for the whole module; AWS_* env vars point at it."""
    from moto.server import ThreadedMotoServer

    werkzeug = logging.getLogger("werkzeug")
    level = werkzeug.level
    werkzeug.setLevel(logging.WARNING)  # moto logs one line per request otherwise
    port = free_port()
    server = ThreadedMotoServer(ip_address="127.0.0.1", port=port, verbose=False)
    server.start()
    endpoint = f"http://127.0.0.1:{port}"
    with pytest.MonkeyPatch.context() as mp:
        for name, value in {**AWS_ENV, "AWS_ENDPOINT_URL": endpoint}.items():
            mp.setenv(name, value)
        for name in ("AWS_PROFILE", "AWS_SESSION_TOKEN", "AWS_ENDPOINT_URL_S3"):
            mp.delenv(name, raising=False)
        try:
            yield endpoint
        finally:
            server.stop()
            werkzeug.setLevel(level)


@pytest.fixture
def s3(moto_endpoint: str):
    """A boto3 S3 client on the moto server."""
    import boto3

    return boto3.client("s3", endpoint_url=moto_endpoint, region_name="us-east-1", aws_access_key_id="test",
                        aws_secret_access_key="test")


@pytest.fixture
def s3_store(s3) -> str:
    """A fresh bucket per test (stores and decoder registries are cached per URI in a process): its store URI."""
    bucket = f"decapflow-{uuid.uuid4().hex[:12]}"
    s3.create_bucket(Bucket=bucket)
    return f"s3://{bucket}/stores/main"


def keys(s3, uri: str, under: str) -> set[str]:
    """The object keys under ``<uri>/<under>/``, relative to it (without the empty "folder" markers that
    pyarrow's ``create_dir`` writes)."""
    bucket, _, prefix = uri.removeprefix("s3://").partition("/")
    full = "/".join(p for p in (prefix, under.strip("/")) if p) + "/"
    pages = s3.get_paginator("list_objects_v2").paginate(Bucket=bucket, Prefix=full)
    return {o["Key"].removeprefix(full) for page in pages for o in page.get("Contents", [])
            if not o["Key"].endswith("/")}


@pytest.fixture
def animals(s3_store: str, tmp_path: Path, tiny_encoder_spec: str) -> str:
    """Bank 'animals' (12 sentences, tiny CLIP) in the s3 store, ingested through the CLI."""
    corpus = tmp_path / "corpus.txt"
    corpus.write_text("".join(f"a {c} {a}\n" for c in ("red", "brown", "small") for a in ("dog", "cat", "bird", "fox")))
    out = invoke("ingest", str(corpus), "--memory", "animals", "--encoder", tiny_encoder_spec, "--store", s3_store,
                 "--prefect", "off")
    assert out.exit_code == 0, out.output
    return s3_store


def train(store: str, *extra: str):
    return invoke("train", "--memory", "animals", "--config", "tiny", "--epochs", "2", "--batch-size", "4",
                  "--store", store, "--prefect", "off", *extra)


def current_ids(store: str) -> list[str]:
    out = invoke("decoder", "list", "animals", "--store", store, "--json")
    assert out.exit_code == 0, out.output
    return [r["id"] for r in json.loads(out.stdout) if r["current"]]


def caption_jsonl(store: str, images: Path, *extra: str) -> list[dict]:
    out = invoke("caption", "--memory", "animals", "--store", store, "--format", "jsonl", str(images), *extra)
    assert out.exit_code == 0, out.output
    return [json.loads(line) for line in out.stdout.splitlines() if line.strip()]


def test_ingest_train_caption_against_s3(animals: str, s3, images: Path, decapflow_home: Path, tmp_path: Path,
                                        monkeypatch: pytest.MonkeyPatch) -> None:
    store = animals
    listed = json.loads(invoke("memory", "list", "--store", store, "--json").stdout)
    assert [b["name"] for b in listed] == ["animals"]
    assert any(k.startswith("animals.lance/") for k in keys(s3, store, ""))

    trained = train(store)
    assert trained.exit_code == 0, trained.output
    assert "is now current for bank 'animals'" in trained.output
    (record,) = json.loads(invoke("decoder", "list", "animals", "--store", store, "--json").stdout)
    decoder_id = record["id"]
    assert record["current"] and record["status"] == "promoted"
    assert record["path"].endswith(f"/_decoders/animals/{decoder_id}")

    # The decoder's files are in the bucket, and the store's tables beside the bank; nothing in the local store.
    assert keys(s3, store, f"_decoders/animals/{decoder_id}") == DECODER_FILES
    assert {k.split("/")[0] for k in keys(s3, store, "")} >= {"animals.lance", "_decoders.lance", "_current.lance",
                                                                 "_decoders"}
    assert not (decapflow_home / "banks").exists()

    captions = caption_jsonl(store, images)
    assert len(captions) == 3 and all(c["caption"] and c["strategy"] == "pd" for c in captions)
    assert [Path(c["image"]).name for c in captions] == [f"img_{i:06d}.png" for i in (7, 8, 9)]
    cached = list((decapflow_home / "cache" / "decoders").glob(f"*/animals/{decoder_id}"))
    assert len(cached) == 1 and {p.name for p in cached[0].iterdir()} == DECODER_FILES
    assert caption_jsonl(store, images, "--decoder", decoder_id) == captions  # by id: the same decoder

    # A second machine: an empty home that only sees the store fetches the decoder into its own cache.
    other = tmp_path / "other-home"
    monkeypatch.setenv("DECAPFLOW_HOME", str(other))
    assert [c["caption"] for c in caption_jsonl(store, images)] == [c["caption"] for c in captions]
    assert len(list((other / "cache" / "decoders").glob(f"*/animals/{decoder_id}/model.safetensors"))) == 1
    assert not (other / "banks").exists()


def test_gate_rollback_and_promote_against_s3(animals: str, s3) -> None:
    store = animals
    first = train(store)
    assert first.exit_code == 0 and "is now current" in first.output, first.output
    second = train(store)
    assert second.exit_code == 0 and "is now current" in second.output, second.output
    gated = train(store, "--max-steps", "1", "--gate", "--margin", "10")
    assert gated.exit_code == 0, gated.output
    assert "rejected for bank 'animals'" in gated.output
    rows = json.loads(invoke("decoder", "list", "animals", "--store", store, "--json").stdout)
    assert [r["status"] for r in rows] == ["promoted", "promoted", "rejected"] and rows[1]["current"]
    assert rows[2]["parent"] == rows[1]["id"] and rows[2]["scores"]
    assert keys(s3, store, f"_decoders/animals/{rows[2]['id']}") == DECODER_FILES  # kept, as rejected

    back = invoke("decoder", "rollback", "animals", "--store", store)
    assert back.exit_code == 0, back.output
    assert f"from decoder {rows[1]['id']} to {rows[0]['id']}" in back.output
    assert current_ids(store) == [rows[0]["id"]]

    promoted = invoke("decoder", "promote", rows[2]["id"], "--store", store)
    assert promoted.exit_code == 0, promoted.output
    assert current_ids(store) == [rows[2]["id"]]
    # The default (local) store knows nothing of it.
    assert json.loads(invoke("decoder", "list", "animals", "--json").stdout) == []


def test_image_eval_set_in_s3_gates_from_a_fresh_home(animals: str, s3, images: Path, tmp_path: Path,
                                                      monkeypatch: pytest.MonkeyPatch) -> None:
    store = animals
    assert train(store).exit_code == 0
    annotations = tmp_path / "captions.json"
    annotations.write_text(json.dumps({
        "images": [{"id": i, "file_name": f"img_{i:06d}.png"} for i in (7, 8, 9)],
        "annotations": [{"image_id": i, "id": i, "caption": "a small dog"} for i in (7, 8, 9)]}))
    added = invoke("memory", "eval-set", "animals", "--annotations", str(annotations), "--images", str(images),
                   "--store", store, "--json")
    assert added.exit_code == 0, added.output
    set_id = json.loads(added.stdout)[-1]["id"]
    assert keys(s3, store, f"_evalsets/animals/{set_id}/images") == {f"img_{i:06d}.png" for i in (7, 8, 9)}
    monkeypatch.setenv("DECAPFLOW_HOME", str(tmp_path / "worker-home"))  # a worker that only sees the store
    gated = invoke("train", "--memory", "animals", "--config", "tiny", "--epochs", "1", "--store", store,
                   "--prefect", "off", "--gate", "--json")
    assert gated.exit_code == 0, gated.output
    decision = json.loads(gated.stdout)["decision"]
    assert decision["metric"] == "images.cider" and decision["eval_set"] == set_id


def test_serve_captions_from_an_s3_store(animals: str, images: Path, serve_app) -> None:
    import httpx

    store = animals
    trained = train(store, "--json")
    assert trained.exit_code == 0, trained.output
    decoder_id = json.loads(trained.stdout)["decoder"]
    url = serve_app(store=store)
    files = [("images", (p.name, p.read_bytes())) for p in sorted(images.iterdir())]
    answer = httpx.post(f"{url}/v1/captions", data={"memory": "animals"}, files=files, timeout=60)
    assert answer.status_code == 200, answer.text
    results = answer.json()["results"]
    assert len(results) == 3 and all(r["caption"] and r["decoder"] == decoder_id for r in results)
    banks = httpx.get(f"{url}/v1/banks", timeout=30)
    assert banks.status_code == 200, banks.text
