"""Train a policy with ExP-GRPO (ExPO), GRPO, GRPO + expert SFT, or DPO on self-explanations / expert solutions.

    python train.py                                   # the CPU demo: embedded SmolLM2-135M on the arith task
    python train.py --method grpo                     # the same run without the self-explanation term
    python train.py --model Qwen/Qwen2.5-1.5B-Instruct --dataset math --levels 5 ...   # see README: GPU recipe

One ExP-GRPO step is `Trainer.grpo_step`, five numbered lines that follow the paper's algorithm box (README: "One
step, mapped to the code"). `--method grpo` has no targets, `grpo_sft_gt` trains on the dataset's expert solutions;
the DPO methods' step is dpo.py's.

Design choices, each for a reason:
* Weights and optimizer state stay fp32; where bf16 matmuls are native (a GPU, a CPU with AMX / AVX512-BF16) the
  forward passes run under bf16 autocast (--train_dtype), with log-softmax and losses in fp32. Pure-bf16 weights
  would silently drop updates smaller than 1/256 of a weight, which at RL learning rates is most of them.
* Each step's batch and sampling seed are functions of (seed, step), so `--resume` replays exactly the run that was
  interrupted (tested), and two methods with the same seed see the same questions in the same order. The evaluation
  set and its draws depend on --eval_seed only, so training seeds never change what a run is measured on.
* One denominator rule: each loss's denominator is counted once per step over the whole batch and all ranks
  (`Trainer.denominators`), and every micro-batch's loss is its sum divided by it, so micro-batches and ranks add up
  to the full-batch loss by construction. A step whose gradient is not finite is skipped and logged.
* What is not the method lives in engine/ (`Run`: the loop, the run folder; fast sampling, torchrun, LoRA) and
  variants/ (TIS, the fkl / rkl relatives), each joining the step in one line.
"""
from __future__ import annotations

import itertools
import sys
from dataclasses import dataclass
from pathlib import Path

import torch

import data
import dpo
import expo
import reward
import rollout
from backend import threads
from engine import checkpoint, distributed, report
from engine.cli import option, parser_for
from engine.run import Run, timed
from variants import distill, tis

METHODS = ("expo", "grpo", "grpo_sft_gt", "expo_dpo", "dpo_gt")


# ------------------------------------------------------------------------------------------------------ the trainer


