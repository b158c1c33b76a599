"""decapflow serve against real uvicorn servers on 127.0.0.1: captions, banks, batching, auth, bad input."""

from __future__ import annotations

import base64
import io
import shutil
import threading
import time
from pathlib import Path

import httpx
import pytest
from PIL import Image

from decapflow.bank.ingest import run_ingest
from decapflow.bank.memory import Registry
from decapflow.caption.captioner import Captioner, Options
from decapflow.caption.files import caption_paths
from decapflow.caption.images import collect_paths
from decapflow.decoder.checkpoint import (
    current_decoder,
    current_meta,
    list_decoders,
    load_decoder,
    register,
    set_current,
)


def wait_until(condition, seconds: float = 60) -> None:
    deadline = time.monotonic() + seconds
    while not condition():
        assert time.monotonic() < deadline, "timed out"
        time.sleep(0.02)


def png(colour: str = "red", size: tuple[int, int] = (48, 40)) -> bytes:
    buffer = io.BytesIO()
    Image.new("RGB", size, colour).save(buffer, "PNG")
    return buffer.getvalue()


def post_files(url: str, files: list[tuple[str, bytes]], **fields: object) -> httpx.Response:
    data = {"memory": "shapes", **{k: str(v) for k, v in fields.items()}}
    return httpx.post(f"{url}/v1/captions", data=data, files=[("images", f) for f in files], timeout=60)


def test_captions_match_the_in_process_captioner(home: Path, images: Path, serve_app) -> None:
    url = serve_app(compute="process")
    paths = collect_paths([images])
    for strategy in ("pd", "nnd", "vd", "clipre"):
        local, _ = caption_paths(Captioner.for_bank("shapes", Options(strategy=strategy)), paths)
        answer = post_files(url, [(p.name, p.read_bytes()) for p in paths], strategy=strategy)
        assert answer.status_code == 200, answer.text
        results = answer.json()["results"]
        assert [r["caption"] for r in results] == [c.caption for c in local]
        assert [r["image"] for r in results] == [p.name for p in paths]
        for result, cap in zip(results, local, strict=True):
            assert [(s["text"], s["weight"]) for s in result["support"]] == cap.support
            assert result["strategy"] == strategy
            assert result["bank_version"] == Registry().open("shapes").version
            assert result["decoder"] == (None if strategy == "clipre" else current_meta("shapes")["id"])


def test_json_base64_request_and_options(home: Path, serve_app) -> None:
    url = serve_app()
    data = base64.b64encode(png("blue")).decode()
    body = {"memory": "shapes", "images": [data, {"name": "b.png", "data": "data:image/png;base64," + data}],
            "strategy": "pd", "tau": 0.05, "beam": 2, "n_support": 5}
    answer = httpx.post(f"{url}/v1/captions", json=body, timeout=60)
    assert answer.status_code == 200, answer.text
    results = answer.json()["results"]
    assert [r["image"] for r in results] == ["image-0", "b.png"]
    assert results[0]["caption"] == results[1]["caption"] != ""
    assert len(results[0]["support"]) == 5
    assert sum(s["weight"] for s in results[0]["support"]) <= 1.0 + 1e-6
    assert set(answer.json()["timings_ms"]) == {"read", "caption", "total"}


def test_banks_routes_and_search(home: Path, serve_app) -> None:
    url = serve_app()
    banks = httpx.get(f"{url}/v1/banks").json()
    assert banks == [{"name": "shapes", "rows": 8, "encoder": Registry().open("shapes").encoder, "dim": 32,
                      "version": Registry().open("shapes").version, "decoder": current_meta("shapes")["id"]}]
    info = httpx.get(f"{url}/v1/banks/shapes").json()
    assert info["rows"] == 8 and info["decoder"]["id"] == banks[0]["decoder"] and info["versions"]
    hits = httpx.get(f"{url}/v1/banks/shapes/search", params={"q": "a red circle", "k": 3}).json()
    assert len(hits) == 3 and hits[0]["text"] == "a red circle" and hits[0]["score"] == pytest.approx(1, abs=1e-3)
    missing = httpx.get(f"{url}/v1/banks/nope")
    assert missing.status_code == 404 and missing.json()["error"]["code"] == "unknown_bank"
    assert httpx.get(f"{url}/v1/banks/shapes/search").status_code == 422
    page = httpx.get(url + "/")
    assert page.status_code == 200 and 'id="caption"' in page.text
    assert "/v1/captions" in httpx.get(f"{url}/openapi.json").json()["paths"]


