"""The protocol's report: tables of docs/results.md (between its protocol markers) from the results JSON.

Per model and ratio, the cells of one variant are pooled over calibration seeds: each evaluation window's
NLL is averaged over the seeds, then compared with the dense model (or the default) on the same windows by
a paired bootstrap over windows (offline/protocol_scores.py). "Out of domain" pools the windows of every
text other than the calibration domain. The validation split chooses: per ratio the variant whose worse
of (in-domain, out-of-domain) validation perplexity ratio is lowest wins (`selection_score`), since a
method that wins only in-domain does not win; the test split is what the tables report.
"""

from __future__ import annotations

from collections import defaultdict
from pathlib import Path
from statistics import mean

from offline.protocol_scores import bootstrap_ppl_ratio

REPO = Path(__file__).resolve().parent.parent
JSON_PATH = REPO / "docs" / "results-protocol.json"
DOC_PATH = REPO / "docs" / "results.md"
BEGIN, END = "<!-- protocol:begin (offline/results_protocol.py writes this part) -->", "<!-- protocol:end -->"


def _pooled_windows(cells: list[dict], split: str, sources: list[str]) -> tuple[list[float], int]:
    """Per-window NLL averaged over the cells (seeds), windows of `sources` concatenated."""
    windows: list[float] = []
    tokens = None
    for source in sources:
        per_seed = [cell["scores"][split][source]["nll"] for cell in cells]
        windows += [mean(values) for values in zip(*per_seed)]
        tokens = cells[0]["scores"][split][source]["tokens_per_window"]
    return windows, tokens


def _dense_windows(dense: dict, split: str, sources: list[str]) -> list[float]:
    return [value for source in sources for value in dense[split][source]["nll"]]


def _ratio_cell(a: list[float], b: list[float], tokens: int) -> dict:
    value, low, high = bootstrap_ppl_ratio(a, b, tokens)
    return {"ratio": value, "low": low, "high": high}


def summarize(entry: dict, split: str) -> dict[float, dict[str, dict]]:
    """{ratio: {variant: summary}} of one model on one split."""
    in_domain, others = [entry["calib_source"]], [s for s in entry["eval_sources"] if s != entry["calib_source"]]
    groups: dict[tuple[float, str], list[dict]] = defaultdict(list)
    for cell in entry["cells"]:
        if "scores" in cell:  # an unreachable cell has none (listed under the table)
            groups[(cell["ratio"], cell["variant"])].append(cell)
    from offline.results_protocol import DEFAULT, VARIANTS

    default_label = DEFAULT.label
    order = {variant.label: i for i, variant in enumerate(VARIANTS)}
    table: dict[float, dict[str, dict]] = defaultdict(dict)
    def position(item) -> tuple[float, int]:  # by ratio, then in the order of VARIANTS (the default first)
        (ratio, label), _ = item
        return ratio, order.get(label, len(order))

    for (ratio, label), cells in sorted(groups.items(), key=position):
        row = {"seeds": sorted(c["seed"] for c in cells), "achieved": mean(c["achieved_ratio"] for c in cells),
               "ppl": [c["scores"][split][in_domain[0]]["ppl"] for c in cells],
               "kl": mean(c["scores"][split][in_domain[0]]["kl"] for c in cells),
               "top1": mean(c["scores"][split][in_domain[0]]["top1"] for c in cells)}
        for key, sources in (("in", in_domain), ("ood", others)):
            nll, tokens = _pooled_windows(cells, split, sources)
            row[f"{key}_vs_dense"] = _ratio_cell(nll, _dense_windows(entry["dense"], split, sources), tokens)
            default_cells = groups.get((ratio, default_label))
            if default_cells and label != default_label:
                reference, _ = _pooled_windows(default_cells, split, sources)
                row[f"{key}_vs_default"] = _ratio_cell(nll, reference, tokens)
        table[ratio][label] = row
    return table


def selection_score(row: dict) -> tuple[float, float]:
    """The worse of the in-domain and out-of-domain ppl ratios to dense (then in-domain, for ties). An
    out-of-domain ratio below 1 counts as 1: beating the dense model on text it cannot model (moe_mini
    on the Python docs: dense ppl above 10,000) is a change of its errors, not quality."""
    in_domain = row["in_vs_dense"]["ratio"]
    return max(in_domain, row["ood_vs_dense"]["ratio"], 1.0), in_domain


