"""The web page marks backfilled attribute values and sends include_predicted (headless Chromium)."""
from __future__ import annotations

from pathlib import Path

import pytest

from indexer.backfill import rewrite_store
from indexer.store import StoredProduct
from search.service import Settings, create_app
from tests.support.browser import chromium_page
from tests.support.service import LiveServer, build_bundle_index

pytestmark = [pytest.mark.browser, pytest.mark.torch]
HIDDEN = "100"  # fixture product 0: a Men's product, its gender removed and predicted


@pytest.fixture(scope="module")
def server(tmp_path_factory: pytest.TempPathFactory, tiny_bundle: Path):
    built = build_bundle_index(tmp_path_factory.mktemp("browser-attributes"), tiny_bundle, n=24)

    def edit(store, folder, previous) -> dict:
        record = store.get(HIDDEN)
        assert record.attributes.pop("gender") == "Men"
        store.put_many([StoredProduct(record, store.image_ref(HIDDEN), store.content_hashes()[HIDDEN])])
        store.put_predicted([(HIDDEN, "gender", "Men", 0.93)])
        return {}

    rewrite_store(built.index_dir, edit, operation="backfill")
    with LiveServer(create_app(Settings(index=built.index_dir))) as live:
        yield live


def test_predicted_values_are_marked_and_the_switch_widens_filters(server):
    with chromium_page() as page:
        errors: list[str] = []
        page.on("pageerror", lambda exc: errors.append(str(exc)))
        page.goto(server.url + "/")
        page.wait_for_selector("#filters select[name=gender]")
        page.select_option("#filters select[name=gender]", "Men")
        page.fill("#query", "men")
        page.click("#text-form button[type=submit]")
        page.wait_for_selector("#results .card")
        ids = page.eval_on_selector_all("#results .card", "cards => cards.map(c => c.dataset.id)")
        assert HIDDEN not in ids  # its gender is not in the catalog: a plain filter cannot see it
        page.check("#include-predicted")
        page.click("#text-form button[type=submit]")
        page.wait_for_selector(f'#results .card[data-id="{HIDDEN}"]')
        mark = page.locator(f'#results .card[data-id="{HIDDEN}"] .meta .predicted')
        assert mark.text_content() == "Men"
        assert "predicted" in mark.get_attribute("title") and "93 %" in mark.get_attribute("title")
        assert page.locator("#results .card .meta .predicted").count() == 1  # catalog values stay unmarked
        assert not errors, errors
