"""What a run says about itself: the progress bar, the closing lines that say what was learnt, and curve.png.

A learner should be able to tell from a run's own output, without the README, whether ExPO did anything: in ExPO's
regime most groups are all wrong, so GRPO's term is exactly zero and the train reward sits at 0.00 while the policy
learns from its self-explanations alone. So the bar shows the targets and their loss beside the reward, and the
closing lines count the steps in which GRPO had no gradient and the targets trained on instead.
"""
from __future__ import annotations

import json
from pathlib import Path

import torch

import evaluate
import reward
from engine import distributed


def progress(stats: dict) -> dict[str, str]:
    """The progress bar's fields after a step: the reward, the rollout rows with a gradient (a nonzero advantage),
    and for methods with a likelihood term its targets and their loss (DPO: its pairs and loss)."""
    fields = {"reward": f"{stats['reward']:.2f}"}
    if "pg_rows" in stats:
        fields["pg_rows"] = f"{stats['pg_rows']:.0f}"
    if stats.get("targets"):
        fields.update(targets=f"{stats['targets']:.0f}", loss_sft=f"{stats.get('loss_sft', 0.0):.3f}")
    if "pairs" in stats:
        fields.update(pairs=f"{stats['pairs']:.0f}", loss_dpo=f"{stats['loss_dpo']:.3f}")
    return fields


def steps_of(out: Path) -> tuple[list[dict], list[dict]]:
    """(the step records, the evaluation records) of a run's metrics.jsonl."""
    records = [json.loads(line) for line in open(out / "metrics.jsonl") if line.strip()]
    return [r for r in records if "eval" not in r], [r for r in records if "eval" in r]


def learnt(out: Path, cfg, before: dict | None, after: dict) -> str:
    """The closing lines: the before/after table, then the scores with their standard errors, what `commit` means,
    the steps in which every group was all wrong (GRPO's term exactly zero), the targets trained on, and where to read
    the samples."""
    k, steps = cfg.eval_k, steps_of(out)[0]
    a = after["all"]
    lines = ["", evaluate.table(before, after, k) if before else evaluate.table(after, None, k), ""]
    b = before["all"] if before else None

    def moved(name: str) -> str:
        se = f" ± {a[name + '_se']:.3f}" if name + "_se" in a else ""
        return (f"{b[name]:.3f} -> " if b else "") + f"{a[name]:.3f}{se}"

    lines.append(f"What the run learnt ({len(steps)} steps; ± is the standard error over {a['n']} questions):")
    lines.append(f"  pass@1 {moved('pass@1')}, pass@{k} {moved(f'pass@{k}')}")
    lines.append(f"  commit {moved('commit')}: the share of completions that end in an answer the checker can read "
                 "(the format);")
    lines.append(f"  accuracy among committed answers {moved('acc_committed')} (solving)")
    if steps and "all_wrong" in steps[0]:
        no_signal = sum(s["all_wrong"] == 1.0 for s in steps)
        lines.append(f"  GRPO's term was exactly zero in {no_signal} of {len(steps)} steps (every group all wrong: "
                     "advantage 0 on every rollout)")
    if cfg.method in ("expo", "grpo_sft_gt") and cfg.explain_loss == "nll":
        total = {key: int(sum(s.get(key, 0) for s in steps)) for key in
                 ("targets", "explanations", "explain_cut_off", "explain_reached", "targets_finished")}
        if cfg.method == "expo":  # the mechanism's health: explanations that finish, and reach the gold alone
            lines.append(f"  {total['explanations']} self-explanations sampled: {total['explain_cut_off']} cut off by "
                         f"the budget, {total['explain_reached']} reached the gold answer alone")
            lines.append(f"  {total['targets']} self-explanation targets trained on, beta = {cfg.beta}: "
                         f"{total['targets_finished']} finished explanations, "
                         f"{total['targets'] - total['targets_finished']} cut off and closed with the answer line")
        else:
            lines.append(f"  {total['targets']} expert-solution targets trained on, beta = {cfg.beta}")
    lines.append(f"  read the rollouts and targets of each step in {out / 'samples.md'}")
    return "\n".join(lines)


