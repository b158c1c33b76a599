"""The API docs (``/docs`` Swagger UI, ``/redoc`` ReDoc) served with their JS/CSS from this server, not a CDN.

FastAPI's own docs pages load Swagger UI and ReDoc from cdn.jsdelivr.net (and ReDoc its fonts from Google), so
they are blank on a machine without internet. Here the same pages point at the files that the ``fastapi-offline``
package ships (Swagger UI 5, ReDoc 2, FastAPI's favicon), mounted under ``/docs/assets``. Create the app with
``docs_url=None, redoc_url=None`` and call :func:`install_docs`; the routes keep FastAPI's paths, sit behind the
same middleware as every other route (the API key included) and honour the ASGI ``root_path``.
"""

from __future__ import annotations

from importlib.resources import files

from fastapi import FastAPI, Request
from fastapi.openapi.docs import get_redoc_html, get_swagger_ui_html, get_swagger_ui_oauth2_redirect_html
from fastapi.responses import HTMLResponse
from fastapi.staticfiles import StaticFiles

#: The folder of swagger-ui-bundle.js, swagger-ui.css, redoc.standalone.js and favicon.png.
ASSETS = files("fastapi_offline") / "static"
ASSETS_URL = "/docs/assets"


def install_docs(app: FastAPI, docs_url: str = "/docs", redoc_url: str | None = "/redoc",
                 oauth2_redirect_url: str | None = "/docs/oauth2-redirect") -> None:
    """Add the docs routes of FastAPI's defaults to ``app`` (made with ``docs_url=None, redoc_url=None``)."""
    openapi_url = app.openapi_url
    if not openapi_url:
        raise ValueError("the app has no openapi_url: there is nothing for the docs to show")
    app.mount(ASSETS_URL, StaticFiles(directory=str(ASSETS)), name="docs-assets")

    def root(request: Request) -> str:
        return request.scope.get("root_path", "").rstrip("/")

    async def swagger_ui(request: Request) -> HTMLResponse:
        prefix = root(request)
        return get_swagger_ui_html(
            openapi_url=prefix + openapi_url, title=f"{app.title} - Swagger UI",
            oauth2_redirect_url=prefix + oauth2_redirect_url if oauth2_redirect_url else None,
            init_oauth=app.swagger_ui_init_oauth, swagger_ui_parameters=app.swagger_ui_parameters,
            swagger_js_url=f"{prefix}{ASSETS_URL}/swagger-ui-bundle.js",
            swagger_css_url=f"{prefix}{ASSETS_URL}/swagger-ui.css",
            swagger_favicon_url=f"{prefix}{ASSETS_URL}/favicon.png")

    app.add_route(docs_url, swagger_ui, include_in_schema=False)

    if oauth2_redirect_url:
        async def swagger_ui_redirect(_: Request) -> HTMLResponse:
            return get_swagger_ui_oauth2_redirect_html()

        app.add_route(oauth2_redirect_url, swagger_ui_redirect, include_in_schema=False)

    if redoc_url:
        async def redoc(request: Request) -> HTMLResponse:
            prefix = root(request)
            return get_redoc_html(openapi_url=prefix + openapi_url, title=f"{app.title} - ReDoc",
                                  redoc_js_url=f"{prefix}{ASSETS_URL}/redoc.standalone.js",
                                  redoc_favicon_url=f"{prefix}{ASSETS_URL}/favicon.png", with_google_fonts=False)

        app.add_route(redoc_url, redoc, include_in_schema=False)
