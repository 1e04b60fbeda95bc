"""The distance experiment's figure and table: expert SFT's pass@1 against how far its expert text sits from the policy.

    python -m lab.distance --compare docs/cmp-relatives/compare.json --base docs/cmp-arith45/analysis-base.json \
        --styles rpn=docs/distance/analysis-base-rpn.json lisp=docs/distance/analysis-base-lisp.json \
        latin=docs/distance/analysis-base-latin.json --out docs/distance/distance

The x axis is each style's distance, the expert solutions' NLL per token under the answer-free prompt over the
self-explanations' (both from `python -m lab.analyze`, on the same questions); the y axis is pass@1 after training,
from a `python -m lab.compare` summary. Each `grpo_sft_gt` style is a column of points, one per seed, with its mean;
`expo` and `grpo` do not depend on the expert text and are drawn as bands (mean ± spread over seeds). Writes OUT.md
(the table) and OUT.png (the figure; needs matplotlib). The protocol and the reading rule: docs/distance-protocol.md.
"""
from __future__ import annotations

import argparse
import json
from pathlib import Path


def ratio(analysis: dict) -> float:
    """Expert NLL per token over the self-explanations' (a `lab.analyze --json` record)."""
    return analysis["expert"]["nll_per_token"] / analysis["self_explanation"]["nll_per_token"]


def points(summary: dict, ratios: dict[str, float]) -> list[dict]:
    """One row per expert style found in the comparison: its ratio and its runs' results."""
    rows = []
    for style, x in sorted(ratios.items(), key=lambda kv: kv[1]):
        name = "grpo_sft_gt" if style == "worded" else f"grpo_sft_gt:expert_style={style}"
        found = [m for m in summary["methods"] if m["method"] == name]
        if found and found[0]["runs"]:
            rows.append({"style": style, "ratio": x, **found[0]})
    return rows


def band(summary: dict, method: str) -> dict | None:
    return next((m for m in summary["methods"] if m["method"] == method and m["runs"]), None)


def fmt(pair) -> str:
    return f"{pair[0]:.3f} ± {pair[1]:.3f}"


def markdown(rows: list[dict], bands: dict[str, dict]) -> str:
    head = ("| expert text | NLL ratio | seeds | pass@1, each seed | pass@1, mean ± sd | pass@4, mean ± sd | commit "
            "| accuracy among committed | eval tokens (cut off) |\n|---|---|---|---|---|---|---|---|---|")
    lines = [head]
    for label, x, m in [(f"`grpo_sft_gt`, {r['style']}", f"{r['ratio']:.2f}x", r) for r in rows] + \
                       [(f"`{name}` (no expert text)", "—", m) for name, m in bands.items()]:
        seeds = ", ".join(str(r["seed"]) for r in m["runs"])
        each = ", ".join(f"{r['after']['pass@1']:.3f}" for r in m["runs"])
        lines.append(f"| {label} | {x} | {seeds} | {each} | {fmt(m['pass@1'])} | {fmt(m['pass@4'])} "
                     f"| {m['commit'][0]:.2f} | {m['acc_committed'][0]:.2f} | {m['tokens']:.0f} ({m['cut_off']:.2f}) |")
    return "\n".join(lines)


def plot(rows: list[dict], bands: dict[str, dict], before: float, path: Path) -> bool:
    try:
        import matplotlib
        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        print("(pip install matplotlib for the figure; the table has the same numbers)")
        return False
    fig, ax = plt.subplots(figsize=(6.4, 4.2))
    lo, hi = min(r["ratio"] for r in rows) - 0.15, max(r["ratio"] for r in rows) + 0.15
    for (name, m), color in zip(bands.items(), ["tab:green", "tab:gray"]):
        mean, sd = m["pass@1"]
        ax.fill_between([lo, hi], mean - sd, mean + sd, color=color, alpha=0.18, lw=0)
        ax.axhline(mean, color=color, lw=1.2, label=f"{name} (mean ± sd over seeds)")
    ax.axhline(before, color="black", lw=0.8, ls=":", label="initial model")
    for r in rows:
        ys = [run["after"]["pass@1"] for run in r["runs"]]
        ax.scatter([r["ratio"]] * len(ys), ys, color="tab:blue", s=22, zorder=3)
        ax.plot([r["ratio"] - 0.05, r["ratio"] + 0.05], [r["pass@1"][0]] * 2, color="tab:blue", lw=2, zorder=3)
        ax.annotate(r["style"], (r["ratio"], max(ys)), textcoords="offset points", xytext=(0, 6), ha="center",
                    fontsize=8)
    ax.scatter([], [], color="tab:blue", s=22, label="grpo_sft_gt: seeds (bar: mean)")
    top = max([run["after"]["pass@1"] for r in rows for run in r["runs"]] + [sum(m["pass@1"]) for m in bands.values()])
    ax.set_xlim(lo, hi)
    ax.set_ylim(-0.02 * top, 1.2 * top)
    ax.set_xlabel("expert text's NLL per token / the self-explanations' (distance from the policy)")
    ax.set_ylabel("pass@1 after 20 steps")
    ax.set_title("Expert SFT as its text moves away from the policy (arith levels 4-5)", fontsize=10)
    ax.legend(fontsize=7, loc="upper right", frameon=False)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)
    return True


def main(argv=None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--compare", type=Path, required=True, help="a `lab.compare` summary (compare.json)")
    parser.add_argument("--base", type=Path, required=True, help="the default (worded) style's `lab.analyze --json`")
    parser.add_argument("--styles", nargs="+", default=[], help="STYLE=path/to/analysis.json, one per other style")
    parser.add_argument("--out", type=Path, required=True, help="writes OUT.md and OUT.png")
    args = parser.parse_args(argv)
    ratios = {"worded": ratio(json.loads(args.base.read_text()))}
    for spec in args.styles:
        style, _, path = spec.partition("=")
        if not path:
            parser.error(f"--styles takes STYLE=PATH, not {spec!r}")
        ratios[style] = ratio(json.loads(Path(path).read_text()))
    summary = json.loads(args.compare.read_text())
    rows = points(summary, ratios)
    bands = {name: m for name in ("expo", "grpo") if (m := band(summary, name))}
    if not rows:
        raise SystemExit(f"error: {args.compare} has no grpo_sft_gt run of the styles {sorted(ratios)}")
    table = markdown(rows, bands)
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.with_suffix(".md").write_text(table + "\n")
    print(table + f"\n\ntable: {args.out.with_suffix('.md')}")
    if plot(rows, bands, summary["before"]["all"]["pass@1"], args.out.with_suffix(".png")):
        print(f"figure: {args.out.with_suffix('.png')}")


if __name__ == "__main__":
    main()
