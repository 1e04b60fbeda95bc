"""Sampling speed: rollout.sample next to transformers' `model.generate` on the same prompts, in one run.

    python -m lab.bench                      # CPU: a tiny random model and the embedded SmolLM2-135M
    python -m lab.bench --shape qwen0.5b     # GPU: a random-weight Qwen2.5-0.5B-shaped model in bf16
    python -m lab.bench --shape qwen0.5b --static-generate --json out.json   # also generate(cache_implementation="static")
    python -m lab.bench --train --shape qwen0.5b       # one GRPO and one ExP-GRPO training step, with and without LoRA

Every method generates exactly `--new-tokens` per row (`min_new_tokens` forbids an early EOS), so tokens/s are
comparable; the figure is generated tokens / wall seconds, including prefill and (for the CUDA graph) capture.
Weights are random: speed does not depend on them. Ratios are against plain `generate` in the same run. It then
times ExP-GRPO's sampling (`expo_sampling`): the G rollouts plus one self-explanation per prompt, in one call with
per-prompt counts (what train.py does) and in two calls, each relative to the G rollouts alone.

`--natural` times the sampler at natural lengths instead (`bench_natural`): the embedded SmolLM2-135M with its real
weights on real arith prompts (B solve prompts x G rollouts plus B explain prompts, as an ExP-GRPO step samples them),
each row stopping where the model stops, at the demo's budget (128 new tokens) and the comparison's (256), sampled
from the fp32 policy and from its bf16 copy (`--sampler_dtype`), side by side in one run, with the bf16 sampler's
mismatch on the tokens it drew (k3 per token, the largest ratio) to the trainer in fp32 and under bf16 autocast
(`--train_dtype`), and one whole ExP-GRPO step three ways (`natural_step`): fp32 sampling and training, bf16 sampling,
and bf16 sampling with the update under bf16 autocast, with the update's own time.

`--train` times whole steps of train.py instead (`bench_train`): a GRPO step and an ExP-GRPO step, each with full
fine-tuning and with `--lora_rank`, on the same random-weight model (the SmolLM2 tokenizer), with every completion
forced to `--new-tokens` and a pseudo-random 0/1 reward of the text (so no group is skipped as all-equal). It prints
seconds per step (after one warm-up step), the sampling share, peak memory, and the ExP-GRPO / GRPO ratio.
"""
from __future__ import annotations

import argparse
import contextlib
import functools
import gc
import json
import resource
import tempfile
import time
import zlib
from pathlib import Path

import torch
from transformers import AutoModelForCausalLM, AutoTokenizer, LlamaConfig, Qwen2Config

from backend import assets, bf16, decode
import rollout
import train
from variants import tis

SHAPES = {
    "tiny": lambda vocab: LlamaConfig(vocab_size=vocab or 32000, hidden_size=64, intermediate_size=128, num_hidden_layers=2,
                                      num_attention_heads=4, num_key_value_heads=2),
    "qwen0.5b": lambda vocab: Qwen2Config(vocab_size=vocab or 151936, hidden_size=896, intermediate_size=4864,
                                          num_hidden_layers=24, num_attention_heads=14, num_key_value_heads=2,
                                          tie_word_embeddings=True, max_position_embeddings=4096),
    "qwen1.5b": lambda vocab: Qwen2Config(vocab_size=vocab or 151936, hidden_size=1536, intermediate_size=8960,
                                          num_hidden_layers=28, num_attention_heads=12, num_key_value_heads=2,
                                          tie_word_embeddings=True, max_position_embeddings=4096),
    "qwen3b": lambda vocab: Qwen2Config(vocab_size=vocab or 151936, hidden_size=2048, intermediate_size=11008,
                                        num_hidden_layers=36, num_attention_heads=16, num_key_value_heads=2,
                                        tie_word_embeddings=True, max_position_embeddings=4096),
}


class _Tok:
    """The little of a tokenizer that rollout.sample needs, for random-weight models."""

    def __init__(self, eos: int):
        self.eos_token_id = self.pad_token_id = eos

    def batch_decode(self, rows, skip_special_tokens=True):
        return [""] * len(rows)


def _timed(fn, device) -> float:
    if device.type == "cuda":
        torch.cuda.synchronize()
    start = time.perf_counter()
    fn()
    if device.type == "cuda":
        torch.cuda.synchronize()
    return time.perf_counter() - start


