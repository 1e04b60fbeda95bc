"""Train a policy with ExP-GRPO (ExPO), GRPO, GRPO + expert SFT, or DPO on self-explanations / expert solutions.

    python train.py                                   # the CPU demo: embedded SmolLM2-135M on the arith task
    python train.py --method grpo                     # the same run without the self-explanation term
    python train.py --model Qwen/Qwen2.5-1.5B-Instruct --dataset math --levels 5 ...   # see README: GPU recipe

One ExP-GRPO step (`grpo_step`), for a batch of B questions:
  1. sample G answer-free rollouts per question from the current policy (rollout.sample, prompt expo.solve_prompt)
  2. score them with the verifier (reward.score) and normalise rewards within each group (expo.group_advantages)
  3. sample one self-explanation per question from the *current* policy with the answer in the prompt
     (expo.explain_prompt) -- in the same rollout.sample call as step 1, one row per explain prompt beside the G per
     solve prompt, so it costs no second decode loop (with --explain_on failed it needs step 2's rewards, so a
     second call) -- turn it into a target ending in \\boxed{gold} (expo.explanation_targets), and pair it with
     the *answer-free* prompt: the hint is never in the context the target is scored under
  4. freeze old log-probs (only needed when --ppo_epochs > 1: with one pass, old == current, detached)
  5. for each PPO epoch: loss = grpo_loss(rollouts) + beta(step) * sft_loss(targets), accumulated over
     micro-batches so that their sum is exactly the full-batch loss; clip the gradient norm; one optimizer step
`--method grpo` skips 3, `grpo_sft_gt` uses the dataset's expert solutions as targets in 3, and the DPO methods
(`dpo_step`) pair a chosen response (a self-explanation, or the expert solution for `dpo_gt`) with one of the
policy's own wrong rollouts and minimise expo.dpo_loss against the frozen initial policy.

Design choices, each for a reason:
* Weights and optimizer state stay fp32; on a GPU the forward passes run under bf16 autocast. Pure-bf16 weights
  would silently drop updates smaller than 1/256 of a weight, which at RL learning rates is most of them.
* Each step's batch and sampling seed are functions of (seed, step), so `--resume` replays exactly the run that was
  interrupted (tested), and two methods with the same seed see the same questions in the same order.
* A step whose loss or gradient is not finite is skipped and logged; it never reaches the weights.
* Outputs (in --output_dir, default runs/METHOD-DATASET): metrics.jsonl (one line per step, plus eval lines),
  samples.md (readable rollouts and self-explanations), checkpoint/ (safetensors weights + tokenizer +
  trainer_state.json, loadable with from_pretrained), curve.png when matplotlib is installed. A fresh run refuses a
  folder that holds a run (--resume continues it, --overwrite replaces it); checkpoint.py says how resume stays exact.
"""
from __future__ import annotations

import argparse
import contextlib
import copy
import json
import math
import os
import random
import signal
import sys
import time
from dataclasses import asdict, dataclass, field, fields
from pathlib import Path

import torch
from safetensors.torch import load_file
from tqdm import tqdm

import checkpoint
import data
import distributed
import evaluate
import expo
import lora
import reward
import rollout

METHODS = ("expo", "grpo", "grpo_sft_gt", "expo_dpo", "dpo_gt")


def option(default, help: str, choices=None):
    """A Config field carrying its command-line help (and choices): each flag is declared in one place."""
    return field(default=default, metadata={"help": help, "choices": choices})


