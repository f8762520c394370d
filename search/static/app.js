// Vitrine search page: plain JS against the JSON API (no build step).
"use strict";

const $ = (id) => document.getElementById(id);
const MAX_FILTER_VALUES = 80; // fields with more values (ids, free text) are not offered as menus
const MAX_FACETS = 16; // the API's limit on facet fields per request
const FACET_VALUES_SHOWN = 6; // most frequent values shown under each filter
let lastSearch = null; // {kind: "text", query} | {kind: "image", file} | {kind: "similar", id, title}
let reranker = { loaded: false }; // GET /readyz's reranker: loaded, image_queries (an aligned one), top_n

// The rerank field a search of `kind` sends: the toggle, where the reranker can read that kind of query
// (photos: an aligned reranker only); otherwise nothing, and the server's default applies.
function rerankOption(kind) {
  if (!reranker.loaded || (kind === "image" && !reranker.image_queries)) return {};
  return { rerank: $("rerank").checked };
}

// Facets: the fields offered as filter menus, counted over the first-stage top N of each search.
function facetFields() {
  return [...document.querySelectorAll("#filters select")].map((s) => s.name).slice(0, MAX_FACETS);
}

function options() {
  const out = { k: Number($("k").value) };
  if ($("alpha-custom").checked) out.alpha = Number($("alpha").value);
  const filters = {};
  for (const select of document.querySelectorAll("#filters select")) {
    if (select.value) filters[select.name] = select.value;
  }
  if (Object.keys(filters).length) out.filters = filters;
  const facets = facetFields();
  if (facets.length) out.facets = facets;
  if ($("include-predicted").checked) out.include_predicted = true;
  return out;
}

// Catalog values as text; backfilled ones (hit.predicted) marked, with their confidence on hover.
function renderMeta(meta, hit) {
  const attrs = hit.attributes || {};
  const predicted = hit.predicted || {};
  const names = ["gender", "baseColour", ...Object.keys(predicted).filter((n) => n !== "gender" && n !== "baseColour")];
  const parts = [];
  for (const name of names) {
    if (attrs[name]) {
      parts.push(document.createTextNode(attrs[name]));
    } else if (predicted[name]) {
      const mark = document.createElement("span");
      mark.className = "predicted";
      mark.textContent = predicted[name].value;
      mark.title = `${name} predicted from photo and title, confidence ${Math.round(predicted[name].confidence * 100)} %`;
      parts.push(mark);
    }
  }
  const category = hit.subcategory || hit.category;
  if (category) parts.push(document.createTextNode(category));
  meta.replaceChildren();
  parts.forEach((node, i) => {
    if (i) meta.appendChild(document.createTextNode(" · "));
    meta.appendChild(node);
  });
}

function showError(message) {
  const box = $("error");
  box.textContent = message;
  box.hidden = !message;
}

async function callApi(url, init) {
  let response;
  try {
    response = await fetch(url, init);
  } catch (err) {
    throw new Error(`cannot reach the server (${err.message})`);
  }
  let body = null;
  try {
    body = await response.json();
  } catch (_) {
    /* not JSON */
  }
  if (!response.ok) {
    const message = body && body.error ? body.error.message : `HTTP ${response.status}`;
    throw new Error(message);
  }
  return body;
}

function render(data) {
  const grid = $("results");
  grid.replaceChildren();
  const template = $("card-template");
  for (const hit of data.results) {
    const card = template.content.firstElementChild.cloneNode(true);
    card.dataset.id = hit.id;
    const img = card.querySelector(".thumb");
    img.src = hit.image_url;
    img.alt = hit.title;
    card.querySelector(".title").textContent = hit.title;
    renderMeta(card.querySelector(".meta"), hit);
    card.querySelector(".fused").textContent = hit.score.toFixed(3);
    const rerank = card.querySelector(".rerank");
    if (typeof hit.rerank_score === "number") {
      rerank.textContent = `rerank ${hit.rerank_score.toFixed(3)}`;
      rerank.title = "the cross-encoder's rerank score (the order of the reranked top N)";
      rerank.hidden = false;
    }
    card.querySelector(".parts").textContent = Object.entries(hit.parts)
      .map(([name, value]) => `${name} ${value.toFixed(3)}`)
      .join(" · ");
    card.title = `id ${hit.id}`;
    card.querySelector(".more-like-this").addEventListener("click", () => {
      $("query-photo").src = hit.image_url; // the product the results are like
      $("query-photo").hidden = false;
      run({ kind: "similar", id: hit.id, title: hit.title });
    });
    grid.appendChild(card);
  }
  renderFacets(data.facets || {}, data.facet_top_n);
  const n = data.results.length;
  const like = lastSearch && lastSearch.kind === "similar" ? ` like “${lastSearch.title}”` : "";
  const mode = data.mode && data.mode !== "vector" ? `, ${data.mode}` : "";
  const reranked = data.reranked ? `, reranked top ${data.rerank_top_n}` : "";
  $("status").textContent = `${n} result${n === 1 ? "" : "s"}${like} in ${data.took_ms.toFixed(1)} ms (α ${data.alpha.toFixed(2)}${mode}${reranked})`;
}