def bench(model, tokenizer, args, label: str) -> dict:
    device = next(model.parameters()).device
    gen = torch.Generator().manual_seed(0)
    prompts = torch.randint(100, 20000, (args.prompts, args.prompt_len), generator=gen).tolist()
    n_tokens = args.prompts * args.group * args.new_tokens
    ids = torch.tensor(prompts, device=device).repeat_interleave(args.group, 0)
    sampling = dict(do_sample=True, temperature=1.0, top_k=0, top_p=1.0, max_new_tokens=args.new_tokens,
                    min_new_tokens=args.new_tokens, pad_token_id=tokenizer.pad_token_id)

    def ours(cuda_graph):
        return lambda: rollout.sample(model, tokenizer, prompts, args.group, args.new_tokens, 1.0, seed=0,
                                      min_new_tokens=args.new_tokens, cuda_graph=cuda_graph)

    methods = {"generate": lambda: model.generate(ids, attention_mask=torch.ones_like(ids), **sampling)}
    if args.static_generate:
        methods["generate_static"] = lambda: model.generate(ids, attention_mask=torch.ones_like(ids),
                                                            cache_implementation="static", **sampling)
    methods["ours_eager"] = ours(False)
    if device.type == "cuda" and decode.GraphedDecoder.supported(model):
        methods["ours_cuda_graph"] = ours(True)
    result = {"model": label, "device": torch.cuda.get_device_name() if device.type == "cuda" else "cpu",
              "rows": args.prompts * args.group, "prompt_len": args.prompt_len, "new_tokens": args.new_tokens}
    for name, fn in methods.items():
        with torch.no_grad():
            warm = _timed(fn, device)  # first call: compilation / capture / allocator warm-up
            seconds = min(_timed(fn, device) for _ in range(args.repeats))
        result[name] = {"tok_s": round(n_tokens / seconds, 1), "seconds": round(seconds, 3),
                        "first_call_s": round(warm, 2)}
        print(f"{label:>10} {name:>16}: {n_tokens / seconds:10.1f} tok/s  ({seconds:.2f} s; first call {warm:.1f} s)",
              flush=True)
    base = result["generate"]["tok_s"]
    for name in methods:
        result[name]["vs_generate"] = round(result[name]["tok_s"] / base, 2)
    print(f"{label:>10} ratios vs generate: " + ", ".join(f"{k} {result[k]['vs_generate']}x" for k in methods))
    result["expo_sampling"] = expo_sampling(model, tokenizer, args, prompts, "ours_cuda_graph" in methods, label)
    return result


def expo_sampling(model, tokenizer, args, prompts, cuda_graph: bool, label: str) -> dict:
    """ExP-GRPO's sampling: the G rollouts of B prompts plus one self-explanation of each (longer prompts: the
    question and its answer), in one call with per-prompt counts or in two calls; seconds relative to the G rollouts
    alone (the GRPO step's sampling)."""
    device = next(model.parameters()).device
    explain = torch.randint(100, 20000, (args.prompts, args.prompt_len + 16), generator=torch.Generator().manual_seed(1))
    run = functools.partial(rollout.sample, model, tokenizer, max_new_tokens=args.new_tokens, seed=0,
                            min_new_tokens=args.new_tokens, cuda_graph=cuda_graph)
    variants = {"rollouts_only": lambda: run(prompts, args.group),
                "two_calls": lambda: (run(prompts, args.group), run(explain.tolist(), 1)),
                "one_call": lambda: run(prompts + explain.tolist(), [args.group] * args.prompts + [1] * args.prompts)}
    with torch.no_grad():
        seconds = {name: min(_timed(fn, device) for _ in range(args.repeats + 1)) for name, fn in variants.items()}
    ratios = {name: round(s / seconds["rollouts_only"], 2) for name, s in seconds.items()}
    print(f"{label:>10} ExP-GRPO sampling / GRPO sampling: two calls {ratios['two_calls']}x, "
          f"one call {ratios['one_call']}x", flush=True)
    return {"seconds": {k: round(v, 3) for k, v in seconds.items()}, "vs_rollouts_only": ratios}


def graph_check(device) -> dict:
    """On a GPU: the CUDA-graph decoder must sample what the eager decoder samples (tiny fp32 model, same seed)."""
    torch.manual_seed(0)
    model = AutoModelForCausalLM.from_config(SHAPES["tiny"](1000)).to(device).eval()
    prompts = torch.randint(3, 1000, (4, 12), generator=torch.Generator().manual_seed(1)).tolist()
    prompts[1] = prompts[1][:5]  # left padding too
    runs = [rollout.sample(model, _Tok(eos=2), prompts, 4, 48, 1.0, seed=3, cuda_graph=g).completion_ids
            for g in (False, True)]
    same = int((runs[0] == runs[1]).all(dim=1).sum())
    print(f"graph check: {same}/{runs[0].shape[0]} rows identical between eager and CUDA-graph decoding")
    return {"graph_check_rows_identical": same, "rows": runs[0].shape[0]}


