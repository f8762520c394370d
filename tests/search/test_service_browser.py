"""The web page in headless Debian Chromium (playwright): type a query, upload a photo, see the grid,
facet counts by the filters, "more like this", the rerank toggle and each reranked card's rerank score."""
from __future__ import annotations

from pathlib import Path

import httpx
import pytest

from search.service import Settings, create_app
from tests.support.browser import chromium_page
from tests.support.indexes import IndexFixture
from tests.support.service import LiveServer, build_bundle_index, export_tiny_reranker_bundle, jpeg_bytes

pytestmark = [pytest.mark.browser, pytest.mark.torch]


@pytest.fixture(scope="module")
def built(tmp_path_factory: pytest.TempPathFactory, tiny_bundle: Path) -> IndexFixture:
    return build_bundle_index(tmp_path_factory.mktemp("browser"), tiny_bundle, n=24)


@pytest.fixture(scope="module")
def server(built: IndexFixture):
    with LiveServer(create_app(Settings(index=built.index_dir))) as live:
        yield live


@pytest.fixture()
def page(server: LiveServer):
    with chromium_page() as page:
        errors: list[str] = []
        page.on("pageerror", lambda exc: errors.append(str(exc)))
        page.goto(server.url + "/")
        yield page
        assert not errors, errors


def wait_for_grid(page) -> dict:
    """Cards rendered and every thumbnail decoded (naturalWidth > 0)."""
    page.wait_for_selector("#results .card", timeout=15_000)
    page.wait_for_function(
        "() => [...document.querySelectorAll('#results .card img.thumb')].every(i => i.complete && i.naturalWidth > 0)",
        timeout=15_000,
    )
    return page.evaluate(
        """() => ({
            cards: document.querySelectorAll('#results .card').length,
            loaded: [...document.querySelectorAll('#results .card img.thumb')].filter(i => i.naturalWidth > 0).length,
            scores: [...document.querySelectorAll('#results .card .fused')].map(e => Number(e.textContent)),
            parts: document.querySelector('#results .card .parts').textContent,
            status: document.querySelector('#status').textContent,
        })"""
    )


def test_text_search_renders_a_grid_of_loaded_thumbnails(page, tmp_path):
    page.wait_for_selector("#filters select[name=gender]")  # filters loaded from /filters
    page.fill("#query", "red tshirts")
    page.click("#text-form button[type=submit]")
    grid = wait_for_grid(page)
    page.screenshot(path=str(tmp_path / "text-search.png"), full_page=True)
    assert grid["cards"] > 0 and grid["loaded"] == grid["cards"]
    assert grid["scores"] == sorted(grid["scores"], reverse=True)
    assert "t2t" in grid["parts"] and "t2i" in grid["parts"] and "results in" in grid["status"]
    assert not page.is_visible("#query-photo") and not page.is_visible("#error")
    assert (tmp_path / "text-search.png").stat().st_size > 0
    assert page.is_disabled("#rerank") and not page.is_checked("#rerank")  # this bundle has no reranker
    assert page.locator("#results .card .rerank:visible").count() == 0 and "reranked" not in grid["status"]

    page.select_option("#filters select[name=gender]", "Women")  # re-runs the search, filtered
    page.wait_for_function("() => document.querySelectorAll('#results .card').length > 0 && "
                           "[...document.querySelectorAll('#results .card .meta')].every(e => e.textContent.startsWith('Women'))")  # fmt: skip


def test_photo_upload_renders_results(page, tmp_path):
    photo = tmp_path / "my-photo.jpg"
    photo.write_bytes(jpeg_bytes((40, 140, 60)))
    page.set_input_files("#photo", str(photo))
    grid = wait_for_grid(page)
    page.screenshot(path=str(tmp_path / "photo-search.png"), full_page=True)
    assert grid["cards"] > 0 and grid["loaded"] == grid["cards"]
    assert "i2t" in grid["parts"] and "i2i" in grid["parts"]
    assert page.is_visible("#query-photo")


