"""Examples that cannot lie: every unmarked ```bash / ```python block of the README and the docs site runs, page
by page in the nav's order, in one scratch workspace (tests/docs_examples.py says how); the marked ones are
listed on docs/examples-not-run.md."""

from __future__ import annotations

import time
from pathlib import Path

import pytest

from tests.docs_examples import (
    CATEGORIES,
    NOT_RUN_PAGE,
    ROOT,
    Example,
    Workspace,
    all_examples,
    extract,
    not_run_markdown,
    pages,
)

PAGES = [page for page in pages() if any(e.category is None for e in extract(page))]


def test_the_list_of_examples_not_run_is_current() -> None:
    assert NOT_RUN_PAGE.read_text() == not_run_markdown(all_examples()), \
        "docs/examples-not-run.md is out of date: run  python -m tests.docs_examples"


def test_the_guides_have_examples_that_run() -> None:
    examples = all_examples()
    run = [e for e in examples if e.category is None]
    assert len(run) >= 20 and len(examples) - len(run) <= 40, (len(run), len(examples))
    assert {"README.md", "docs/get-started/first-bank.md", "docs/guides/curating.md",
            "docs/guides/serving.md"} <= set(PAGES)


def test_examples_marked_elsewhere_are_run_by_the_test_they_name() -> None:
    for example in (e for e in all_examples() if e.category == "elsewhere"):
        test = ROOT / example.reason.split()[0]
        assert test.is_file(), example.where
        assert example.page in test.read_text(), f"{test.name} does not read {example.page}"


def test_markers_are_checked(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    page = tmp_path / "page.md"
    page.write_text("<!-- example: gpu (a GPU) -->\n\n```bash\nnvidia-smi\n```\n\n```text\nnot run\n```\n"
                    "```python\nprint(1)\n```\n")
    monkeypatch.setattr("tests.docs_examples.ROOT", tmp_path)
    gpu, plain = extract("page.md")
    assert (gpu.category, gpu.reason, gpu.code, gpu.line) == ("gpu", "a GPU", "nvidia-smi\n", 3)
    assert (plain.category, plain.lang, plain.code) == (None, "python", "print(1)\n")
    page.write_text("<!-- example: offline (no) -->\n```bash\ntrue\n```\n")
    with pytest.raises(ValueError, match="unknown example category"):
        extract("page.md")
    assert set(CATEGORIES) == {"network", "gpu", "long-running", "elsewhere"}


def test_the_workspace_reports_failures_and_ends_what_an_example_left_running(tmp_path: Path) -> None:
    workspace = Workspace.create(tmp_path / "ws")
    status, output = workspace.run(Example("x.md", 1, "bash", "decapflow --version\nfalse\necho never\n"))
    assert status != 0 and "decapflow" in output and "never" not in output
    started = time.monotonic()
    status, _ = workspace.run(Example("x.md", 1, "bash", "sleep 30 &\necho $! > pid\n"), timeout=20)
    assert status == 0 and time.monotonic() - started < 10
    pid = int((workspace.root / "pid").read_text())
    time.sleep(0.2)
    assert not Path(f"/proc/{pid}").exists() or "Z" in Path(f"/proc/{pid}/stat").read_text().split()[2]


@pytest.fixture(scope="module")
def workspace(tmp_path_factory: pytest.TempPathFactory) -> Workspace:
    return Workspace.create(tmp_path_factory.mktemp("docs-examples"))


@pytest.mark.slow
@pytest.mark.parametrize("page", PAGES)
def test_page_examples_run(page: str, workspace: Workspace) -> None:
    for example in (e for e in extract(page) if e.category is None):
        if example.code in workspace.ran:  # e.g. the README's five lines, which "your first bank" repeats
            continue
        status, output = workspace.run(example)
        assert status == 0, f"{example.where} exited {status}:\n{example.code}\n--- output ---\n{output[-6000:]}"
        workspace.ran.add(example.code)
