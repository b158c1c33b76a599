"""benchmarks/gpu_check.py: its quick CPU mode runs every part and reports every figure, and it never imports
what the lent GPU machines lack (lancedb, prefect, fastapi, ...)."""

from __future__ import annotations

import importlib
import json
import math
import os
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parent.parent
SCRIPT = ROOT / "benchmarks" / "gpu_check.py"
#: Installed here, absent on the GPU machines (or never to be needed there): importing one fails in the child.
BLOCKED = ("lancedb", "lance", "pylance", "prefect", "prefect_dask", "dask", "distributed", "fastapi",
           "fastapi_offline", "uvicorn", "click", "transformers", "tokenizers", "av", "pycocoevalcap", "pandas",
           "httpx", "prometheus_client", "moto", "selenium")
PRELUDE = ("import sys\nfor name in {blocked!r}:\n    sys.modules[name] = None  # 'import name' raises ImportError\n"
           "sys.argv = [{script!r}, *{args!r}]\n")


def run_blocked(code: str, args: list[str], tmp_path: Path, timeout: float) -> subprocess.CompletedProcess:
    env = {**os.environ, "DECAPFLOW_HOME": str(tmp_path / "home"), "OMP_NUM_THREADS": "1",
           "DECAPFLOW_THREADS": "1", "HF_HUB_OFFLINE": "1", "PYTHONPATH": str(ROOT)}
    env.pop("OUT", None)
    prelude = PRELUDE.format(blocked=BLOCKED, script=str(SCRIPT), args=args)
    return subprocess.run([sys.executable, "-c", prelude + code], env=env, cwd=tmp_path, capture_output=True,
                          text=True, timeout=timeout, check=False)


def figure(data: dict, path: str) -> object:
    for key in path.split("."):
        data = data[key]
    return data


def test_its_imports_need_nothing_the_gpu_machines_lack(tmp_path: Path) -> None:
    code = ("import runpy\nmodule = runpy.run_path(sys.argv[0], run_name='gpu_check')\n"
            "import json\nprint(json.dumps(sorted({m.split('.')[0] for m in sys.modules if sys.modules[m] is not None})))\n")
    out = run_blocked(code, [], tmp_path, timeout=120)
    assert out.returncode == 0, out.stderr[-3000:]
    loaded = set(json.loads(out.stdout.strip().splitlines()[-1]))
    assert {"torch", "decapflow", "corpora"} <= loaded and not loaded & set(BLOCKED)


def test_the_quick_cpu_run_reports_every_figure_with_the_gpu_only_modules_blocked(tmp_path: Path) -> None:
    code = "import runpy\nrunpy.run_path(sys.argv[0], run_name='__main__')\n"
    out = run_blocked(code, ["--device", "cpu", "--quick", "--json", str(tmp_path / "check.json")], tmp_path,
                      timeout=300)
    assert out.returncode == 0, out.stdout[-3000:] + out.stderr[-3000:]
    data = json.loads((tmp_path / "check.json").read_text())
    assert data == json.loads(out.stdout.strip().splitlines()[-1])  # the last line is the same JSON
    assert data["errors"] == {} and data["env"]["quick"] is True
    assert {"train", "caption", "pd", "kmeans", "total"} <= set(data["seconds"])
    for path in importlib.import_module("gpu_check").FIGURES:
        value = figure(data, path)
        assert isinstance(value, (int, float)) and math.isfinite(value), (path, value)
    assert figure(data, "pd.reference.min_cos") > 0.99999 and data["pd"]["reference"]["same_ids"]
    assert figure(data, "pd.streamed.min_cos") > 0.99999 and data["pd"]["streamed"]["upload"]["same_ids"]
    assert data["pd"]["streamed"]["upload"]["mode"] == "resident"
    assert "== kmeans" in out.stdout and "total" in out.stdout


@pytest.fixture(autouse=True)
def _benchmarks_importable(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.syspath_prepend(str(ROOT / "benchmarks"))
