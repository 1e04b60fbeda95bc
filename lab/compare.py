"""Whether ExPO works, measured: several methods and training seeds, one fixed evaluation set, side by side.

    python -m lab.compare                                   # expo, grpo, grpo_sft_gt: the default run of each, seed 0
    python -m lab.compare --seeds 0 1 2 --out runs/cmp -- --levels 4 5 --steps 20 --eval_limit 80 --max_new_tokens 256
    python -m lab.compare --seeds 0 1 2 --out runs/cmp --report_only -- --levels 4 5 ...   # tabulate what is there

Every flag after `--` (or any flag compare.py does not know) goes to each `train.py` run unchanged, so the runs
differ only in `--method` and `--seed`, and in the flags a variant names: a --methods entry is a method or a method
with flags of its own, METHOD:flag=value[,flag=value...], e.g. `expo:explain_loss=fkl` (folder expo-explain_loss=fkl):

    python -m lab.compare --methods expo expo:explain_loss=fkl expo:explain_loss=rkl --seeds 0 1 2 --out runs/cmp -- ...

The training seed changes the question order and the sampling, never the evaluation: every run is evaluated on the
same questions with the same draws (`--eval_seed`, fixed), and the initial model once, by the first run. Each run
has its own folder, OUT/METHOD/seed-S. A run already complete there (its log has its "after" evaluation) is reused,
and one interrupted after a checkpoint is resumed, so a long comparison can be built over several sittings; a reused
run must have been trained with the same flags (else an error says which).

Then one table (printed, and written as OUT/compare.md to paste into a README), the numbers (OUT/compare.json) and one
figure (OUT/compare.png, when matplotlib is installed) show, per method:
  * pass@1 and pass@k after training, for every seed and as mean ± spread (the standard deviation across seeds),
    beside the evaluation's own standard error over questions: one run cannot rank methods whose seeds spread more
    than their difference;
  * the commit rate (share of eval completions with an answer the checker can extract) and the accuracy among
    committed answers: the first rises when a model learns the answer *format*, the second when it learns to *solve*;
  * pass@1 by level (the paper's per-level view), when the evaluation set has several;
  * the mean train reward, and the share of all-wrong groups, where GRPO's advantage is zero everywhere.
"""
from __future__ import annotations

import argparse
import json
import math
from dataclasses import asdict
from pathlib import Path

from backend import threads
from engine import checkpoint
import train

DEFAULT_METHODS = ("expo", "grpo", "grpo_sft_gt")


def variant_flags(spec: str) -> list[str]:
    """train.py's flags for a --methods entry: METHOD, or METHOD:flag=value[,flag=value...] (a variant)."""
    method, _, rest = spec.partition(":")
    if method not in train.METHODS:
        raise SystemExit(f"error: --methods {spec}: {method!r} is not one of {', '.join(train.METHODS)}")
    flags = ["--method", method]
    for item in filter(None, rest.split(",")):
        name, equals, value = item.partition("=")
        if not (equals and name and value):
            raise SystemExit(f"error: --methods {spec}: write a variant's flags as flag=value, not {item!r}")
        flags += [f"--{name}", value]
    return flags


def run_folder(out: Path, spec: str, seed: int) -> Path:
    """OUT/METHOD/seed-S; a variant's folder is its entry with ':' and ',' as '-' (expo-explain_loss=fkl)."""
    return out / spec.replace(":", "-").replace(",", "-") / f"seed-{seed}"


def is_complete(folder: Path) -> bool:
    """A run is complete once its log holds its "after" evaluation (written after the last step)."""
    try:
        return any(json.loads(line).get("eval") == "after" for line in open(folder / "metrics.jsonl") if line.strip())
    except (OSError, ValueError):
        return False


