"""Train a policy with ExP-GRPO (ExPO), GRPO, GRPO + expert SFT, or DPO on self-explanations / expert solutions.

    python train.py                                   # the CPU demo: embedded SmolLM2-135M on the arith task
    python train.py --method grpo                     # the same run without the self-explanation term
    python train.py --model Qwen/Qwen2.5-1.5B-Instruct --dataset math --levels 5 ...   # see README: GPU recipe

One ExP-GRPO step is `Trainer.grpo_step`, five numbered lines that follow the paper's algorithm box: sample G
answer-free rollouts per question and one self-explanation with the answer in the prompt (one sampling call), reward
and normalise within each group, make the self-explanations into targets scored under the *answer-free* prompt, then
grpo_loss + beta * sft_loss micro-batch by micro-batch (expo.microbatch_loss) and one optimizer step. `--method grpo`
has no targets, `grpo_sft_gt` uses the dataset's expert solutions. The DPO methods are dpo.py's.

Design choices, each for a reason:
* Weights and optimizer state stay fp32; on a GPU the forward passes run under bf16 autocast. Pure-bf16 weights
  would silently drop updates smaller than 1/256 of a weight, which at RL learning rates is most of them.
* Each step's batch and sampling seed are functions of (seed, step), so `--resume` replays exactly the run that was
  interrupted (tested), and two methods with the same seed see the same questions in the same order. The evaluation
  set and its draws depend on --eval_seed only, so training seeds never change what a run is measured on.
* One denominator rule: each loss's denominator is counted once per step over the whole batch and all ranks
  (`Trainer.denominators`), and every micro-batch's loss is its sum divided by it, so micro-batches and ranks add up
  to the full-batch loss by construction. A step whose gradient is not finite is skipped and logged.
* Outputs (in --output_dir, default runs/METHOD-DATASET): metrics.jsonl (one line per step, plus eval lines),
  eval_samples.jsonl (every evaluation's completions: `evaluate.py --rescore` scores them again), samples.md
  (readable rollouts and self-explanations), checkpoint/ (safetensors weights + tokenizer +
  trainer_state.json, loadable with from_pretrained), curve.png when matplotlib is installed. checkpoint.py says how
  the folder is claimed and locked, how resume stays exact, and how SIGTERM stops a run with a checkpoint.
"""
from __future__ import annotations

import argparse
import contextlib
import itertools
import math
import os
import random
import signal
import sys
import time
from dataclasses import dataclass, field, fields
from pathlib import Path

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

def option(default, help: str, choices=None, section: str | None = None):
    """A Config field carrying its command-line help (and choices): each flag is declared in one place. `section`, on
    the first flag of a group, titles the group of flags from there on in --help."""
    return field(default=default, metadata={"help": help, "choices": choices, "section": section})


class HelpFormatter(argparse.ArgumentDefaultsHelpFormatter):
    """Append "(default: X)" to a flag's help unless the help already says its default."""

    def _get_help_string(self, action):
        return action.help if "default" in action.help else super()._get_help_string(action)