def plot_curve(out: Path) -> None:
    """curve.png: what moves in ExPO's regime -- the train reward, the likelihood term's loss, and the evaluations'
    pass@1 (with its standard error) and commit rate -- when matplotlib is installed."""
    try:
        import matplotlib
        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        print("(pip install matplotlib for curve.png; or plot metrics.jsonl with any tool)")
        return
    steps, evals = steps_of(out)
    fig, (left, right) = plt.subplots(1, 2, figsize=(9, 3.3))
    x = [r["step"] for r in steps]
    left.plot(x, [r["reward"] for r in steps], label="train reward (mean)")
    if any("loss_sft" in r for r in steps):
        left.plot(x, [r.get("loss_sft", float("nan")) for r in steps], label="likelihood term's loss (NLL / token)")
    left.set_xlabel("step")
    left.legend(fontsize=8)
    at = [r["step"] for r in evals]
    p1 = [r["all"]["pass@1"] for r in evals]
    right.errorbar(at, p1, yerr=[r["all"].get("pass@1_se", 0.0) for r in evals], marker="o", capsize=3,
                   label="eval pass@1 (± s.e.)")
    right.plot(at, [r["all"]["commit"] for r in evals], "s--", label="eval commit rate")
    right.set_xlabel("step")
    right.set_ylim(0, 1)
    right.legend(fontsize=8)
    fig.tight_layout()
    fig.savefig(out / "curve.png", dpi=120)
    plt.close(fig)


# --------------------------------------------------------------------------------------------- a step's log line


def sampling_stats(roll, rewards: torch.Tensor, explanations, group_size: int, t_sample: float, batch=()) -> dict:
    """What every method logs about its samples: rewards, all-wrong / all-right groups, lengths, tokens per second,
    and given the `batch`, `restated`: the rollouts the checker refused for restating their question."""
    groups = rewards.view(-1, group_size)  # [B, G]
    drawn = sum(float(x.completion_mask.sum()) for x in (roll, explanations) if x is not None)  # tokens sampled
    stats = {"reward": float(rewards.mean()), "all_wrong": float((groups.sum(1) == 0).float().mean()),
             "all_right": float((groups.sum(1) == group_size).float().mean()),
             "completion_len": float(roll.completion_mask.sum(1).float().mean()),
             "truncated": float(roll.truncated.float().mean()), "gen_tok_s": drawn / max(t_sample, 1e-9)}
    if batch:
        stats["restated"] = sum(reward.refused(text, batch[i].answer, batch[i].question) == "restates the question"
                                for text, i in zip(roll.texts, roll.prompt_index.tolist()))
    return stats if explanations is None else {**stats, **explanation_stats(explanations)}


def explanation_stats(explanations) -> dict:
    """The sampled self-explanations' mean length and the share cut off by the budget."""
    return {"explain_len": float(explanations.completion_mask.sum(1).float().mean()),
            "explain_truncated": float(explanations.truncated.float().mean())}


def update_stats(sums: dict, roll, scored: list[list[int]], ranks, distill: bool = False) -> dict:
    """The update's statistics from its summed micro-batch values: the losses as summed, the rest as means over
    every rank's rollout tokens (clip_frac, kl) or scored tokens (entropy, the sampler's mismatch)."""
    mask = roll.completion_mask
    tokens, scored_tokens = distributed.all_sum(
        [float(mask.sum()), float(mask[[i for rows in scored for i in rows]].sum())], ranks)
    stats = {"loss_pg": sums.get("loss_pg", 0.0), "clip_frac": sums.get("clipped", 0.0) / max(1.0, tokens),
             "kl": sums.get("kl", 0.0) / max(1.0, tokens), "loss_sft": sums.get("loss_sft", 0.0)}
    if distill:  # fkl / rkl: the term is a KL (variants/distill.py), logged under its own name
        stats["loss_sft"], stats["loss_distill"] = 0.0, stats["loss_sft"]
    if scored_tokens:  # over every rank's scored tokens (this rank may have none)
        stats["entropy"] = sums.get("entropy", 0.0) / scored_tokens
        if roll.sampler_logp is not None:  # sampled rollouts (not fixed texts): the sampler against the trainer
            stats.update(mismatch_log_ratio=sums.get("log_ratio", 0.0) / scored_tokens,
                         mismatch_k3=sums.get("k3", 0.0) / scored_tokens,
                         mismatch_max_ratio=sums.get("max_ratio", 1.0))
    return stats


def first_target(texts: list[str | None], explanations) -> str | None:
    """samples.md's target of the step's first question: the target, or the explanation a filter dropped."""
    if texts[0] is not None or explanations is None:
        return texts[0]
    return f"(dropped: see --drop_leaks/_truncated/_wrong/--explain_on) {explanations.texts[0]}"
