"""MkDocs hook: the HTTP reference comes from the FastAPI app itself (``decapflow.serve.app.create_app``), so it
cannot drift. It writes the app's OpenAPI document into the site as ``reference/openapi.json`` and replaces the
marker ``<!-- openapi-routes -->`` in a page with a table of the documented routes."""

from __future__ import annotations

import json
from typing import Any

from mkdocs.config.defaults import MkDocsConfig
from mkdocs.structure.files import File, Files
from mkdocs.structure.pages import Page

MARKER = "<!-- openapi-routes -->"
SPEC_PATH = "reference/openapi.json"


def openapi_spec() -> dict[str, Any]:
    """The OpenAPI document ``decapflow serve`` publishes at /openapi.json (the app is built, not started)."""
    from decapflow.serve.app import create_app

    return create_app().openapi()


def routes_table(spec: dict[str, Any]) -> str:
    """A Markdown table: method, path, the route's summary and first docstring line, its parameters."""
    rows = ["| method | path | what | parameters |", "|---|---|---|---|"]
    for path, methods in spec["paths"].items():
        for method, operation in methods.items():
            what = operation.get("summary", "")
            first = operation.get("description", "").strip().split("\n\n")[0].replace("\n", " ")
            if first:
                what += f": {first}"
            params = ", ".join(f"`{p['name']}` ({p['in']})" for p in operation.get("parameters", []))
            what = what.replace("|", "\\|")
            rows.append(f"| `{method.upper()}` | `{path}` | {what} | {params or '-'} |")
    return "\n".join(rows)


def on_files(files: Files, config: MkDocsConfig) -> Files:
    files.append(File.generated(config, SPEC_PATH, content=json.dumps(openapi_spec(), indent=2) + "\n"))
    return files


def on_page_markdown(markdown: str, page: Page, config: MkDocsConfig, files: Files) -> str:
    if MARKER in markdown:
        markdown = markdown.replace(MARKER, routes_table(openapi_spec()))
    return markdown