def initial_evaluation(out: Path) -> tuple[Path, dict] | None:
    """(the run folder, the record) of the initial model's evaluation in comparison folder `out`, whichever method
    and seed's run made it; None before any run has."""
    for log in sorted(out.glob("*/seed-*/metrics.jsonl")):
        before = read_run(log.parent)[1].get("before")
        if before is not None:
            return log.parent, before
    return None


def run_all(methods: list[str], seeds: list[int], out: Path, train_args: list[str]) -> None:
    """Train each (method, seed) into its folder with the same flags, seed by seed, skipping complete runs and
    resuming interrupted ones (each run's minutes are read back from its log). The initial model is evaluated once
    per folder, by the first run trained there, and reused by every later run and later call (a new seed or method)."""
    found = initial_evaluation(out)
    evaluator = found[0] if found else None  # the run that evaluates (or evaluated) the initial model
    for i, (seed, method) in enumerate([(seed, method) for seed in seeds for method in methods]):
        folder = run_folder(out, method, seed)
        if evaluator is None and not is_complete(folder):
            evaluator = folder
        flags = [*variant_flags(method), "--seed", str(seed), "--output_dir", str(folder), *train_args]
        if folder != evaluator:
            flags.append("--no-eval_before")  # one "before" serves every method and seed
        if is_complete(folder):
            try:  # the same flags, or an error that names those that differ
                checkpoint.check_config(folder, asdict(train.parse_args(flags)))
            except checkpoint.RunFolderError as e:
                raise SystemExit(f"error: {e}") from None
            print(f"=== {method}, seed {seed}: complete in {folder}, reused", flush=True)
            continue
        if checkpoint.latest(folder):
            flags.append("--resume")
        elif folder.exists():
            flags.append("--overwrite")  # an earlier start of this run that wrote no checkpoint: nothing to keep
        print(f"\n=== {method}, seed {seed} ({i + 1}/{len(methods) * len(seeds)}) ===", flush=True)
        train.main(flags)


def read_run(folder: Path) -> tuple[list[dict], dict[str, dict]]:
    """(training step records, eval records by label) of one run's metrics.jsonl."""
    records = [json.loads(line) for line in open(folder / "metrics.jsonl") if line.strip()]
    return [r for r in records if "eval" not in r], {r["eval"]: r for r in records if "eval" in r}


def mean_sd(values: list[float]) -> tuple[float, float]:
    """Mean and standard deviation across seeds (0 for one seed)."""
    mean = sum(values) / len(values)
    sd = math.sqrt(sum((v - mean) ** 2 for v in values) / (len(values) - 1)) if len(values) > 1 else 0.0
    return mean, sd


def summarize(methods: list[str], seeds: list[int], out: Path, k: int) -> dict:
    """The initial model's evaluation and, per method, every complete seed's results and their mean and spread."""
    found = initial_evaluation(out)
    if found is None:
        raise SystemExit(f"error: no run in {out} has evaluated the initial model (the first run of a comparison does)")
    before, rows = found[1], []
    for method in methods:
        runs = []
        for seed in seeds:
            folder = run_folder(out, method, seed)
            if not is_complete(folder):
                continue
            steps, evals = read_run(folder)
            after = evals["after"]
            runs.append({"seed": seed, "after": after["all"], "by_level": after.get("level", {}),
                         "reward": [s["reward"] for s in steps], "all_wrong": [s["all_wrong"] for s in steps],
                         "t_step": sum(s["t_step"] for s in steps) / len(steps),
                         "minutes": sum(s["t_step"] for s in steps) / 60 + after["t_eval"] / 60})
        if not runs:
            continue
        row = {"method": method, "runs": runs}
        for metric in ("pass@1", f"pass@{k}", "commit", "acc_committed"):
            row[metric] = mean_sd([r["after"][metric] for r in runs])
            row[metric + "_eval_se"] = sum(r["after"].get(metric + "_se", 0.0) for r in runs) / len(runs)
        row["by_level"] = {level: mean_sd([r["by_level"][level]["pass@1"] for r in runs])
                           for level in runs[0]["by_level"]}
        for metric in ("tokens", "cut_off"):  # the eval completions' length (logs before 2026-12-06 lack it)
            values = [r["after"][metric] for r in runs if metric in r["after"]]
            row[metric] = sum(values) / len(values) if values else None
        row["t_step"] = sum(r["t_step"] for r in runs) / len(runs)
        row["reward"] = sum(sum(r["reward"]) / len(r["reward"]) for r in runs) / len(runs)
        row["all_wrong"] = sum(sum(r["all_wrong"]) / len(r["all_wrong"]) for r in runs) / len(runs)
        rows.append(row)
    return {"before": before, "methods": rows, "k": k}