@dataclass
class Config:
    method: str = option("expo", "expo = ExP-GRPO; grpo; grpo_sft_gt = GRPO + SFT on expert solutions; expo_dpo; "
                         "dpo_gt = DPO with expert solutions", METHODS, section="the method and the paper's settings")
    model: str | None = option(None, "hub id or local folder (default: the embedded SmolLM2-135M-Instruct)")
    dataset: str = option("arith", "gsm8k | math | math500 | arith | path/to/file.jsonl")
    levels: list[str] | None = option(None, "train and evaluate on these difficulty levels; default: level 2 of arith, "
                                      "every level of other datasets; 'all' for all")
    expert_style: str = option("worded", "arith: the style of its expert solutions (grpo_sft_gt, dpo_gt), nearest to "
                               "the model's own writing first (the distance experiment)", tuple(data.EXPERT_STYLES))
    num_generations: int = option(4, "G: answer-free rollouts sampled per question")
    batch_size: int = option(8, "questions per step, over all ranks under torchrun (each takes its share)")
    beta: float = option(0.04, "weight of the self-explanation (expo) or expert-solution (grpo_sft_gt) term")
    learning_rate: float = option(1e-5, "AdamW learning rate (with --lora_rank, use ~10x the full fine-tuning rate)")
    steps: int = option(7, "training steps")
    kl_coef: float = option(0.0, "weight of the k3 KL penalty to the frozen initial policy (0 = no reference model)",
                            section="the objective")
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
    explain_on: str = option("all", "self-explain every question (all, the paper) or only all-wrong groups",
                             ("all", "failed"), section="self-explanation filters and ablations")
    drop_leaks: bool = option(True, "drop self-explanations that mention being given the answer")
    drop_truncated: bool = option(False, "drop self-explanations cut off by --max_new_tokens (else their target is a "
                                  "cut-off explanation with the answer pasted after it)")
    drop_wrong: bool = option(False, "drop self-explanations whose own final answer is not the gold one (else the gold "
                              "answer replaces it in their last box: the paper's target)")
    dpo_refresh: int = option(0, "expo_dpo: 0 = offline (explanations of the initial model), N = renew every N steps")
    explain_loss: str = option("nll", "expo's self-explanation term: nll = -log pi(e~ | q), the paper's; fkl = the "
                               "full-vocabulary KL from the teacher to the policy along e~; rkl = the KL from the "
                               "policy to the teacher along the policy's own rollouts (no self-explanation is sampled)",
                               expo.EXPLAIN_LOSSES, section="ExPO's relatives: the term as self-distillation")
    teacher: str = option("current", "fkl / rkl: the teacher is the policy with the answer in its prompt, current "
                          "(detached) or initial (frozen)", ("current", "initial"))
    max_new_tokens: int = option(128, "generation budget of rollouts and self-explanations",
                                 section="sampling and evaluation")
    temperature: float = option(0.7, "sampling temperature; the policy-gradient log-probs are scored at the same "
                                     "temperature, the likelihood terms (self-explanation, expert SFT, DPO) at T = 1")
    sampler_dtype: str = option("auto", "what rollouts, self-explanations and evaluations are sampled from: bf16 = a "
                                "bf16 copy of the policy refreshed after every update, fp32 = the policy itself, "
                                "auto = bf16 where bf16 matmuls are native (CUDA, a CPU with AMX / AVX512-BF16)",
                                ("auto", "fp32", "bf16"))
    eval_every: int = option(0, "evaluate every N steps (0 = only before and after training)")
    eval_before: bool = option(True, "evaluate before training (compare.py does it once for all runs)")
    eval_k: int = option(4, "samples per eval question: reports pass@1 and pass@k")
    eval_temperature: float = option(0.7, "sampling temperature of evaluation (the paper: 0.7)")
    eval_limit: int | None = option(24, "evaluate a fixed random subset of this many test questions ('all')")
    eval_max_new_tokens: int | None = option(None, "generation budget of evaluation (default: --max_new_tokens)")
    eval_seed: int = option(0, "seed of the evaluation subset and its sampling: fixed, so every training seed and "
                            "method is evaluated on the same questions with the same draws")
    seed: int = option(0, "seed of the training run: question order and sampling (never the evaluation)",
                       section="the run")
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
                                     formatter_class=HelpFormatter)
    group = parser
    for f in fields(Config):  # in sections, as Config lists them
        flag, help_, choices = f"--{f.name}", f.metadata["help"], f.metadata["choices"]
        group = parser.add_argument_group(f.metadata["section"]) if f.metadata["section"] else group
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
        (cfg.explain_loss != "nll" and cfg.method != "expo", "--explain_loss fkl / rkl is a form of --method expo"),
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


def micro_batches(n_rows: int, grad_accum: int, lengths: list[int] | None = None) -> list[list[int]]:
    """Rows 0 .. n_rows - 1 in `grad_accum` micro-batches of (nearly) equal size. Given each row's length, longest
    first: rows of like length share a micro-batch, which is scored at its own width (`Rollouts.select`), so the
    padding a long row would force on short ones is never computed; the widest micro-batch, which sets the peak
    memory, comes first. Example: lengths [3, 9, 5, 7], grad_accum 2 -> [[1, 3], [2, 0]]."""
    order = sorted(range(n_rows), key=lambda i: -lengths[i]) if lengths is not None else list(range(n_rows))
    size = max(1, math.ceil(n_rows / grad_accum))
    return [order[i : i + size] for i in range(0, n_rows, size)]


def target_batch(tokenizer, questions: list[str], targets: list[str], turn_end: int) -> rollout.Rollouts:
    """Targets as completions of the *answer-free* solve prompt: the hint is never in the context they are scored in.
    Each ends in the chat template's turn-end token (`rollout.turn_end_id`)."""
    return rollout.encode_targets(tokenizer, [expo.solve_prompt(q) for q in questions], targets, turn_end)


