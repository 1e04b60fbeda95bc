"""Train a policy with ExP-GRPO (ExPO), GRPO, GRPO + expert SFT, or DPO on self-explanations / expert solutions.

    python train.py                                   # the CPU demo: embedded SmolLM2-135M on the arith task
    python train.py --method grpo                     # the same run without the self-explanation term
    python train.py --model Qwen/Qwen2.5-1.5B-Instruct --dataset math --levels 5 ...   # see README: GPU recipe

One ExP-GRPO step (`Trainer.grpo_step`), for a batch of B questions:
  1. sample G answer-free rollouts per question from the current policy (rollout.sample, prompt expo.solve_prompt),
     and one self-explanation per question with the answer in the prompt (expo.explain_prompt) in the same call:
     one row per explain prompt beside the G per solve prompt, so it costs no second decode loop
  2. score the rollouts with the verifier (reward.score), normalise rewards within each group (expo.group_advantages)
  3. turn each self-explanation into a target ending in \\boxed{gold} (expo.explanation_target), paired with the
     *answer-free* prompt: the hint is never in the context the target is scored under (`sft_targets`)
  4. choose the rows the policy gradient scores and freeze their old / reference log-probs when needed
  5. for each PPO epoch: loss = grpo_loss(rollouts) + beta(step) * sft_loss(targets), accumulated over
     micro-batches so that their sum is exactly the full-batch loss; clip the gradient norm; one optimizer step
`--method grpo` has no targets in 3, `grpo_sft_gt` uses the dataset's expert solutions, and `--explain_on failed`
explains only the all-wrong groups (it needs step 2's rewards first, so a second sampling call). The DPO methods
(`DPOTrainer`) pair a chosen response (a self-explanation, or the expert solution for `dpo_gt`) with one of the
policy's own wrong rollouts and minimise expo.dpo_loss against the frozen initial policy.

Design choices, each for a reason:
* Weights and optimizer state stay fp32; on a GPU the forward passes run under bf16 autocast. Pure-bf16 weights
  would silently drop updates smaller than 1/256 of a weight, which at RL learning rates is most of them.
* Each step's batch and sampling seed are functions of (seed, step), so `--resume` replays exactly the run that was
  interrupted (tested), and two methods with the same seed see the same questions in the same order. The evaluation
  set and its draws depend on --eval_seed only, so training seeds never change what a run is measured on.
* Every micro-batch loss is weighted by one rule (expo.accumulation_weight), so micro-batches and ranks add up to the
  full-batch loss. A step whose loss or gradient is not finite is skipped and logged; it never reaches the weights.
* Outputs (in --output_dir, default runs/METHOD-DATASET): metrics.jsonl (one line per step, plus eval lines),
  samples.md (readable rollouts and self-explanations), checkpoint/ (safetensors weights + tokenizer +
  trainer_state.json, loadable with from_pretrained), curve.png when matplotlib is installed. checkpoint.py says how
  the folder is claimed and locked, how resume stays exact, and how SIGTERM stops a run with a checkpoint.
"""
from __future__ import annotations

import argparse
import contextlib
import math
import os
import random
import signal
import sys
import time
from dataclasses import dataclass, field, fields
from pathlib import Path
from types import SimpleNamespace

import torch
from tqdm import tqdm

import checkpoint
import data
import distributed
import evaluate
import expo
import reward
import rollout
from run import Run, plot_curve

METHODS = ("expo", "grpo", "grpo_sft_gt", "expo_dpo", "dpo_gt")
# ------------------------------------------------------------------------------------------------------------ flags

SECTIONS = {"method": "the method and the paper's settings", "kl_coef": "the objective",  # first flag -> title
            "explain_on": "self-explanation filters and ablations", "max_new_tokens": "sampling and evaluation",
            "seed": "the run"}


def option(default, help: str, choices=None):
    """A Config field carrying its command-line help (and choices): each flag is declared in one place."""
    return field(default=default, metadata={"help": help, "choices": choices})