def length(tokens: float | None, cut_off: float | None) -> str:
    """An eval's mean completion length and cut-off share as a table cell ("—" for logs that lack them)."""
    return "—" if tokens is None else f"{tokens:.0f} ({cut_off:.2f})"


def markdown(summary: dict) -> str:
    """The comparison as Markdown: after training, each seed and mean ± spread across seeds; then pass@1 by level."""
    k, before = summary["k"], summary["before"]
    lines = [f"| method | seeds | pass@1, each seed | pass@1, mean ± sd over seeds (eval s.e.) | pass@{k}, each seed | "
             f"pass@{k}, mean ± sd (eval s.e.) | commit | accuracy among committed | eval tokens (cut off) | "
             "train reward | all-wrong groups | s per step | minutes per run |", "|" + "---|" * 13]
    b = before["all"]
    lines.append(f"| initial model | — | {b['pass@1']:.3f} | {b['pass@1']:.3f} ({b['pass@1_se']:.3f}) | "
                 f"{b[f'pass@{k}']:.3f} | {b[f'pass@{k}']:.3f} ({b[f'pass@{k}_se']:.3f}) | {b['commit']:.2f} | "
                 f"{b['acc_committed']:.2f} | {length(b.get('tokens'), b.get('cut_off'))} | — | — | — | — |")
    for r in summary["methods"]:
        runs = r["runs"]

        def each(metric):
            return ", ".join(f"{run['after'][metric]:.3f}" for run in runs)

        def agg(metric):
            (mean, sd), se = r[metric], r[metric + "_eval_se"]
            return f"{mean:.3f} ± {sd:.3f} ({se:.3f})"

        minutes = sum(run["minutes"] for run in runs) / len(runs)
        lines.append(f"| `{r['method']}` | {', '.join(str(run['seed']) for run in runs)} | {each('pass@1')} | "
                     f"{agg('pass@1')} | {each(f'pass@{k}')} | {agg(f'pass@{k}')} | {r['commit'][0]:.2f} | "
                     f"{r['acc_committed'][0]:.2f} | {length(r['tokens'], r['cut_off'])} | {r['reward']:.3f} | "
                     f"{r['all_wrong']:.2f} | {r['t_step']:.0f} | {minutes:.0f} |")
    levels = list(before.get("level", {}))
    if levels:
        lines += ["", "pass@1 by level, mean ± sd over seeds:", "",
                  "| method | " + " | ".join(f"level {lv}" for lv in levels) + " |", "|" + "---|" * (len(levels) + 1),
                  "| initial model | " + " | ".join(f"{before['level'][lv]['pass@1']:.3f}" for lv in levels) + " |"]
        for r in summary["methods"]:
            lines.append(f"| `{r['method']}` | " + " | ".join(
                f"{r['by_level'][lv][0]:.3f} ± {r['by_level'][lv][1]:.3f}" for lv in levels) + " |")
    return "\n".join(lines)