class Trainer(Run):
    """The five methods' steps on `Run`'s plumbing (engine/run.py): `grpo_step` for expo, grpo and grpo_sft_gt,
    dpo.step for expo_dpo and dpo_gt."""

    def update(self, batch: list[data.Example]) -> dict:
        """The method's step on this rank's questions (called by Run's loop)."""
        return dpo.step(self, batch) if self.cfg.method in dpo.METHODS else self.grpo_step(batch)

    def grpo_step(self, batch: list[data.Example]) -> dict:
        """One step of ExP-GRPO (GRPO, GRPO + expert SFT) on this rank's questions, as in the paper's algorithm box."""
        cfg, G, times = self.cfg, self.cfg.num_generations, {}
        # 1. G answer-free rollouts per question, rewarded by the verifier; for expo each question's self-explanation,
        #    sampled with the answer in the prompt in the same call
        with timed(times, "t_sample"):
            roll, rewards, explanations = self.rollouts(batch)
        # 2. group-normalised advantages: zero for every row of an all-equal group
        adv = expo.group_advantages(rewards, G, cfg.adv_scale).to(self.device)  # [B*G]
        # 3. the likelihood term's targets, scored as completions of the answer-free prompt (fkl / rkl: and a teacher)
        with timed(times, "t_explain"):
            targets, texts, target_stats, teacher = self.likelihood_targets(batch, roll, rewards, explanations)
        # 4. the rollout rows the policy gradient scores (those with a gradient) and the step's denominators
        scored = self.scored_micro_batches(adv, roll.completion_mask.sum(1).tolist())
        denominators = self.denominators(roll, targets)
        # 5. per PPO epoch: grpo_loss + beta * sft_loss, one backward per micro-batch; then one optimizer step
        beta, frozen = expo.beta_at(self.step, cfg.steps, cfg.beta, cfg.beta_schedule), {}  # frozen: pi_old, pi_ref
        with timed(times, "t_update"):
            for _ in range(cfg.ppo_epochs):
                self.optimizer.zero_grad(set_to_none=True)
                sums = self.backward_pass(roll, adv, frozen, scored, targets, teacher, denominators, beta)
                grad_norm = self.optimizer_step()
        self.write_samples(batch[0], roll.texts[:G], rewards[:G].tolist(), report.first_target(texts, explanations))
        return {**report.sampling_stats(roll, rewards, explanations, G, times["t_sample"], batch), **target_stats,
                **report.update_stats(sums, roll, scored, self.ranks, cfg.explain_loss != "nll"), **times, "beta": beta,
                "grad_norm": grad_norm, "targets": 0 if targets is None else len(targets.texts),
                "pg_rows": sum(map(len, scored))}

    def rollouts(self, batch: list[data.Example]):
        """(G answer-free rollouts per question, their 0/1 rewards [B*G], expo's self-explanations (one per question,
        at --explain_temperature) or None), in one sampling call: decoding is latency-bound, B more rows cost little."""
        cfg, B, G = self.cfg, len(batch), self.cfg.num_generations
        explain = cfg.method == "expo" and cfg.explain_loss != "rkl"  # rkl distills along the rollouts alone
        prompts = [expo.solve_prompt(e.question) for e in batch] + \
            [expo.explain_prompt(e.question, e.answer, cfg.explain_hint) for e in batch if explain]
        E = len(prompts) - B  # explanations: B or 0
        with self.sampling():  # the bf16 sampler copy, or the fp32 policy in fp32
            out = rollout.sample(self.sampler, self.tokenizer, rollout.encode_prompts(self.tokenizer, prompts),
                                 [G] * B + [1] * E, cfg.max_new_tokens,
                                 [cfg.temperature] * B + [cfg.explain_temperature] * E, seed=self.sampling_seed())
        roll, explanations = out.select(range(B * G)), out.select(range(B * G, B * G + E)) if E else None
        rewards = torch.tensor([reward.score(text, batch[i].answer, batch[i].question)  # 0 if it restates the question
                                for text, i in zip(roll.texts, roll.prompt_index.tolist())])  # [B*G]
        return roll, rewards, explanations

    def likelihood_targets(self, batch: list[data.Example], roll: rollout.Rollouts, rewards: torch.Tensor,
                           explanations: rollout.Rollouts | None):
        """Step 3: (the targets as completions of the answer-free prompt, or None; each question's target text or None;
        the filters' counts; fkl / rkl's teacher, else None). expo: the self-explanations through its filters;
        grpo_sft_gt: the expert solutions; grpo: none; rkl: the rollouts (all-wrong groups' with --explain_on failed)."""
        cfg, questions = self.cfg, [e.question for e in batch]
        solved = (rewards.view(-1, cfg.num_generations).sum(1) > 0).tolist()  # [B]
        texts, counts, targets = [None] * len(batch), {}, None
        if cfg.method == "grpo_sft_gt":
            texts = [e.solution for e in batch]
        elif cfg.method == "expo" and cfg.explain_loss == "rkl":  # the rollouts themselves (variants/distill.py)
            targets = distill.rollout_targets(roll, solved, cfg.explain_on)
        elif cfg.method == "expo":
            texts, counts = expo.self_explanation_targets(explanations.texts, [e.answer for e in batch],
                                                          explanations.truncated.tolist(),
                                                          solved if cfg.explain_on == "failed" else None,
                                                          cfg.drop_leaks, cfg.drop_truncated, cfg.drop_wrong, questions)
        targets = targets or rollout.encode_targets(self.tokenizer, [expo.solve_prompt(q) for q in questions], texts,
                                                    self.turn_end, self.device)  # scored after the answer-free prompt
        return targets, texts, counts, distill.teacher_view(self, batch, targets)  # fkl / rkl only; else None

    def scored_micro_batches(self, adv: torch.Tensor, lengths: list[int]) -> list[list[int]]:
        """The micro-batches of rollout rows the policy gradient scores (`micro_batches`, by length). Without a KL term
        the rows of all-equal groups (most, on hard questions) are skipped: a zero advantage makes their surrogate
        exactly 0, and the denominators still count them, so the gradient is the same."""
        active = [i for i in range(len(adv)) if adv[i] != 0] if self.cfg.kl_coef == 0 else list(range(len(adv)))
        split = rollout.micro_batches(len(active), self.cfg.grad_accum, [lengths[i] for i in active])
        return [[active[j] for j in mb] for mb in split]

    def denominators(self, roll: rollout.Rollouts, targets: rollout.Rollouts | None) -> expo.Denominators:
        """The step's denominators over all its rollouts and targets, summed over ranks (expo.Denominators)."""
        pg = expo.pg_denominator(roll.completion_mask, self.cfg.loss_norm, self.cfg.max_new_tokens)
        target_tokens = 0.0 if targets is None else float(targets.completion_mask.sum())
        return expo.Denominators(*distributed.all_sum([pg, target_tokens], self.ranks))

    def backward_pass(self, roll: rollout.Rollouts, adv: torch.Tensor, frozen: dict, scored: list[list[int]],
                      targets: rollout.Rollouts | None, teacher: rollout.Rollouts | None,
                      denominators: expo.Denominators, beta: float) -> dict:
        """Backward of this rank's share of the step's loss, one micro-batch at a time (the i-th of the scored rollout
        rows with the i-th of the targets) through expo.microbatch_loss; its statistics summed."""
        cfg, sums = self.cfg, {}
        target_micro = [] if targets is None or not beta else \
            rollout.micro_batches(len(targets.texts), cfg.grad_accum, targets.completion_mask.sum(1).tolist())
        for rows, target_rows in itertools.zip_longest(scored, target_micro, fillvalue=[]):
            pg, logged = self.rollout_inputs(roll, adv, frozen, rows)
            target = self.target_inputs(targets, teacher, target_rows)
            loss, stats = expo.microbatch_loss(**pg, **target, denominators=denominators, beta=beta,
                                               clip_eps=cfg.clip_eps, kl_coef=cfg.kl_coef, norm=cfg.loss_norm)
            loss.backward()
            for key, value in {**stats, **logged}.items():
                sums[key] = max(sums.get(key, value), value) if key == "max_ratio" else sums.get(key, 0.0) + value
        return sums

    def target_inputs(self, targets: rollout.Rollouts | None, teacher: rollout.Rollouts | None, rows: list[int]):
        """microbatch_loss's target arguments for these target rows (None without rows): their log-probs at T = 1 and
        mask [m, w], at the rows' own width w. fkl / rkl pass -KL to the teacher per token instead (distill.kl_loss)."""
        if not rows:
            return dict(target_logp=None, target_mask=None)
        part = targets.select(rows)
        with self.amp():
            logp = rollout.logprobs(self.model, part, 1.0) if teacher is None else \
                -distill.target_kl(self, part, teacher.select(rows))  # [m, w]
        return dict(target_logp=logp, target_mask=part.completion_mask)

    def rollout_inputs(self, roll: rollout.Rollouts, adv: torch.Tensor, frozen: dict, rows: list[int]):
        """(microbatch_loss's rollout arguments for these rows at their own width, all None without rows; what the log
        sums of them: entropy, a bf16 sampler's mismatch). pi_old: the first epoch's log-probs, detached (a ratio of
        exactly 1), kept in `frozen` for later epochs. With --tis_cap, TIS's token weights (variants/tis.py)."""
        keys = ("logp", "old_logp", "ref_logp", "advantages", "mask", "token_weights")
        if not rows:
            return dict.fromkeys(keys), {}
        part, temperature = roll.select(rows), self.cfg.temperature
        with self.amp():
            logp, entropy = rollout.logprobs(self.model, part, temperature, with_entropy=True)  # [n, w] each
            if tuple(rows) not in frozen:  # the first epoch: pi_old is the policy as it is now; pi_ref for the KL
                ref = self.reference_logprobs(part, temperature) if self.cfg.kl_coef > 0 else None  # engine/run.py
                frozen[tuple(rows)] = (logp.detach(), ref)
        old, ref = frozen[tuple(rows)]
        cap = self.cfg.tis_cap if self.sampler is not self.model else 0.0  # an fp32 sampler *is* the trainer
        weights, logged = tis.correction(old, part.sampler_logp, part.completion_mask, cap)  # variants/tis.py
        values = (logp, old, ref, adv[rows], part.completion_mask, weights)
        return dict(zip(keys, values)), {**logged, "entropy": float((entropy * part.completion_mask).sum())}

    def optimizer_step(self) -> float:
        """Sum the ranks' gradients, clip, apply AdamW, refresh the bf16 sampler (engine/run.py); returns the norm.
        Without a gradient on any rank (all groups all wrong, no targets), no step: AdamW's momentum moves nothing."""
        return self.apply_gradients()

    def needs_reference(self) -> bool:  # DPO's, besides Run's (KL, the relatives' initial teacher)
        return self.cfg.method in dpo.METHODS or super().needs_reference()