// Under each filter menu, its most frequent values among the top N candidates; a click applies one.
function renderFacets(facets, topN) {
  for (const select of document.querySelectorAll("#filters select")) {
    const box = select.parentElement.querySelector(".facet");
    box.replaceChildren();
    const values = facets[select.name] || [];
    box.title = topN ? `counts over the top ${topN} candidates` : "";
    for (const { value, count } of values.slice(0, FACET_VALUES_SHOWN)) {
      const chip = document.createElement("button");
      chip.type = "button";
      chip.className = "facet-value";
      chip.dataset.value = value;
      chip.textContent = value;
      const number = document.createElement("span");
      number.className = "count";
      number.textContent = String(count);
      chip.appendChild(number);
      const active = select.value.toLowerCase() === value.toLowerCase();
      chip.classList.toggle("active", active);
      chip.addEventListener("click", () => {
        const option = [...select.options].find((o) => o.value.toLowerCase() === value.toLowerCase());
        select.value = active || !option ? "" : option.value;
        if (lastSearch) run(lastSearch);
      });
      box.appendChild(chip);
    }
  }
}

async function run(search) {
  lastSearch = search;
  showError("");
  $("status").textContent = "searching…";
  try {
    let data;
    if (search.kind === "similar") {
      const opts = options();
      const params = new URLSearchParams({ k: String(opts.k) });
      if (opts.alpha !== undefined) params.set("alpha", String(opts.alpha));
      if (opts.filters) params.set("filters", JSON.stringify(opts.filters));
      for (const field of opts.facets || []) params.append("facets", field);
      data = await callApi(`/products/${encodeURIComponent(search.id)}/similar?${params}`);
    } else if (search.kind === "text") {
      data = await callApi("/search/text", {
        method: "POST",
        headers: { "Content-Type": "application/json" },
        body: JSON.stringify({ query: search.query, ...options(), mode: $("mode").value, ...rerankOption("text") }),
      });
    } else {
      const form = new FormData();
      form.append("image", search.file);
      const opts = options();
      form.append("k", String(opts.k));
      if (opts.alpha !== undefined) form.append("alpha", String(opts.alpha));
      if (opts.filters) form.append("filters", JSON.stringify(opts.filters));
      if (opts.facets) form.append("facets", JSON.stringify(opts.facets));
      if (opts.include_predicted) form.append("include_predicted", "true");
      const rerank = rerankOption("image");
      if (rerank.rerank !== undefined) form.append("rerank", String(rerank.rerank));
      data = await callApi("/search/image", { method: "POST", body: form });
    }
    render(data);
  } catch (err) {
    $("results").replaceChildren();
    renderFacets({});
    $("status").textContent = "";
    showError(err.message);
  }
}

async function loadFilters() {
  try {
    const data = await callApi("/filters");
    const box = $("filters");
    for (const [field, values] of Object.entries(data.fields)) {
      if (!values.length || values.length > MAX_FILTER_VALUES) continue;
      const label = document.createElement("label");
      label.textContent = field;
      const select = document.createElement("select");
      select.name = field;
      select.add(new Option("any", ""));
      for (const value of values) select.add(new Option(value, value));
      select.addEventListener("change", () => lastSearch && run(lastSearch));
      label.appendChild(select);
      const facet = document.createElement("div");
      facet.className = "facet";
      label.appendChild(facet);
      box.appendChild(label);
    }
  } catch (err) {
    showError(`filters unavailable: ${err.message}`);
  }
}

async function loadDefaults() {
  try {
    const ready = await callApi("/readyz");
    if (ready.index && typeof ready.index.alpha_text === "number") {
      $("alpha").value = ready.index.alpha_text;
      $("alpha-value").textContent = `${ready.index.alpha_text.toFixed(2)} text, ${ready.index.alpha_image.toFixed(2)} photo (index)`;
    }
    if (ready.reranker && ready.reranker.loaded) {
      reranker = ready.reranker;
      $("rerank").disabled = false;
      $("rerank").checked = Boolean(ready.reranker.default_on);
      $("rerank-label").title = `reorder the top ${ready.reranker.top_n} by the cross-encoder` +
        (ready.reranker.image_queries ? " (text and photo queries)" : " (text queries; this reranker cannot read a photo)");
    }
  } catch (_) {
    /* the slider keeps its default; no rerank toggle */
  }
}

$("text-form").addEventListener("submit", (event) => {
  event.preventDefault();
  const query = $("query").value.trim();
  if (!query) return;
  $("query-photo").hidden = true;
  run({ kind: "text", query });
});

$("photo").addEventListener("change", () => {
  const file = $("photo").files[0];
  if (!file) return;
  const preview = $("query-photo");
  preview.src = URL.createObjectURL(file);
  preview.hidden = false;
  run({ kind: "image", file });
});

$("alpha-custom").addEventListener("change", () => {
  $("alpha").disabled = !$("alpha-custom").checked;
  $("alpha-value").textContent = $("alpha-custom").checked ? Number($("alpha").value).toFixed(2) : "index default";
  if (lastSearch) run(lastSearch);
});
$("alpha").addEventListener("change", () => {
  $("alpha-value").textContent = Number($("alpha").value).toFixed(2);
  if (lastSearch) run(lastSearch);
});
$("k").addEventListener("change", () => lastSearch && run(lastSearch));
$("rerank").addEventListener("change", () => lastSearch && lastSearch.kind !== "similar" && run(lastSearch));
$("mode").addEventListener("change", () => lastSearch && lastSearch.kind === "text" && run(lastSearch));
$("clear-filters").addEventListener("click", () => {
  for (const select of document.querySelectorAll("#filters select")) select.value = "";
  if (lastSearch) run(lastSearch);
});

loadFilters();
loadDefaults();