def grouped_bars(ax, groups: dict[str, str], initial: dict, rows: list[dict], value, title: str) -> None:
    """For each group (key -> label): the initial model's bar, and each method's mean bar with every seed a point;
    `initial[key]` and `value(run, key)` give the numbers."""
    width = 0.8 / (len(rows) + 1)
    for j, key in enumerate(groups):
        ax.bar(j, initial[key], width, color="grey", label="initial" if j == 0 else None)
        for i, r in enumerate(rows):
            x, seeds = j + (i + 1) * width, [value(run, key) for run in r["runs"]]
            ax.bar(x, sum(seeds) / len(seeds), width, color=f"C{i}", alpha=0.4, label=r["method"] if j == 0 else None)
            ax.plot([x] * len(seeds), seeds, "o", color=f"C{i}", ms=3)
    ax.set_xticks([j + 0.4 for j in range(len(groups))], list(groups.values()))
    ax.set(title=title)


def plot(summary: dict, path: Path) -> bool:
    """pass@1 and pass@k after training (every seed a point, the mean a bar), pass@1 by level, and format against
    solving: the commit rate and the accuracy among committed answers."""
    try:
        import matplotlib
        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        print("(pip install matplotlib for compare.png; the table above has the same numbers)")
        return False
    k, before, rows = summary["k"], summary["before"], summary["methods"]
    levels = list(before.get("level", {}))
    fig, axes = plt.subplots(1, 4 if levels else 3, figsize=(16 if levels else 12, 3.8))

    def after(run, key):
        return run["after"][key]

    for ax, metric in zip(axes, ("pass@1", f"pass@{k}")):
        grouped_bars(ax, {metric: metric}, before["all"], rows, after, f"{metric} after training (points: seeds)")
    if levels:
        grouped_bars(axes[2], {lv: f"level {lv}" for lv in levels},
                     {lv: before["level"][lv]["pass@1"] for lv in levels}, rows,
                     lambda run, lv: run["by_level"][lv]["pass@1"], "pass@1 by level")
    grouped_bars(axes[-1], {"commit": "commit rate\n(format)", "acc_committed": "accuracy among\ncommitted (solving)"},
                 before["all"], rows, after, "format vs solving")
    handles, labels = axes[0].get_legend_handles_labels()  # one legend under the panels: none hides a seed's point
    fig.legend(handles, labels, loc="lower center", ncol=len(labels), fontsize=8, frameon=False)
    fig.tight_layout(rect=(0, 0.08, 1, 1))
    fig.savefig(path, dpi=110)
    plt.close(fig)
    return True


def main(argv=None) -> dict:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0], epilog="Other flags go to train.py.")
    parser.add_argument("--methods", nargs="+", default=list(DEFAULT_METHODS),
                        help=f"each METHOD ({', '.join(train.METHODS)}) or a variant METHOD:flag=value[,flag=value]")
    parser.add_argument("--seeds", nargs="+", type=int, default=[0], help="training seeds: one run per method each")
    parser.add_argument("--out", type=Path, default=Path("runs/compare"), help="OUT/METHOD/seed-S per run")
    parser.add_argument("--report_only", action="store_true", help="do not train: tabulate the complete runs in --out")
    args, train_args = parser.parse_known_args(argv)
    train_args = [a for a in train_args if a != "--"]
    k = train.parse_args(train_args).eval_k
    for spec in args.methods:  # a bad variant fails now, not after hours of the runs before it
        train.parse_args(variant_flags(spec) + train_args)
    if not args.report_only:
        run_all(args.methods, args.seeds, args.out, train_args)
    summary = summarize(args.methods, args.seeds, args.out, k)
    table = markdown(summary)
    (args.out / "compare.md").write_text(table + "\n")
    (args.out / "compare.json").write_text(json.dumps(summary, indent=1))
    print("\n" + table + f"\n\ntable: {args.out / 'compare.md'}")
    if plot(summary, args.out / "compare.png"):
        print(f"figure: {args.out / 'compare.png'}")
    return summary


if __name__ == "__main__":
    threads.use_this_process_cpus()  # its CPU affinity's, or OMP_NUM_THREADS
    main()
