"""A training run's plumbing: where it runs, its folder, data, model and reference, the loop, its logs, evaluations
and checkpoints. `train.Trainer` builds on `Run` and adds the method (its `update`: how a step samples, scores and
learns); nothing here knows the objective. A first reading may skip this file.

    Run(cfg)             ranks and device; the run folder locked and claimed (checkpoint.py); the train and eval
                         sets; the policy (a checkpoint's, or the base model with LoRA adapters); the frozen initial
                         policy when a loss needs one; AdamW; the step and optimizer state of a checkpoint on --resume
    train() / loop()     evaluate, run the steps (`update` on this rank's share of each step's questions), checkpoint
                         by steps and by time, stop cleanly on SIGTERM / Ctrl-C, evaluate again, say what was learnt
    log / write_samples  metrics.jsonl (one JSON line per step or evaluation) and samples.md, by rank 0; evaluate
                         also appends its completions to eval_samples.jsonl
    evaluate(label)      pass@k on the fixed evaluation set (its questions and draws depend on --eval_seed only)
    sampler, sampling()  what rollouts are drawn from (the bf16 copy or the policy) and the context to draw them in;
                         `sampling_seed` is a function of (seed, step, rank)
    apply_gradients()    sum the ranks' gradients, clip, apply (unless not finite), refresh the sampler copy
    save()               the checkpoint of the completed steps (every rank calls it at the same step)
"""
from __future__ import annotations

import contextlib
import copy
import json
import math
import random
import signal
import sys
import time
from dataclasses import asdict
from pathlib import Path

import torch
from safetensors.torch import load_file
from tqdm import tqdm

import data
import evaluate
import reward
import rollout
from backend import bf16
from engine import checkpoint, distributed, lora, report


ENGINE_STATE = ("step", "skipped_updates", "config")  # what a checkpoint's trainer_state.json holds for the engine


def step_seed(seed: int, step: int, salt: int = 0, rank: int = 0) -> int:
    """The sampling seed of a step; each rank draws its own (rank 0's is the single-process seed)."""
    return (seed * 1_000_003 + step * 7919 + salt + rank * 104_729) % (2**31)


def batch_indices(n: int, batch_size: int, step: int, seed: int) -> list[int]:
    """The questions of `step`: consecutive slices of per-epoch shuffles, a pure function of (seed, step)."""
    out = []
    for position in range(step * batch_size, (step + 1) * batch_size):
        epoch, offset = divmod(position, n)
        order = list(range(n))
        random.Random(f"{seed}/{epoch}").shuffle(order)
        out.append(order[offset])
    return out


@contextlib.contextmanager
def timed(times: dict[str, float], key: str):
    """Record the wall time of the block in times[key], in seconds."""
    t0 = time.perf_counter()
    yield
    times[key] = time.perf_counter() - t0