# --------------------------------------------------------------------------------------------------------- the CLI


@dataclass
class Config:
    method: str = option("expo", "expo = ExP-GRPO; grpo; grpo_sft_gt = GRPO + SFT on expert solutions; expo_dpo; "
                         "dpo_gt = DPO with expert solutions", METHODS, section="the method and the paper's settings")
    model: str | None = option(None, "hub id or local folder (default: the embedded SmolLM2-135M-Instruct)")
    dataset: str = option("arith", "gsm8k | math | math500 | arith | path/to/file.jsonl")
    levels: list[str] | None = option(None, "difficulty levels (default: arith's 2, all of others; 'all' for all)")
    expert_style: str = option("worded", "arith: its expert solutions' style (the distance experiment)",
                               tuple(data.EXPERT_STYLES))
    num_generations: int = option(4, "G: answer-free rollouts sampled per question")
    batch_size: int = option(8, "questions per step, over all ranks under torchrun (each takes its share)")
    beta: float = option(0.04, "weight of the self-explanation (expo) or expert-solution (grpo_sft_gt) term")
    learning_rate: float = option(1e-5, "AdamW learning rate (with --lora_rank, use ~10x the full fine-tuning rate)")
    steps: int = option(6, "training steps")
    kl_coef: float = option(0.0, "weight of the k3 KL penalty to the frozen initial policy (0 = no reference model)",
                            section="the objective")
    clip_eps: float = option(0.2, "PPO clipping range of the token ratio")
    loss_norm: str = option("seq", "seq (DeepSeekMath), token (DAPO) or constant (Dr. GRPO)", expo.LOSS_NORMS)
    adv_scale: str = option("std", "std: (r - mean) / std; none: r - mean (Dr. GRPO)", ("std", "none"))
    beta_schedule: str = option("constant", "constant beta, or linear decay to 0 over --steps", ("constant", "linear"))
    ppo_epochs: int = option(1, "optimizer steps on each batch of rollouts (1 = on-policy, no old-policy pass)")
    max_grad_norm: float = option(1.0, "gradient norm clipping")
    dpo_beta: float = option(0.1, "DPO temperature")
    tis_cap: float = option(0.0, "TIS for a bf16 sampler: weight each rollout token by min(pi_old / pi_sampler, C)")
    lora_rank: int = option(0, "train rank-R LoRA adapters on every linear layer instead of all weights (0: off)")
    lora_alpha: float = option(32.0, "LoRA scale: the update is lora_alpha / lora_rank * B A")
    explain_hint: str = option("brief", "what the self-explanation prompt asks for: brief = a short solution ending in "
                               "\\boxed{answer}, step_by_step = the hint of the runs recorded before it (most of its "
                               "explanations hit a 128-token budget)", tuple(expo.HINTS),
                               section="the self-explanations: prompt, temperature, filters and ablations")
    explain_temperature: float = option(0.3, "sampling temperature of the self-explanations (rollouts: --temperature): "
                                        "a target is not a rollout (no ratio, no advantage), and a cooler draw is "
                                        "likelier under the policy and finishes more often")
    explain_on: str = option("all", "self-explain every question (all, the paper) or only all-wrong groups",
                             ("all", "failed"))
    drop_leaks: bool = option(True, "drop self-explanations that mention being given the answer")
    drop_truncated: bool = option(False, "drop self-explanations cut off by the budget (else: answer pasted after)")
    drop_wrong: bool = option(False, "drop self-explanations that miss the gold answer (else it replaces theirs)")
    dpo_refresh: int = option(0, "expo_dpo: 0 = offline (explanations of the initial model), N = renew every N steps")
    explain_loss: str = option("nll", "expo's self-explanation term: nll = -log pi(e~ | q), the paper's; fkl = the "
                               "full-vocabulary KL from the teacher to the policy along e~; rkl = the KL from the "
                               "policy to the teacher along the policy's own rollouts (no self-explanation is sampled)",
                               distill.EXPLAIN_LOSSES, section="ExPO's relatives: the term as self-distillation")
    teacher: str = option("current", "fkl / rkl: the policy shown the answer, current (detached) or initial (frozen)",
                          ("current", "initial"))
    max_new_tokens: int = option(128, "generation budget of rollouts and self-explanations",
                                 section="sampling and evaluation")
    temperature: float = option(0.7, "sampling temperature; the policy-gradient log-probs are scored at the same "
                                     "temperature, the likelihood terms (self-explanation, expert SFT, DPO) at T = 1")
    sampler_dtype: str = option("auto", "what rollouts, self-explanations and evaluations are sampled from: bf16 = a "
                                "bf16 copy of the policy refreshed after every update, fp32 = the policy itself in "
                                "fp32 (whatever --train_dtype), auto = bf16 where bf16 matmuls are native (CUDA, a CPU "
                                "with AMX / AVX512-BF16)", ("auto", "fp32", "bf16"))
    eval_every: int = option(0, "evaluate every N steps (0 = only before and after training)")
    eval_before: bool = option(True, "evaluate before training (lab/compare.py does it once for all runs)")
    eval_k: int = option(4, "samples per eval question: reports pass@1 and pass@k")
    eval_temperature: float = option(0.7, "sampling temperature of evaluation (the paper: 0.7)")
    eval_limit: int | None = option(48, "evaluate a fixed random subset of this many test questions ('all')")
    eval_max_new_tokens: int | None = option(None, "generation budget of evaluation (default: --max_new_tokens)")
    eval_seed: int = option(0, "seed of the evaluation's questions and draws (never the training seed's)")
    seed: int = option(0, "seed of the training run: question order and sampling (never the evaluation)",
                       section="the run")
    grad_accum: int = option(4, "micro-batches per optimizer step (same gradient, less memory)")
    gradient_checkpointing: bool = option(False, "recompute activations in the backward pass to save memory")
    save_every: int = option(0, "write a checkpoint every N steps (0: only by time, at the end, and when stopped)")
    save_every_minutes: float = option(30.0, "also checkpoint when this many minutes passed (0: off): a kill's loss")
    output_dir: str | None = option(None, "the run's folder (default: runs/METHOD-DATASET)")
    resume: bool = option(False, "continue the run in output_dir from its newest checkpoint, as if uninterrupted")
    overwrite: bool = option(False, "start afresh in an output_dir that holds a run, deleting that run's files")
    device: str = option("auto", "auto | cpu | cuda | cuda:N")
    train_dtype: str = option("auto", "the trainer's forward passes: bf16 = under bf16 autocast (weights, gradients "
                              "and AdamW stay fp32, log-softmax and losses fp32), fp32, auto = bf16 where bf16 matmuls "
                              "are native (CUDA, a CPU with AMX / AVX512-BF16), as --sampler_dtype",
                              ("auto", "fp32", "bf16"))


