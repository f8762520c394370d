"""Facet counts: how many of a query's top-N first-stage candidates have each value of a filterable field.

    {"facets": ["baseColour", "gender"]}  ->  "facets": {"baseColour": [{"value": "Red", "count": 41}, ...], ...}

N is VITRINE_FACET_TOP_N (1..MAX_FACET_TOP_N, default 100), whatever k is. It never exceeds
`indexer.product_index.MIN_FETCH_K`: every query's candidate pool (the union of the title and the
image top-`fetch_k`) already holds at least that many products, so the engine ranks N instead of k
from the same pool (the top k are the same as without facets) and counts over records it fetches in
one store read. Reranking reorders the top rerank_top_n only; counts are over the first-stage top N.
Values are grouped as filters compare them (`match_key`: trimmed, case-insensitive), shown as first
seen, most frequent first; products without a value for the field are not counted.
"""
from __future__ import annotations

from collections.abc import Iterable, Mapping, Sequence

from indexer.filters import match_key
from indexer.product_index import MIN_FETCH_K
from search.service.errors import ApiError
from search.service.settings import MAX_FACET_TOP_N
from vitrine.catalog.record import ProductRecord

assert MAX_FACET_TOP_N <= MIN_FETCH_K, "facet counts must come from the candidate pool every query has"
MAX_FACET_VALUES = 50  # values listed per field, most frequent first (a field of ids has thousands)


def resolve_facets(names: Sequence[str], fields: Mapping[str, object], loc: str = "body") -> list[str]:
    """The fields as stored (exact, else case-insensitive, as filters match), each once; 422 unknown_facet otherwise."""
    by_lower = {name.lower(): name for name in fields}
    out: list[str] = []
    for i, name in enumerate(names):
        field = name if name in fields else by_lower.get(name.lower())
        if field is None:
            known = ", ".join(sorted(fields)) or "(none)"
            message = f"unknown facet field {name!r}; facets are the filterable fields: {known}"
            raise ApiError(422, "unknown_facet", message, [{"loc": [loc, "facets", i], "msg": message}])
        if field not in out:
            out.append(field)
    return out


def count_facets(records: Iterable[ProductRecord | None], fields: Sequence[str]) -> dict[str, list[dict[str, object]]]:
    """Field -> [{value, count}], most frequent first (ties by value), at most MAX_FACET_VALUES values."""
    records = [r for r in records if r is not None]
    out: dict[str, list[dict[str, object]]] = {}
    for field in fields:
        counts: dict[str, int] = {}
        shown: dict[str, str] = {}
        for record in records:
            value = record.attribute(field)
            key = match_key(value)
            if key:
                counts[key] = counts.get(key, 0) + 1
                shown.setdefault(key, value.strip())
        ordered = sorted(counts, key=lambda key: (-counts[key], key))[:MAX_FACET_VALUES]
        out[field] = [{"value": shown[key], "count": counts[key]} for key in ordered]
    return out