def bench_natural(args) -> list[dict]:
    """Sampling at natural lengths from the fp32 policy and from its bf16 copy, at the demo's and the comparison's
    budgets, and how far the bf16 sampler's distribution is from the trainer's on the tokens it drew, with the trainer
    in fp32 and under bf16 autocast (--train_dtype)."""
    model, tokenizer = rollout.load_policy(None)
    copy = bf16.sampler_copy(model)
    questions = train.data.load("arith", "test", levels=args.levels, limit=args.prompts, seed=0)
    texts = [train.expo.solve_prompt(e.question) for e in questions]
    texts += [train.expo.explain_prompt(e.question, e.answer) for e in questions]
    prompts = rollout.encode_prompts(tokenizer, texts)
    counts = [args.group] * len(questions) + [1] * len(questions)
    results = []
    for budget in args.budgets:
        seconds, runs = {}, {}
        for name, sampler in (("fp32", model), ("bf16 copy", copy)):
            seconds[name] = min(_timed(lambda: runs.__setitem__(name, rollout.sample(
                sampler, tokenizer, prompts, counts, budget, 0.7, seed=1)), model.device) for _ in range(args.repeats))
        out, mismatch = runs["bf16 copy"], {}
        for trainer, amp in (("fp32", contextlib.nullcontext()), ("bf16 autocast", bf16.autocast(model.device))):
            with torch.no_grad(), amp:  # [N, T] the trainer's log-probs of the bf16 copy's tokens
                logp = rollout.token_logprobs(model, out.prompt_ids, out.prompt_mask, out.completion_ids, 0.7)
            mismatch[trainer] = tis.sampler_mismatch(logp, out.sampler_logp, out.completion_mask)
        m = mismatch["fp32"]
        n_tokens = {k: int(r.completion_mask.sum()) for k, r in runs.items()}
        row = {"budget": budget, "rows": len(counts), "seconds": {k: round(v, 2) for k, v in seconds.items()},
               "tokens": n_tokens, "tok_s": {k: round(n_tokens[k] / seconds[k], 1) for k in runs},
               "mean_len": {k: round(float(r.completion_mask.sum(1).float().mean()), 1) for k, r in runs.items()},
               "truncated": {k: round(float(r.truncated.float().mean()), 2) for k, r in runs.items()},
               "mismatch_k3_per_token": m["k3"] / n_tokens["bf16 copy"],
               "mismatch_log_ratio_per_token": m["log_ratio"] / n_tokens["bf16 copy"], "max_ratio": m["max_ratio"],
               "bf16_trainer": {"mismatch_k3_per_token": mismatch["bf16 autocast"]["k3"] / n_tokens["bf16 copy"],
                                "max_ratio": mismatch["bf16 autocast"]["max_ratio"]}}
        row["tok_s_ratio"] = round(row["tok_s"]["bf16 copy"] / row["tok_s"]["fp32"], 2)
        results.append(row)
        print(f"{len(questions)} x G={args.group} + {len(questions)} explanations, budget {budget}: " + ", ".join(
            f"{k} {seconds[k]:.1f} s, {row['tok_s'][k]:.0f} tok/s (mean length {row['mean_len'][k]})" for k in runs)
            + f"; bf16 / fp32 tokens/s {row['tok_s_ratio']}x; mismatch per token to the fp32 trainer: k3 "
            f"{row['mismatch_k3_per_token']:.2e}, log-ratio {row['mismatch_log_ratio_per_token']:.2e}, largest ratio "
            f"{m['max_ratio']:.3f}; to the trainer under bf16 autocast: k3 "
            f"{row['bf16_trainer']['mismatch_k3_per_token']:.2e}, largest ratio {row['bf16_trainer']['max_ratio']:.3f}",
            flush=True)
    results.append(natural_step(args))
    return results


STEP_CONFIGS = {  # (sampler, trainer's forward passes) of natural_step
    "fp32 / fp32": (False, False), "bf16 copy / fp32": (True, False), "bf16 copy / bf16 autocast": (True, True)}