def logprobs(model, part: rollout.Rollouts, temperature: float, **kw):
    """Token log-probs [n, w] of a micro-batch, `part = batch.select(rows)`: at its own width w, not the batch's."""
    return rollout.token_logprobs(model, part.prompt_ids, part.prompt_mask, part.completion_ids, temperature, **kw)


def logits(model, part: rollout.Rollouts):
    """Completion logits [n, w, V] of a micro-batch `part = batch.select(rows)`."""
    return rollout.completion_logits(model, part.prompt_ids, part.prompt_mask, part.completion_ids)


@contextlib.contextmanager
def timed(times: dict[str, float], key: str):
    """Record the wall time of the block in times[key], in seconds."""
    t0 = time.perf_counter()
    yield
    times[key] = time.perf_counter() - t0


def sampling_stats(roll: rollout.Rollouts, rewards: torch.Tensor, explanations: rollout.Rollouts | None,
                   group_size: int, t_sample: float) -> dict:
    """What every method logs about its samples: rewards, all-wrong / all-right groups, lengths, tokens per second."""
    groups = rewards.view(-1, group_size)  # [B, G]
    drawn = sum(float(x.completion_mask.sum()) for x in (roll, explanations) if x is not None)  # tokens sampled
    stats = {"reward": float(rewards.mean()), "all_wrong": float((groups.sum(1) == 0).float().mean()),
             "all_right": float((groups.sum(1) == group_size).float().mean()),
             "completion_len": float(roll.completion_mask.sum(1).float().mean()),
             "truncated": float(roll.truncated.float().mean()), "gen_tok_s": drawn / max(t_sample, 1e-9)}
    return stats if explanations is None else {**stats, **explanation_stats(explanations)}


def explanation_stats(explanations: rollout.Rollouts) -> dict:
    """The sampled self-explanations' mean length and the share cut off by the budget."""
    return {"explain_len": float(explanations.completion_mask.sum(1).float().mean()),
            "explain_truncated": float(explanations.truncated.float().mean())}


def first_target(texts: list[str | None], explanations: rollout.Rollouts | None) -> str | None:
    """samples.md's target of the step's first question: the target, or the explanation a filter dropped."""
    if texts[0] is not None or explanations is None:
        return texts[0]
    return f"(dropped: see --drop_leaks/_truncated/_wrong/--explain_on) {explanations.texts[0]}"


def trainer_for(cfg: Config) -> "Trainer":
    """The trainer of `cfg.method`: Trainer for the GRPO family, dpo.DPOTrainer for the DPO family."""
    if cfg.method in ("expo_dpo", "dpo_gt"):
        import dpo  # dpo.py builds on Trainer, so it imports this file: not at the top
        return dpo.DPOTrainer(cfg)
    return Trainer(cfg)


# ------------------------------------------------------------------------------------------------------ the trainer