def test_errors_are_shown_not_swallowed(page, tmp_path):
    not_a_photo = tmp_path / "notes.jpg"
    not_a_photo.write_bytes(b"this is not an image")
    page.set_input_files("#photo", str(not_a_photo))
    page.wait_for_selector("#error:not([hidden])", timeout=15_000)
    assert "not an image" in page.inner_text("#error")


def facet_chips(page, field: str) -> dict[str, int]:
    return page.evaluate(
        """(field) => Object.fromEntries([...document.querySelectorAll(`#filters select[name="${field}"] ~ .facet .facet-value`)]
            .map(b => [b.dataset.value, Number(b.querySelector('.count').textContent)]))""",
        field,
    )


def test_facet_counts_sit_by_the_filters_and_apply_one_on_click(page, server):
    page.wait_for_selector("#filters select[name=gender]")
    page.fill("#query", "blue jeans")
    page.click("#text-form button[type=submit]")
    wait_for_grid(page)
    page.wait_for_selector("#filters select[name=gender] ~ .facet .facet-value")
    fields = page.evaluate("() => [...document.querySelectorAll('#filters select')].map(s => s.name)")
    expected = httpx.post(f"{server.url}/search/text", json={"query": "blue jeans", "k": 24, "facets": fields}).json()
    chips = facet_chips(page, "gender")
    assert chips == {v["value"]: v["count"] for v in expected["facets"]["gender"]}
    assert sum(chips.values()) == expected["facet_top_n"] == 24  # the 24-product catalog: every product is a candidate

    page.click("#filters select[name=gender] ~ .facet .facet-value[data-value=Men]")  # applies gender = Men
    page.wait_for_function("() => document.querySelector('#filters select[name=gender]').value === 'Men' && "
                           "document.querySelectorAll('#results .card').length > 0 && "
                           "[...document.querySelectorAll('#results .card .meta')].every(e => e.textContent.startsWith('Men'))")  # fmt: skip
    page.wait_for_function("() => document.querySelector('#filters select[name=gender] ~ .facet .facet-value.active') !== null")
    assert set(facet_chips(page, "gender")) == {"Men"}  # counted within the filter


def test_more_like_this_shows_the_products_similar_to_a_card(page, server):
    page.fill("#query", "red tshirts")
    page.click("#text-form button[type=submit]")
    wait_for_grid(page)
    first = page.evaluate("() => ({id: document.querySelector('#results .card').dataset.id, "
                          "title: document.querySelector('#results .card .title').textContent})")  # fmt: skip
    page.click("#results .card:first-child .more-like-this")
    page.wait_for_function("(title) => document.querySelector('#status').textContent.includes(title)", arg=first["title"])
    grid = wait_for_grid(page)
    shown = page.evaluate("() => [...document.querySelectorAll('#results .card')].map(c => c.dataset.id)")
    expected = httpx.get(f"{server.url}/products/{first['id']}/similar", params={"k": 24}).json()
    assert shown == [r["id"] for r in expected["results"]] and first["id"] not in shown
    assert "i2t" in grid["parts"] and "i2i" in grid["parts"] and "like" in grid["status"]
    assert page.is_visible("#query-photo") and page.get_attribute("#query-photo", "src") == f"/products/{first['id']}/image"
    # Filters apply to "more like this" too, and re-run it.
    page.select_option("#filters select[name=gender]", "Women")
    page.wait_for_function("() => document.querySelectorAll('#results .card').length > 0 && "
                           "[...document.querySelectorAll('#results .card .meta')].every(e => e.textContent.startsWith('Women'))")  # fmt: skip
    assert first["title"] in page.inner_text("#status")


# ---------------------------------------------------------------- the rerank toggle (an aligned reranker)

RERANK_TOP_N = 6  # the reranker's default N, written into its bundle


@pytest.fixture(scope="module")
def rerank_server(tmp_path_factory: pytest.TempPathFactory, tiny_bundle: Path):
    """The service over a bundle with an untrained tiny-aligned reranker: it reranks text and photo queries."""
    root = tmp_path_factory.mktemp("browser-rerank")
    bundle = export_tiny_reranker_bundle(root / "bundle", tiny_bundle, model="tiny-aligned", default_top_n=RERANK_TOP_N)
    built = build_bundle_index(root / "index", bundle, n=24)
    with LiveServer(create_app(Settings(index=built.index_dir))) as live:
        yield live