def natural_step(args) -> dict:
    """One whole ExP-GRPO step of train.py (embedded model, arith, --max_new_tokens = the last budget) three ways, from
    the same weights (each update is undone): sampling from the fp32 policy or its bf16 copy, training in fp32 or under
    bf16 autocast (--train_dtype). Per way: the step, its sampling and its update (forward and backward of the scored
    rows and targets), each against fp32 / fp32. (The mismatch is `bench_natural`'s: a step logs it only over the
    rollouts it trains on, none when every group is all-wrong.)"""
    flags = ["--batch_size", str(args.prompts), "--num_generations", str(args.group), "--max_new_tokens",
             str(args.budgets[-1]), "--output_dir", tempfile.mkdtemp(prefix="expo-bench-"), "--overwrite",
             "--levels", *map(str, args.levels), "--sampler_dtype", "fp32", "--train_dtype", "fp32"]
    trainer = train.Trainer(train.parse_args(flags))
    weights = {k: v.clone() for k, v in trainer.model.state_dict().items()}
    batch = trainer.train_set[: args.prompts]
    out = {}
    for name, (bf16_sampler, bf16_train) in STEP_CONFIGS.items():
        trainer.model.load_state_dict(weights)
        trainer.sampler = bf16.sampler_copy(trainer.model) if bf16_sampler else trainer.model
        trainer.amp = functools.partial(bf16.autocast, trainer.device) if bf16_train else contextlib.nullcontext
        start = time.perf_counter()
        stats = trainer.grpo_step(batch)
        out[name] = {"step_s": round(time.perf_counter() - start, 1), "sample_s": round(stats["t_sample"], 1),
                     "update_s": round(stats["t_update"], 1), "rows": stats["pg_rows"], "targets": stats["targets"]}
    base = out["fp32 / fp32"]
    for name, row in out.items():
        row["step_x"], row["update_x"] = round(base["step_s"] / row["step_s"], 2), \
            round(base["update_s"] / max(row["update_s"], 1e-9), 2)
        print(f"one ExP-GRPO step, budget {args.budgets[-1]}, sampling / training {name}: step {row['step_s']} s "
              f"({row['step_x']}x), sampling {row['sample_s']} s, update {row['update_s']} s ({row['update_x']}x; "
              f"{row['rows']} rollouts, {row['targets']} targets)", flush=True)
    return {"step": out, "bf16_native": bf16.is_native(trainer.device)}


def bench_train(args, device: torch.device) -> list[dict]:
    """Seconds and peak memory of one GRPO and one ExP-GRPO step, full fine-tuning and LoRA, in one run."""
    tokenizer = AutoTokenizer.from_pretrained(assets.embedded_model_dir())  # a real chat template and decoder
    folder = Path(tempfile.mkdtemp(prefix="expo-bench-"))
    torch.manual_seed(0)
    AutoModelForCausalLM.from_config(SHAPES[args.shape](len(tokenizer))).save_pretrained(folder / "model")
    tokenizer.save_pretrained(folder / "model")
    real_score, real_sample = train.reward.score, train.rollout.sample
    train.reward.score = lambda text, gold, question=None: float(zlib.crc32(text.encode()) % 2)  # pseudo-random, fixed per text
    train.rollout.sample = lambda model, tok, prompts, group, max_new, *a, **k: real_sample(
        model, tok, prompts, group, max_new, *a, **{**k, "min_new_tokens": max_new})  # every row the same length
    results = []
    try:
        for lora_rank in (0, args.lora_rank):
            for method in ("grpo", "expo"):
                flags = ["--model", str(folder / "model"), "--method", method, "--batch_size", str(args.prompts),
                         "--num_generations", str(args.group), "--max_new_tokens", str(args.new_tokens),
                         "--grad_accum", str(args.grad_accum), "--output_dir", str(folder / "run"), "--overwrite",
                         "--lora_rank", str(lora_rank), "--device", device.type,
                         *(["--gradient_checkpointing"] if device.type == "cuda" else [])]
                trainer = train.Trainer(train.parse_args(flags))
                batch = trainer.train_set[: args.prompts]
                trainer.grpo_step(batch)  # warm-up: allocator, kernels, CUDA-graph capture
                if device.type == "cuda":
                    torch.cuda.reset_peak_memory_stats()
                seconds = _timed(lambda: results.append(trainer.grpo_step(batch)), device)
                stats = results.pop()
                peak = (torch.cuda.max_memory_allocated() if device.type == "cuda"
                        else resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024) / 2**30
                results.append({"method": method, "lora_rank": lora_rank, "step_s": round(seconds, 2),
                                "sample_s": round(stats["t_sample"] + stats.get("t_explain", 0.0), 2),
                                "peak_gib": round(peak, 2), "shape": args.shape, "rows": args.prompts * args.group,
                                "new_tokens": args.new_tokens})
                print(f"{args.shape:>9} {method:>5} lora={lora_rank:<3} step {seconds:7.2f} s  (sampling "
                      f"{results[-1]['sample_s']:.2f} s)  peak {peak:6.2f} GiB" + (" (process RSS)" if device.type
                                                                                    == "cpu" else ""), flush=True)
                del trainer
                gc.collect()
                if device.type == "cuda":
                    torch.cuda.empty_cache()
    finally:
        train.reward.score, train.rollout.sample = real_score, real_sample
    for lora_rank in (0, args.lora_rank):
        grpo, expo = (next(r for r in results if r["method"] == m and r["lora_rank"] == lora_rank)
                      for m in ("grpo", "expo"))
        print(f"lora={lora_rank}: ExP-GRPO step / GRPO step = {expo['step_s'] / grpo['step_s']:.2f}x")
    return results