@dataclass
class Config:
    method: str = option("expo", "expo = ExP-GRPO; grpo; grpo_sft_gt = GRPO + SFT on expert solutions; expo_dpo; "
                         "dpo_gt = DPO with expert solutions", METHODS)
    model: str | None = option(None, "hub id or local folder (default: the embedded SmolLM2-135M-Instruct)")
    dataset: str = option("arith", "gsm8k | math | math500 | arith | path/to/file.jsonl")
    levels: list[str] | None = option(None, "train and evaluate on these difficulty levels; default: level 2 of arith, "
                                      "every level of other datasets; 'all' for all")
    num_generations: int = option(4, "G: answer-free rollouts sampled per question")
    batch_size: int = option(8, "questions per step, over all ranks under torchrun (each takes its share)")
    beta: float = option(0.04, "weight of the self-explanation (expo) or expert-solution (grpo_sft_gt) term")
    beta_schedule: str = option("constant", "constant beta, or linear decay to 0 over --steps", ("constant", "linear"))
    explain_on: str = option("all", "self-explain every question (all, the paper) or only all-wrong groups",
                             ("all", "failed"))
    drop_leaks: bool = option(True, "drop self-explanations that mention being given the answer")
    drop_truncated: bool = option(False, "drop self-explanations cut off by --max_new_tokens (else their target is a "
                                  "cut-off explanation with the answer pasted after it)")
    drop_wrong: bool = option(False, "drop self-explanations whose own final answer is not the gold one (else the gold "
                              "answer replaces it in their last box: the paper's target)")
    kl_coef: float = option(0.0, "weight of the k3 KL penalty to the frozen initial policy (0 = no reference model)")
    clip_eps: float = option(0.2, "PPO clipping range of the token ratio")
    loss_norm: str = option("seq", "seq (DeepSeekMath), token (DAPO) or constant (Dr. GRPO)", expo.LOSS_NORMS)
    adv_scale: str = option("std", "std: (r - mean) / std; none: r - mean (Dr. GRPO)", ("std", "none"))
    dpo_beta: float = option(0.1, "DPO temperature")
    dpo_refresh: int = option(0, "expo_dpo: 0 = offline (explanations of the initial model), N = renew every N steps")
    learning_rate: float = option(1e-5, "AdamW learning rate (with --lora_rank, use ~10x the full fine-tuning rate)")
    lora_rank: int = option(0, "train rank-R LoRA adapters on every linear layer instead of all weights (0: off)")
    lora_alpha: float = option(32.0, "LoRA scale: the update is lora_alpha / lora_rank * B A")
    max_grad_norm: float = option(1.0, "gradient norm clipping")
    max_new_tokens: int = option(128, "generation budget of rollouts and self-explanations")
    temperature: float = option(0.7, "sampling temperature (log-probs are scored at the same temperature)")
    steps: int = option(7, "training steps")
    ppo_epochs: int = option(1, "optimizer steps on each batch of rollouts (1 = on-policy, no old-policy pass)")
    grad_accum: int = option(4, "micro-batches per optimizer step (same gradient, less memory)")
    gradient_checkpointing: bool = option(False, "recompute activations in the backward pass to save memory")
    eval_every: int = option(0, "evaluate every N steps (0 = only before and after training)")
    eval_before: bool = option(True, "evaluate before training (compare.py does it once for all methods)")
    eval_k: int = option(4, "samples per eval question: reports pass@1 and pass@k")
    eval_temperature: float = option(0.7, "sampling temperature of evaluation (the paper: 0.7)")
    eval_limit: int | None = option(24, "evaluate a fixed random subset of this many test questions ('all')")
    eval_max_new_tokens: int | None = option(None, "generation budget of evaluation (default: --max_new_tokens)")
    save_every: int = option(0, "write a checkpoint every N steps (0: only by time, at the end, and when stopped)")
    save_every_minutes: float = option(30.0, "write a checkpoint after a step when this many minutes passed since the "
                                       "last one (0: off): bounds what a hard kill loses")
    seed: int = option(0, "seed of the training run: question order and sampling (never the evaluation)")
    eval_seed: int = option(0, "seed of the evaluation subset and its sampling: fixed, so every training seed and "
                            "method is evaluated on the same questions with the same draws")
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
    for f in fields(Config):
        flag, help_, choices = f"--{f.name}", f.metadata["help"], f.metadata["choices"]
        if f.type == "bool":
            parser.add_argument(flag, action=argparse.BooleanOptionalAction, default=f.default, help=help_)
        elif f.name == "levels":
            parser.add_argument(flag, nargs="+", default=None, help=help_)
        else:
            kind = {"int": int, "float": float, "str": str, "int | None": _optional_int, "str | None": str}[f.type]
            parser.add_argument(flag, type=kind, default=f.default, choices=choices, help=help_)
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
        (cfg.resume and cfg.overwrite, "--resume continues a run and --overwrite replaces it: choose one"),
    ] if bad]
    if problems:
        parser.error(problems[0])
    return cfg


# ------------------------------------------------------------------------------------------------------- helpers


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


def target_batch(tokenizer, questions: list[str], targets: list[str], stop_id: int) -> rollout.Rollouts:
    """Targets as completions of the *answer-free* solve prompt: the hint is never in the context they are scored in."""
    return rollout.encode_targets(tokenizer, [expo.solve_prompt(q) for q in questions], targets, stop_id)


