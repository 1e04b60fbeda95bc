"""ExP-GRPO on TRL: `ExPOTrainer`, a `trl.GRPOTrainer` that adds ExPO's self-explanation term, for the paper's scale
(a 3B-7B model on 8 GPUs, ZeRO-3 or FSDP, vLLM). Recipe and flags: docs/trl.md.

    pip install trl==1.16.0                                   # not a runtime requirement of this repository
    python -m scale.trl_expo --output_dir runs/trl-expo       # a CPU smoke run on the embedded model and arith
    accelerate launch --config_file zero3.yaml -m scale.trl_expo --model_name_or_path Qwen/Qwen2.5-3B-Instruct ...

What it changes in TRL's step, and nothing else (the method is expo.py's, called, not copied):
  1. after TRL has generated and scored the G rollouts of each question, the process that holds a group's first row
     asks the policy for one self-explanation of that question (`expo.explain_prompt`: the gold answer in the prompt),
     through TRL's own generation path (transformers or vLLM, colocate or server), at `explain_temperature`;
  2. `expo.self_explanation_targets` makes them targets (its filters; `\\boxed{gold}`), attached to the group's first
     row as `expo_target_ids` / `expo_target_mask`, so TRL's shuffling and splitting carry them along;
  3. the loss is TRL's GRPO loss + expo_beta * the NLL of the targets under the answer-free prompt (TRL's `prompt`) at
     temperature 1, a token mean over the whole generation batch of every process (`expo_target_tokens`, gathered
     once), normalised as TRL's "dapo" loss normalises its tokens, so micro-batches and processes add up to it.
Every process scores its targets in every micro-batch, one row at least, so ZeRO-3 and FSDP see the same forward
passes on every rank. Logged beside TRL's metrics: expo/targets, expo/explain_truncated, expo/explain_reached,
expo/all_wrong, expo/loss_sft (the names of our metrics.jsonl, under expo/).
"""
from __future__ import annotations

import contextlib
import json
import os
from dataclasses import dataclass, field
from pathlib import Path

import torch

try:
    from trl import GRPOConfig, GRPOTrainer
except ImportError as e:  # an optional extra: only this add-on needs it
    raise ImportError("ExPO on TRL needs trl: pip install trl==1.16.0 (see docs/trl.md)") from e
from transformers import AutoTokenizer, HfArgumentParser, TrainerCallback

import data
import expo
import reward
import rollout
from backend import assets


@dataclass
class ExPOConfig(GRPOConfig):
    """TRL's GRPOConfig plus ExPO's knobs (train.py's flags of the same names; TRL's own `beta` is the KL weight, our
    --kl_coef)."""
    expo_beta: float = field(default=0.04, metadata={"help": "weight of the self-explanation term (train.py --beta)"})
    explain_hint: str = field(default="brief", metadata={"help": f"the explanation prompt's hint: {list(expo.HINTS)}"})
    explain_temperature: float = field(default=0.3, metadata={"help": "the self-explanations' sampling temperature"})
    explain_on: str = field(default="all", metadata={"help": "all: every question; failed: only all-wrong groups"})
    drop_leaks: bool = field(default=True, metadata={"help": "drop explanations that mention being given the answer"})
    drop_truncated: bool = field(default=False, metadata={"help": "drop explanations cut off by the budget"})
    drop_wrong: bool = field(default=False, metadata={"help": "drop explanations that miss the gold answer"})


def dataset_rows(examples: list[data.Example]) -> list[dict]:
    """TRL's conversational prompt dataset: the answer-free prompt (`expo.solve_prompt`), and the question and gold
    answer as columns for the reward and the self-explanation prompt."""
    return [{"prompt": [{"role": "user", "content": expo.solve_prompt(e.question)}], "question": e.question,
             "answer": e.answer} for e in examples]


def correctness(completions, question, answer, **_) -> list[float]:
    """TRL reward function: reward.score of each completion against its gold, with its question (a restated question
    scores 0), as train.py rewards rollouts."""
    texts = [c[-1]["content"] if isinstance(c, list) else c for c in completions]
    return [float(reward.score(t, a, q)) for t, a, q in zip(texts, answer, question)]


