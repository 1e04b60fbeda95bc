"""Why ExPO works, measured: the paper's three kinds of positive sample under the current policy (Table 1, Fig. 2).

    python -m lab.analyze                                         # embedded SmolLM2-135M, 16 arith questions, ~2 min CPU
    python -m lab.analyze --model runs/expo-arith/checkpoint      # the same questions under a trained policy
    python -m lab.analyze --dataset math --levels 5 --n 64 --max_new_tokens 1024 --model Qwen/Qwen2.5-1.5B-Instruct
    python -m lab.analyze --levels 4 5 --pass_k 64 --model runs/cmp/expo/seed-0/checkpoint   # + coverage at large k

A good positive sample (a text to raise the likelihood of) must be
  (1) likely under the current policy: a low NLL, so learning it is a small step, not a jump to another distribution;
  (2) right more often than the policy's own attempts, or there is nothing to learn from it.
For N questions we measure three candidates:
  own               k answer-free rollouts per question, what GRPO learns from:       (1) by construction, rarely (2)
  self_explanation  one sample with the gold answer in the prompt, made into the training target exactly as
                    training makes it (`expo.self_explanation_targets`); ExPO's:      the paper's claim: (1) and (2)
  expert            the dataset's worked solution, GRPO SFT-GT-CoT's positive:        (2), but not (1)

Every NLL is scored under the *answer-free* solve prompt at temperature 1 -- the context and the distribution that
training scores its targets in -- and counts the stop token, as training does. `nll_per_token` is the mean over
samples of each sample's NLL / its length; `nll_per_seq` the mean NLL of a whole sample. `correct` is the share that
reaches the gold answer; for self-explanations it is measured *before* the rewrite that sets the final answer to the
gold one (does the explanation itself end on it?). `truncated` is the share cut off by the token budget: a truncated
self-explanation becomes a cut-off explanation with the answer pasted after it. In the paper (Qwen2.5-3B on MATH)
experts' NLL is about twice the self-explanations'.

Two more of the paper's diagnostics:
  hint_reliance     each self-explanation's mean per-token log-probability with the answer in the prompt minus
                    without it: how much of it is written *from* the hint (`hint_reliance`)
  stop_at_target_end  p(turn end) where each self-explanation target ends, answer-free and hinted
                    (`end_probability`): where the NLL and the forward KL of --explain_loss fkl part ways
  stop_at_rollout_end the same where the policy's own answer-free rollouts stop: what --explain_loss rkl's teacher
                    says of stopping there
  pass_at_k         (--pass_k 64) pass@k for k = 1, 2, 4, ..., 64 from 64 answer-free samples per question: GRPO
                    sharpens within what the base model already covers at large k; ExPO's claim is that it can extend
                    that coverage (`pass_at_k_curve`). Run it on the base model and on a trained checkpoint.
"""
from __future__ import annotations

import argparse
import contextlib
import json
from pathlib import Path

import torch

import data
from backend import bf16, threads
import evaluate
import expo
import reward
import rollout
from variants import distill


@torch.no_grad()
def sequence_nll(model, batch: rollout.Rollouts, rows_per_pass: int = 16) -> tuple[list[float], list[int]]:
    """NLL of each row's completion (masked tokens, temperature 1) and its length in tokens."""
    nll, lengths = [], []
    for start in range(0, batch.completion_ids.shape[0], rows_per_pass):
        rows = slice(start, start + rows_per_pass)
        logp = rollout.token_logprobs(model, batch.prompt_ids[rows], batch.prompt_mask[rows],
                                      batch.completion_ids[rows], 1.0)  # [rows, T]
        mask = batch.completion_mask[rows]
        nll += (-expo.sequence_logp(logp, mask)).tolist()
        lengths += mask.sum(1).tolist()
    return nll, lengths


@torch.no_grad()
def end_probability(model, batch: rollout.Rollouts, rows_per_pass: int = 16) -> list[float]:
    """p(last token | all before it) of each row at temperature 1. For targets, the last token is the turn end: how
    ready the policy is to stop where the target stops."""
    out = []
    for start in range(0, batch.completion_ids.shape[0], rows_per_pass):
        rows = slice(start, start + rows_per_pass)
        logp = rollout.token_logprobs(model, batch.prompt_ids[rows], batch.prompt_mask[rows],
                                      batch.completion_ids[rows], 1.0)  # [rows, T]
        last = batch.completion_mask[rows].sum(1) - 1  # [rows]
        out += logp[torch.arange(len(last)), last].exp().tolist()
    return out


