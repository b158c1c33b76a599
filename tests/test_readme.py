"""The Python quick start (docs/get-started/python.md, linked from the README), run as written (slow: ingests the
world corpus and trains 200 steps). The docs examples runner leaves it to this test (marked 'elsewhere')."""

from __future__ import annotations

import contextlib
import io
import re
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parent.parent
PAGE = "docs/get-started/python.md"


def quick_start() -> str:
    """The first ```python block of docs/get-started/python.md, the page the README links as "from Python"."""
    text = (ROOT / PAGE).read_text()
    assert f"({PAGE})" in (ROOT / "README.md").read_text()
    return re.search(r"```python\n(.*?)```", text, re.S).group(1)


def test_quick_start_is_short_and_uses_the_public_api() -> None:
    code = quick_start()
    assert len(code.strip().splitlines()) <= 12
    imports = [line for line in code.splitlines() if line.startswith(("import ", "from "))]
    assert imports == ["import decapflow", "from corpora.world import write_image_set"]


@pytest.mark.slow
def test_quick_start_runs_as_written(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    from corpora.world import attribute_accuracy, load_scenes

    (tmp_path / "corpora").symlink_to(ROOT / "corpora")  # the page runs from the repository root
    monkeypatch.chdir(tmp_path)
    out = io.StringIO()
    with contextlib.redirect_stdout(out):
        exec(compile(quick_start(), PAGE, "exec"), {"__name__": "__readme__"})
    lines = out.getvalue().splitlines()
    assert lines[0].startswith("bank 'world': read ") and "written 21" in lines[0]
    captions = {Path(line.split(" -> ")[0]).name: line.split(" -> ")[1] for line in lines if " -> " in line}
    assert len(captions) == 4
    scenes = load_scenes(tmp_path / "world-photos")
    scores = [attribute_accuracy(caption, scenes[int(re.search(r"(\d+)\.png$", name).group(1))])["mean"]
              for name, caption in captions.items()]
    assert sum(scores) / len(scores) >= 0.5, captions  # a decoder that learnt the world, not noise


def test_readme_is_a_landing_page_that_starts_with_the_two_commands() -> None:
    text = (ROOT / "README.md").read_text()
    assert len(text.splitlines()) <= 120
    first_block = re.search(r"```bash\n(.*?)```", text, re.S).group(1).splitlines()
    assert first_block[0].startswith("./setup.sh && .venv/bin/decapflow demo")
    assert first_block[1].startswith(".venv/bin/python -m pytest")
    assert ".venv/bin/mkdocs serve" in text
    for link in re.findall(r"\]\((docs/[^)#]+)", text):
        assert (ROOT / link).is_file(), link