@dataclass
class Config:
    # the method and the paper's settings
    method: str = option("expo", "expo = ExP-GRPO; grpo; grpo_sft_gt = GRPO + SFT on expert solutions; expo_dpo; "
                         "dpo_gt = DPO with expert solutions", METHODS)
    model: str | None = option(None, "hub id or local folder (default: the embedded SmolLM2-135M-Instruct)")
    dataset: str = option("arith", "gsm8k | math | math500 | arith | path/to/file.jsonl")
    levels: list[str] | None = option(None, "train and evaluate on these difficulty levels; default: level 2 of arith, "
                                      "every level of other datasets; 'all' for all")
    num_generations: int = option(4, "G: answer-free rollouts sampled per question")
    batch_size: int = option(8, "questions per step, over all ranks under torchrun (each takes its share)")
    beta: float = option(0.04, "weight of the self-explanation (expo) or expert-solution (grpo_sft_gt) term")
    learning_rate: float = option(1e-5, "AdamW learning rate (with --lora_rank, use ~10x the full fine-tuning rate)")
    steps: int = option(7, "training steps")
    # the objective
    kl_coef: float = option(0.0, "weight of the k3 KL penalty to the frozen initial policy (0 = no reference model)")
    clip_eps: float = option(0.2, "PPO clipping range of the token ratio")
    loss_norm: str = option("seq", "seq (DeepSeekMath), token (DAPO) or constant (Dr. GRPO)", expo.LOSS_NORMS)
    adv_scale: str = option("std", "std: (r - mean) / std; none: r - mean (Dr. GRPO)", ("std", "none"))
    beta_schedule: str = option("constant", "constant beta, or linear decay to 0 over --steps", ("constant", "linear"))
    ppo_epochs: int = option(1, "optimizer steps on each batch of rollouts (1 = on-policy, no old-policy pass)")
    max_grad_norm: float = option(1.0, "gradient norm clipping")
    dpo_beta: float = option(0.1, "DPO temperature")
    tis_cap: float = option(0.0, "weight each rollout token's policy-gradient term by min(pi_old / pi_sampler, C): "
                            "the truncated importance-sampling correction for a bf16 sampler (0: off)")
    lora_rank: int = option(0, "train rank-R LoRA adapters on every linear layer instead of all weights (0: off)")
    lora_alpha: float = option(32.0, "LoRA scale: the update is lora_alpha / lora_rank * B A")
    # self-explanation filters and ablations
    explain_on: str = option("all", "self-explain every question (all, the paper) or only all-wrong groups",
                             ("all", "failed"))
    drop_leaks: bool = option(True, "drop self-explanations that mention being given the answer")
    drop_truncated: bool = option(False, "drop self-explanations cut off by --max_new_tokens (else their target is a "
                                  "cut-off explanation with the answer pasted after it)")
    drop_wrong: bool = option(False, "drop self-explanations whose own final answer is not the gold one (else the gold "
                              "answer replaces it in their last box: the paper's target)")
    dpo_refresh: int = option(0, "expo_dpo: 0 = offline (explanations of the initial model), N = renew every N steps")
    # sampling and evaluation
    max_new_tokens: int = option(128, "generation budget of rollouts and self-explanations")
    temperature: float = option(0.7, "sampling temperature; the policy-gradient log-probs are scored at the same "
                                     "temperature, the likelihood terms (self-explanation, expert SFT, DPO) at T = 1")
    sampler_dtype: str = option("auto", "what rollouts, self-explanations and evaluations are sampled from: bf16 = a "
                                "bf16 copy of the policy refreshed after every update, fp32 = the policy itself, auto = "
                                "bf16 where bf16 matmuls are native (CUDA, a CPU with AMX / AVX512-BF16)",
                                ("auto", "fp32", "bf16"))
    eval_every: int = option(0, "evaluate every N steps (0 = only before and after training)")
    eval_before: bool = option(True, "evaluate before training (compare.py does it once for all runs)")
    eval_k: int = option(4, "samples per eval question: reports pass@1 and pass@k")
    eval_temperature: float = option(0.7, "sampling temperature of evaluation (the paper: 0.7)")
    eval_limit: int | None = option(24, "evaluate a fixed random subset of this many test questions ('all')")
    eval_max_new_tokens: int | None = option(None, "generation budget of evaluation (default: --max_new_tokens)")
    eval_seed: int = option(0, "seed of the evaluation subset and its sampling: fixed, so every training seed and "
                            "method is evaluated on the same questions with the same draws")
    # the run
    seed: int = option(0, "seed of the training run: question order and sampling (never the evaluation)")
    grad_accum: int = option(4, "micro-batches per optimizer step (same gradient, less memory)")
    gradient_checkpointing: bool = option(False, "recompute activations in the backward pass to save memory")
    save_every: int = option(0, "write a checkpoint every N steps (0: only by time, at the end, and when stopped)")
    save_every_minutes: float = option(30.0, "write a checkpoint after a step when this many minutes passed since the "
                                       "last one (0: off): bounds what a hard kill loses")
    output_dir: str | None = option(None, "where metrics.jsonl, samples.md, checkpoint/ and curve.png go "
                                    "(default: runs/METHOD-DATASET)")
    resume: bool = option(False, "continue the run in output_dir from its newest checkpoint, as if uninterrupted")
    overwrite: bool = option(False, "start afresh in an output_dir that holds a run, deleting that run's files")
    device: str = option("auto", "auto | cpu | cuda | cuda:N")
    dtype: str = option("auto", "auto (bf16 autocast on a GPU, fp32 on a CPU) | fp32 | bf16", ("auto", "fp32", "bf16"))