def parse_args(argv=None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--shape", choices=["cpu", *SHAPES], default="cpu",
                        help="'cpu' = the tiny model and SmolLM2-135M; or one random-weight shape")
    parser.add_argument("--prompts", type=int, default=None, help="prompts per batch (default: 8 GPU, 4 CPU)")
    parser.add_argument("--group", type=int, default=None, help="completions per prompt (G; default 8, --natural 4)")
    parser.add_argument("--prompt-len", type=int, default=None, help="prompt tokens (default: 256 GPU, 64 CPU)")
    parser.add_argument("--new-tokens", type=int, default=None, help="generated tokens per row (512 GPU, 64 CPU)")
    parser.add_argument("--repeats", type=int, default=1, help="timed runs per method (the best is kept)")
    parser.add_argument("--static-generate", action="store_true", help="also time generate with a static cache")
    parser.add_argument("--json", default=None, help="write the figures to this file")
    parser.add_argument("--train", action="store_true", help="time training steps instead of sampling (see above)")
    parser.add_argument("--natural", action="store_true", help="CPU: sampling at natural lengths, from the fp32 "
                        "policy and from its bf16 copy (see above)")
    parser.add_argument("--budgets", type=int, nargs="+", default=[128, 256], help="--natural: new-token budgets")
    parser.add_argument("--levels", type=int, nargs="+", default=[2], help="--natural: arith levels of the prompts")
    parser.add_argument("--lora-rank", type=int, default=16, help="--train: the LoRA rank of the LoRA rows")
    parser.add_argument("--grad-accum", type=int, default=1, help="--train: micro-batches per step")
    args = parser.parse_args(argv)
    gpu = torch.cuda.is_available() and args.shape != "cpu"
    args.prompts = args.prompts or (8 if gpu or args.natural else 4)
    args.group = args.group or (4 if args.natural else 8)
    args.prompt_len = args.prompt_len or (256 if gpu else 64)
    args.new_tokens = args.new_tokens or (512 if gpu else 64)
    if args.train and args.shape == "cpu":
        args.shape, args.prompts, args.group, args.new_tokens = "tiny", 2, 2, 8
    args.device = torch.device("cuda" if gpu else "cpu")
    return args


def bench_sampling(args) -> list[dict]:
    """Our sampler against model.generate: the tiny model and SmolLM2 on a CPU, or one random-weight shape on a GPU."""
    device, results = args.device, []
    if args.shape == "cpu":
        model, tokenizer = rollout.load_policy(None)
        results.append(bench(AutoModelForCausalLM.from_config(SHAPES["tiny"](len(tokenizer))).eval(), tokenizer,
                             args, "tiny"))
        results.append(bench(model.eval(), tokenizer, args, "smollm2"))
    else:
        torch.manual_seed(0)
        dtype = torch.bfloat16 if device.type == "cuda" else torch.float32
        model = AutoModelForCausalLM.from_config(SHAPES[args.shape](None), dtype=dtype).to(device).eval()
        results.append(bench(model, _Tok(eos=2), args, args.shape))
    if device.type == "cuda" and decode.GraphedDecoder.supported(model):
        results.append(graph_check(device))
    return results


def main(argv=None) -> None:
    args = parse_args(argv)
    if args.natural:
        results = bench_natural(args)
    elif args.train:
        results = bench_train(args, args.device)
    else:
        results = bench_sampling(args)
    if args.json:
        Path(args.json).write_text(json.dumps(results, indent=2))


if __name__ == "__main__":
    main()