def logprobs(model, batch: rollout.Rollouts, rows, temperature: float, **kw):
    return rollout.token_logprobs(model, batch.prompt_ids[rows], batch.prompt_mask[rows], batch.completion_ids[rows],
                                  temperature, **kw)


# ------------------------------------------------------------------------------------------------- the trainer


class Trainer:
    def __init__(self, cfg: Config):
        self.cfg = cfg
        use_cuda = cfg.device.startswith("cuda") or (cfg.device == "auto" and torch.cuda.is_available())
        self.ranks = distributed.init(use_cuda)  # a single process unless launched by torchrun
        local = f"cuda:{self.ranks.local_rank}" if use_cuda else "cpu"  # under torchrun: this rank's GPU
        self.device = torch.device(local if cfg.device in ("auto", "cuda") else cfg.device)
        use_bf16 = cfg.dtype == "bf16" or (cfg.dtype == "auto" and self.device.type == "cuda")
        self.amp = (lambda: torch.autocast(self.device.type, dtype=torch.bfloat16, cache_enabled=False)) \
            if use_bf16 else contextlib.nullcontext
        self.out = Path(cfg.output_dir)
        if self.ranks.main:
            checkpoint.lock(self.out)  # one process at a time in a run folder
            checkpoint.claim(self.out, cfg.resume, cfg.overwrite)  # never mix a fresh run into an old one
            if cfg.resume:  # the same run, or an error naming the flags that differ
                changes = checkpoint.check_config(self.out, asdict(cfg))
                if changes:
                    print(f"resuming {self.out} with changed flags: {'; '.join(changes)}", flush=True)
        distributed.barrier(self.ranks)
        torch.manual_seed(cfg.seed)
        self.train_set = data.load(cfg.dataset, "train", levels=cfg.levels)
        self.eval_set = data.load(cfg.dataset, "test", levels=cfg.levels, limit=cfg.eval_limit, seed=cfg.eval_seed)
        if cfg.method in ("grpo_sft_gt", "dpo_gt") and not all(e.solution for e in self.train_set):
            raise data.DataError(f"--method {cfg.method} needs expert solutions, and {cfg.dataset} has rows without "
                                 "a 'solution'")
        start, state = (checkpoint.latest(self.out) if cfg.resume else None) or (None, None)
        if cfg.resume and start is None:
            raise FileNotFoundError(f"--resume: no checkpoint in {self.out}")
        self.model, self.tokenizer = self.load_model(start)
        if cfg.gradient_checkpointing:
            (getattr(self.model, "activation_checkpointing_enable", None)
             or self.model.gradient_checkpointing_enable)()
        self.model.train()
        self.stop_id = rollout.stop_ids(self.model, self.tokenizer)[0]
        # The frozen reference is the *initial* policy, also after --resume: KL and DPO are measured against it.
        needs_ref = cfg.kl_coef > 0 or cfg.method in ("expo_dpo", "dpo_gt")
        self.ref = None  # with LoRA the reference is the same model with its adapters off: no copy
        if needs_ref and not cfg.lora_rank:
            self.ref = (rollout.load_policy(cfg.model, self.device)[0] if start else copy.deepcopy(self.model)).eval()
            self.ref.requires_grad_(False)
        self.optimizer = torch.optim.AdamW([p for p in self.model.parameters() if p.requires_grad],
                                           lr=cfg.learning_rate, betas=(0.9, 0.99), weight_decay=0.0)
        self.step, self.skipped = 0, 0
        self.stop = StopSignals(abandon=self.ranks.world == 1)  # installed while `train` runs
        self.dpo_chosen: dict[str, tuple[int, str]] = {}  # question id -> (step made, target) for ExP-DPO
        if start:
            self.step = state["step"]
            checkpoint.load_optimizer(start, self.optimizer, state)
            self.dpo_chosen = {k: tuple(v) for k, v in state.get("dpo_chosen", {}).items()}
            if self.ranks.main:  # the steps after the checkpoint are replayed, not repeated
                checkpoint.truncate_logs(self.out, self.step)

    def load_model(self, start: Path | None):
        """The policy: a checkpoint's weights, or the base model with LoRA adapters (restored from the checkpoint)."""
        cfg = self.cfg
        if not cfg.lora_rank:
            return rollout.load_policy(str(start) if start else cfg.model, self.device)
        model, tokenizer = rollout.load_policy(cfg.model, self.device)  # the frozen base, also on --resume
        lora.apply(model, cfg.lora_rank, cfg.lora_alpha)
        if start:
            lora.load_adapter_state(model, load_file(start / "adapter.safetensors"))
        return model, tokenizer

    @contextlib.contextmanager
    def reference(self):
        """The frozen initial policy (KL, DPO, offline ExP-DPO): its own copy, or the LoRA model with adapters off."""
        if self.cfg.lora_rank:
            with lora.disabled(self.model):
                yield self.model
        else:
            yield self.ref

    # ------------------------------------------------------------------------------------------------- sampling

    def sample(self, user_texts: list[str], group_size: int | list[int], seed: int, model=None) -> rollout.Rollouts:
        prompts = rollout.encode_prompts(self.tokenizer, user_texts)
        with self.amp():
            return rollout.sample(model or self.model, self.tokenizer, prompts, group_size, self.cfg.max_new_tokens,
                                  self.cfg.temperature, seed=seed)

    def self_explanations(self, questions: list[data.Example], seed: int, model=None, out=None):
        """Targets from self-explanations (None where dropped), the explanations, and their stats. `out`: the
        explanations when already sampled (one row per question), else they are sampled here."""
        if out is None:
            out = self.sample([expo.explain_prompt(e.question, e.answer) for e in questions], 1, seed, model)
        targets, dropped = expo.explanation_targets(out.texts, [e.answer for e in questions], self.cfg.drop_leaks)
        correct = [reward.score(t, e.answer) for t, e in zip(out.texts, questions)]  # before the answer is swapped in
        cut = [i for i, t in enumerate(targets) if t is not None and out.truncated[i] and self.cfg.drop_truncated]
        wrong = [i for i, t in enumerate(targets) if t is not None and i not in cut and self.cfg.drop_wrong
                 and not correct[i]]
        for i in cut + wrong:
            targets[i] = None
        stats = {"explain_len": float(out.completion_mask.sum(1).float().mean()), "explain_dropped": dropped,
                 "explain_dropped_truncated": len(cut), "explain_dropped_wrong": len(wrong),
                 "explain_truncated": float(out.truncated.float().mean()),
                 "explain_correct": sum(correct) / len(correct)}
        return targets, out.texts, stats

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
                                for text, i in zip(roll.texts, roll.prompt_index.tolist())])
        groups = rewards.view(-1, G)
        stats = {"reward": float(rewards.mean()), "all_wrong": float((groups.sum(1) == 0).float().mean()),
                 "all_right": float((groups.sum(1) == G).float().mean()),
                 "completion_len": float(roll.completion_mask.sum(1).float().mean()),
                 "truncated": float(roll.truncated.float().mean()),
                 "gen_tok_s": float(out.completion_mask.sum()) / max(t_sample, 1e-9), "t_sample": t_sample}
        return roll, rewards, stats, explanations

    def seed(self, salt: int = 0) -> int:
        return step_seed(self.cfg.seed, self.step, salt, self.ranks.rank)

    # ------------------------------------------------------------------------------------------------ GRPO family

    def grpo_step(self, batch: list[data.Example]) -> dict:
        """One step of ExP-GRPO (GRPO, GRPO + expert SFT) on this rank's questions, as in the paper's algorithm box."""
        cfg = self.cfg
        # 1. G answer-free rollouts per question, 0/1 rewards; when ExP-GRPO explains every question (the paper's
        #    setting) its self-explanations are drawn in the same sampling pass
        explain_all = cfg.method == "expo" and cfg.explain_on == "all"
        roll, rewards, stats, expl = self.rollouts(batch, explain_all)
        adv = expo.group_advantages(rewards, cfg.num_generations, cfg.adv_scale).to(self.device)  # 2. advantages
        tgt, first_target = self.sft_targets(batch, rewards, stats, expl)  # 3. self-explanations, scored answer-free
        rows, frozen = self.frozen_logprobs(roll, adv)  # 4. old / reference log-probs, when needed
        beta = expo.beta_at(self.step, cfg.steps, cfg.beta, cfg.beta_schedule)
        t2 = time.perf_counter()
        for _ in range(cfg.ppo_epochs):  # 5. grpo_loss + beta * sft_loss, accumulated, one optimizer step
            self.optimizer.zero_grad(set_to_none=True)
            stats.update(self.policy_gradient_pass(roll, adv, rows, frozen))
            stats["loss_sft"] = self.sft_pass(tgt, beta)
            stats["grad_norm"] = self.optimizer_step()
        stats.update({"beta": beta, "targets": 0 if tgt is None else len(tgt.texts),
                      "pg_rows": sum(len(r) for r in rows), "t_update": time.perf_counter() - t2})
        G = cfg.num_generations
        self.write_samples(batch[0], roll.texts[:G], rewards[:G].tolist(), first_target)
        return stats

    def sft_targets(self, batch: list[data.Example], rewards: torch.Tensor, stats: dict, sampled=None):
        """The targets of the likelihood term, as completions of the answer-free prompt (None when there are none):
        self-explanations for expo (of every question, already `sampled` with the rollouts, or of all-wrong groups
        only, sampled here), expert solutions for grpo_sft_gt. Also the first question's target, for samples.md."""
        cfg, t1 = self.cfg, time.perf_counter()
        targets, first_target = [], None
        if cfg.method == "expo":
            groups = rewards.view(-1, cfg.num_generations)
            chosen = [i for i, g in enumerate(groups) if cfg.explain_on == "all" or g.sum() == 0]
            if chosen:
                texts, explanations, ex_stats = self.self_explanations([batch[i] for i in chosen], self.seed(1),
                                                                       out=sampled)
                stats.update(ex_stats)
                targets = [(batch[i].question, t) for i, t in zip(chosen, texts) if t is not None]
                if chosen[0] == 0:
                    first_target = texts[0] or f"(dropped: see --drop_leaks/_truncated/_wrong) {explanations[0]}"
        elif cfg.method == "grpo_sft_gt":
            targets = [(e.question, e.solution) for e in batch]
            first_target = batch[0].solution
        stats["t_explain"] = time.perf_counter() - t1
        tgt = target_batch(self.tokenizer, *zip(*targets), self.stop_id).to(self.device) if targets else None
        return tgt, first_target

    def frozen_logprobs(self, roll: rollout.Rollouts, adv: torch.Tensor):
        """The micro-batches of rows the policy-gradient pass scores, and the old / reference log-probs it needs.

        A zero advantage (every row of an all-equal group) makes a row's clipped surrogate exactly 0, so without a
        KL term such rows are skipped; the normalisers still count the whole batch, so the gradient is the same.
        On hard questions most groups are all-wrong: this is most of the update's cost saved.
        """
        cfg = self.cfg
        n_rows = len(roll.texts)
        active = [i for i in range(n_rows) if adv[i] != 0] if cfg.kl_coef == 0 else list(range(n_rows))
        rows = [[active[j] for j in mb] for mb in micro_batches(len(active), cfg.grad_accum)] if active else []
        old = ref = None
        with torch.no_grad(), self.amp():
            if cfg.ppo_epochs > 1:  # with one pass the old policy *is* the current one: use logp.detach()
                old = torch.zeros(roll.completion_ids.shape, device=self.device)
                for r in rows:
                    old[r] = logprobs(self.model, roll, r, cfg.temperature)
            if cfg.kl_coef > 0:
                ref = torch.zeros(roll.completion_ids.shape, device=self.device)
                with self.reference() as reference:
                    for r in rows:
                        ref[r] = logprobs(reference, roll, r, cfg.temperature)
        return rows, (old, ref)

    def policy_gradient_pass(self, roll: rollout.Rollouts, adv: torch.Tensor, rows: list[list[int]], frozen) -> dict:
        """Backward of this rank's share of grpo_loss over all rollouts, micro-batch by micro-batch. The normalisers
        (rows, tokens) count every rollout of the step on every rank, so the shares add up to the full-batch loss."""
        cfg, (old, ref) = self.cfg, frozen
        active = [i for r in rows for i in r]
        n_rows, n_tokens, active_tokens = distributed.all_sum(
            [len(roll.texts), float(roll.completion_mask.sum()), float(roll.completion_mask[active].sum())], self.ranks)
        totals = {"loss_pg": 0.0, "clip_frac": 0.0, "kl": 0.0, "entropy": 0.0}
        for r in rows:
            with self.amp():
                logp, entropy = logprobs(self.model, roll, r, cfg.temperature, with_entropy=True)
            mask = roll.completion_mask[r]
            loss, st = expo.grpo_loss(logp, logp.detach() if old is None else old[r], None if ref is None else ref[r],
                                      adv[r], mask, cfg.clip_eps, cfg.kl_coef, cfg.loss_norm,
                                      max_tokens=cfg.max_new_tokens)
            weight = expo.accumulation_weight(cfg.loss_norm, mask, int(n_rows), int(n_tokens))
            (loss * weight).backward()
            share = float(mask.sum()) / max(1, n_tokens)
            totals["loss_pg"] += loss.item() * weight
            for key in ("clip_frac", "kl"):
                totals[key] += st[key] * share
            totals["entropy"] += float((entropy * mask).sum()) / max(1, active_tokens)
        if not active_tokens:
            del totals["entropy"]  # measured on the rollouts that were scored; none were this step
        return totals

    def sft_pass(self, tgt: rollout.Rollouts | None, beta: float) -> float:
        """Backward of beta * sft_loss over the targets, token-mean over all ranks' targets; returns sft_loss's share."""
        local = 0.0 if tgt is None else float(tgt.completion_mask.sum())
        (t_tokens,) = distributed.all_sum([local], self.ranks)
        total = 0.0
        if tgt is None or beta == 0:
            return total
        for r in micro_batches(tgt.completion_ids.shape[0], self.cfg.grad_accum):
            with self.amp():
                logp = logprobs(self.model, tgt, r, 1.0)  # the policy's own likelihood (temperature 1)
            mask = tgt.completion_mask[r]
            loss = expo.sft_loss(logp, mask) * (float(mask.sum()) / t_tokens)
            (beta * loss).backward()
            total += loss.item()
        return total

    # ------------------------------------------------------------------------------------------------- DPO family

    def dpo_step(self, batch: list[data.Example]) -> dict:
        cfg, G = self.cfg, self.cfg.num_generations
        roll, rewards, stats, _ = self.rollouts(batch)
        scores = rewards.tolist()
        chosen = self.chosen_responses(batch, stats)
        pairs = []  # (question, chosen text, rejected text): the first wrong rollout of the question
        for i, e in enumerate(batch):
            wrong = [roll.texts[i * G + j] for j in range(G) if scores[i * G + j] == 0]
            if chosen[i] is not None and wrong:
                pairs.append((e.question, chosen[i], wrong[0]))
        (n,) = distributed.all_sum([len(pairs)], self.ranks)  # the loss is a mean over every rank's pairs
        stats["pairs"] = len(pairs)
        t2 = time.perf_counter()
        self.optimizer.zero_grad(set_to_none=True)
        stats["loss_dpo"] = 0.0
        if pairs:
            questions, good, bad = zip(*pairs)
            both = target_batch(self.tokenizer, questions + questions, good + bad, self.stop_id).to(self.device)
            for r in micro_batches(len(pairs), cfg.grad_accum):
                rows = r + [i + len(pairs) for i in r]  # chosen rows, then their rejected partners
                with torch.no_grad(), self.amp(), self.reference() as reference:
                    ref_seq = expo.sequence_logp(logprobs(reference, both, rows, 1.0), both.completion_mask[rows])
                with self.amp():
                    seq = expo.sequence_logp(logprobs(self.model, both, rows, 1.0), both.completion_mask[rows])
                k = len(r)
                loss = expo.dpo_loss(seq[:k], seq[k:], ref_seq[:k], ref_seq[k:], cfg.dpo_beta) * (k / n)
                loss.backward()
                stats["loss_dpo"] += loss.item()
            self.write_samples(batch[0], roll.texts[:G], scores[:G], chosen[0])
        stats["grad_norm"] = self.optimizer_step()
        stats["t_update"] = time.perf_counter() - t2
        return stats

    def chosen_responses(self, batch: list[data.Example], stats: dict) -> list[str | None]:
        """dpo_gt: expert solutions. expo_dpo: self-explanations, cached per question -- made once by the initial
        (reference) policy when offline, or by the current policy and renewed every --dpo_refresh steps."""
        if self.cfg.method == "dpo_gt":
            return [e.solution for e in batch]
        refresh = self.cfg.dpo_refresh
        stale = [e for e in batch if e.id not in self.dpo_chosen
                 or (refresh and self.step - self.dpo_chosen[e.id][0] >= refresh)]
        if stale:
            with contextlib.nullcontext(self.model) if refresh else self.reference() as model:
                targets, _, ex_stats = self.self_explanations(stale, self.seed(1), model=model)
            stats.update(ex_stats)
            for e, t in zip(stale, targets):
                self.dpo_chosen[e.id] = (self.step, t)
        return [self.dpo_chosen[e.id][1] for e in batch]

    # ------------------------------------------------------------------------------------------------- plumbing

    def optimizer_step(self) -> float:
        """Sum the ranks' gradients, clip, and apply, unless the norm is not finite (then nothing changes). The norm
        is taken after the sum, so every rank makes the same decision."""
        distributed.sum_gradients(self.model, self.ranks)
        norm = float(torch.nn.utils.clip_grad_norm_(self.model.parameters(), self.cfg.max_grad_norm))
        if math.isfinite(norm):
            self.stop.hold()  # from here the step is finished before a stop signal takes effect
            self.optimizer.step()
        else:
            self.skipped += 1
            print(f"step {self.step}: non-finite loss or gradient (norm {norm}); update skipped", file=sys.stderr)
        self.optimizer.zero_grad(set_to_none=True)
        return norm

    def write_samples(self, example: data.Example, texts, rewards, explanation) -> None:
        if not self.ranks.main:
            return
        with open(self.out / "samples.md", "a") as f:
            f.write(f"\n## step {self.step}\n\n**Question** ({example.id}, gold `{example.answer}`): "
                    f"{example.question}\n\n")
            for text, r in zip(texts[:3], rewards):
                f.write(f"- reward {r:.0f}: {text.strip()[:600]!r}\n")
            if explanation:
                f.write(f"\n**Training target (self-explanation or expert solution):** {explanation.strip()[:800]!r}\n")

    def log(self, record: dict) -> None:
        if not self.ranks.main:
            return
        with open(self.out / "metrics.jsonl", "a") as f:
            f.write(json.dumps(record) + "\n")

    def evaluate(self, label: str) -> dict | None:
        """pass@k on the eval set, logged; rank 0 evaluates while the other ranks wait."""
        cfg, result = self.cfg, None
        if self.ranks.main:
            t0 = time.perf_counter()
            with self.amp():
                result = evaluate.evaluate(self.model, self.tokenizer, self.eval_set, cfg.eval_k, cfg.eval_temperature,
                                           cfg.eval_max_new_tokens or cfg.max_new_tokens, seed=cfg.eval_seed + 10**6)
            self.model.train()
            self.log({"eval": label, "step": self.step, "t_eval": time.perf_counter() - t0,
                      **{k: v for k, v in result.items() if k != "samples"}})
        distributed.barrier(self.ranks)
        return result

    def save(self, everyone: bool = True) -> Path:
        """The checkpoint of the completed steps, written by rank 0 with every rank's ExP-DPO targets; `everyone`
        False (Ctrl-C, when the ranks may be anywhere) writes rank 0's without any collective."""
        chosen = self.dpo_chosen
        if everyone:
            chosen = {k: v for part in distributed.gather(self.dpo_chosen, self.ranks) for k, v in part.items()}
        path = self.out / "checkpoint"
        if self.ranks.main:
            adapters = {"adapter.safetensors": lora.adapter_state(self.model)} if self.cfg.lora_rank else {}
            path = checkpoint.save(self.out, self.model, self.tokenizer, self.optimizer,
                                   {"step": self.step, "config": asdict(self.cfg), "dpo_chosen": chosen},
                                   weights=lora.merged_state_dict(self.model) if adapters else None, extra=adapters)
        if everyone:
            distributed.barrier(self.ranks)
        return path

    def train(self) -> tuple[dict | None, dict | None]:
        cfg, main = self.cfg, self.ranks.main
        levels = "all levels" if cfg.levels is None else "level " + ",".join(map(str, cfg.levels))
        if main:
            print(f"{cfg.method} on {cfg.dataset}, {levels}: {len(self.train_set)} train / {len(self.eval_set)} eval "
                  f"questions, device {self.device}, {self.ranks.world} process(es), output {self.out}", flush=True)
        before = self.evaluate("before") if self.step == 0 and cfg.eval_before else None
        bar = tqdm(range(self.step, cfg.steps), desc=cfg.method, initial=self.step, total=cfg.steps, disable=not main)
        try:
            with self.stop as stop:
                last_save = time.monotonic()
                for _ in bar:
                    stats = self.train_step()
                    bar.set_postfix(reward=f"{stats['reward']:.2f}", tok_s=f"{stats.get('gen_tok_s', 0):.0f}")
                    if cfg.eval_every and self.step % cfg.eval_every == 0 and self.step < cfg.steps:
                        self.evaluate(f"step {self.step}")
                    minutes = (time.monotonic() - last_save) / 60
                    due = (cfg.save_every and self.step % cfg.save_every == 0) or \
                        (cfg.save_every_minutes and minutes >= cfg.save_every_minutes)
                    stopping, due = distributed.all_sum([float(stop.signal is not None), float(due)], self.ranks)
                    if stopping:  # every rank has finished the same step: stop together, no collective left waiting
                        raise Stopped(stop.signal or signal.SIGTERM)
                    if due:
                        self.save()
                        last_save = time.monotonic()
        except (Stopped, KeyboardInterrupt) as e:  # KeyboardInterrupt: a Ctrl-C raised before our handler was in
            signum = e.signum if isinstance(e, Stopped) else signal.SIGINT
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
            plot(self.out)
            print(f"\nlogs: {self.out / 'metrics.jsonl'}\nsamples: {self.out / 'samples.md'}\ncheckpoint: {path}")
        return before, after

    def train_step(self) -> dict:
        """One step on this rank's share of the step's questions, logged; the step counter moves on after it."""
        cfg = self.cfg
        questions = batch_indices(len(self.train_set), cfg.batch_size, self.step, cfg.seed)
        batch = [self.train_set[i] for i in distributed.share(questions, self.ranks)]
        t0 = time.perf_counter()
        stats = (self.dpo_step if "dpo" in cfg.method else self.grpo_step)(batch)
        stats.update(t_step=time.perf_counter() - t0, **self.memory())
        stats = distributed.merge_stats(distributed.gather(stats, self.ranks))
        stats.update(step=self.step, skipped_updates=self.skipped)
        self.log(stats)
        self.step += 1
        self.stop.release()  # the step is applied, logged and counted: a stop signal may now take effect
        return stats

    def memory(self) -> dict:
        if self.device.type == "cuda":
            return {"peak_mem_gb": torch.cuda.max_memory_allocated(self.device) / 2**30}
        try:
            import resource
            return {"peak_rss_gb": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 2**20}
        except ImportError:
            return {}