def _optional_int(text: str) -> int | None:
    return None if text.lower() in ("all", "none") else int(text)


def parse_args(argv=None) -> Config:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0],
                                     formatter_class=argparse.ArgumentDefaultsHelpFormatter)
    group = parser
    for f in fields(Config):  # in sections, as Config lists them
        flag, help_, choices = f"--{f.name}", f.metadata["help"], f.metadata["choices"]
        group = parser.add_argument_group(SECTIONS[f.name]) if f.name in SECTIONS else group
        if f.type == "bool":
            group.add_argument(flag, action=argparse.BooleanOptionalAction, default=f.default, help=help_)
        elif f.name == "levels":
            group.add_argument(flag, nargs="+", default=None, help=help_)
        else:
            kind = {"int": int, "float": float, "str": str, "int | None": _optional_int, "str | None": str}[f.type]
            group.add_argument(flag, type=kind, default=f.default, choices=choices, help=help_)
    cfg = Config(**vars(parser.parse_args(argv)))
    try:
        cfg.levels = data.parse_levels(cfg.dataset, cfg.levels)
    except data.DataError as e:
        parser.error(f"--{e}")
    cfg.output_dir = cfg.output_dir or f"runs/{cfg.method}-{Path(cfg.dataset).stem}"
    problems = [msg for bad, msg in [
        (cfg.num_generations < 2, "--num_generations must be at least 2 (advantages compare rollouts in a group)"),
        (cfg.batch_size < 1 or cfg.steps < 1 or cfg.ppo_epochs < 1, "--batch_size, --steps, --ppo_epochs must be >= 1"),
        (cfg.grad_accum < 1, "--grad_accum must be >= 1"),
        (cfg.beta < 0 or cfg.kl_coef < 0, "--beta and --kl_coef must be >= 0"),
        (not 0 < cfg.clip_eps < 1, "--clip_eps must be in (0, 1)"),
        (cfg.temperature <= 0 or cfg.eval_temperature <= 0, "temperatures must be > 0"),
        (cfg.learning_rate <= 0, "--learning_rate must be > 0"),
        (cfg.max_new_tokens < 1, "--max_new_tokens must be >= 1"),
        (cfg.save_every_minutes < 0, "--save_every_minutes must be >= 0"),
        (cfg.resume and cfg.overwrite, "--resume continues a run and --overwrite replaces it: choose one"),
    ] if bad]
    if problems:
        parser.error(problems[0])
    return cfg


# ---------------------------------------------------------------------------------------------------------- helpers


def batch_indices(n: int, batch_size: int, step: int, seed: int) -> list[int]:
    """The questions of `step`: consecutive slices of per-epoch shuffles, a pure function of (seed, step)."""
    out = []
    for position in range(step * batch_size, (step + 1) * batch_size):
        epoch, offset = divmod(position, n)
        order = list(range(n))
        random.Random(f"{seed}/{epoch}").shuffle(order)
        out.append(order[offset])
    return out


def step_seed(seed: int, step: int, salt: int = 0, rank: int = 0) -> int:
    """The sampling seed of a step; each rank draws its own (rank 0's is the single-process seed)."""
    return (seed * 1_000_003 + step * 7919 + salt + rank * 104_729) % (2**31)


def micro_batches(n_rows: int, grad_accum: int) -> list[list[int]]:
    size = math.ceil(n_rows / grad_accum)
    return [list(range(i, min(i + size, n_rows))) for i in range(0, n_rows, size)]


def target_batch(tokenizer, questions: list[str], targets: list[str], turn_end: int) -> rollout.Rollouts:
    """Targets as completions of the *answer-free* solve prompt: the hint is never in the context they are scored in.
    Each ends in the chat template's turn-end token (`rollout.turn_end_id`)."""
    return rollout.encode_targets(tokenizer, [expo.solve_prompt(q) for q in questions], targets, turn_end)


def logprobs(model, batch: rollout.Rollouts, rows, temperature: float, **kw):
    return rollout.token_logprobs(model, batch.prompt_ids[rows], batch.prompt_mask[rows], batch.completion_ids[rows],
                                  temperature, **kw)


def trainer_for(cfg: Config) -> "Trainer":
    """The trainer of `cfg.method`: Trainer for the GRPO family, DPOTrainer for the DPO family."""
    return {"expo_dpo": DPOTrainer, "dpo_gt": DPOTrainer}.get(cfg.method, Trainer)(cfg)


# ------------------------------------------------------------------------------------------------------ the trainer