def shown_cards(page) -> list[dict]:
    """Per card: its id, and its rerank score's text when the score is shown."""
    return page.evaluate(
        """() => [...document.querySelectorAll('#results .card')].map(c => {
            const r = c.querySelector('.rerank');
            return {id: c.dataset.id, rerank: r.hidden ? null : r.textContent};
        })"""
    )


def expected_cards(answer: dict) -> list[dict]:
    return [{"id": r["id"], "rerank": f"rerank {r['rerank_score']:.3f}" if "rerank_score" in r else None} for r in answer["results"]]


def test_the_rerank_toggle_reranks_and_each_card_shows_its_rerank_score(rerank_server, tmp_path):
    with chromium_page() as page:
        errors: list[str] = []
        page.on("pageerror", lambda exc: errors.append(str(exc)))
        texts: list[dict] = []
        page.on("request", lambda r: texts.append(r.post_data_json) if r.url.endswith("/search/text") else None)
        page.goto(rerank_server.url + "/")
        page.wait_for_selector("#rerank:not([disabled])")  # /readyz says a reranker is loaded
        assert page.is_checked("#rerank")  # on by default, as the service is (VITRINE_RERANK_DEFAULT)

        page.fill("#query", "red tshirts")
        page.click("#text-form button[type=submit]")
        wait_for_grid(page)
        assert texts[-1]["rerank"] is True
        body = {"query": "red tshirts", "k": 24, "rerank": True}
        reranked = httpx.post(f"{rerank_server.url}/search/text", json=body).json()
        assert reranked["reranked"] and reranked["rerank_top_n"] == RERANK_TOP_N
        cards = shown_cards(page)
        assert cards == expected_cards(reranked)  # the reranked order, a score on each of the top N and no other
        assert all(c["rerank"] for c in cards[:RERANK_TOP_N]) and not any(c["rerank"] for c in cards[RERANK_TOP_N:])
        assert f"reranked top {RERANK_TOP_N}" in page.inner_text("#status")
        page.screenshot(path=str(tmp_path / "reranked.png"), full_page=True)

        page.uncheck("#rerank")  # re-runs the search without the reranker
        page.wait_for_function("() => !document.querySelector('#status').textContent.includes('reranked') && "
                               "document.querySelectorAll('#results .card').length > 0")  # fmt: skip
        assert texts[-1]["rerank"] is False
        plain = httpx.post(f"{rerank_server.url}/search/text", json={**body, "rerank": False}).json()
        assert shown_cards(page) == expected_cards(plain) and not any(c["rerank"] for c in shown_cards(page))
        assert [c["id"] for c in shown_cards(page)] != [c["id"] for c in cards]  # the toggle changed the order

        page.check("#rerank")  # a photo query is reranked too (the reranker is aligned)
        page.wait_for_function("() => document.querySelector('#status').textContent.includes('reranked')")
        photo = tmp_path / "my-photo.jpg"
        photo.write_bytes(jpeg_bytes((200, 30, 30)))
        page.set_input_files("#photo", str(photo))
        page.wait_for_function("() => document.querySelector('#query-photo').hidden === false && "
                               "document.querySelector('#status').textContent.includes('reranked')")  # fmt: skip
        wait_for_grid(page)
        upload = {"image": ("q.jpg", photo.read_bytes(), "image/jpeg")}
        answer = httpx.post(f"{rerank_server.url}/search/image", files=upload, data={"k": "24", "rerank": "true"}).json()
        assert answer["reranked"] and shown_cards(page) == expected_cards(answer)
        # the form sends the toggle (rerank=false), not the server's default (on): the photo's plain order
        page.uncheck("#rerank")
        page.wait_for_function("() => !document.querySelector('#status').textContent.includes('reranked') && "
                               "document.querySelectorAll('#results .card').length > 0")  # fmt: skip
        plain = httpx.post(f"{rerank_server.url}/search/image", files=upload, data={"k": "24", "rerank": "false"}).json()
        assert not plain["reranked"] and shown_cards(page) == expected_cards(plain) != expected_cards(answer)
        assert not errors, errors
