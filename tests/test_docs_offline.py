"""/docs and /redoc work without internet: their JS/CSS come from the server (decapflow.serve.docs), not a CDN."""

from __future__ import annotations

import os
import threading
import time
from html.parser import HTMLParser

import httpx
import pytest

from decapflow.serve.app import ServeSettings, create_app
from tests.test_page import chromium


class Assets(HTMLParser):
    """The URLs of a page's <script src> and <link href>."""

    def __init__(self) -> None:
        super().__init__()
        self.urls: list[str] = []

    def handle_starttag(self, tag: str, attrs: list[tuple[str, str | None]]) -> None:
        wanted = {"script": "src", "link": "href"}.get(tag)
        self.urls += [value for name, value in attrs if name == wanted and value]


def assets_of(html: str) -> list[str]:
    parser = Assets()
    parser.feed(html)
    return parser.urls


KINDS = {".js": "javascript", ".css": "text/css", ".png": "image/png"}


def check_page(url: str, path: str, prefix: str = "", **request: object) -> list[str]:
    """GET the docs page at ``path``: every asset it names is on this server (under ``prefix``) and served."""
    page = httpx.get(url + path, **request)
    assert page.status_code == 200 and page.headers["content-type"].startswith("text/html")
    assert "cdn." not in page.text and "fonts.googleapis" not in page.text
    assets = assets_of(page.text)
    assert len(assets) >= 2, page.text
    for asset in assets:
        assert asset.startswith(prefix + "/docs/assets/"), asset  # a local path, no scheme nor host
        response = httpx.get(url + asset.removeprefix(prefix), **request)
        assert response.status_code == 200, asset
        kind = KINDS[os.path.splitext(asset)[1]]
        assert kind in response.headers["content-type"], (asset, response.headers["content-type"])
        assert len(response.content) > (100_000 if kind != "image/png" else 500), asset
    return assets


def test_docs_and_redoc_serve_their_assets_locally(serve_app) -> None:
    url = serve_app()
    swagger = check_page(url, "/docs")
    assert {"/docs/assets/swagger-ui-bundle.js", "/docs/assets/swagger-ui.css"} <= set(swagger)
    assert "/docs/assets/redoc.standalone.js" in check_page(url, "/redoc")
    page = httpx.get(url + "/docs").text
    assert "url: '/openapi.json'" in page and "'/docs/oauth2-redirect'" in page
    redirect = httpx.get(url + "/docs/oauth2-redirect")
    assert redirect.status_code == 200 and "swaggerUIRedirectOauth2" in redirect.text
    schema = httpx.get(url + "/openapi.json").json()
    assert "/v1/captions" in schema["paths"]
    assert not any(p.startswith(("/docs", "/redoc")) for p in schema["paths"])  # the docs stay out of the API


def test_docs_are_behind_the_api_key_like_every_route(serve_app) -> None:
    url = serve_app(api_key="s3cret")
    for path in ("/docs", "/redoc", "/docs/oauth2-redirect", "/docs/assets/swagger-ui.css", "/openapi.json"):
        assert httpx.get(url + path).status_code == 401, path
    check_page(url, "/docs", headers={"X-API-Key": "s3cret"})


def test_docs_honour_the_root_path_of_a_proxy() -> None:
    """Behind a proxy that strips /api (uvicorn --root-path /api) the page names /api/... URLs that work."""
    import uvicorn

    from tests.conftest import free_port

    port = free_port()
    server = uvicorn.Server(uvicorn.Config(create_app(ServeSettings(compute="thread")), host="127.0.0.1",
                                           port=port, root_path="/api", log_level="warning", lifespan="on"))
    thread = threading.Thread(target=server.run, daemon=True)
    thread.start()
    try:
        deadline = time.monotonic() + 20
        while not server.started:
            assert time.monotonic() < deadline and thread.is_alive(), "the test server did not start"
            time.sleep(0.02)
        url = f"http://127.0.0.1:{port}"  # what the proxy forwards to, the prefix taken off
        assert "/api/docs/assets/swagger-ui-bundle.js" in check_page(url, "/docs", prefix="/api")
        page = httpx.get(url + "/docs").text
        assert "url: '/api/openapi.json'" in page and "'/api/docs/oauth2-redirect'" in page
        assert "/api/docs/assets/redoc.standalone.js" in check_page(url, "/redoc", prefix="/api")
        assert 'spec-url="/api/openapi.json"' in httpx.get(url + "/redoc").text
    finally:
        server.should_exit = True
        thread.join(10)


@pytest.fixture
def offline_browser():
    """Headless Chromium (as in test_page.py) that can resolve no host but 127.0.0.1: the internet is gone."""
    driver = chromium("--host-resolver-rules=MAP * ~NOTFOUND , EXCLUDE 127.0.0.1", "--proxy-server=http://127.0.0.1:9",
                      "--proxy-bypass-list=127.0.0.1")
    yield driver
    driver.quit()


@pytest.mark.slow
def test_swagger_ui_and_redoc_render_offline_in_chromium(serve_app, offline_browser) -> None:
    from selenium.webdriver.common.by import By
    from selenium.webdriver.support.ui import WebDriverWait

    url = serve_app()
    wait = WebDriverWait(offline_browser, 30)
    offline_browser.get(url + "/docs")
    wait.until(lambda d: d.find_elements(By.CSS_SELECTOR, ".opblock-summary-path"))
    paths = {e.get_attribute("data-path") for e in offline_browser.find_elements(By.CSS_SELECTOR,
                                                                                 ".opblock-summary-path")}
    assert {"/v1/captions", "/v1/banks", "/v1/banks/{ref}/search"} <= paths
    assert offline_browser.find_element(By.CSS_SELECTOR, ".info .title").text.startswith("decapflow")
    loaded = offline_browser.execute_script("return performance.getEntriesByType('resource').map(e => e.name)")
    assert loaded and all(name.startswith(url + "/") for name in loaded), loaded

    offline_browser.get(url + "/redoc")
    wait.until(lambda d: d.find_elements(By.CSS_SELECTOR, ".api-content"))
    wait.until(lambda d: "/v1/captions" in d.find_element(By.TAG_NAME, "body").get_attribute("textContent"))
    # ReDoc's sidebar tries the Redocly logo from its CDN and drops the <img> when that fails: nothing else leaves.
    logo = "https://cdn.redoc.ly/redoc/logo-mini.svg"
    wait.until(lambda d: not d.find_elements(By.CSS_SELECTOR, f'img[src="{logo}"]'))
    loaded = offline_browser.execute_script("return performance.getEntriesByType('resource').map(e => e.name)")
    assert loaded and all(name.startswith(url + "/") for name in loaded if name != logo), loaded
