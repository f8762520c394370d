"""The web page and the API docs under their Content-Security-Policy, in headless Debian Chromium:
nothing the pages need is blocked, and /docs renders from local assets with the network cut off."""
from __future__ import annotations

import pytest

from indexer import ProductIndex
from search.service import Settings, create_app
from tests.support.browser import chromium_page
from tests.support.indexes import IndexFixture, build_fixture_index
from tests.support.service import LiveServer, jpeg_bytes

pytestmark = pytest.mark.browser


@pytest.fixture(scope="module")
def server(tmp_path_factory: pytest.TempPathFactory):
    built: IndexFixture = build_fixture_index(tmp_path_factory.mktemp("csp-browser"), n=16)
    with ProductIndex.open(built.index_dir) as index:
        with LiveServer(create_app(Settings(), index=index, encoder=built.encoder)) as live:
            yield live


@pytest.fixture()
def browser_page(server: LiveServer):
    """A page whose console errors (CSP violations are reported there) and off-server requests are recorded."""
    with chromium_page() as page:
        problems: list[str] = []
        page.on("console", lambda message: message.type == "error" and problems.append(message.text))
        page.on("pageerror", lambda exc: problems.append(str(exc)))
        # Offline: anything not served by this server fails (and is recorded).
        page.route("**/*", lambda route: route.continue_() if route.request.url.startswith(server.url)
                   else (problems.append(f"off-server request {route.request.url}"), route.abort()))  # fmt: skip
        yield page, problems


def test_the_search_page_works_under_its_policy(browser_page, server, tmp_path):
    page, problems = browser_page
    page.goto(server.url + "/")
    page.wait_for_selector("#filters select[name=gender]")
    page.fill("#query", "red tshirts")
    page.click("#text-form button[type=submit]")
    page.wait_for_function("() => [...document.querySelectorAll('#results .card img.thumb')].length > 0 && "
                           "[...document.querySelectorAll('#results .card img.thumb')].every(i => i.complete && i.naturalWidth > 0)")  # fmt: skip
    photo = tmp_path / "photo.jpg"
    photo.write_bytes(jpeg_bytes((40, 140, 60)))
    page.set_input_files("#photo", str(photo))  # the preview is a blob: image
    page.wait_for_function("() => document.querySelector('#query-photo').complete && document.querySelector('#query-photo').naturalWidth > 0")
    page.wait_for_selector("#results .card .parts:has-text('i2t')")
    assert not problems, problems


def test_the_docs_render_offline_under_their_policy(browser_page, server):
    page, problems = browser_page
    page.goto(server.url + "/docs")
    page.wait_for_selector(".swagger-ui .opblock-summary-path", timeout=20_000)
    paths = page.eval_on_selector_all(".opblock-summary-path", "nodes => nodes.map(n => n.textContent)")
    assert {"/search/text", "/search/image", "/products/{product_id}"} <= {p.strip().replace("\u200b", "") for p in paths}
    assert not problems, problems