class ExPOTrainer(GRPOTrainer):
    """GRPOTrainer + beta * the NLL of the policy's own self-explanations (ExP-GRPO). Pass `reward_funcs=correctness`
    (or your own) and a dataset with `prompt`, `question` and `answer` columns (`dataset_rows`)."""

    def __init__(self, *args, **kwargs):
        super().__init__(*args, **kwargs)
        args = self.args
        if (args.per_device_train_batch_size * args.steps_per_generation) % self.num_generations:
            raise ValueError("ExPOTrainer: per_device_train_batch_size * steps_per_generation must be a multiple of "
                             "num_generations (each process then holds whole groups and explains their questions)")
        if args.explain_hint not in expo.HINTS or args.explain_on not in ("all", "failed"):
            raise ValueError(f"explain_hint must be one of {list(expo.HINTS)}, explain_on 'all' or 'failed'")
        self.turn_end = rollout.turn_end_id(self._tokenizer)  # every target ends in it, as train.py's

    def _calculate_rewards(self, inputs, prompts, completions, completion_ids_list):
        self._rewards = super()._calculate_rewards(inputs, prompts, completions, completion_ids_list)  # [all rows, f]
        return self._rewards

    def _generate_and_score_completions(self, inputs):
        output = super()._generate_and_score_completions(inputs)  # TRL's rollouts, rewards, advantages
        if self.model.training and self.args.expo_beta:
            output.update(self._self_explanation_targets(inputs, output))
        return output

    def _self_explanation_targets(self, inputs: list[dict], output: dict) -> dict:
        """Steps 1-2: one self-explanation per group held here, made into a target on the group's first row."""
        args, G, n, device = self.args, self.num_generations, len(inputs), self.accelerator.device
        first = self.accelerator.process_index * n  # the global index of this process's first row
        rewards = (self._rewards * self.reward_weights.to(self._rewards.device)).nansum(dim=1)  # [all rows]
        solved = (rewards.view(-1, G) > 0).any(dim=1).tolist()  # [all groups]
        heads = [j for j in range(n) if (first + j) % G == 0]  # rows that open a group: each explains its question
        questions, answers = [inputs[j]["question"] for j in heads], [inputs[j]["answer"] for j in heads]
        texts, truncated = self._explain([expo.explain_prompt(q, a, args.explain_hint)
                                          for q, a in zip(questions, answers)])
        targets, counts = expo.self_explanation_targets(
            texts, answers, truncated, [solved[(first + j) // G] for j in heads] if args.explain_on == "failed" else
            None, args.drop_leaks, args.drop_truncated, args.drop_wrong, questions)
        encoded = rollout.encode_targets(self._tokenizer, [expo.solve_prompt(q) for q in questions], targets,
                                         self.turn_end)  # the kept targets' ids, each ending in the turn-end token
        width = 1 if encoded is None else encoded.completion_ids.shape[1]
        ids = torch.full((n, width), self._tokenizer.pad_token_id, dtype=torch.long)  # [n, w]
        mask = torch.zeros((n, width), dtype=torch.long)  # [n, w] 1 on the target tokens of a group's first row
        if encoded is not None:
            rows = [heads[i] for i in encoded.prompt_index.tolist()]
            ids[rows], mask[rows] = encoded.completion_ids, encoded.completion_mask
        totals = self.accelerator.gather(torch.tensor(
            [mask.sum(), counts["explanations"], counts["explain_cut_off"], counts["explain_reached"],
             0 if encoded is None else len(encoded.texts)], dtype=torch.float, device=device)).view(-1, 5).sum(0)
        metrics = self._metrics["train"]
        metrics["expo/targets"].append(totals[4].item())
        metrics["expo/explain_truncated"].append((totals[2] / totals[1].clamp(min=1)).item())
        metrics["expo/explain_reached"].append((totals[3] / totals[1].clamp(min=1)).item())
        metrics["expo/all_wrong"].append(1.0 - sum(solved) / len(solved))
        return {"expo_target_ids": ids.to(device), "expo_target_mask": mask.to(device),
                "expo_target_tokens": totals[0]}  # 0-dim: TRL's splitting passes it to every micro-batch

    def _explain(self, prompts: list[str]) -> tuple[list[str], list[bool]]:
        """(texts, cut off by the budget) of one completion per user message, through TRL's generation path."""
        conversations = [[{"role": "user", "content": p}] for p in prompts]
        prompt_ids, images, fields = self._tokenize_prompts(conversations)
        with self._sampling_temperature(self.args.explain_temperature):
            completion_ids, _ = self._generate_single_turn(prompt_ids, images, fields, 1)
        texts = self._tokenizer.batch_decode(completion_ids, skip_special_tokens=True)
        stops = {*self.eos_token_ids, self._tokenizer.pad_token_id}
        return texts, [not ids or ids[-1] not in stops for ids in completion_ids]

    @contextlib.contextmanager
    def _sampling_temperature(self, temperature: float):
        """Sample at `temperature` in this block: TRL reads args.temperature from its generation config and kwargs
        (transformers) or from its vLLM generator; each is set here and restored after."""
        kwargs = getattr(self, "generation_kwargs", None) or {}
        holders = [h for h in (getattr(self, "generation_config", None), getattr(self, "vllm_generation", None))
                   if hasattr(h, "temperature")]
        saved, saved_kwarg = [h.temperature for h in holders], kwargs.get("temperature")
        for h in holders:
            h.temperature = temperature
        if "temperature" in kwargs:
            kwargs["temperature"] = temperature
        try:
            yield
        finally:
            for h, t in zip(holders, saved):
                h.temperature = t
            if "temperature" in kwargs:
                kwargs["temperature"] = saved_kwarg

    def _compute_loss(self, model, inputs):
        """Step 3: TRL's GRPO loss + expo_beta * the targets' NLL at T = 1, over the step's target tokens."""
        loss = super()._compute_loss(model, inputs)
        if "expo_target_ids" not in inputs:
            return loss
        mask = inputs["expo_target_mask"]  # [n, w]
        rows = mask.any(dim=1).nonzero().flatten()
        rows = rows if len(rows) else torch.zeros(1, dtype=torch.long, device=mask.device)  # a pass on every rank
        with self.accelerator.autocast():
            logp = rollout.token_logprobs(model, inputs["prompt_ids"][rows], inputs["prompt_mask"][rows],
                                          inputs["expo_target_ids"][rows], 1.0)  # [m, w] fp32, answer-free prompt
        # TRL's "dapo" normaliser: the generation batch's tokens, per process, per accumulated micro-batch
        tokens = inputs["expo_target_tokens"].clamp(min=1) / self.accelerator.num_processes
        tokens = tokens * self.current_gradient_accumulation_steps / self.args.steps_per_generation
        nll = expo.sft_loss(logp, mask[rows], denominator=1.0) / tokens  # the sum of NLLs / the step's tokens
        self._metrics["train"]["expo/loss_sft"].append(self.accelerator.gather(nll.detach()).sum().item())
        return loss + self.args.expo_beta * nll


# ------------------------------------------------------------------------------------------------ the command line


@dataclass
class DataArgs:
    model_name_or_path: str | None = field(default=None, metadata={"help": "hub id or folder (default: embedded)"})
    dataset: str = field(default="arith", metadata={"help": "gsm8k | math | math500 | arith | path.jsonl"})
    levels: list[str] | None = field(default=None, metadata={"help": "as train.py --levels"})
    limit: int | None = field(default=None, metadata={"help": "a fixed random subset of this many questions"})


class MetricsFile(TrainerCallback):
    """Each log line of the run also goes to output_dir/metrics.jsonl, as train.py writes it."""

    def on_log(self, args, state, control, logs=None, **_):
        if state.is_world_process_zero and logs:
            with open(Path(args.output_dir) / "metrics.jsonl", "a") as f:
                f.write(json.dumps({"step": state.global_step, **logs}) + "\n")


def smoke_defaults(argv: list[str]) -> list[str]:
    """The CPU smoke run's settings, for the flags the command line leaves out."""
    given = {a.split("=")[0] for a in argv if a.startswith("--")}
    defaults = {"--output_dir": "runs/trl-expo", "--max_steps": "2", "--per_device_train_batch_size": "8",
                "--num_generations": "4", "--max_completion_length": "128", "--temperature": "0.7",
                "--learning_rate": "1e-5", "--loss_type": "grpo", "--logging_steps": "1", "--report_to": "none",
                "--save_strategy": "no", "--limit": "64", "--bf16": str(torch.cuda.is_available())}
    return argv + [x for k, v in defaults.items() if k not in given for x in (k, v)]


def main(argv: list[str] | None = None) -> None:
    import sys
    parser = HfArgumentParser((DataArgs, ExPOConfig))
    data_args, config = parser.parse_args_into_dataclasses(smoke_defaults(sys.argv[1:] if argv is None else argv))
    levels = data.parse_levels(data_args.dataset, data_args.levels)
    examples = data.load(data_args.dataset, "train", levels=levels, limit=data_args.limit, seed=config.seed)
    from datasets import Dataset  # installed with trl
    name = data_args.model_name_or_path or str(assets.embedded_model_dir())
    tokenizer = AutoTokenizer.from_pretrained(name)
    os.makedirs(config.output_dir, exist_ok=True)
    trainer = ExPOTrainer(model=name, reward_funcs=correctness, args=config, processing_class=tokenizer,
                          train_dataset=Dataset.from_list(dataset_rows(examples)), callbacks=[MetricsFile()])
    trainer.train()
    trainer.save_model(config.output_dir)


if __name__ == "__main__":
    main()
