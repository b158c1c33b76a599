"""Test set-up: offline, state in temporary folders, no network except 127.0.0.1, tiny models in fixtures."""

from __future__ import annotations

import json
import os
import socket
import tempfile
from pathlib import Path

import pytest
import torch

# Folders of the session, removed when it ends (the objects' finalizers run at interpreter exit).
_PREFECT_HOME = tempfile.TemporaryDirectory(prefix="decapflow-prefect-", ignore_cleanup_errors=True)
_CPU_DIR = tempfile.TemporaryDirectory(prefix="decapflow-cpus-", ignore_cleanup_errors=True)

os.environ["HF_HUB_OFFLINE"] = "1"
os.environ.setdefault("PREFECT_HOME", _PREFECT_HOME.name)
os.environ.setdefault("DECAPFLOW_DEVICE", "cpu")
os.environ.pop("PREFECT_API_URL", None)
os.environ.setdefault("PREFECT_LOGGING_LEVEL", "INFO")  # run logs reach the server; the console and the temporary
os.environ.setdefault("PREFECT_LOGGING_HANDLERS_CONSOLE_LEVEL", "WARNING")  # server (whose shutdown logs go to a closed
os.environ.setdefault("PREFECT_SERVER_LOGGING_LEVEL", "WARNING")  # stream at exit otherwise
os.environ.setdefault("PREFECT_SERVER_ANALYTICS_ENABLED", "false")
os.environ.setdefault("PREFECT_SERVER_EPHEMERAL_STARTUP_TIMEOUT_SECONDS", "90")  # 25-30 s on a busy 2-core box

# Small models, and a 2-core machine where a second thread mostly spins: one thread is faster and repeatable.
# DECAPFLOW_THREADS reaches the subprocesses too (tests of the fair share remove it); the CPU claims of the suite
# live in their own folder, apart from any decapflow job running on the machine (decapflow.cpu).
torch.set_num_threads(1)
os.environ["DECAPFLOW_THREADS"] = "1"
os.environ["DECAPFLOW_CPU_DIR"] = _CPU_DIR.name

_LOCAL = ("127.0.0.1", "::1", "localhost")
_connect = socket.socket.connect


def _guarded_connect(self: socket.socket, address: object) -> object:
    host = address[0] if isinstance(address, tuple) else address
    if self.family in (socket.AF_INET, socket.AF_INET6) and host not in _LOCAL:
        raise OSError(f"tests may not reach the network (tried {address!r})")
    return _connect(self, address)


socket.socket.connect = _guarded_connect  # type: ignore[method-assign]

TINY_CLIP = {
    "embed_dim": 32,
    "vision_cfg": {"image_size": 32, "layers": 1, "width": 32, "patch_size": 16, "head_width": 16},
    "text_cfg": {"context_length": 77, "vocab_size": 49408, "width": 32, "heads": 2, "layers": 1},
}


@pytest.fixture(autouse=True)
def decapflow_home(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Path:
    """Every test gets its own empty DECAPFLOW_HOME."""
    home = tmp_path / "home"
    monkeypatch.setenv("DECAPFLOW_HOME", str(home))
    monkeypatch.delenv("DECAPFLOW_STORE", raising=False)
    return home


@pytest.fixture(scope="session")
def tiny_clip_config(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """An open_clip model config: 1 layer, 32 wide, the real CLIP BPE vocabulary."""
    path = tmp_path_factory.mktemp("clip") / "tiny-clip.json"
    path.write_text(json.dumps(TINY_CLIP))
    return path


@pytest.fixture(scope="session")
def tiny_encoder_spec(tiny_clip_config: Path) -> str:
    """Encoder spec of the tiny CLIP with deterministic random weights."""
    return f"{tiny_clip_config}:random"


SENTENCES = ["a red circle", "a blue square", "two green triangles", "a small yellow circle",
             "three red squares", "a large blue triangle", "a purple circle on the left", "two white squares"]


@pytest.fixture(scope="session")
def trained_home(tmp_path_factory: pytest.TempPathFactory, tiny_encoder_spec: str) -> Path:
    """A home with bank 'shapes' (tiny CLIP, 8 sentences) and a tiny decoder that memorised them: built once."""
    from decapflow.bank.ingest import run_ingest
    from decapflow.decoder.train import TrainRecipe
    from decapflow.lifecycle.training import train_from_bank

    home = tmp_path_factory.mktemp("trained-home")
    corpus = home / "shapes.txt"
    corpus.write_text("\n".join(SENTENCES) + "\n")
    with pytest.MonkeyPatch.context() as mp:
        mp.setenv("DECAPFLOW_HOME", str(home))
        run_ingest(corpus, "shapes", tiny_encoder_spec)
        recipe = TrainRecipe(epochs=150, batch_size=8, lr=1e-2, warmup_steps=10, val_fraction=0.0, patience=None)
        train_from_bank("shapes", config="tiny", recipe=recipe, progress=False)
    return home


@pytest.fixture
def home(trained_home: Path, monkeypatch: pytest.MonkeyPatch) -> Path:
    """Use the shared trained home (read-only by convention: copy it to change it)."""
    monkeypatch.setenv("DECAPFLOW_HOME", str(trained_home))
    return trained_home


@pytest.fixture
def own_home(trained_home: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Path:
    """A private copy of the trained home, for tests that change it."""
    import shutil

    home = tmp_path / "home-copy"
    shutil.copytree(trained_home, home)
    monkeypatch.setenv("DECAPFLOW_HOME", str(home))
    return home


@pytest.fixture
def images(tmp_path: Path) -> Path:
    """Three small solid-colour PNGs named like COCO images (ids 7, 8, 9)."""
    from PIL import Image

    folder = tmp_path / "imgs"
    folder.mkdir()
    for i, colour in enumerate(("red", "blue", "green")):
        Image.new("RGB", (48, 40), colour).save(folder / f"img_{i + 7:06d}.png")
    return folder


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@pytest.fixture
def serve_app():
    """Start ``create_app(ServeSettings(**kw))`` on a real uvicorn server on 127.0.0.1 in a thread; returns its URL.

    The models run in a compute thread unless a test asks for ``compute="process"`` (the default of
    ``decapflow serve``; a worker process costs ~2 s to start). Every server started is stopped after the test."""
    import threading
    import time

    import uvicorn

    from decapflow.serve.app import ServeSettings, create_app

    servers: list[tuple[uvicorn.Server, threading.Thread]] = []

    def start(**settings: object) -> str:
        settings.setdefault("compute", "thread")
        port = free_port()
        config = uvicorn.Config(create_app(ServeSettings(**settings)), host="127.0.0.1", port=port,
                                log_level="warning", lifespan="on")
        server = uvicorn.Server(config)
        thread = threading.Thread(target=server.run, daemon=True)
        thread.start()
        deadline = time.monotonic() + 90  # compute="process" starts a worker importing torch: 20 s on busy cores
        while not server.started:
            if time.monotonic() > deadline or not thread.is_alive():
                raise RuntimeError("the test server did not start")
            time.sleep(0.02)
        servers.append((server, thread))
        url = f"http://127.0.0.1:{port}"
        start.apps[url] = config.app  # type: ignore[attr-defined]
        return url

    start.apps = {}  # type: ignore[attr-defined]  # url -> its FastAPI app, for tests that look inside
    yield start
    for server, thread in servers:
        server.should_exit = True
        thread.join(timeout=10)
