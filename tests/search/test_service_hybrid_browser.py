"""The web page's text-ranking switch (vector | lexical | hybrid) in headless Chromium."""
from __future__ import annotations

import pytest

from indexer import ProductIndex
from search.service import Settings, create_app
from tests.support.browser import chromium_page
from tests.support.indexes import build_fixture_index
from tests.support.service import LiveServer

pytestmark = [pytest.mark.browser]


@pytest.fixture(scope="module")
def server(tmp_path_factory: pytest.TempPathFactory):
    fixture = build_fixture_index(tmp_path_factory.mktemp("hybrid-browser"), n=24)
    with ProductIndex.open(fixture.index_dir) as index, LiveServer(create_app(Settings(), index=index, encoder=fixture.encoder)) as live:
        yield live


def cards(page) -> dict:
    return page.evaluate(
        """() => ({
            ids: [...document.querySelectorAll('#results .card')].map(c => c.dataset.id),
            parts: [...document.querySelectorAll('#results .card .parts')].map(e => e.textContent),
            status: document.querySelector('#status').textContent,
        })"""
    )


def test_the_mode_switch_reruns_the_query_lexically_and_hybrid(server):
    with chromium_page() as page:
        errors: list[str] = []
        page.on("pageerror", lambda exc: errors.append(str(exc)))
        requests: list[dict] = []
        page.on("request", lambda r: requests.append(r.post_data_json) if r.url.endswith("/search/text") else None)
        page.goto(server.url + "/")
        assert page.input_value("#mode") == "vector"
        page.fill("#query", "no 13")
        page.click("#text-form button[type=submit]")
        page.wait_for_selector("#results .card")
        vector = cards(page)
        assert requests[-1]["mode"] == "vector" and "bm25" not in vector["parts"][0]

        page.select_option("#mode", "lexical")  # re-runs the last text search
        page.wait_for_function("() => document.querySelector('#status').textContent.includes('lexical')")
        lexical = cards(page)
        assert requests[-1]["mode"] == "lexical" and requests[-1]["query"] == "no 13"
        assert lexical["ids"][0] == "113" and "bm25" in lexical["parts"][0]  # the one title with "13"

        page.select_option("#mode", "hybrid")
        page.wait_for_function("() => document.querySelector('#status').textContent.includes('hybrid')")
        hybrid = cards(page)
        assert requests[-1]["mode"] == "hybrid" and hybrid["ids"][0] == "113" and hybrid["ids"] != lexical["ids"]  # fused, not BM25 alone
        assert not errors, errors