class Stopped(Exception):
    def __init__(self, signum: int):
        super().__init__(signum)
        self.signum = signum


class StopSignals:
    """SIGTERM (schedulers, `timeout`) and SIGINT (Ctrl-C) stop training cleanly: `train` writes a checkpoint of the
    completed steps and exits with 128 + the signal's number (143, 130), as a shell reports it.

    One process abandons the step in progress at once (`abandon`): nothing of it reaches the weights before the
    optimizer step, and the next step starts from zeroed gradients. From the update on (`hold`) the step is
    finished, logged and counted first (`release`). Under torchrun a rank may be inside a collective, so every rank
    finishes its step and they stop together at the step boundary (`train` sums the flags over ranks there).
    """

    def __init__(self, abandon: bool):
        self.abandon, self.signal, self.holding = abandon, None, False

    def __enter__(self) -> "StopSignals":
        self.previous = {s: signal.signal(s, self.handle) for s in (signal.SIGTERM, signal.SIGINT)}
        return self

    def __exit__(self, *exc) -> None:
        for s, handler in self.previous.items():
            signal.signal(s, handler)

    def handle(self, signum, frame) -> None:
        self.signal = signum
        if self.abandon and not self.holding:
            raise Stopped(signum)

    def hold(self) -> None:
        self.holding = True

    def release(self) -> None:
        self.holding = False
        if self.abandon and self.signal is not None:
            raise Stopped(self.signal)


def plot(out: Path) -> None:
    """curve.png: training reward per step and eval pass@1, when matplotlib is installed."""
    try:
        import matplotlib
        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        print("(pip install matplotlib for curve.png; or plot metrics.jsonl with any tool)")
        return
    records = [json.loads(line) for line in open(out / "metrics.jsonl")]
    steps = [r for r in records if "eval" not in r]
    evals = [r for r in records if "eval" in r]
    fig, ax = plt.subplots(figsize=(6, 3.5))
    ax.plot([r["step"] for r in steps], [r["reward"] for r in steps], label="train reward (mean)")
    ax.plot([r["step"] for r in evals], [r["all"]["pass@1"] for r in evals], "o-", label="eval pass@1")
    ax.set_xlabel("step")
    ax.legend()
    fig.tight_layout()
    fig.savefig(out / "curve.png", dpi=120)
    plt.close(fig)


def main(argv=None) -> None:
    cfg = parse_args(argv)
    try:
        trainer = Trainer(cfg)
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
    torch.set_num_threads(max(1, os.cpu_count() or 1))
    main()