def describe(nll: list[float], lengths: list[int], correct: list[float], truncated: list[bool]) -> dict:
    n = len(nll)
    return {"n": n, "nll_per_token": sum(s / max(1, t) for s, t in zip(nll, lengths)) / n,
            "nll_per_seq": sum(nll) / n, "correct": sum(correct) / n, "length": sum(lengths) / n,
            "truncated": sum(map(bool, truncated)) / n}


def measure(model, tokenizer, examples: list[data.Example], k: int = 4, max_new_tokens: int = 128,
            temperature: float = 0.7, seed: int = 0, drop_leaks: bool = True, drop_truncated: bool = False,
            sampler=None, explain_hint: str = "brief", explain_temperature: float = 0.3) -> dict:
    """The three kinds of positive sample for `examples`, each described by `describe` (see the module docstring).
    Samples come from `sampler` (a bf16 copy, as in training) when given, else from `model`, never under the caller's
    autocast (which is for scoring, as --train_dtype: train.py samples by --sampler_dtype alone); NLLs are `model`'s."""
    device, sampler = next(model.parameters()).device, sampler or model
    turn_end = rollout.turn_end_id(tokenizer)
    solve = [expo.solve_prompt(e.question) for e in examples]
    golds = [e.answer for e in examples]

    with torch.autocast(device.type, enabled=False):  # sampling: the sampler's own dtype, whatever the caller's
        own = rollout.sample(sampler, tokenizer, rollout.encode_prompts(tokenizer, solve), k, max_new_tokens,
                             temperature, seed=seed)
    result = {"own": describe(*sequence_nll(model, own), [reward.score(t, golds[i // k], examples[i // k].question)
                                                          for i, t in
                                                          enumerate(own.texts)], own.truncated.tolist())}
    stops = stop_at_rollout_end(model, tokenizer, own, examples, k, explain_hint)
    if stops:
        result["stop_at_rollout_end"] = stops

    hinted_prompts = [expo.explain_prompt(e.question, e.answer, explain_hint) for e in examples]
    with torch.autocast(device.type, enabled=False):
        raw = rollout.sample(sampler, tokenizer, rollout.encode_prompts(tokenizer, hinted_prompts), 1, max_new_tokens,
                             explain_temperature, seed=seed + 1)
    targets, counts = expo.self_explanation_targets(raw.texts, golds, raw.truncated.tolist(), None, drop_leaks,
                                                    drop_truncated, questions=[e.question for e in examples])
    kept = [i for i, t in enumerate(targets) if t is not None]
    if kept:
        batch = rollout.encode_targets(tokenizer, [solve[i] for i in kept], [targets[i] for i in kept], turn_end)
        nll, lengths = sequence_nll(model, batch.to(device))
        result["self_explanation"] = describe(nll, lengths, [reward.score(raw.texts[i], golds[i], examples[i].question)
                                                             for i in kept],
                                              [bool(raw.truncated[i]) for i in kept])
        result["self_explanation"].update(dropped_leaks=counts["explain_dropped"],
                                          dropped_truncated=counts["explain_dropped_truncated"])
        hinted = rollout.encode_targets(tokenizer, [hinted_prompts[i] for i in kept], [targets[i] for i in kept],
                                        turn_end)
        result["hint_reliance"] = hint_reliance(nll, sequence_nll(model, hinted.to(device))[0], lengths)
        result["stop_at_target_end"] = {name: sum(p) / len(p) for name, p in (
            ("answer_free", end_probability(model, batch)), ("hinted", end_probability(model, hinted.to(device))))}

    experts = [i for i, e in enumerate(examples) if e.solution]
    if experts:
        batch = rollout.encode_targets(tokenizer, [solve[i] for i in experts],
                                       [examples[i].solution for i in experts], turn_end)
        nll, lengths = sequence_nll(model, batch.to(device))
        result["expert"] = describe(nll, lengths, [reward.score(examples[i].solution, golds[i], examples[i].question)
                                                    for i in experts],
                                    [False] * len(experts))
    return result


def stop_at_rollout_end(model, tokenizer, own: rollout.Rollouts, examples: list[data.Example], k: int,
                        explain_hint: str = "brief") -> dict | None:
    """Where the policy's own answer-free rollouts stop within the budget: p(stop) there, answer-free and with the
    answer in the prompt (`end_probability`), means over those rollouts; None if none stopped. The second is the
    teacher of --explain_loss rkl, which pulls the first toward it along every rollout, stops included."""
    ended = [i for i, cut in enumerate(own.truncated.tolist()) if not cut]  # rows i // k answer question i // k
    if not ended:
        return None
    part = own.select(ended)
    hinted = distill.with_prompts(tokenizer, part, [expo.explain_prompt(examples[i // k].question,
                                                                        examples[i // k].answer, explain_hint)
                                                    for i in ended])
    return {name: sum(p) / len(p) for name, p in (("answer_free", end_probability(model, part)),
                                                  ("hinted", end_probability(model, hinted)))}


def hint_reliance(nll_plain: list[float], nll_hinted: list[float], lengths: list[int]) -> dict:
    """How much each self-explanation leans on the hint: its mean per-token log-probability with the answer in the
    prompt minus without it, (NLL plain - NLL hinted) / tokens. Near 0: the policy would write it unprompted, so
    training on it answer-free is a small step; large: it is written *from* the answer."""
    per_sample = [(p - h) / max(1, t) for p, h, t in zip(nll_plain, nll_hinted, lengths)]
    return {"mean": sum(per_sample) / len(per_sample), "per_sample": per_sample}


@torch.no_grad()
def pass_at_k_curve(model, tokenizer, examples: list[data.Example], n: int = 64, max_new_tokens: int = 128,
                    temperature: float = 0.7, seed: int = 0, rows_per_call: int = 64) -> dict[str, float]:
    """Unbiased pass@k for k = 1, 2, 4, ..., n from n answer-free samples per question, means over questions.

    The paper's coverage argument: GRPO sharpens what the base model already finds at large k (pass@1 rises towards
    pass@64, which stays put), while ExPO's answer-guided targets can extend it (pass@64 rises too)."""
    correct = []
    per_call = max(1, rows_per_call // n)
    for start in range(0, len(examples), per_call):
        chunk = examples[start : start + per_call]
        prompts = rollout.encode_prompts(tokenizer, [expo.solve_prompt(e.question) for e in chunk])
        out = rollout.sample(model, tokenizer, prompts, n, max_new_tokens, temperature, seed=seed + start)
        correct += [int(sum(reward.score(t, e.answer, e.question) for t in out.texts[i * n : (i + 1) * n]))
                    for i, e in enumerate(chunk)]
    ks = [2**j for j in range(n.bit_length()) if 2**j <= n]
    return {f"pass@{k}": sum(evaluate.pass_at_k(n, c, k) for c in correct) / len(correct) for k in ks}


ROWS = [  # key, label, the paper's claim about it
    ("own", "own rollouts", "(1) likely, rarely (2) right"),
    ("self_explanation", "self-explanations", "(1) likely and (2) right"),
    ("expert", "expert solutions", "(2) right, not (1) likely"),
]


def table(result: dict) -> str:
    """The measurements as a plain-text table in the shape of the paper's Table 1, and what they say."""
    lines = [f"{'positive sample':<18} {'n':>4} {'NLL/token':>9} {'NLL/seq':>8} {'correct':>7} {'tokens':>6} "
             f"{'cut off':>7}   the paper's claim"]
    for key, label, claim in ROWS:
        if key in result:
            r = result[key]
            lines.append(f"{label:<18} {r['n']:>4} {r['nll_per_token']:>9.3f} {r['nll_per_seq']:>8.1f} "
                         f"{r['correct']:>7.2f} {r['length']:>6.1f} {r['truncated']:>7.2f}   {claim}")
    own, mine, expert = (result.get(key) for key, _, _ in ROWS)
    if mine:
        lines.append(f"\nself-explanations end on the gold answer {mine['correct']:.0%} of the time, own rollouts "
                     f"{own['correct']:.0%}; {mine['dropped_leaks']} explanation(s) dropped for mentioning the hint")
    if mine and expert:
        lines.append(f"expert NLL per token is {expert['nll_per_token'] / mine['nll_per_token']:.2f}x the "
                     f"self-explanations' (paper, Qwen2.5-3B on MATH: about 2x)")
    if "hint_reliance" in result:
        lines.append(f"hint reliance: a self-explanation's tokens are {result['hint_reliance']['mean']:.3f} nats more "
                     "likely each with the answer in the prompt than without")
    if "stop_at_target_end" in result:
        stop = result["stop_at_target_end"]
        lines.append(f"where a target ends, the policy stops with p = {stop['answer_free']:.2f} answer-free and "
                     f"{stop['hinted']:.2f} with the answer in the prompt (the teacher of --explain_loss fkl, which "
                     "pulls the first toward the second; the NLL pulls it toward 1)")
    if "stop_at_rollout_end" in result:
        stop = result["stop_at_rollout_end"]
        lines.append(f"where its own rollouts stop, the policy stops with p = {stop['answer_free']:.2f} answer-free and "
                     f"{stop['hinted']:.2f} with the answer in the prompt (the teacher of --explain_loss rkl)")
    if "pass_at_k" in result:
        lines.append("answer-free coverage: " + ", ".join(f"{k} {v:.3f}" for k, v in result["pass_at_k"].items()))
    return "\n".join(lines)


def main(argv=None) -> dict:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0],
                                     formatter_class=argparse.ArgumentDefaultsHelpFormatter)
    parser.add_argument("--model", default=None, help="hub id or folder (a checkpoint); default: the embedded model")
    parser.add_argument("--dataset", default="arith", help="gsm8k | math | math500 | arith | path.jsonl")
    parser.add_argument("--split", default="train", help="the questions training samples from")
    parser.add_argument("--levels", nargs="+", default=None, help="default: level 2 of arith, all elsewhere")
    parser.add_argument("--n", type=int, default=16, help="questions (a fixed random subset)")
    parser.add_argument("--k", type=int, default=4, help="own rollouts per question")
    parser.add_argument("--max_new_tokens", type=int, default=128, help="budget of rollouts and self-explanations")
    parser.add_argument("--temperature", type=float, default=0.7, help="rollouts' sampling temperature (NLLs are at 1)")
    parser.add_argument("--explain_temperature", type=float, default=0.3, help="the self-explanations', as train.py")
    parser.add_argument("--explain_hint", default="brief", choices=list(expo.HINTS), help="the self-explanation "
                        "prompt's hint, as train.py --explain_hint")
    parser.add_argument("--pass_k", type=int, default=0, help="also pass@k for k = 1, 2, 4, .. up to this many "
                        "answer-free samples per question (e.g. 64; costs that many samples per question)")
    parser.add_argument("--no_drop_leaks", action="store_true", help="keep explanations that mention the hint")
    parser.add_argument("--drop_truncated", action="store_true", help="drop explanations cut off by the budget, as "
                        "train.py --drop_truncated does (default: keep them, as train.py does)")
    parser.add_argument("--expert_style", default="worded", choices=list(data.EXPERT_STYLES),
                        help="arith: the style its expert solutions are written in (the distance experiment)")
    parser.add_argument("--seed", type=int, default=0, help="question subset and sampling seed")
    parser.add_argument("--json", type=Path, default=None, help="also write the numbers here")
    parser.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu", help="cpu | cuda")
    parser.add_argument("--sampler_dtype", default="auto", choices=("auto", "fp32", "bf16"),
                        help="sample from a bf16 copy (auto: where bf16 matmuls are native), as train.py does")
    parser.add_argument("--train_dtype", default="auto", choices=("auto", "fp32", "bf16"),
                        help="score under bf16 autocast (auto: where bf16 matmuls are native), as train.py trains")
    args = parser.parse_args(argv)
    try:
        examples = data.load(args.dataset, args.split, levels=data.parse_levels(args.dataset, args.levels),
                             limit=args.n, seed=args.seed, expert_style=args.expert_style)
        model, tokenizer = rollout.load_policy(args.model, args.device)
    except (OSError, data.DataError) as e:
        raise SystemExit(f"error: {e}")
    model.eval()
    native = bf16.is_native(model.device)
    sampling_bf16 = args.sampler_dtype == "bf16" or (args.sampler_dtype == "auto" and native)
    sampler = bf16.sampler_copy(model) if sampling_bf16 else model
    scoring_bf16 = args.train_dtype == "bf16" or (args.train_dtype == "auto" and native)
    amp = bf16.autocast(model.device) if scoring_bf16 else contextlib.nullcontext()  # as
    # train.py's --train_dtype: the NLLs are scored under bf16 autocast where bf16 is native (log-softmax in fp32)
    with amp:
        result = measure(model, tokenizer, examples, args.k, args.max_new_tokens, args.temperature, args.seed,
                         drop_leaks=not args.no_drop_leaks, drop_truncated=args.drop_truncated, sampler=sampler,
                         explain_hint=args.explain_hint, explain_temperature=args.explain_temperature)
    if args.pass_k:
        result["pass_at_k"] = pass_at_k_curve(sampler, tokenizer, examples, args.pass_k, args.max_new_tokens,
                                              args.temperature, args.seed + 2)
    result["config"] = {k: str(v) if isinstance(v, Path) else v for k, v in vars(args).items()}
    print(table(result))
    if args.json:
        args.json.parent.mkdir(parents=True, exist_ok=True)
        args.json.write_text(json.dumps(result, indent=1))
        print(f"\nwritten to {args.json}")
    return result


if __name__ == "__main__":
    threads.use_this_process_cpus()  # its CPU affinity's, or OMP_NUM_THREADS
    main()
