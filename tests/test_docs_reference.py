"""The generated references cannot drift: the CLI page, rendered the way the site renders it, holds every command,
subcommand and option `decapflow --help` knows; the HTTP page's hook lists every route of the app; and the strict
site build passes."""

from __future__ import annotations

import html as html_lib
import importlib.util
import os
import re
import shutil
import subprocess
import sys
from pathlib import Path

import click
import markdown
import pytest
from click.testing import CliRunner

from decapflow.cli import main

ROOT = Path(__file__).resolve().parent.parent


def cli_reference_html() -> str:
    """docs/reference/cli.md rendered with the extensions mkdocs.yml gives it (mkdocs-click expands the directive)."""
    return markdown.markdown((ROOT / "docs/reference/cli.md").read_text(),
                             extensions=["mkdocs-click", "attr_list", "toc", "pymdownx.superfences"])


def sections(html: str) -> dict[str, str]:
    """Command path ("decapflow memory remove") -> its section of the page, from the heading levels."""
    found: dict[str, str] = {}
    headings = list(re.finditer(r"<h([2-6])[^>]*>(.*?)</h\1>", html))
    stack: list[tuple[int, str]] = []
    for index, heading in enumerate(headings):
        level, name = int(heading.group(1)), re.sub(r"<[^>]+>", "", heading.group(2)).strip()
        while stack and stack[-1][0] >= level:
            stack.pop()
        stack.append((level, name))
        end = headings[index + 1].start() if index + 1 < len(headings) else len(html)
        found[" ".join(n for _, n in stack)] = html_lib.unescape(html[heading.end():end])
    return found


def commands(group: click.Command, path: str = "decapflow") -> dict[str, click.Command]:
    """Every command reachable from ``group``, by path, hidden ones left out (as --help does)."""
    found = {path: group}
    if isinstance(group, click.Group):
        for name, command in group.commands.items():
            if not command.hidden:
                found |= commands(command, f"{path} {name}")
    return found


def help_lists(path: str) -> list[str]:
    """The subcommands `decapflow ... --help` lists."""
    result = CliRunner().invoke(main, [*path.split()[1:], "--help"], terminal_width=200)
    assert result.exit_code == 0, result.output
    if "Commands:" not in result.output:
        return []
    return re.findall(r"^  (\S+)", result.output.split("Commands:")[1], re.M)


def test_cli_reference_lists_every_command_and_option() -> None:
    page = sections(cli_reference_html())
    known = commands(main)
    assert len(known) >= 25 and "decapflow memory remove" in known and "decapflow train" in known
    assert set(known) <= set(page), sorted(set(known) - set(page))
    for path, command in known.items():
        assert {f"{path} {name}" for name in help_lists(path)} <= set(page), path
        usage = f"{path} [OPTIONS]"
        assert usage in page[path], (path, page[path][:300])
        for param in command.params:
            if isinstance(param, click.Option) and not param.hidden:
                for opt in param.opts:
                    assert re.search(rf"(?<![\w-]){re.escape(opt)}(?![\w-])", page[path]), (path, opt)
    assert "--fused" in page["decapflow train"]  # options added on this branch are there without an edit


def test_cli_reference_is_generated_not_written() -> None:
    text = (ROOT / "docs/reference/cli.md").read_text()
    assert ":module: decapflow.cli" in text and ":command: main" in text
    assert "--max-steps" not in text  # no hand-written option list to drift


def load_hook():
    spec = importlib.util.spec_from_file_location("openapi_hook", ROOT / "docs/_hooks/openapi.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def test_http_reference_lists_every_route_of_the_app() -> None:
    hook = load_hook()
    spec = hook.openapi_spec()
    table = hook.routes_table(spec)
    assert {"/v1/captions", "/v1/banks", "/v1/banks/{ref}/search", "/healthz", "/readyz"} <= set(spec["paths"])
    for path, methods in spec["paths"].items():
        for method in methods:
            assert f"| `{method.upper()}` | `{path}` |" in table
    assert "`q` (query)" in table
    assert hook.MARKER in (ROOT / "docs/reference/http.md").read_text()


@pytest.mark.slow
def test_the_site_builds_strictly(tmp_path: Path) -> None:
    mkdocs = shutil.which("mkdocs", path=str(Path(sys.executable).parent))
    if mkdocs is None:
        pytest.skip("the docs extra is not installed (pip install -e '.[docs]')")
    env = {**os.environ, "NO_MKDOCS_2_WARNING": "1", "PYTHONPATH": str(ROOT)}  # this checkout's commands and app
    result = subprocess.run([mkdocs, "build", "--strict", "--site-dir", str(tmp_path / "site")], cwd=ROOT,
                            capture_output=True, text=True, timeout=300, env=env)
    assert result.returncode == 0, result.stderr[-4000:]
    site = tmp_path / "site"
    assert "decapflow memory remove" in (site / "reference/cli/index.html").read_text()
    assert '"/v1/captions"' in (site / "reference/openapi.json").read_text()
    assert "nightly-maintenance" in (site / "reference/prefect-yaml/index.html").read_text()
    assert "run_ingest" in (site / "reference/python/index.html").read_text()