def bomb(width: int = 20_000, height: int = 20_000) -> bytes:
    """A PNG whose header claims 400 megapixels in a few dozen bytes: only the header check can stop it."""
    import struct
    import zlib

    def chunk(kind: bytes, data: bytes) -> bytes:
        return struct.pack(">I", len(data)) + kind + data + struct.pack(">I", zlib.crc32(kind + data))

    header = struct.pack(">IIBBBBB", width, height, 8, 0, 0, 0, 0)  # 8-bit greyscale
    return (b"\x89PNG\r\n\x1a\n" + chunk(b"IHDR", header) + chunk(b"IDAT", zlib.compress(b"\0" * 64))
            + chunk(b"IEND", b""))


BAD_INPUTS = {
    "not an image": (lambda url: post_files(url, [("a.png", b"hello, not an image")]), 422, "invalid_image"),
    "empty upload": (lambda url: post_files(url, [("a.png", b"")]), 422, "invalid_image"),
    "truncated image": (lambda url: post_files(url, [("a.png", png(size=(300, 300))[:200])]), 422, "invalid_image"),
    "decompression bomb": (lambda url: post_files(url, [("bomb.png", bomb(10_000, 10_000))]), 422,
                           "invalid_image"),
    "bomb past PIL's own limit": (lambda url: post_files(url, [("bomb.png", bomb())]), 422, "invalid_image"),
    "over the size limit": (lambda url: post_files(url, [("big.bin", b"\0" * (2 * 2**20))]), 413,
                            "upload_too_large"),
    "no images": (lambda url: post_files(url, []), 422, "no_images"),
    "unknown bank": (lambda url: post_files(url, [("a.png", png())], memory="ghost"), 404, "unknown_bank"),
    "unknown decoder": (lambda url: post_files(url, [("a.png", png())], decoder="20990101-000000-abcdef"), 404,
                        "unknown_decoder"),
    "decoder as a path": (lambda url: post_files(url, [("a.png", png())], decoder="../../etc"), 404,
                          "unknown_decoder"),
    "bad strategy": (lambda url: post_files(url, [("a.png", png())], strategy="magic"), 422, "invalid_parameter"),
    "bad tau": (lambda url: post_files(url, [("a.png", png())], tau=-1), 422, "invalid_parameter"),
    "bad k": (lambda url: post_files(url, [("a.png", png())], k=0), 422, "invalid_parameter"),
    "k not a number": (lambda url: post_files(url, [("a.png", png())], k="many"), 422, "invalid_parameter"),
    "unknown field": (lambda url: post_files(url, [("a.png", png())], colour="red"), 422, "invalid_parameter"),
    "malformed JSON": (lambda url: httpx.post(f"{url}/v1/captions", content=b"{not json",
                                              headers={"content-type": "application/json"}), 400, "bad_request"),
    "bad base64": (lambda url: httpx.post(f"{url}/v1/captions", json={"memory": "shapes", "images": ["@@@"]}),
                   400, "bad_request"),
    "wrong content type": (lambda url: httpx.post(f"{url}/v1/captions", content=b"x",
                                                  headers={"content-type": "text/plain"}), 415,
                           "unsupported_media_type"),
    "unknown route": (lambda url: httpx.get(f"{url}/v2/nothing"), 404, "not_found"),
}


def test_bad_input_gets_a_clear_4xx_and_the_server_keeps_serving(home: Path, serve_app) -> None:
    url = serve_app(max_upload_mb=1, max_pixels=50_000_000, compute="process")
    for name, (send, status, code) in BAD_INPUTS.items():
        response = send(url)
        assert response.status_code == status, (name, response.text)
        error = response.json()["error"]
        assert error["code"] == code and error["message"], name
        ok = post_files(url, [("ok.png", png())])
        assert ok.status_code == 200, (name, ok.text)
    message = BAD_INPUTS["decompression bomb"][0](url).json()["error"]["message"]
    assert message == "image 0 (bomb.png): 10000x10000 exceeds the 50,000,000-pixel limit"


def test_bank_without_decoder_is_409_but_clipre_works(tmp_path: Path, tiny_encoder_spec: str, serve_app) -> None:
    corpus = tmp_path / "c.txt"
    corpus.write_text("a cat\na dog\n")
    run_ingest(corpus, "fresh", tiny_encoder_spec)
    url = serve_app()
    refused = post_files(url, [("a.png", png())], memory="fresh")
    assert refused.status_code == 409 and refused.json()["error"]["code"] == "no_decoder"
    assert "decapflow train --memory fresh" in refused.json()["error"]["message"]
    retrieved = post_files(url, [("a.png", png())], memory="fresh", strategy="clipre")
    assert retrieved.status_code == 200 and retrieved.json()["results"][0]["caption"] in ("a cat", "a dog")