class Trainer(Run):
    """The GRPO family (expo, grpo, grpo_sft_gt): `grpo_step` is one step of the paper's algorithm box; `train` the
    loop. Its folder, model, logs, evaluation and checkpoints are `Run`'s (run.py); DPOTrainer overrides `update`."""

    # ---------------------------------------------------------------------------------------------------- sampling

    def seed(self, salt: int = 0) -> int:
        return step_seed(self.cfg.seed, self.step, salt, self.ranks.rank)

    def sample(self, user_texts: list[str], group_size: int | list[int], seed: int, model=None) -> rollout.Rollouts:
        prompts = rollout.encode_prompts(self.tokenizer, user_texts)
        model = model or self.sampler
        with self.sampling(model):
            return rollout.sample(model, self.tokenizer, prompts, group_size, self.cfg.max_new_tokens,
                                  self.cfg.temperature, seed=seed)

    def rollouts(self, batch: list[data.Example], explain: bool = False):
        """G answer-free rollouts per question, their 0/1 rewards [B*G], the stats every method logs, and with
        `explain` one self-explanation per question (else None), drawn in the same sampling call as the rollouts:
        decoding is latency-bound, so B more rows cost little, while a second call would cost a second decode loop."""
        B, G = len(batch), self.cfg.num_generations
        prompts = [expo.solve_prompt(e.question) for e in batch]
        if explain:
            prompts += [expo.explain_prompt(e.question, e.answer) for e in batch]
        t0 = time.perf_counter()
        out = self.sample(prompts, [G] * B + [1] * (len(prompts) - B), self.seed())
        t_sample = time.perf_counter() - t0
        roll, explanations = out, None  # without explain prompts, the call's rows are exactly the rollouts
        if explain:
            roll, explanations = out.select(range(B * G)), out.select(range(B * G, len(out.texts)))
        rewards = torch.tensor([reward.score(text, batch[i].answer)
                                for text, i in zip(roll.texts, roll.prompt_index.tolist())])  # [B*G]
        groups = rewards.view(-1, G)  # [B, G]
        stats = {"reward": float(rewards.mean()), "all_wrong": float((groups.sum(1) == 0).float().mean()),
                 "all_right": float((groups.sum(1) == G).float().mean()),
                 "completion_len": float(roll.completion_mask.sum(1).float().mean()),
                 "truncated": float(roll.truncated.float().mean()),
                 "gen_tok_s": float(out.completion_mask.sum()) / max(t_sample, 1e-9), "t_sample": t_sample}
        return roll, rewards, stats, explanations

    def self_explanations(self, questions: list[data.Example], sampled: rollout.Rollouts) -> tuple[list, dict]:
        """Training targets from sampled self-explanations (one row per question): each with its final answer set to
        \\boxed{gold} (expo.explanation_target), or None where a filter drops it, and the stats that count why."""
        cfg, targets, reasons = self.cfg, [], []
        correct = [reward.score(t, e.answer) for t, e in zip(sampled.texts, questions)]  # before the answer is swapped
        for text, e, cut, right in zip(sampled.texts, questions, sampled.truncated.tolist(), correct):
            reason = ("leak" if cfg.drop_leaks and expo.mentions_hint(text) else
                      "truncated" if cfg.drop_truncated and cut else
                      "wrong" if cfg.drop_wrong and not right else None)
            reasons.append(reason)
            targets.append(None if reason else expo.explanation_target(text, e.answer))
        stats = {"explain_len": float(sampled.completion_mask.sum(1).float().mean()),
                 "explain_dropped": reasons.count("leak"), "explain_dropped_truncated": reasons.count("truncated"),
                 "explain_dropped_wrong": reasons.count("wrong"),
                 "explain_truncated": float(sampled.truncated.float().mean()),
                 "explain_correct": sum(correct) / len(correct)}
        return targets, stats

    # ------------------------------------------------------------------------------------------------ GRPO family

    def update(self, batch: list[data.Example]) -> dict:
        """The method's step on this rank's questions (DPOTrainer overrides it)."""
        return self.grpo_step(batch)

    def grpo_step(self, batch: list[data.Example]) -> dict:
        """One step of ExP-GRPO (GRPO, GRPO + expert SFT) on this rank's questions, as in the paper's algorithm box."""
        cfg, G = self.cfg, self.cfg.num_generations
        # 1. G answer-free rollouts per question, and (the paper's setting) each question's self-explanation
        explain_now = cfg.method == "expo" and cfg.explain_on == "all"
        roll, rewards, stats, explanations = self.rollouts(batch, explain=explain_now)
        # 2. group-normalised advantages: zero for every row of an all-equal group
        adv = expo.group_advantages(rewards, G, cfg.adv_scale).to(self.device)  # [B*G]
        # 3. the likelihood term's targets, as completions of the answer-free prompt
        targets, target_stats, first_target = self.sft_targets(batch, rewards, explanations)
        # 4. the rows the policy gradient scores, and their frozen old / reference log-probs
        rows = self.scored_rows(adv)
        old, ref = self.frozen_logprobs(roll, rows)
        # 5. grpo_loss + beta * sft_loss, accumulated over micro-batches; one optimizer step per PPO epoch
        beta = expo.beta_at(self.step, cfg.steps, cfg.beta, cfg.beta_schedule)
        t_update = time.perf_counter()
        for _ in range(cfg.ppo_epochs):
            self.optimizer.zero_grad(set_to_none=True)
            pg_stats = self.policy_gradient_pass(roll, adv, rows, old, ref)
            loss_sft = self.sft_pass(targets, beta)
            grad_norm = self.optimizer_step()
        self.write_samples(batch[0], roll.texts[:G], rewards[:G].tolist(), first_target)
        return {**stats, **target_stats, **pg_stats, "loss_sft": loss_sft, "grad_norm": grad_norm, "beta": beta,
                "targets": 0 if targets is None else len(targets.texts), "pg_rows": sum(len(r) for r in rows),
                "t_update": time.perf_counter() - t_update}

    def sft_targets(self, batch: list[data.Example], rewards: torch.Tensor, explanations: rollout.Rollouts | None):
        """Step 3: (the likelihood term's targets as completions of the answer-free prompt, or None; their stats; the
        first question's target, for samples.md). expo: self-explanations -- of every question, `explanations`
        drawn with the rollouts, or (--explain_on failed) of the all-wrong groups, drawn here; grpo_sft_gt: the
        expert solutions; grpo: none."""
        cfg, t0 = self.cfg, time.perf_counter()
        pairs, stats, first = [], {}, None  # (question, target text)
        if cfg.method == "expo":
            chosen = list(range(len(batch)))
            if cfg.explain_on == "failed":  # only the all-wrong groups
                chosen = [i for i, g in enumerate(rewards.view(-1, cfg.num_generations)) if g.sum() == 0]
            if chosen and explanations is None:  # not drawn with the rollouts: draw them now that rewards are known
                explanations = self.sample([expo.explain_prompt(batch[i].question, batch[i].answer) for i in chosen],
                                           1, self.seed(1))
            if chosen:
                texts, stats = self.self_explanations([batch[i] for i in chosen], explanations)
                pairs = [(batch[i].question, t) for i, t in zip(chosen, texts) if t is not None]
                if chosen[0] == 0:
                    first = texts[0] or f"(dropped: see --drop_leaks/_truncated/_wrong) {explanations.texts[0]}"
        elif cfg.method == "grpo_sft_gt":
            pairs, first = [(e.question, e.solution) for e in batch], batch[0].solution
        stats["t_explain"] = time.perf_counter() - t0
        targets = target_batch(self.tokenizer, *zip(*pairs), self.turn_end).to(self.device) if pairs else None
        return targets, stats, first

    def scored_rows(self, adv: torch.Tensor) -> list[list[int]]:
        """The micro-batches of rollout rows the policy gradient scores. A zero advantage (every row of an all-equal
        group) makes a row's clipped surrogate exactly 0, so without a KL term such rows are skipped; the normalisers
        still count the whole batch, so the gradient is the same. On hard questions this is most of the update."""
        active = [i for i in range(len(adv)) if adv[i] != 0] if self.cfg.kl_coef == 0 else list(range(len(adv)))
        return [[active[j] for j in mb] for mb in micro_batches(len(active), self.cfg.grad_accum)] if active else []

    @torch.no_grad()
    def frozen_logprobs(self, roll: rollout.Rollouts, rows: list[list[int]]):
        """(old, ref) [N, T] log-probs of the scored rows, each None when not needed: old only for --ppo_epochs > 1
        (with one pass the old policy *is* the current one: logp.detach()), ref only for --kl_coef > 0."""
        cfg, old, ref = self.cfg, None, None
        with self.amp():
            if cfg.ppo_epochs > 1:
                old = torch.zeros(roll.completion_ids.shape, device=self.device)  # [N, T]
                for r in rows:
                    old[r] = logprobs(self.model, roll, r, cfg.temperature)
            if cfg.kl_coef > 0:
                ref = torch.zeros(roll.completion_ids.shape, device=self.device)  # [N, T]
                with self.reference() as reference:
                    for r in rows:
                        ref[r] = logprobs(reference, roll, r, cfg.temperature)
        return old, ref

    def global_counts(self, **counts: float) -> SimpleNamespace:
        """Counts summed over ranks (rows, tokens, pairs): the normalisers of a loss over the whole step's batch."""
        return SimpleNamespace(**dict(zip(counts, distributed.all_sum(list(counts.values()), self.ranks))))

    def policy_gradient_pass(self, roll: rollout.Rollouts, adv: torch.Tensor, rows: list[list[int]], old, ref) -> dict:
        """Backward of this rank's share of grpo_loss over all rollouts, micro-batch by micro-batch; its stats."""
        cfg, mask = self.cfg, roll.completion_mask  # [N, T]
        scored = [i for r in rows for i in r]
        total = self.global_counts(rows=len(roll.texts), tokens=float(mask.sum()), scored_tokens=float(mask[scored].sum()))
        stats = {"loss_pg": 0.0, "clip_frac": 0.0, "kl": 0.0, "entropy": 0.0}
        mismatch = {"log_ratio": 0.0, "k3": 0.0, "max_ratio": 1.0}  # sampler vs trainer, on the scored tokens
        for r in rows:
            with self.amp():
                logp, entropy = logprobs(self.model, roll, r, cfg.temperature, with_entropy=True)  # [n, T] each
            old_r = logp.detach() if old is None else old[r]  # [n, T]
            sampler_r = None if roll.sampler_logp is None else roll.sampler_logp[r]  # [n, T]; None: text, not sampled
            tis = None  # when the sampler *is* the fp32 trainer there is nothing to correct
            if cfg.tis_cap and self.sampler is not self.model and sampler_r is not None:
                tis = expo.tis_weights(old_r, sampler_r, mask[r], cfg.tis_cap)  # [n, T]
            loss, st = expo.grpo_loss(logp, old_logp=old_r, ref_logp=None if ref is None else ref[r],
                                      advantages=adv[r], mask=mask[r], clip_eps=cfg.clip_eps, kl_coef=cfg.kl_coef,
                                      norm=cfg.loss_norm, max_tokens=cfg.max_new_tokens, token_weights=tis)
            if sampler_r is not None:
                m = expo.sampler_mismatch(old_r, sampler_r, mask[r])
                mismatch = {k: max(v, m[k]) if k == "max_ratio" else v + m[k] for k, v in mismatch.items()}
            weight = expo.accumulation_weight(cfg.loss_norm, mask[r], int(total.rows), int(total.tokens))
            (loss * weight).backward()
            stats["loss_pg"] += loss.item() * weight
            token_share = expo.accumulation_weight("token", mask[r], int(total.rows), total.tokens)
            stats["clip_frac"] += st["clip_frac"] * token_share
            stats["kl"] += st["kl"] * token_share
            stats["entropy"] += float((entropy * mask[r]).sum()) / max(1, total.scored_tokens)
        if not total.scored_tokens:
            del stats["entropy"]  # measured on the rollouts that were scored; none were this step
        else:
            stats.update(mismatch_log_ratio=mismatch["log_ratio"] / total.scored_tokens,
                         mismatch_k3=mismatch["k3"] / total.scored_tokens, mismatch_max_ratio=mismatch["max_ratio"])
        return stats

    def sft_pass(self, targets: rollout.Rollouts | None, beta: float) -> float:
        """Backward of beta * sft_loss over the targets (a token mean over every rank's targets); sft_loss's value."""
        mask = None if targets is None else targets.completion_mask  # [n, T]
        total = self.global_counts(rows=0 if mask is None else mask.shape[0],
                                   tokens=0.0 if mask is None else float(mask.sum()))
        value = 0.0
        if targets is None or beta == 0:
            return value
        for r in micro_batches(mask.shape[0], self.cfg.grad_accum):
            with self.amp():
                logp = logprobs(self.model, targets, r, 1.0)  # [n, T] the policy's own likelihood (temperature 1)
            loss = expo.sft_loss(logp, mask[r]) * expo.accumulation_weight("token", mask[r], total.rows, total.tokens)
            (beta * loss).backward()
            value += loss.item()
        return value

    # -------------------------------------------------------------------------------------------------- plumbing

    def optimizer_step(self) -> float:
        """Sum the ranks' gradients, clip, and apply, unless the norm is not finite (then nothing changes). The norm
        is taken after the sum, so every rank makes the same decision.

        A step in which no rank ran a backward (every group all-equal, no targets) has no gradient, and is not an
        update: AdamW is not stepped, so its momentum does not move the weights, in one process and under torchrun
        alike (there `sum_gradients` would zero-fill the gradients and AdamW would step). "GRPO learns nothing from
        an all-wrong batch" then holds exactly, and one process and N ranks stay the same run."""
        has_grad = any(p.grad is not None for p in self.model.parameters())
        if not distributed.all_sum([float(has_grad)], self.ranks)[0]:
            return 0.0
        distributed.sum_gradients(self.model, self.ranks)
        norm = float(torch.nn.utils.clip_grad_norm_(self.model.parameters(), self.cfg.max_grad_norm))
        if math.isfinite(norm):
            self.stop.hold()  # from here the step is finished before a stop signal takes effect
            self.optimizer.step()
            self.refresh_sampler()
        else:
            self.skipped += 1
            print(f"step {self.step}: non-finite loss or gradient (norm {norm}); update skipped", file=sys.stderr)
        self.optimizer.zero_grad(set_to_none=True)
        return norm

    def train(self) -> tuple[dict | None, dict | None]:
        cfg, main = self.cfg, self.ranks.main
        levels = "all levels" if cfg.levels is None else "level " + ",".join(map(str, cfg.levels))
        if main:
            print(f"{cfg.method} on {cfg.dataset}, {levels}: {len(self.train_set)} train / {len(self.eval_set)} eval "
                  f"questions, device {self.device}, {self.ranks.world} process(es), sampling from "
                  f"{'a bf16 copy of the policy' if self.sampler is not self.model else 'the fp32 policy'}, "
                  f"output {self.out}", flush=True)
        before = self.evaluate("before") if self.step == 0 and cfg.eval_before else None
        try:
            with self.stop:
                self.loop()
        except (checkpoint.Stopped, KeyboardInterrupt) as e:  # KeyboardInterrupt: a Ctrl-C before our handler was in
            signum = e.signum if isinstance(e, checkpoint.Stopped) else signal.SIGINT
            path = self.save()
            if main:
                print(f"\nstopped by {signal.Signals(signum).name}: checkpoint of step {self.step} in {path}; "
                      f"continue with the same command and --resume", flush=True)
            raise SystemExit(128 + signum)
        after = self.evaluate("after")
        path = self.save()
        if main:
            if before:
                print("\n" + evaluate.table(before, after, cfg.eval_k))
            plot_curve(self.out)
            print(f"\nlogs: {self.out / 'metrics.jsonl'}\nsamples: {self.out / 'samples.md'}\ncheckpoint: {path}")
        return before, after

    def loop(self) -> None:
        """The training steps, with evaluations and checkpoints between them; a stop signal ends it at a step
        boundary that every rank has reached (one tiny collective per step decides it for all)."""
        cfg, last_save = self.cfg, time.monotonic()
        if self.step and self.eval_due() and not self.logged_eval(self.step):  # resumed: a stop cut off this eval
            self.evaluate(f"step {self.step}")
        bar = tqdm(range(self.step, cfg.steps), desc=cfg.method, initial=self.step, total=cfg.steps,
                   disable=not self.ranks.main)
        for _ in bar:
            stats = self.train_step()
            bar.set_postfix(reward=f"{stats['reward']:.2f}", tok_s=f"{stats.get('gen_tok_s', 0):.0f}")
            if self.eval_due():
                self.evaluate(f"step {self.step}")
            due = (cfg.save_every and self.step % cfg.save_every == 0) or \
                (cfg.save_every_minutes and time.monotonic() - last_save >= 60 * cfg.save_every_minutes)
            stopping, due = distributed.all_sum([float(self.stop.signal is not None), float(due)], self.ranks)
            if stopping:
                raise checkpoint.Stopped(self.stop.signal or signal.SIGTERM)
            if due:
                self.save()
                last_save = time.monotonic()

    def eval_due(self) -> bool:
        """Is an evaluation due after the step just completed (every --eval_every steps, the last one excepted)?"""
        return bool(self.cfg.eval_every) and self.step % self.cfg.eval_every == 0 and self.step < self.cfg.steps

    def train_step(self) -> dict:
        """One step on this rank's share of the step's questions, logged; then the step counter moves on."""
        cfg = self.cfg
        questions = batch_indices(len(self.train_set), cfg.batch_size, self.step, cfg.seed)
        batch = [self.train_set[i] for i in distributed.share(questions, self.ranks)]
        t0 = time.perf_counter()
        stats = self.update(batch)
        stats.update(t_step=time.perf_counter() - t0, **self.memory())
        stats = distributed.merge_stats(distributed.gather(stats, self.ranks))
        stats.update(step=self.step, skipped_updates=self.skipped)
        self.log(stats)
        self.step += 1
        self.stop.release()  # the step is applied, logged and counted: a stop signal may now take effect
        return stats

