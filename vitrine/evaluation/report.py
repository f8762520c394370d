"""Evaluation reports: metrics.json, a markdown table and a recall@K plot."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np

from vitrine.errors import UserError

JSON_NAME = "metrics.json"
MARKDOWN_NAME = "metrics.md"
PLOT_NAME = "recall_at_k.png"

_DIRECTIONS = {"t2i": "T2I (text → image)", "i2t": "I2T (image → text)"}


def _json_default(value: object) -> object:
    if isinstance(value, np.generic):
        return value.item()
    if isinstance(value, np.ndarray):
        return value.tolist()
    raise TypeError(f"not JSON serialisable: {type(value).__name__}")


def to_json(report: dict) -> str:
    return json.dumps(report, indent=2, ensure_ascii=False, default=_json_default) + "\n"


def _pct(value: float) -> str:
    return f"{100 * value:.2f}"


def render_markdown(report: dict) -> str:
    """Tables of the headline numbers (percent): one row per protocol × direction, then T2P and I2P."""
    config, counts = report["config"], report["counts"]
    lines = [
        "# Vitrine evaluation",
        "",
        f"Encoder: `{report['encoder']['description']}` (d = {report['encoder']['dim']}) · "
        f"catalog: `{config.get('catalog', '?')}` · split: {config.get('split', '?')} · "
        f"products: {counts['products']} · distinct texts: {counts['distinct_texts']} · "
        f"seed: {config['seed']}",
        "",
    ]
    retrieval = report.get("retrieval", {})
    if retrieval:
        lines += [
            "## Cross-modal retrieval",
            "",
            "Recall in %; ties count against the model.",
            "",
            "| Protocol | Direction | Queries | Candidates / query | R@1 | R@5 | R@10 | Median rank |",
            "|---|---|---:|---:|---:|---:|---:|---:|",
        ]
        for protocol, directions in retrieval.items():
            for direction, m in directions.items():
                lines.append(
                    f"| {protocol} | {_DIRECTIONS.get(direction, direction)} | {m['queries']} "
                    f"| {m['candidates_per_query']} "
                    f"| {_pct(m['R@1'])} | {_pct(m['R@5'])} | {_pct(m['R@10'])} | {m['median_rank']:g} |"
                )
        if "sample" in retrieval:
            s = retrieval["sample"]
            lines += [
                "",
                "Sample protocol: negatives from the query's subcategory; topped up from the whole split "
                f"for {s['t2i']['topped_up_queries']} T2I and {s['i2t']['topped_up_queries']} I2T queries "
                f"(still short of negatives: {s['t2i']['short_queries']} T2I, "
                f"{s['i2t']['short_queries']} I2T).",
            ]
        lines.append("")

    kagl = report.get("kagl")
    if kagl and kagl.get("queries"):
        lines += [
            "## KAGL protocol (Marqo's text-to-image leaderboard protocol)",
            "",
            "Distinct titles as queries; relevant = every gallery product with exactly that title. "
            "R@k = share of the relevant found in the top k. Values in %.",
            "",
            "| Queries | Gallery | R@1 | R@10 | MRR@10 |",
            "|---:|---:|---:|---:|---:|",
            f"| {kagl['queries']} | {kagl['gallery']} ({kagl['gallery_source']}) | {_pct(kagl['R@1'])} "
            f"| {_pct(kagl['R@10'])} | {_pct(kagl['MRR@10'])} |",
            "",
        ]

    search = report.get("product_search", {})
    if search:
        alphas = config["alpha"]
        lines += [f"## Product search (α: T2P {alphas['t2p']:g}, I2P {alphas['i2p']:g})", ""]
        t2p = search.get("t2p")
        if t2p and "skipped" in t2p:
            lines += [f"T2P skipped: {t2p['skipped']}", ""]
        elif t2p:
            lines += [
                "T2P: shopper queries composed from attributes; relevant = products matching all of them. "
                "R@10 (capped) = relevant in top 10 / min(10, relevant). Values in %.",
                "",
                "| Queries | P@1 | P@10 | nDCG@10 | R@10 (capped) |",
                "|---:|---:|---:|---:|---:|",
                f"| {t2p['queries']} | {_pct(t2p['P@1'])} | {_pct(t2p['P@10'])} | {_pct(t2p['nDCG@10'])} "
                f"| {_pct(t2p['R@10_capped'])} |",
                "",
            ]
        i2p = search.get("i2p")
        if i2p:
            lines += [
                "I2P: a transformed product photo (crop, flip, light, JPEG) finds its product. Recall in %.",
                "",
                "| Queries | Candidates / query | R@1 | R@5 | R@10 | R@20 |",
                "|---:|---:|---:|---:|---:|---:|",
                f"| {i2p['queries']} | {i2p['candidates_per_query']} "
                f"| {_pct(i2p['R@1'])} | {_pct(i2p['R@5'])} "
                f"| {_pct(i2p['R@10'])} | {_pct(i2p['R@20'])} |",
                "",
            ]
    return "\n".join(lines)


def recall_curves(report: dict) -> dict[str, list[float]]:
    """Label -> [R@1, ..., R@K] for every protocol and direction in the report."""
    curves = {}
    for protocol, directions in report.get("retrieval", {}).items():
        for direction, m in directions.items():
            curves[f"{protocol} {direction.upper()}"] = m["recall_curve"]
    i2p = report.get("product_search", {}).get("i2p")
    if i2p:
        curves["I2P"] = i2p["recall_curve"]
    return curves


def plot_recall_curves(report: dict, path: Path) -> None:
    """A PNG of R@K against K, one line per protocol and direction."""
    import matplotlib

    matplotlib.use("Agg")  # no display; must precede pyplot
    import matplotlib.pyplot as plt
    from matplotlib.ticker import MaxNLocator

    fig, ax = plt.subplots(figsize=(7, 4.5), dpi=100)
    for label, curve in recall_curves(report).items():
        ax.plot(range(1, len(curve) + 1), curve, marker="o", markersize=3, label=label)
    ax.xaxis.set_major_locator(MaxNLocator(integer=True))
    ax.set_xlabel("K")
    ax.set_ylabel("Recall@K")
    ax.set_ylim(0, 1)
    ax.grid(alpha=0.3)
    ax.set_title(f"{report['encoder']['description']} · {report['config'].get('split', '')}", fontsize=9)
    if ax.lines:
        ax.legend(fontsize=8)
    fig.tight_layout()
    fig.savefig(path)
    plt.close(fig)


def write_report(report: dict, out_dir: Path) -> dict[str, Path]:
    """Write metrics.json, metrics.md and recall_at_k.png into `out_dir` (created if needed)."""
    out_dir = Path(out_dir)
    try:
        out_dir.mkdir(parents=True, exist_ok=True)
    except OSError as exc:
        raise UserError(f"cannot create output folder {out_dir}: {exc}") from exc
    if not out_dir.is_dir():
        raise UserError(f"output path {out_dir} is not a folder")
    paths = {"json": out_dir / JSON_NAME, "markdown": out_dir / MARKDOWN_NAME, "plot": out_dir / PLOT_NAME}
    paths["json"].write_text(to_json(report), encoding="utf-8")
    paths["markdown"].write_text(render_markdown(report), encoding="utf-8")
    plot_recall_curves(report, paths["plot"])
    return paths