def test_api_key_guards_every_route_but_healthz(home: Path, serve_app) -> None:
    url = serve_app(api_key="s3cret")
    for path in ("/", "/v1/banks", "/v1/banks/shapes", "/readyz", "/metrics", "/docs", "/openapi.json"):
        for headers in ({}, {"Authorization": "Bearer wrong"}, {"X-API-Key": "s3cre"}):
            response = httpx.get(url + path, headers=headers)
            assert response.status_code == 401, (path, headers)
            assert response.json()["error"]["code"] == "unauthorized"
    assert httpx.post(f"{url}/v1/captions", files=[("images", ("a.png", png()))], data={"memory": "shapes"}
                      ).status_code == 401
    assert httpx.get(f"{url}/healthz").status_code == 200
    for headers in ({"Authorization": "Bearer s3cret"}, {"X-API-Key": "s3cret"},
                    {"Authorization": "Basic " + base64.b64encode(b"anyone:s3cret").decode()}):
        assert httpx.get(f"{url}/v1/banks", headers=headers).status_code == 200, headers


def test_concurrent_requests_share_batches(home: Path, serve_app) -> None:
    def burst(url: str, n: int = 8) -> list[int]:
        sizes: list[int] = []
        barrier = threading.Barrier(n)

        def one() -> None:
            barrier.wait()
            answer = post_files(url, [("a.png", png())])
            sizes.append(answer.json()["results"][0]["batch"]["size"])

        threads = [threading.Thread(target=one) for _ in range(n)]
        for t in threads:
            t.start()
        for t in threads:
            t.join(30)
        return sizes

    batched = burst(serve_app(max_batch=8, max_wait_ms=300))
    assert len(batched) == 8 and max(batched) > 1
    assert burst(serve_app(max_batch=1)) == [1] * 8


def test_metrics_count_requests_batches_and_banks(home: Path, serve_app) -> None:
    url = serve_app(preload=["shapes"])
    deadline = time.monotonic() + 30
    while httpx.get(f"{url}/readyz").status_code != 200:
        assert time.monotonic() < deadline, "preload never finished"
        time.sleep(0.05)
    post_files(url, [("a.png", png()), ("b.png", png("blue"))])
    post_files(url, [("a.png", b"junk")])
    text = httpx.get(f"{url}/metrics").text
    assert 'decapflow_requests_total{method="POST",route="/v1/captions",status="200"} 1.0' in text
    assert 'decapflow_requests_total{method="POST",route="/v1/captions",status="422"} 1.0' in text
    assert "decapflow_batch_size_count 2.0" in text and "decapflow_batch_size_sum 3.0" in text  # junk too
    assert "decapflow_images_total 2.0" in text
    assert "decapflow_loaded_banks 1.0" in text and "decapflow_queue_depth 0.0" in text
    assert 'decapflow_request_seconds_bucket{le="+Inf",route="/v1/captions"} 2.0' in text


def test_readyz_reports_a_preload_that_failed(home: Path, serve_app) -> None:
    url = serve_app(preload=["ghost"])
    deadline = time.monotonic() + 10
    while (r := httpx.get(f"{url}/readyz")).json().get("error", {}).get("code") == "not_ready":
        assert time.monotonic() < deadline
        time.sleep(0.05)
    assert r.status_code == 503 and r.json()["error"]["code"] == "preload_failed" and "ghost" in r.text
    assert post_files(url, [("a.png", png())]).status_code == 200  # the other banks still serve