def validation_winners(entry: dict, servable_only: bool = False) -> dict[float, str]:
    """Per ratio, the variant with the lowest `selection_score` on the validation split (among the ones
    vLLM's fused MoE kernels serve, with `servable_only`). Scores equal to 6 digits (variants that wrote the
    same checkpoint up to float noise, e.g. the output-basis variant where the default keeps no bases) go
    to the earlier variant in `VARIANTS`, the default first."""
    from offline.results_protocol import VARIANTS, variant_named

    order = [v.label for v in VARIANTS]

    def key(label: str) -> tuple[float, float, int]:
        worst, in_domain = selection_score(rows[label])
        return round(worst, 6), round(in_domain, 6), order.index(label)

    winners = {}
    for ratio, rows in summarize(entry, "validation").items():
        labels = [label for label in rows if variant_named(label).servable or not servable_only]
        winners[ratio] = min(labels, key=key)
    return winners


def _interval(cell: dict | None) -> str:
    if cell is None:
        return "(reference)"
    return f"{cell['ratio']:.3f} [{cell['low']:.3f}-{cell['high']:.3f}]"


def _spread(values: list[float]) -> str:
    return f"{mean(values):.2f}" + (f" [{min(values):.2f}-{max(values):.2f}]" if len(values) > 1 else "")


def model_section(name: str, entry: dict) -> list[str]:
    from offline.results_protocol import variant_named

    dense_test = entry["dense"]["test"]
    lines = [f"### {name}: calibrated on {entry['calib_source']} (train split)", "",
             "Dense test perplexity: " + ", ".join(f"{s} {dense_test[s]['ppl']:.2f}" for s in entry["eval_sources"])
             + f" ({len(dense_test[entry['calib_source']]['nll'])} windows of "
               f"{dense_test[entry['calib_source']]['tokens_per_window'] + 1} tokens per text).", ""]
    winners, servable = validation_winners(entry), validation_winners(entry, servable_only=True)
    lines += ["| removed (asked / achieved) | variant | seeds | in-domain test ppl, mean [min-max] | in-domain x dense "
              "[95 % CI] | out-of-domain x dense [95 % CI] | KL in-domain | top-1 in-domain | x default in-domain | "
              "x default out-of-domain |", "|---|---|---|---|---|---|---|---|---|---|"]
    for ratio, rows in summarize(entry, "test").items():
        for label, row in rows.items():
            marks = [text for text, chosen in (("validation winner", winners), ("best servable on validation",
                                                                                 servable)) if chosen.get(ratio) == label]
            mark = f" **({', '.join(marks)})**" if marks else ""
            if not variant_named(label).servable:
                label += " (not servable)"
            lines.append(
                f"| {ratio:.0%} / {row['achieved']:.1%} | {label}{mark} | {len(row['seeds'])} | {_spread(row['ppl'])} | "
                f"{_interval(row['in_vs_dense'])} | {_interval(row['ood_vs_dense'])} | {row['kl']:.4f} | "
                f"{row['top1']:.3f} | {_interval(row.get('in_vs_default'))} | {_interval(row.get('ood_vs_default'))} |")
    unreachable = sorted({(c["ratio"], c["variant"]) for c in entry["cells"] if "unreachable" in c})
    if unreachable:
        lines += ["", "Not reachable near the default's parameter count (the variant's rank / neuron steps): "
                  + "; ".join(f"{label} at {ratio:.0%}" for ratio, label in unreachable) + "."]
    return lines + [""]


def render(results: dict) -> str:
    lines = [BEGIN, "", "Regenerate: `python -m offline.results_protocol` (the grid) or "
             "`python -m offline.results_protocol --render-only` (these tables from docs/results-protocol.json).", ""]
    for name, entry in sorted(results["models"].items()):
        if entry.get("cells"):
            lines += model_section(name, entry)
    return "\n".join(lines + [END])


def write_report(results: dict, doc: Path) -> None:
    """Replace the text between the protocol markers of `doc` (appended at the end if there are none)."""
    text = doc.read_text(encoding="utf-8") if doc.exists() else ""
    section = render(results)
    if BEGIN in text and END in text:
        head, rest = text.split(BEGIN, 1)
        text = head + section + rest.split(END, 1)[1]
    else:
        text = text.rstrip("\n") + "\n\n## The results protocol (issue 13)\n\n" + section + "\n"
    doc.write_text(text, encoding="utf-8")