def parse_args(argv=None) -> Config:
    parser = parser_for(Config, __doc__.split("\n\n")[0])
    cfg = Config(**vars(parser.parse_args(argv)))
    try:
        cfg.levels = data.parse_levels(cfg.dataset, cfg.levels)
    except data.DataError as e:
        parser.error(f"--{e}")
    cfg.output_dir = cfg.output_dir or f"runs/{cfg.method}-{Path(cfg.dataset).stem}"
    problems = [msg for bad, msg in [
        (cfg.num_generations < 2, "--num_generations must be at least 2 (advantages compare rollouts in a group)"),
        (min(cfg.batch_size, cfg.steps, cfg.ppo_epochs, cfg.grad_accum) < 1, "--batch_size, --steps, --ppo_epochs, "
         "--grad_accum must be >= 1"),
        (cfg.beta < 0 or cfg.kl_coef < 0, "--beta and --kl_coef must be >= 0"),
        (not 0 < cfg.clip_eps < 1, "--clip_eps must be in (0, 1)"),
        (min(cfg.temperature, cfg.eval_temperature, cfg.explain_temperature) <= 0, "temperatures must be > 0"),
        (cfg.learning_rate <= 0 or cfg.max_new_tokens < 1, "--learning_rate must be > 0, --max_new_tokens >= 1"),
        (cfg.save_every_minutes < 0, "--save_every_minutes must be >= 0"),
        (cfg.resume and cfg.overwrite, "--resume continues a run and --overwrite replaces it: choose one"),
        (cfg.explain_loss != "nll" and cfg.method != "expo", "--explain_loss fkl / rkl is a form of --method expo"),
    ] if bad]
    if problems:
        parser.error(problems[0])
    return cfg


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
    threads.use_this_process_cpus()  # its CPU affinity's, or OMP_NUM_THREADS
    main()
