"""Whether ExPO works, measured: several methods, same seed, questions, budget and evaluation set, side by side.

    python compare.py                                   # expo, grpo, grpo_sft_gt: the default run of each
    python compare.py --methods expo grpo --out runs/cmp -- --steps 20 --eval_limit 100 --drop_truncated

Every flag after `--` (or any flag compare.py does not know) goes to each `train.py` run unchanged, so the runs
differ only in `--method`. Each run writes its own folder (OUT/METHOD); the initial model is evaluated once, by the
first run, since every run starts from the same weights and evaluates the same questions with the same seed.
Then one table (printed, and written as OUT/compare.md to paste into a README) and one figure (OUT/compare.png,
when matplotlib is installed) show, per method:
  * pass@1 and pass@k before -> after, each with its standard error over questions: a difference of less than about
    two standard errors is noise;
  * the commit rate (share of eval completions with an answer the checker can extract) and the accuracy among
    committed answers: the first rises when a model learns the answer *format*, the second when it learns to *solve*;
  * the mean train reward per step, and the share of all-wrong groups, where GRPO's advantage is zero everywhere.
"""
from __future__ import annotations

import argparse
import json
import time
from pathlib import Path

import train

DEFAULT_METHODS = ("expo", "grpo", "grpo_sft_gt")


def run_all(methods: list[str], out: Path, train_args: list[str]) -> dict[str, float]:
    """Train each method into out/METHOD with the same flags; returns the wall seconds of each run."""
    seconds = {}
    for i, method in enumerate(methods):
        extra = [] if i == 0 else ["--no-eval_before"]  # the first run's "before" serves every method
        start = time.perf_counter()
        print(f"\n=== {method} ({i + 1}/{len(methods)}) ===", flush=True)
        train.main(["--method", method, "--output_dir", str(out / method), *extra, *train_args])
        seconds[method] = time.perf_counter() - start
    return seconds


def read_run(folder: Path) -> tuple[list[dict], dict[str, dict]]:
    """(training step records, eval records by label) of one run's metrics.jsonl."""
    records = [json.loads(line) for line in open(folder / "metrics.jsonl") if line.strip()]
    return [r for r in records if "eval" not in r], {r["eval"]: r for r in records if "eval" in r}


def summarize(methods: list[str], out: Path, seconds: dict[str, float] | None = None) -> list[dict]:
    """One row per method: its before/after eval (before taken from the first run) and its training statistics."""
    before = read_run(out / methods[0])[1]["before"]
    rows = []
    for method in methods:
        steps, evals = read_run(out / method)
        rows.append({"method": method, "before": before["all"], "after": evals["after"]["all"],
                     "reward": [s["reward"] for s in steps], "all_wrong": [s["all_wrong"] for s in steps],
                     "seconds": (seconds or {}).get(method)})
    return rows


def markdown(rows: list[dict], k: int) -> str:
    """The comparison as a Markdown table: mean ± standard error over questions."""
    def pm(r: dict, key: str) -> str:
        return f"{r[key]:.3f} ± {r[key + '_se']:.3f}"

    lines = [f"| method | pass@1 before | pass@1 after | pass@{k} before | pass@{k} after | commit before → after "
             "| accuracy among committed, before → after | train reward, mean (first → last step) "
             "| all-wrong groups, mean | minutes |", "|" + "---|" * 10]
    for r in rows:
        b, a, reward, wrong = r["before"], r["after"], r["reward"], r["all_wrong"]
        minutes = f"{r['seconds'] / 60:.1f}" if r["seconds"] else "—"
        lines.append(f"| `{r['method']}` | {pm(b, 'pass@1')} | {pm(a, 'pass@1')} | {pm(b, f'pass@{k}')} | "
                     f"{pm(a, f'pass@{k}')} | {b['commit']:.2f} → {a['commit']:.2f} | "
                     f"{b['acc_committed']:.2f} → {a['acc_committed']:.2f} | "
                     f"{sum(reward) / len(reward):.3f} ({reward[0]:.2f} → {reward[-1]:.2f}) | "
                     f"{sum(wrong) / len(wrong):.2f} | {minutes} |")
    return "\n".join(lines)


def plot(rows: list[dict], k: int, path: Path) -> bool:
    """Train reward and all-wrong share per step, and pass@1 / pass@k before and after with ±1 s.e. bars."""
    try:
        import matplotlib
        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        print("(pip install matplotlib for compare.png; the table above has the same numbers)")
        return False
    fig, axes = plt.subplots(1, 3, figsize=(13, 3.6))
    for r in rows:
        axes[0].plot(r["reward"], label=r["method"])
        axes[1].plot(r["all_wrong"], label=r["method"])
    axes[0].set(title="train reward (mean of the step's rollouts)", xlabel="step")
    axes[1].set(title="all-wrong groups (zero GRPO advantage)", xlabel="step", ylim=(0, 1.05))
    axes[0].legend()
    first = rows[0]["before"]
    for j, metric in enumerate(("pass@1", f"pass@{k}")):
        x = [j * (len(rows) + 2) + i for i in range(len(rows) + 1)]
        values = [first] + [r["after"] for r in rows]
        axes[2].bar(x, [v[metric] for v in values], yerr=[v[metric + "_se"] for v in values], capsize=3,
                    color=["grey"] + [f"C{i}" for i in range(len(rows))])
    axes[2].set_xticks([j * (len(rows) + 2) + len(rows) / 2 for j in range(2)], ["pass@1", f"pass@{k}"])
    axes[2].set(title="eval: initial model (grey), then each method after")
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)
    return True


def main(argv=None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0], epilog="Other flags go to train.py.")
    parser.add_argument("--methods", nargs="+", default=list(DEFAULT_METHODS), choices=train.METHODS)
    parser.add_argument("--out", type=Path, default=Path("runs/compare"), help="a folder per method goes here")
    parser.add_argument("--report_only", action="store_true", help="do not train: tabulate the runs already in --out")
    args, train_args = parser.parse_known_args(argv)
    train_args = [a for a in train_args if a != "--"]
    k = train.parse_args(train_args).eval_k
    seconds = None if args.report_only else run_all(args.methods, args.out, train_args)
    rows = summarize(args.methods, args.out, seconds)
    table = markdown(rows, k)
    (args.out / "compare.md").write_text(table + "\n")
    (args.out / "compare.json").write_text(json.dumps(rows, indent=1))
    print("\n" + table + f"\n\ntable: {args.out / 'compare.md'}")
    if plot(rows, k, args.out / "compare.png"):
        print(f"figure: {args.out / 'compare.png'}")


if __name__ == "__main__":
    import os

    import torch
    torch.set_num_threads(max(1, os.cpu_count() or 1))
    main()