class Trainer(Run):
    """The GRPO family (expo, grpo, grpo_sft_gt): `grpo_step` is one step of the paper's algorithm box; `train` the
    loop. Its folder, model, logs, evaluation and checkpoints are `Run`'s (run.py); DPOTrainer overrides `update`."""

    def rollouts(self, batch: list[data.Example], explain: bool = False):
        """(G answer-free rollouts per question, their 0/1 rewards [B*G], and with `explain` one self-explanation per
        question, else None), drawn in one sampling call: decoding is latency-bound, so B more rows cost little,
        while a second call would cost a second decode loop."""
        B, G = len(batch), self.cfg.num_generations
        prompts = [expo.solve_prompt(e.question) for e in batch]
        if explain:
            prompts += [expo.explain_prompt(e.question, e.answer) for e in batch]
        out = self.sample(prompts, [G] * B + [1] * (len(prompts) - B), self.sampling_seed())
        roll, explanations = out, None  # without explain prompts, the call's rows are exactly the rollouts
        if explain:
            roll, explanations = out.select(range(B * G)), out.select(range(B * G, len(out.texts)))
        rewards = torch.tensor([reward.score(text, batch[i].answer)
                                for text, i in zip(roll.texts, roll.prompt_index.tolist())])  # [B*G]
        return roll, rewards, explanations

    def encode_targets(self, questions: list[str], texts: list[str | None]) -> rollout.Rollouts | None:
        """The targets that are not None, as completions of their answer-free prompts (`target_batch`), each row's
        `prompt_index` its question's index in the batch; None if none."""
        kept = [i for i, t in enumerate(texts) if t is not None]
        if not kept:
            return None
        targets = target_batch(self.tokenizer, [questions[i] for i in kept], [texts[i] for i in kept], self.turn_end)
        targets.prompt_index = torch.tensor(kept)
        return targets.to(self.device)

    def teacher_view(self, batch: list[data.Example], targets: rollout.Rollouts | None) -> rollout.Rollouts | None:
        """For --explain_loss fkl / rkl, the targets' tokens after the teacher's prompt: the same question *with* its
        answer (expo.explain_prompt), the privileged context the student's prompt lacks. None for nll."""
        if self.cfg.explain_loss == "nll" or targets is None:
            return None
        hinted = [expo.explain_prompt(batch[i].question, batch[i].answer) for i in targets.prompt_index.tolist()]
        return rollout.with_prompts(self.tokenizer, targets, hinted)

    # ------------------------------------------------------------------------------------------------ GRPO family

    def update(self, batch: list[data.Example]) -> dict:
        """The method's step on this rank's questions (DPOTrainer overrides it)."""
        return self.grpo_step(batch)

    def grpo_step(self, batch: list[data.Example]) -> dict:
        """One step of ExP-GRPO (GRPO, GRPO + expert SFT) on this rank's questions, as in the paper's algorithm box."""
        cfg, G, times = self.cfg, self.cfg.num_generations, {}
        # 1. G answer-free rollouts per question, rewarded by the verifier; for expo each question's self-explanation,
        #    sampled with the answer in the prompt in the same call
        with timed(times, "t_sample"):
            explain = cfg.method == "expo" and cfg.explain_loss != "rkl"  # rkl distills along the rollouts alone
            roll, rewards, explanations = self.rollouts(batch, explain)
        # 2. group-normalised advantages: zero for every row of an all-equal group
        adv = expo.group_advantages(rewards, G, cfg.adv_scale).to(self.device)  # [B*G]
        # 3. the likelihood term's targets, scored as completions of the answer-free prompt (and for fkl / rkl the same
        #    tokens after the teacher's prompt, with the answer)
        with timed(times, "t_explain"):
            targets, texts, target_stats = self.likelihood_targets(batch, roll, rewards, explanations)
            teacher = self.teacher_view(batch, targets)
        # 4. the rollout rows the policy gradient scores, the step's denominators, frozen old / reference log-probs
        scored = self.scored_micro_batches(adv, roll.completion_mask.sum(1).tolist())
        denominators = self.denominators(roll, targets)
        old, ref = self.frozen_logprobs(roll, scored)
        # 5. per PPO epoch: grpo_loss + beta * sft_loss, one backward per micro-batch; then one optimizer step
        beta = expo.beta_at(self.step, cfg.steps, cfg.beta, cfg.beta_schedule)
        with timed(times, "t_update"):
            for _ in range(cfg.ppo_epochs):
                self.optimizer.zero_grad(set_to_none=True)
                sums = self.backward_pass(roll, adv, old, ref, scored, targets, teacher, denominators, beta)
                grad_norm = self.optimizer_step()
        self.write_samples(batch[0], roll.texts[:G], rewards[:G].tolist(), first_target(texts, explanations))
        return {**sampling_stats(roll, rewards, explanations, G, times["t_sample"]), **target_stats,
                **self.update_stats(sums, roll, scored), **times, "grad_norm": grad_norm, "beta": beta,
                "targets": 0 if targets is None else len(targets.texts), "pg_rows": sum(map(len, scored))}

    def likelihood_targets(self, batch: list[data.Example], roll: rollout.Rollouts, rewards: torch.Tensor,
                           explanations: rollout.Rollouts | None):
        """Step 3: (the likelihood term's targets as completions of the answer-free prompt, or None; each question's
        target text, None where it has none; the filters' counts). expo: each self-explanation made into a target by
        expo.self_explanation_targets, with every filter (--explain_on failed: only the all-wrong groups');
        grpo_sft_gt: the expert solutions; grpo: none. expo --explain_loss rkl: the rollouts themselves (with
        --explain_on failed, those of all-wrong groups), on which the policy is pulled toward its hinted self."""
        cfg, questions = self.cfg, [e.question for e in batch]
        solved = (rewards.view(-1, cfg.num_generations).sum(1) > 0).tolist()  # [B]
        texts, counts = [None] * len(batch), {}
        if cfg.method == "grpo_sft_gt":
            texts = [e.solution for e in batch]
        elif cfg.method == "expo" and cfg.explain_loss == "rkl":
            rows = [i for i, q in enumerate(roll.prompt_index.tolist()) if cfg.explain_on == "all" or not solved[q]]
            return (roll.select(rows) if rows else None), texts, counts
        elif cfg.method == "expo":
            texts, counts = expo.self_explanation_targets(explanations.texts, [e.answer for e in batch],
                                                          explanations.truncated.tolist(),
                                                          solved if cfg.explain_on == "failed" else None,
                                                          cfg.drop_leaks, cfg.drop_truncated, cfg.drop_wrong)
        return self.encode_targets(questions, texts), texts, counts

    def scored_micro_batches(self, adv: torch.Tensor, lengths: list[int]) -> list[list[int]]:
        """The micro-batches (lists of rollout row indices, by `lengths`: see `micro_batches`) the policy gradient
        scores. A zero advantage (every row of an all-equal group) makes a row's clipped surrogate exactly 0, so
        without a KL term such rows are skipped; the denominators still count the whole batch, so the gradient is the
        same. On hard questions this is most rows."""
        active = [i for i in range(len(adv)) if adv[i] != 0] if self.cfg.kl_coef == 0 else list(range(len(adv)))
        split = micro_batches(len(active), self.cfg.grad_accum, [lengths[i] for i in active])
        return [[active[j] for j in mb] for mb in split]

    def denominators(self, roll: rollout.Rollouts, targets: rollout.Rollouts | None) -> expo.Denominators:
        """The step's denominators, over all its rollouts and targets and summed over ranks: counted once, they make
        every micro-batch's loss its exact share of the step's loss (expo.microbatch_loss)."""
        pg = expo.pg_denominator(roll.completion_mask, self.cfg.loss_norm, self.cfg.max_new_tokens)
        target_tokens = 0.0 if targets is None else float(targets.completion_mask.sum())
        return expo.Denominators(*distributed.all_sum([pg, target_tokens], self.ranks))

    @torch.no_grad()
    def frozen_logprobs(self, roll: rollout.Rollouts, scored: list[list[int]]):
        """(old, ref) [N, T] log-probs of the scored rows, each None when not needed: old only for --ppo_epochs > 1
        (with one pass the old policy *is* the current one: logp.detach()), ref only for --kl_coef > 0."""
        cfg, old, ref = self.cfg, None, None
        with self.amp():
            if cfg.ppo_epochs > 1:
                old = torch.zeros(roll.completion_ids.shape, device=self.device)  # [N, T]
                for rows in scored:
                    part = roll.select(rows)
                    old[rows, : part.completion_ids.shape[1]] = logprobs(self.model, part, cfg.temperature)
            if cfg.kl_coef > 0:
                ref = torch.zeros(roll.completion_ids.shape, device=self.device)  # [N, T]
                with self.reference() as reference:
                    for rows in scored:
                        part = roll.select(rows)
                        ref[rows, : part.completion_ids.shape[1]] = logprobs(reference, part, cfg.temperature)
        return old, ref

    def backward_pass(self, roll: rollout.Rollouts, adv: torch.Tensor, old, ref, scored: list[list[int]],
                      targets: rollout.Rollouts | None, teacher: rollout.Rollouts | None,
                      denominators: expo.Denominators, beta: float) -> dict:
        """Backward of this rank's share of the step's loss, one micro-batch at a time: the i-th micro-batch of scored
        rollout rows with the i-th of the targets (and of their `teacher_view`), through expo.microbatch_loss; its
        statistics summed."""
        cfg, sums = self.cfg, {}
        target_micro = [] if targets is None or not beta else \
            micro_batches(len(targets.texts), cfg.grad_accum, targets.completion_mask.sum(1).tolist())
        tis_cap = cfg.tis_cap if self.sampler is not self.model else 0.0  # an fp32 sampler *is* the trainer
        for rows, target_rows in itertools.zip_longest(scored, target_micro, fillvalue=[]):
            pg, entropy = self.rollout_inputs(roll, adv, old, ref, rows)
            target = self.target_inputs(targets, teacher, target_rows)
            loss, stats = expo.microbatch_loss(**pg, **target, denominators=denominators, beta=beta,
                                               clip_eps=cfg.clip_eps, kl_coef=cfg.kl_coef, norm=cfg.loss_norm,
                                               tis_cap=tis_cap)
            loss.backward()
            stats["entropy"] = entropy
            for key, value in stats.items():
                sums[key] = max(sums.get(key, value), value) if key == "max_ratio" else sums.get(key, 0.0) + value
        return sums

    def target_inputs(self, targets: rollout.Rollouts | None, teacher: rollout.Rollouts | None, rows: list[int]):
        """microbatch_loss's target arguments for these target rows, all None without rows: their log-probs (nll) or
        per-token KL to the teacher (fkl, rkl) [m, w], at temperature 1, and their mask [m, w], at the rows' own width
        w. The teacher (the current policy or the initial one after its hinted prompt) runs under no_grad: its logits
        are constants."""
        if not rows:
            return dict(target_logp=None, target_mask=None, target_kl=None)
        part, logp, kl = targets.select(rows), None, None
        with self.amp():
            if teacher is None:
                logp = logprobs(self.model, part, 1.0)  # [m, w]
            else:
                with torch.no_grad(), self.teacher_model() as model:
                    teacher_logits = logits(model, teacher.select(rows))  # [m, w, V], a constant
                kl = expo.token_kl(logits(self.model, part), teacher_logits,
                                   reverse=self.cfg.explain_loss == "rkl")  # [m, w]
        return dict(target_logp=logp, target_mask=part.completion_mask, target_kl=kl)

    def teacher_model(self):
        """(A context giving) the fkl / rkl teacher's weights: the current policy, or the frozen initial one."""
        return self.reference() if self.cfg.teacher == "initial" else contextlib.nullcontext(self.model)

    def rollout_inputs(self, roll: rollout.Rollouts, adv: torch.Tensor, old, ref, rows: list[int]):
        """(microbatch_loss's rollout arguments for these rows -- all None without rows --, their summed entropy), at
        the rows' own width w."""
        keys = ("logp", "old_logp", "ref_logp", "advantages", "mask", "sampler_logp")
        if not rows:
            return dict.fromkeys(keys), 0.0
        part = roll.select(rows)
        with self.amp():
            logp, entropy = logprobs(self.model, part, self.cfg.temperature, with_entropy=True)  # [n, w] each
        width = part.completion_ids.shape[1]
        pick = lambda x: None if x is None else x[rows, :width]  # noqa: E731
        values = (logp, logp.detach() if old is None else pick(old), pick(ref), adv[rows], part.completion_mask,
                  part.sampler_logp)  # sampler_logp is None for rollouts that were not sampled (tests)
        return dict(zip(keys, values)), float((entropy * part.completion_mask).sum())

    def update_stats(self, sums: dict, roll: rollout.Rollouts, scored: list[list[int]]) -> dict:
        """The update's statistics from its summed micro-batch values: the losses as summed, the rest as means over
        every rank's rollout tokens (clip_frac, kl) or scored tokens (entropy, the sampler's mismatch)."""
        mask = roll.completion_mask
        tokens, scored_tokens = distributed.all_sum(
            [float(mask.sum()), float(mask[[i for rows in scored for i in rows]].sum())], self.ranks)
        stats = {"loss_pg": sums.get("loss_pg", 0.0), "clip_frac": sums.get("clipped", 0.0) / max(1.0, tokens),
                 "kl": sums.get("kl", 0.0) / max(1.0, tokens), "loss_sft": sums.get("loss_sft", 0.0)}
        if self.cfg.explain_loss != "nll":
            stats["loss_distill"] = sums.get("loss_distill", 0.0)
        if scored_tokens:  # over every rank's scored tokens (this rank may have none)
            stats["entropy"] = sums.get("entropy", 0.0) / scored_tokens
            if roll.sampler_logp is not None:  # sampled rollouts (not fixed texts): the sampler against the trainer
                stats.update(mismatch_log_ratio=sums.get("log_ratio", 0.0) / scored_tokens,
                             mismatch_k3=sums.get("k3", 0.0) / scored_tokens,
                             mismatch_max_ratio=sums.get("max_ratio", 1.0))
        return stats

    # ------------------------------------------------------------------------------------------------------ the loop

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
            with self.signals:
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
            stopping, due = distributed.all_sum([float(self.signals.signal is not None), float(due)], self.ranks)
            if stopping:
                raise checkpoint.Stopped(self.signals.signal or signal.SIGTERM)
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
        self.signals.release()  # the step is applied, logged and counted: a stop signal may now take effect
        return stats

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