def test_hot_reload_of_decoder_and_bank_version_fails_no_request(trained_home: Path, tmp_path: Path,
                                                                  monkeypatch: pytest.MonkeyPatch,
                                                                  tiny_encoder_spec: str, serve_app) -> None:
    home = tmp_path / "home"
    shutil.copytree(trained_home, home)
    monkeypatch.setenv("DECAPFLOW_HOME", str(home))
    old = current_meta("shapes")["id"]
    model, vocab, meta = load_decoder(current_decoder("shapes"))
    with __import__("torch").no_grad():
        model.prefix_proj.bias.add_(0.01)  # another decoder: same vocabulary, different weights
    new = register("shapes", model, vocab, meta, make_current=False)
    url = serve_app(max_batch=4, max_wait_ms=2, compute="process", preload=["shapes"])
    wait_until(lambda: httpx.get(f"{url}/readyz").status_code == 200)
    seen: list[tuple[str, int]] = []
    errors: list[str] = []
    stop = threading.Event()

    def client() -> None:
        with httpx.Client(timeout=60) as http:
            for _ in range(2000):  # bounded
                if stop.is_set():
                    return
                r = http.post(f"{url}/v1/captions", data={"memory": "shapes"}, files=[("images", ("a.png", png()))])
                if r.status_code != 200:
                    errors.append(r.text)
                else:
                    result = r.json()["results"][0]
                    seen.append((result["decoder"], result["bank_version"]))

    threads = [threading.Thread(target=client) for _ in range(4)]
    for t in threads:
        t.start()
    try:
        wait_until(lambda: len(seen) >= 20)
        set_current("shapes", new)
        swapped = len(seen)
        wait_until(lambda: len(seen) >= swapped + 20)
        corpus = tmp_path / "more.txt"
        corpus.write_text("a green circle on the right\n")
        run_ingest(corpus, "shapes", tiny_encoder_spec)
        version = Registry().open("shapes").version
        ingested = len(seen)
        wait_until(lambda: len(seen) >= ingested + 20)
    finally:
        stop.set()
        for t in threads:
            t.join(60)
    assert not errors
    decoders = [d for d, _ in seen]
    assert decoders[0] == old and decoders[-1] == new and {d["id"] for d in list_decoders("shapes")} >= {old, new}
    first_new = decoders.index(new)
    assert all(d == new for d in decoders[first_new + 8:])  # at most the batches in flight used the old one
    assert seen[-1][1] == version and seen[0][1] < version
    versions = [v for _, v in seen]
    print(f"hot reload: {len(seen)} requests, {len(errors)} errors, {swapped} before the decoder swap, "
          f"{ingested} before the ingest; old decoder after the swap: {decoders[swapped:].count(old)}, "
          f"old version after the ingest: {versions[ingested:].count(version - 1)}")


def test_caption_server_client_prints_what_a_local_run_prints(home: Path, images: Path, serve_app) -> None:
    from click.testing import CliRunner

    from decapflow.cli import main

    (images / "broken.png").write_bytes(b"not a png")
    url = serve_app()
    runner = CliRunner()
    for fmt in ("text", "jsonl", "coco"):
        local = runner.invoke(main, ["caption", "--memory", "shapes", str(images), "--format", fmt])
        remote = runner.invoke(main, ["caption", "--server", url, "--memory", "shapes", str(images), "--format", fmt,
                                      "--batch-size", "2"])
        assert local.exit_code == remote.exit_code == 3, (local.output, remote.output)
        assert remote.stdout == local.stdout and remote.stdout.count("circle") + remote.stdout.count("square") >= 3
        assert "skipped" in remote.stderr and "broken.png" in remote.stderr
    gone = runner.invoke(main, ["caption", "--server", "http://127.0.0.1:9", "--memory", "shapes", str(images)])
    assert gone.exit_code == 1 and "no decapflow server answers at http://127.0.0.1:9" in gone.output
    unknown = runner.invoke(main, ["caption", "--server", url, "--memory", "ghost", str(images)])
    assert unknown.exit_code == 1 and "no memory bank named 'ghost'" in unknown.output


@pytest.mark.slow
def test_decapflow_serve_command_runs_and_stops(home: Path, tmp_path: Path) -> None:
    import os
    import subprocess
    import sys

    from tests.conftest import free_port

    port = free_port()
    log = (tmp_path / "serve.log").open("w")
    proc = subprocess.Popen([sys.executable, "-m", "decapflow.cli", "serve", "--port", str(port), "--preload",
                             "shapes", "--api-key", "k"], stdout=log, stderr=subprocess.STDOUT, env=os.environ)
    try:
        deadline = time.monotonic() + 60
        url = f"http://127.0.0.1:{port}"
        while True:
            assert proc.poll() is None and time.monotonic() < deadline, (tmp_path / "serve.log").read_text()
            try:
                if httpx.get(f"{url}/readyz", headers={"X-API-Key": "k"}).status_code == 200:
                    break
            except httpx.TransportError:
                pass
            time.sleep(0.2)
        answer = httpx.post(f"{url}/v1/captions", headers={"X-API-Key": "k"}, data={"memory": "shapes"},
                            files=[("images", ("a.png", png()))], timeout=60)
        assert answer.status_code == 200 and answer.json()["results"][0]["caption"]
    finally:
        proc.terminate()
        code = proc.wait(30)
    text = (tmp_path / "serve.log").read_text()
    assert code in (0, -15) and "Finished server process" in text, text  # uvicorn re-raises SIGTERM after a clean stop
    assert "decapflow serve on http://127.0.0.1" in text


def test_a_full_queue_answers_503_overloaded(home: Path, serve_app) -> None:
    url = serve_app(max_queue=2)
    refused = post_files(url, [(f"{i}.png", png()) for i in range(3)])
    assert refused.status_code == 503 and refused.json()["error"]["code"] == "overloaded"
    assert post_files(url, [("a.png", png()), ("b.png", png())]).status_code == 200
