"""Evaluation: pass@k on a held-out split, overall and by level / subject (the paper: pass@4 at temperature 0.7).

    python evaluate.py --model runs/expo-arith/checkpoint   # repeats the demo's "after" evaluation, draw for draw
    python evaluate.py                      # the embedded SmolLM2-135M: the demo's "before"
    python evaluate.py --model runs/expo/checkpoint --dataset math --levels 5 --k 4 --limit 500 --max_new_tokens 1024
    python evaluate.py --rescore runs/expo-arith/eval_samples.jsonl   # a run's evaluations, by today's checker

The defaults are train.py's evaluation (--eval_limit 48, --eval_k 4, T = 0.7, the training budget of 128 tokens,
--eval_seed 0, the same sampler), so a run's evaluation can be repeated exactly, or with other draws (--draws).

For each question we sample n = k completions and count the correct ones, c. The unbiased estimator of
pass@k (Chen et al., 2021) is  1 - C(n - c, k) / C(n, k);  with n = k it is simply "any of the k is right", and
pass@1 is the mean of c / n. Scores are means over questions.
"""
from __future__ import annotations

import argparse
import json
import math
from collections import defaultdict
from dataclasses import dataclass, field
from pathlib import Path

import torch
from tqdm import tqdm

import data
from backend import bf16, threads
import expo
import reward
import rollout


DRAWS = 10**6  # an evaluation draws from the stream seed + DRAWS + i for question i, apart from the subset's seed


def pass_at_k(n: int, c: int, k: int) -> float:
    """Unbiased pass@k from n samples of which c are correct: 1 - C(n-c, k) / C(n, k). k > n is a ValueError."""
    # exercise 10: the unbiased pass@k estimator
    if k > n:
        raise ValueError(f"pass@{k} needs at least {k} samples, got {n}")
    return 1.0 if n - c < k else 1.0 - math.comb(n - c, k) / math.comb(n, k)


def evaluate(model, tokenizer, examples: list[data.Example], k: int = 4, temperature: float = 0.7,
             max_new_tokens: int = 256, batch_size: int = 16, seed: int = 0,
             progress: bool = True) -> dict:
    """pass@1 and pass@k of `model` on `examples`, overall and per level / subject.

    The contract: question i's k completions are drawn at `temperature` (the evaluation's own, never training's) from
    a random stream seeded with `seed + i` alone, so they are the same whatever `batch_size` and whatever the training
    seed, and no two questions share draws."""
    rows = []
    batches = range(0, len(examples), batch_size)
    for start in tqdm(batches, desc="eval", disable=not progress, leave=False):
        chunk = examples[start : start + batch_size]
        prompts = rollout.encode_prompts(tokenizer, [expo.solve_prompt(e.question) for e in chunk])
        seeds = [seed + start + i for i in range(len(chunk))]  # one per question, whatever the batching
        out = rollout.sample(model, tokenizer, prompts, k, max_new_tokens, temperature, seed=seeds)
        lengths = out.completion_mask.sum(1).tolist()  # [len(chunk) * k] tokens, the stop token included
        for i, e in enumerate(chunk):
            mine = slice(i * k, (i + 1) * k)
            rows.append(scored_row(e, out.texts[mine], sum(lengths[mine]), int(out.truncated[mine].sum())))
    return {**summarize(rows, k), "completions": [completion_record(r) for r in rows]}


@dataclass
class Row:
    """One evaluated question: of its k completions, how many are right, how many commit to any answer, their tokens
    in all and how many the budget cut off; and the completions themselves."""

    example: data.Example
    correct: int
    committed: int = 0
    texts: list[str] = field(default_factory=list)
    tokens: int = 0
    cut_off: int = 0


def scored_row(example: data.Example, texts: list[str], tokens: int = 0, cut_off: int = 0) -> Row:
    """A question's completions, scored by the checker now in reward.py."""
    return Row(example, correct=int(sum(reward.score(t, example.answer, example.question) for t in texts)),
               committed=sum(reward.extract_answer(t) is not None for t in texts), texts=list(texts), tokens=tokens,
               cut_off=cut_off)


def completion_record(row: Row) -> dict:
    """What an evaluation keeps of a question (a line of a run's eval_samples.jsonl): enough to score it again."""
    e = row.example
    return {"id": e.id, "question": e.question, "gold": e.answer, "level": e.level, "subject": e.subject,
            "completions": row.texts, "tokens": row.tokens, "cut_off": row.cut_off}


def rescore(records: list[dict], k: int) -> dict:
    """`summarize` of stored completions (`completion_record`s), scored by today's checker: a checker fixed after a
    run changes its numbers without sampling anything again."""
    rows = [scored_row(data.Example(r["question"], r["gold"], level=r["level"], subject=r["subject"], id=r["id"]),
                       r["completions"], r["tokens"], r["cut_off"]) for r in records]
    return summarize(rows, k)


def mean_se(values: list[float]) -> tuple[float, float]:
    """Mean and its standard error over questions, sqrt(sample variance / n) (0 for a single value)."""
    n = len(values)
    mean = sum(values) / n
    var = sum((v - mean) ** 2 for v in values) / (n - 1) if n > 1 else 0.0
    return mean, math.sqrt(var / n)