# --------------------------------------------------------------------------------------------------- the DPO family


class DPOTrainer(Trainer):
    """ExP-DPO (expo_dpo) and DPO on expert solutions (dpo_gt): each question's chosen response -- its
    self-explanation, or its expert solution -- against the first of the policy's own wrong rollouts, with
    expo.dpo_loss against the frozen initial policy. Owns its cached self-explanations and checkpoints them."""

    def __init__(self, cfg: Config):
        self.chosen: dict[str, tuple[int, str]] = {}  # question id -> (step made, target), expo_dpo only
        super().__init__(cfg)

    def needs_reference(self) -> bool:
        return True

    def restore(self, start: Path, state: dict) -> None:
        super().restore(start, state)
        self.chosen = {k: tuple(v) for k, v in state.get("dpo_chosen", {}).items()}

    def checkpoint_state(self) -> dict:
        """Rank 0 saves every rank's cached explanations: each rank explains its own share of the questions."""
        merged = {k: v for part in distributed.gather(self.chosen, self.ranks) for k, v in part.items()}
        return {**super().checkpoint_state(), "dpo_chosen": merged}

    def update(self, batch: list[data.Example]) -> dict:
        return self.dpo_step(batch)

    def dpo_step(self, batch: list[data.Example]) -> dict:
        cfg, G = self.cfg, self.cfg.num_generations
        roll, rewards, stats, _ = self.rollouts(batch)
        scores = rewards.tolist()
        chosen, chosen_stats = self.chosen_responses(batch)
        pairs = []  # (question, chosen text, rejected text): the first wrong rollout of the question
        for i, e in enumerate(batch):
            wrong = [roll.texts[i * G + j] for j in range(G) if scores[i * G + j] == 0]
            if chosen[i] is not None and wrong:
                pairs.append((e.question, chosen[i], wrong[0]))
        total = self.global_counts(pairs=len(pairs))  # the loss is a mean over every rank's pairs
        t_update, loss_dpo = time.perf_counter(), 0.0
        self.optimizer.zero_grad(set_to_none=True)
        if pairs:
            questions, good, bad = zip(*pairs)
            both = target_batch(self.tokenizer, questions + questions, good + bad, self.turn_end).to(self.device)
            for r in micro_batches(len(pairs), cfg.grad_accum):
                rows = r + [i + len(pairs) for i in r]  # chosen rows, then their rejected partners
                with torch.no_grad(), self.amp(), self.reference() as reference:
                    ref_seq = expo.sequence_logp(logprobs(reference, both, rows, 1.0), both.completion_mask[rows])
                with self.amp():
                    seq = expo.sequence_logp(logprobs(self.model, both, rows, 1.0), both.completion_mask[rows])  # [2k]
                k = len(r)
                weight = expo.accumulation_weight("seq", both.completion_mask[r], int(total.pairs), 0)
                loss = expo.dpo_loss(seq[:k], seq[k:], ref_seq[:k], ref_seq[k:], cfg.dpo_beta) * weight
                loss.backward()
                loss_dpo += loss.item()
            self.write_samples(batch[0], roll.texts[:G], scores[:G], chosen[0])
        grad_norm = self.optimizer_step()
        return {**stats, **chosen_stats, "pairs": len(pairs), "loss_dpo": loss_dpo, "grad_norm": grad_norm,
                "t_update": time.perf_counter() - t_update}

    def chosen_responses(self, batch: list[data.Example]) -> tuple[list[str | None], dict]:
        """dpo_gt: expert solutions. expo_dpo: self-explanations, cached per question -- made once by the initial
        (reference) policy when offline, or by the current policy and renewed every --dpo_refresh steps."""
        if self.cfg.method == "dpo_gt":
            return [e.solution for e in batch], {}
        refresh, stats = self.cfg.dpo_refresh, {}
        stale = [e for e in batch if e.id not in self.chosen
                 or (refresh and self.step - self.chosen[e.id][0] >= refresh)]
        if stale:
            with contextlib.nullcontext(self.model) if refresh else self.reference() as model:
                sampled = self.sample([expo.explain_prompt(e.question, e.answer) for e in stale], 1, self.seed(1),
                                      model)
            targets, stats = self.self_explanations(stale, sampled)
            self.chosen.update({e.id: (self.step, t) for e, t in zip(stale, targets)})
        return [self.chosen[e.id][1] for e in batch], stats


# --------------------------------------------------------------------------------------------------------- the CLI


def main(argv=None) -> None:
    cfg = parse_args(argv)
    try:
        trainer = trainer_for(cfg)
    except (OSError, data.DataError, checkpoint.RunFolderError) as e:  # one clear line: missing package or model,
        checkpoint.unlock(Path(cfg.output_dir))  # bad data, no checkpoint, a folder in use or of another run
        sys.exit(f"error: {e}")
    try:
        trainer.train()
    except torch.cuda.OutOfMemoryError:
        sys.exit("error: out of GPU memory; try a larger --grad_accum, a smaller --batch_size / --num_generations / "
                 "--max_new_tokens, or --gradient_checkpointing")
    finally:
        checkpoint.unlock(trainer.out)
        distributed.close(trainer.ranks)


if __name__ == "__main__":
    if "OMP_NUM_THREADS" not in os.environ:  # set it (e.g. to 1) to share the CPU with another job
        torch.set_num_threads(max(1, os.cpu_count() or 1))
    main()