class Run:
    """Everything a training run holds besides the method (see the module docstring)."""

    def __init__(self, cfg):
        self.cfg = cfg
        self.ranks, self.device, self.amp = self.placement()
        self.out = Path(cfg.output_dir)
        if self.ranks.main:
            self.claim_folder()
        distributed.barrier(self.ranks)
        torch.manual_seed(cfg.seed)
        self.train_set, self.eval_set = self.load_data()
        start, state = (checkpoint.latest(self.out) if cfg.resume else None) or (None, None)
        if cfg.resume and start is None:
            raise FileNotFoundError(f"--resume: no checkpoint in {self.out}")
        self.model, self.tokenizer = self.load_model(start)
        self.sampler = self.load_sampler()
        self.turn_end = rollout.turn_end_id(self.tokenizer)  # what every training target ends in
        self.ref = self.load_reference(start)
        self.optimizer = torch.optim.AdamW([p for p in self.model.parameters() if p.requires_grad],
                                           lr=cfg.learning_rate, betas=(0.9, 0.99), weight_decay=0.0)
        self.step, self.skipped = 0, 0
        self.method_state: dict[str, dict] = {}  # the method's own, kept by checkpoints unread (`checkpoint_state`)
        self.signals = checkpoint.StopSignals(abandon=self.ranks.world == 1)  # installed while `train` runs
        if start:
            self.restore(start, state)
        elif self.ranks.main:  # written once the run can start: a start that failed (bad data, model) leaves no run
            checkpoint.write_config(self.out, asdict(cfg))

    # ------------------------------------------------------------------------------------------------------ setup

    def placement(self):
        """(ranks, device, autocast context) -- a single process unless launched by torchrun."""
        cfg = self.cfg
        use_cuda = cfg.device.startswith("cuda") or (cfg.device == "auto" and torch.cuda.is_available())
        ranks = distributed.init(use_cuda)
        local = f"cuda:{ranks.local_rank}" if use_cuda else "cpu"  # under torchrun: this rank's GPU
        device = torch.device(local if cfg.device in ("auto", "cuda") else cfg.device)
        use_bf16 = cfg.train_dtype == "bf16" or (cfg.train_dtype == "auto" and bf16.is_native(device))
        amp = (lambda: bf16.autocast(device)) if use_bf16 else contextlib.nullcontext
        return ranks, device, amp

    def claim_folder(self) -> None:
        """Lock the run folder, refuse to mix a fresh run into an old one, and check that --resume continues it
        (a fresh run's config.json is written once its data and model have loaded)."""
        cfg = self.cfg
        checkpoint.lock(self.out)  # one process at a time in a run folder
        checkpoint.claim(self.out, cfg.resume, cfg.overwrite)
        if cfg.resume:  # the same run, or an error naming the flags that differ
            changes = checkpoint.check_config(self.out, asdict(cfg))
            if changes:
                print(f"resuming {self.out} with changed flags: {'; '.join(changes)}", flush=True)

    def load_data(self) -> tuple[list[data.Example], list[data.Example]]:
        cfg = self.cfg
        train_set = data.load(cfg.dataset, "train", levels=cfg.levels, expert_style=cfg.expert_style)
        eval_set = data.load(cfg.dataset, "test", levels=cfg.levels, limit=cfg.eval_limit, seed=cfg.eval_seed)
        if cfg.method in ("grpo_sft_gt", "dpo_gt") and not all(e.solution for e in train_set):
            raise data.DataError(f"--method {cfg.method} needs expert solutions, and {cfg.dataset} has rows without "
                                 "a 'solution'")
        return train_set, eval_set

    def load_model(self, start: Path | None):
        """The policy: a checkpoint's weights, or the base model with LoRA adapters (restored from the checkpoint)."""
        cfg = self.cfg
        if not cfg.lora_rank:
            model, tokenizer = rollout.load_policy(str(start) if start else cfg.model, self.device)
        else:
            model, tokenizer = rollout.load_policy(cfg.model, self.device)  # the frozen base, also on --resume
            lora.apply(model, cfg.lora_rank, cfg.lora_alpha)
            if start:
                lora.load_adapter_state(model, load_file(start / "adapter.safetensors"))
        if cfg.gradient_checkpointing:
            (getattr(model, "activation_checkpointing_enable", None) or model.gradient_checkpointing_enable)()
        return model.train(), tokenizer

    def load_sampler(self):
        """What rollouts, self-explanations and evaluations are sampled from (--sampler_dtype): a bf16 copy of the
        policy where bf16 matmuls are native, refreshed after every optimizer step (`refresh_sampler`), else the
        policy itself. The trainer's log-probs, losses and optimizer stay fp32 either way. With LoRA the copy holds the
        adapters too, and the refresh copies them."""
        want = self.cfg.sampler_dtype
        if want == "bf16" or (want == "auto" and bf16.is_native(self.device)):
            return bf16.sampler_copy(self.model, torch.bfloat16)
        return self.model

    def refresh_sampler(self) -> None:
        if self.sampler is not self.model:
            bf16.refresh_sampler(self.sampler, self.model)

    def sampling(self, model=None):
        """The context to sample `model` (default: the sampler) in, by --sampler_dtype and never --train_dtype: none
        for the bf16 copy or an fp32 sampler; bf16 autocast for an fp32 model (DPO's reference) when sampling bf16."""
        model = model or self.sampler
        fp32_model_bf16_run = next(model.parameters()).dtype != torch.bfloat16 and self.sampler is not self.model
        return bf16.autocast(self.device) if fp32_model_bf16_run else contextlib.nullcontext()

    def apply_gradients(self) -> float:
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
            self.signals.hold()  # from here the step is finished before a stop signal takes effect
            self.optimizer.step()
            self.refresh_sampler()
        else:
            self.skipped += 1
            print(f"step {self.step}: non-finite loss or gradient (norm {norm}); update skipped", file=sys.stderr)
        self.optimizer.zero_grad(set_to_none=True)
        return norm

    def sampling_seed(self, salt: int = 0) -> int:
        """This step's sampling seed on this rank (`step_seed`)."""
        return step_seed(self.cfg.seed, self.step, salt, self.ranks.rank)

    def load_reference(self, start: Path | None):
        """The frozen *initial* policy (also after --resume) when a loss needs one (KL, the initial teacher, DPO). With
        LoRA there is no copy: the reference is the same model with its adapters off (see `reference`)."""
        if not self.needs_reference() or self.cfg.lora_rank:
            return None
        ref = rollout.load_policy(self.cfg.model, self.device)[0] if start else copy.deepcopy(self.model)
        return ref.eval().requires_grad_(False)

    def needs_reference(self) -> bool:
        return self.cfg.kl_coef > 0 or (self.cfg.explain_loss != "nll" and self.cfg.teacher == "initial")

    def restore(self, start: Path, state: dict) -> None:
        """Continue from a checkpoint: its step and optimizer state; the logs are cut back to it."""
        self.step, self.skipped = state["step"], state.get("skipped_updates", 0)
        self.method_state = {k: v for k, v in state.items() if k not in ENGINE_STATE}  # the method's (unread)
        checkpoint.load_optimizer(start, self.optimizer, state)
        if self.ranks.main:  # the steps after the checkpoint are replayed, not repeated
            checkpoint.truncate_logs(self.out, self.step)

    @torch.no_grad()
    def reference_logprobs(self, part: rollout.Rollouts, temperature: float) -> torch.Tensor:
        """The frozen initial policy's token log-probs [n, w] of a micro-batch: the KL term's pi_ref."""
        with self.reference() as reference:
            return rollout.logprobs(reference, part, temperature)

    @contextlib.contextmanager
    def reference(self):
        """The frozen initial policy: its own copy, or the LoRA model with its adapters off."""
        if self.cfg.lora_rank:
            with lora.disabled(self.model):
                yield self.model
        else:
            yield self.ref


    # --------------------------------------------------------------------------------------------------- the loop

    def update(self, batch: list[data.Example]) -> dict:
        """One step of the method on this rank's questions: the subclass's (train.Trainer)."""
        raise NotImplementedError

    def train(self) -> tuple[dict | None, dict | None]:
        """Evaluate, train --steps steps, evaluate again; print what was learnt. A stop signal saves and exits."""
        cfg, main = self.cfg, self.ranks.main
        levels = "all levels" if cfg.levels is None else "level " + ",".join(map(str, cfg.levels))
        autocast = self.amp is not contextlib.nullcontext  # --train_dtype: the trainer's forward passes under autocast
        emulated = "" if bf16.is_native(self.device) else " (bf16 emulated on this CPU: slower than fp32)"
        sampler = "a bf16 copy of the policy" + emulated if self.sampler is not self.model else "the fp32 policy"
        trainer = "under bf16 autocast" + emulated if autocast else "in fp32"
        if main:
            print(f"{cfg.method} on {cfg.dataset}, {levels}: {len(self.train_set)} train / {len(self.eval_set)} eval "
                  f"questions, device {self.device}, {self.ranks.world} process(es) of {torch.get_num_threads()} "
                  f"thread(s), sampling from {sampler}, training {trainer}, output {self.out}", flush=True)
        before = self.evaluate("before") if self.step == 0 and cfg.eval_before else self.logged_before()
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
            print(report.learnt(self.out, cfg, before, after))
            report.plot_curve(self.out)
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
            bar.set_postfix(report.progress(stats))
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

    # ------------------------------------------------------------------------------------------------- logging

    def write_samples(self, example: data.Example, texts, rewards, explanation) -> None:
        if not self.ranks.main:
            return
        with open(self.out / "samples.md", "a") as f:
            f.write(f"\n## step {self.step}\n\n**Question** ({example.id}, gold `{example.answer}`): "
                    f"{example.question}\n\n")
            for text, r in zip(texts[:3], rewards):
                refused = reward.refused(text, example.answer, example.question)  # the rule's name, or None
                refused = f" (refused: {refused})" if refused else ""
                f.write(f"- reward {r:.0f}{refused}: {text.strip()[:600]!r}\n")
            if explanation:
                f.write(f"\n**Training target (self-explanation or expert solution):** {explanation.strip()[:800]!r}\n")

    def log(self, record: dict) -> None:
        if not self.ranks.main:
            return
        with open(self.out / "metrics.jsonl", "a") as f:
            f.write(json.dumps(record) + "\n")

    def logged_eval(self, step: int) -> bool:
        """Does metrics.jsonl hold an evaluation line of `step`? (A resumed run redoes one a stop cut off.)"""
        path = self.out / "metrics.jsonl"
        records = [json.loads(line) for line in open(path)] if self.ranks.main and path.exists() else []
        logged = any("eval" in r and r["step"] == step and r["eval"] != "after" for r in records)
        return bool(distributed.all_sum([float(logged)], self.ranks)[0])  # every rank takes the same decision

    def logged_before(self) -> dict | None:
        """A resumed run's "before" evaluation, as metrics.jsonl logged it, so that its closing lines compare against
        it as the uninterrupted run's do (None if it made none)."""
        path = self.out / "metrics.jsonl"
        records = [json.loads(line) for line in open(path)] if self.ranks.main and path.exists() else []
        return next((r for r in records if r.get("eval") == "before"), None)

    def evaluate(self, label: str) -> dict | None:
        """pass@k on the eval set, logged; rank 0 evaluates while the other ranks wait."""
        cfg, result = self.cfg, None
        if self.ranks.main:
            t0 = time.perf_counter()
            with self.sampling(self.sampler):
                result = evaluate.evaluate(self.sampler, self.tokenizer, self.eval_set, cfg.eval_k,
                                           cfg.eval_temperature, cfg.eval_max_new_tokens or cfg.max_new_tokens,
                                           seed=cfg.eval_seed + evaluate.DRAWS)
            self.model.train()
            with open(self.out / "eval_samples.jsonl", "a") as f:  # every completion, to score again (--rescore)
                f.writelines(json.dumps({"eval": label, "step": self.step, **r}) + "\n" for r in result["completions"])
            self.log({"eval": label, "step": self.step, "t_eval": time.perf_counter() - t0,
                      **{k: v for k, v in result.items() if k not in ("samples", "completions")}})
        distributed.barrier(self.ranks)
        return result

    def checkpoint_state(self) -> dict:
        """What a checkpoint keeps besides weights and optimizer: the step, the skipped updates, the flags (ENGINE_STATE),
        and the method's own state, read by the method alone: `method_state`, named dicts of which each rank holds its
        own share (e.g. ExP-DPO's cached chosen responses, one per question, dpo.py); rank 0 saves their union."""
        parts = distributed.gather(self.method_state, self.ranks)
        method = {name: {k: v for part in parts for k, v in part.get(name, {}).items()} for part in parts for name in part}
        return {**method, "step": self.step, "skipped_updates": self.skipped, "config": asdict(self.cfg)}

    def save(self) -> Path:
        """The checkpoint of the completed steps, written by rank 0 (every rank calls it, at the same step)."""
        state, path = self.checkpoint_state(), self.out / "checkpoint"
        if self.ranks.main:
            adapters = {"adapter.safetensors": lora.adapter_state(self.model)} if self.cfg.lora_rank else {}
            path = checkpoint.save(self.out, self.model, self.tokenizer, self.optimizer, state,
                                   weights=lora.merged_state_dict(self.model) if adapters else None, extra=adapters)
        distributed.barrier(self.ranks)
        return path

    def memory(self) -> dict:
        if self.device.type == "cuda":
            return {"peak_mem_gb": torch.cuda.max_memory_allocated(self.device) / 2**30}
        try:
            import resource
            return {"peak_rss_gb": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 2**20}
        except ImportError:
            return {}