def summarize(rows: list[Row], k: int) -> dict:
    """pass@1 / pass@k (with standard errors over questions), overall and within each level and subject, plus
    the commit rate (share of completions with an extractable answer) and the accuracy among committed answers:
    together they separate learning the answer format from learning to solve; and the completions' mean length in
    tokens and the share cut off by the budget (a policy that learns to ramble shows there first)."""
    def scores(subset: list[Row]) -> dict:
        p1, p1_se = mean_se([r.correct / k for r in subset])
        pk, pk_se = mean_se([pass_at_k(k, r.correct, k) for r in subset])
        committed = sum(r.committed for r in subset)
        return {"n": len(subset), "pass@1": p1, "pass@1_se": p1_se, f"pass@{k}": pk, f"pass@{k}_se": pk_se,
                "commit": committed / (k * len(subset)),
                "acc_committed": sum(r.correct for r in subset) / committed if committed else 0.0,
                "tokens": sum(r.tokens for r in subset) / (k * len(subset)),
                "cut_off": sum(r.cut_off for r in subset) / (k * len(subset))}

    result = {"all": scores(rows)}
    for key in ("level", "subject"):
        groups = defaultdict(list)
        for row in rows:
            if getattr(row.example, key) is not None:
                groups[getattr(row.example, key)].append(row)
        if len(groups) > 1:
            result[key] = {str(name): scores(groups[name]) for name in sorted(groups)}
    result["samples"] = [{"question": r.example.question, "gold": r.example.answer,
                          "completion": r.texts[0] if r.texts else "", "correct": r.correct} for r in rows[:5]]
    return result


def rescore_file(path: Path) -> dict[str, tuple[dict, int]]:
    """Every evaluation stored in a run's eval_samples.jsonl, by label ("before", "step 5", "after"): (its summary
    scored again, its k)."""
    records: dict[str, list[dict]] = {}
    for n, line in enumerate(open(path), start=1):
        try:
            record = json.loads(line)
            missing = next((f for f in ("eval", "question", "gold", "completions") if f not in record), None)
        except ValueError:
            raise SystemExit(f"error: {path}:{n}: not a JSON line") from None
        if missing:
            raise SystemExit(f"error: {path}:{n}: no field {missing!r}")
        records.setdefault(record["eval"], []).append(
            {"id": "", "level": None, "subject": None, "tokens": 0, "cut_off": 0, **record})
    return {label: (rescore(rows, len(rows[0]["completions"])), len(rows[0]["completions"]))
            for label, rows in records.items()}


def table(before: dict, after: dict | None, k: int) -> str:
    """A plain-text table of pass@1 / pass@k, before and (optionally) after training, by level when known."""
    columns = ("pass@1", f"pass@{k}", "commit")
    lines = [f"{'':>12} {'n':>5}" + "".join(f" {c:>14}" for c in columns)]

    def cell(b, a, name):
        return f"{b[name]:.3f}" + (f" -> {a[name]:.3f}" if a else "")

    names = [("all", before["all"], after["all"] if after else None)]
    for key in ("level", "subject"):
        groups = {str(g): v for g, v in after.get(key, {}).items()} if after else {}  # a logged `before`: str keys
        for group, b in before.get(key, {}).items():
            names.append((f"{key} {group}"[:12], b, groups.get(str(group))))
    for name, b, a in names:
        lines.append(f"{name:>12} {b['n']:>5}" + "".join(f" {cell(b, a, c):>14}" for c in columns))
    return "\n".join(lines)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--model", default=None, help="hub id or local folder (a checkpoint); default: embedded")
    parser.add_argument("--dataset", default="arith", help="gsm8k | math | math500 | arith | path.jsonl")
    parser.add_argument("--split", default="test", help="split to evaluate on")
    parser.add_argument("--levels", nargs="+", default=None,
                        help="keep only these levels ('all' for all; default: level 2 of arith, all elsewhere)")
    parser.add_argument("--limit", type=int, default=48, help="evaluate a fixed random subset of this many questions "
                        "(0: all)")
    parser.add_argument("--k", type=int, default=4, help="samples per question; reports pass@1 and pass@k")
    parser.add_argument("--temperature", type=float, default=0.7, help="sampling temperature")
    parser.add_argument("--max_new_tokens", type=int, default=128, help="generation budget per completion")
    parser.add_argument("--batch_size", type=int, default=16, help="questions sampled together")
    parser.add_argument("--seed", type=int, default=0, help="the subset's seed, as train.py --eval_seed")
    parser.add_argument("--draws", type=int, default=0, help="which draws: 0 = the run's own (train.py's "
                        "evaluation), another number = other draws of the same questions (the evaluation's noise)")
    parser.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu", help="cpu | cuda")
    parser.add_argument("--sampler_dtype", default="auto", choices=("auto", "fp32", "bf16"),
                        help="the weights' dtype (auto: bf16 where bf16 matmuls are native), as train.py samples")
    parser.add_argument("--rescore", type=Path, default=None,
                        help="score a run's stored eval completions (eval_samples.jsonl) again; samples nothing")
    args = parser.parse_args()
    if args.rescore:
        for label, (result, k) in rescore_file(args.rescore).items():
            print(f"{label}:\n{table(result, None, k)}\n")
        return
    levels = data.parse_levels(args.dataset, args.levels)
    examples = data.load(args.dataset, args.split, levels=levels, limit=args.limit or None, seed=args.seed)
    native = bf16.is_native(torch.device(args.device))
    model, tokenizer = rollout.load_policy(args.model, args.device)
    if args.sampler_dtype == "bf16" or (args.sampler_dtype == "auto" and native):
        model = bf16.sampler_copy(model, torch.bfloat16)  # the bf16 copy a run samples from
    result = evaluate(model, tokenizer, examples, args.k, args.temperature, args.max_new_tokens, args.batch_size,
                      args.seed + DRAWS + args.draws * 10**5)
    print(table(result, None, args.k))


if __name__ == "__main__":
    threads.use_this_process_cpus()  # its CPU affinity's, or OMP_NUM_THREADS
    main()
