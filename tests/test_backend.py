"""Beneath rollout.py (backend/): the decode loop and its decoders, the bf16 sampler copy and bf16 autocast."""
from __future__ import annotations

import contextlib
import math
import re

import pytest
import torch

import expo
import rollout
import train
from backend import bf16, decode, memory, threads
from conftest import HERE, TWO_TEXTS, _args, _steps, fixed_rollouts, tiny_llama
from variants import tis


@pytest.mark.exercise1
def test_static_cache_decoder_matches_dynamic_one(tokenizer):
    """The GPU path (static cache + 4D mask, replayed as a CUDA graph there) runs eagerly here: same samples."""
    model = tiny_llama(tokenizer)
    prompts = rollout.encode_prompts(tokenizer, ["What is 1 + 1?", "Hi"])
    dynamic = rollout.sample(model, tokenizer, prompts, 2, 10, temperature=1.0, seed=5, cuda_graph=False)
    static = rollout.sample(model, tokenizer, prompts, 2, 10, temperature=1.0, seed=5, cuda_graph=True)
    assert torch.equal(dynamic.completion_ids, static.completion_ids)


def test_growing_cache_layer_holds_what_dynamic_layer_holds():
    """decode.GrowingLayer (writes in place into spare room) against transformers' DynamicLayer (torch.cat), on plain
    tensors: a 3-position prefill, steps past its room of 2 (a reallocation), and rows leaving the batch."""
    from transformers.cache_utils import DynamicLayer
    growing, dynamic = decode.GrowingLayer(room=2), DynamicLayer()
    torch.manual_seed(0)
    for step, (rows, positions) in enumerate([(3, 3), (3, 1), (3, 1), (3, 1), (2, 1), (2, 1)]):
        if step == 4:  # row 1 finishes
            for layer in (growing, dynamic):
                layer.batch_select_indices(torch.tensor([0, 2]))
        k, v = torch.randn(rows, 2, positions, 4), torch.randn(rows, 2, positions, 4)  # [N, heads, new, head_dim]
        got, want = growing.update(k, v), dynamic.update(k, v)
        assert all(torch.equal(g, w) for g, w in zip(got, want))
        assert growing.get_seq_length() == dynamic.get_seq_length() == 3 + step
    assert growing.buffers[0].shape[2] == 8  # room for 3 + 2 at the prefill, then for 6 + 2 when it ran out


def early_stopping_llama(tokenizer, seed=0):
    """A tiny random Llama whose EOS logit is large in some contexts: its rows stop anywhere from the first token
    to never, so a batch's rows finish at very different times."""
    model = tiny_llama(tokenizer, seed)
    with torch.no_grad():
        model.lm_head.weight[tokenizer.eos_token_id] *= 60
    return model


@pytest.mark.exercise1
def test_finished_rows_leave_the_batch_with_the_same_tokens(tokenizer):
    """The eager decoder drops finished rows (its batch shrinks: counted with a hook), and every row samples exactly
    the tokens it samples without compaction and on the static-cache path, which never compacts."""
    model = early_stopping_llama(tokenizer)
    prompts = rollout.encode_prompts(tokenizer, ["What is 1 + 1?", "Hi", "The answer is 4. Explain why 2 + 2 = 4."])
    rows = []
    handle = model.model.register_forward_pre_hook(lambda mod, args, kw: rows.append(kw["input_ids"].shape[0]),
                                                   with_kwargs=True)
    compacted = rollout.sample(model, tokenizer, prompts, [6, 6, 1], 40, 1.0, seed=3)
    handle.remove()
    lengths = compacted.completion_mask.sum(1)  # 11 to 40 tokens
    assert int(lengths.max() - lengths.min()) >= 20 and bool(compacted.truncated.any())
    assert rows[:2] == [3, 13] and rows[-1] < 13 and rows[1:] == sorted(rows[1:], reverse=True)  # prefill, shrink
    full = rollout.sample(model, tokenizer, prompts, [6, 6, 1], 40, 1.0, seed=3, compact=False)
    static = rollout.sample(model, tokenizer, prompts, [6, 6, 1], 40, 1.0, seed=3, cuda_graph=True)
    for other in (full, static):
        assert torch.equal(compacted.completion_ids, other.completion_ids)
        assert torch.equal(compacted.completion_mask, other.completion_mask) and compacted.texts == other.texts


@pytest.mark.exercise1
def test_sampling_uses_kv_cache_under_gradient_checkpointing(tokenizer):
    model = tiny_llama(tokenizer).train()
    (getattr(model, "activation_checkpointing_enable", None) or model.gradient_checkpointing_enable)()  # renamed in 5.2x
    lengths = []
    handle = model.model.register_forward_pre_hook(lambda mod, args, kw: lengths.append(kw["input_ids"].shape[1]),
                                                   with_kwargs=True)
    rollout.sample(model, tokenizer, rollout.encode_prompts(tokenizer, ["Hi"]), 2, 6, seed=0)
    handle.remove()
    assert lengths[0] > 1 and lengths[1:] == [1] * 5  # one prefill, then one token per step: the cache is on
    assert model.training  # the caller's mode is restored


def test_inverse_cdf_sampling_matches_the_distribution():
    logits = torch.log(torch.tensor([[0.1, 0.2, 0.7, 0.0]])).repeat(40000, 1)
    picks = decode.pick(logits, 1.0, torch.Generator().manual_seed(0))
    freq = torch.bincount(picks, minlength=4).float() / 40000
    assert torch.allclose(freq, torch.tensor([0.1, 0.2, 0.7, 0.0]), atol=0.01) and freq[3] == 0
    hot = decode.pick(torch.tensor([[1.0, 3.0, 2.0, 0.0]]).repeat(5, 1), 0, None)
    assert hot.tolist() == [1] * 5


@pytest.mark.exercise5
def test_tis_weights_and_mismatch_values():
    """Hand-computed: old log 0.5 vs sampler log 0.4 -> ratio 1.25, capped at 1.2; 0 at padding; k3 of d = log 1.25."""
    old, sampler = torch.log(torch.tensor([[0.5, 0.5, 0.9]])), torch.log(torch.tensor([[0.4, 0.5, 0.1]]))
    mask = torch.tensor([[1, 1, 0]])
    assert tis.tis_weights(old, sampler, mask, cap=1.2)[0].tolist() == pytest.approx([1.2, 1.0, 0.0])
    assert tis.tis_weights(old, sampler, mask, cap=2.0)[0].tolist() == pytest.approx([1.25, 1.0, 0.0])
    m = tis.sampler_mismatch(old, sampler, mask)
    d = math.log(1.25)
    assert m == pytest.approx({"log_ratio": d, "k3": 1.25 - d - 1, "max_ratio": 1.25})
    logp = torch.zeros(1, 3, requires_grad=True)
    weighted, _ = expo.grpo_loss(logp, logp.detach(), None, torch.tensor([1.0]), mask, norm="token",
                                 token_weights=tis.tis_weights(old, sampler, mask, cap=1.2))
    weighted.backward()
    assert logp.grad[0].tolist() == pytest.approx([-0.6, -0.5, 0.0])  # each token's gradient scaled by its weight


@pytest.mark.exercise2
def test_sampler_logprobs_are_the_sampled_tokens_logprobs(tokenizer):
    model = tiny_llama(tokenizer)
    out = rollout.sample(model, tokenizer, [[1, 400, 401], [1, 500]], 2, 6, temperature=0.7, seed=3)
    with torch.no_grad():
        want = rollout.token_logprobs(model, out.prompt_ids, out.prompt_mask, out.completion_ids, 0.7)
    mask = out.completion_mask.bool()
    assert torch.allclose(out.sampler_logp[mask], want[mask], atol=1e-4)
    assert out.select([1, 2]).sampler_logp.shape == out.select([1, 2]).completion_ids.shape


@pytest.mark.exercise2
def test_bf16_sampler_is_seeded_and_close_to_the_policy(tokenizer):
    """A bf16 copy: bf16 parameters, fp32 buffers; a seed gives the same tokens twice; its log-probs are within bf16
    rounding of the fp32 policy's."""
    model = tiny_llama(tokenizer)
    sampler = bf16.sampler_copy(model)
    assert all(p.dtype == torch.bfloat16 for p in sampler.parameters())
    assert all(b.dtype == torch.float32 for b in sampler.buffers() if b.is_floating_point())
    runs = [rollout.sample(sampler, tokenizer, [[1, 400, 401], [1, 500]], 4, 8, temperature=1.0, seed=5) for _ in "ab"]
    assert torch.equal(runs[0].completion_ids, runs[1].completion_ids)
    out = runs[0]
    with torch.no_grad():
        fp32 = rollout.token_logprobs(model, out.prompt_ids, out.prompt_mask, out.completion_ids, 1.0)
    mask = out.completion_mask.bool()
    gap = (fp32[mask] - out.sampler_logp[mask]).abs()
    assert 0 < gap.max() < 0.1, f"bf16 sampler vs fp32 policy: largest log-prob gap {gap.max():.4f}"


@pytest.mark.skipif(not (bf16.is_native(torch.device("cpu")) and bf16.PackedLinear.available()),
                    reason="pre-packed bf16 linears are used only on a CPU with native bf16 matmuls")
def test_packed_linears_compute_what_the_bf16_weights_do_after_every_refresh():
    """On this CPU the bf16 sampler's linear layers are PackedLinears: bit for bit F.linear of their bf16 weights
    (with and without bias, 3-D input), again after refresh_sampler changes the weights, and in a deep copy."""
    import copy
    policy = torch.nn.Sequential(torch.nn.Linear(32, 48), torch.nn.Linear(48, 16, bias=False))
    sampler = bf16.sampler_copy(policy)
    assert all(type(m) is bf16.PackedLinear for m in sampler)
    x = torch.randn(3, 5, 32).bfloat16()

    def plain(model):
        linear = torch.nn.functional.linear
        return linear(linear(x, model[0].weight, model[0].bias), model[1].weight)
    before = plain(sampler)
    assert torch.equal(sampler(x), before) and torch.equal(copy.deepcopy(sampler)(x), before)
    with torch.no_grad():
        policy[0].weight.mul_(-2)
    bf16.refresh_sampler(sampler, policy)
    assert not torch.equal(plain(sampler), before) and torch.equal(sampler(x), plain(sampler))


def test_auto_sampler_dtype_follows_the_devices_bf16_support(tiny_dir, tmp_path, monkeypatch):
    monkeypatch.setattr(torch.cpu, "get_capabilities", lambda: {"avx512_bf16": False, "amx_bf16": False})
    assert not bf16.is_native(torch.device("cpu"))
    t = train.Trainer(train.parse_args(_args(tiny_dir, tmp_path / "no", "--sampler_dtype", "auto")))
    assert t.sampler is t.model, "auto chose a bf16 sampler on a CPU without bf16 matmuls"
    monkeypatch.setattr(torch.cpu, "get_capabilities", lambda: {"avx512_bf16": False, "amx_bf16": True})
    t = train.Trainer(train.parse_args(_args(tiny_dir, tmp_path / "yes", "--sampler_dtype", "auto")))
    assert t.sampler is not t.model and next(t.sampler.parameters()).dtype == torch.bfloat16


@pytest.mark.exercise10
@pytest.mark.parametrize("flags", [[], ["--grad_accum", "1", "--ppo_epochs", "2"], ["--lora_rank", "4"], ["--resume"]])
def test_bf16_sampler_is_the_policy_cast_after_every_update(tiny_dir, tmp_path, monkeypatch, flags):
    """No stale sampler: before training and after every optimizer step the bf16 copy equals the fp32 weights cast
    to bf16, with micro-batches, two PPO epochs, LoRA adapters, and a resumed run."""
    checks = []

    def check(t, when):
        cast = [p.detach().to(torch.bfloat16) for p in t.model.parameters()]
        checks.append(when)
        assert all(torch.equal(s, c) for s, c in zip(t.sampler.parameters(), cast, strict=True)), f"stale at {when}"
        ids = torch.tensor([[1, 400, 401, 402]])  # and it computes what a fresh copy does (no stale packed weight)
        assert torch.equal(t.sampler(ids).logits, bf16.sampler_copy(t.model)(ids).logits), f"stale at {when}"
    real_step, real_loop = train.Trainer.optimizer_step, train.Trainer.loop
    monkeypatch.setattr(train.Trainer, "optimizer_step", lambda t: (real_step(t), check(t, f"step {t.step}"))[0])
    monkeypatch.setattr(train.Trainer, "loop", lambda t: (check(t, "start"), real_loop(t))[1])
    args = _args(tiny_dir, tmp_path, "--method", "expo", "--learning_rate", "1e-2", "--sampler_dtype", "bf16",
                 *[f for f in flags if f != "--resume"])
    if "--resume" in flags:
        train.main(args + ["--steps", "1"])
    train.main(args + ["--steps", "2"] + (["--resume"] if "--resume" in flags else []))
    epochs = 2 if "--ppo_epochs" in flags else 1
    assert checks.count("start") == (2 if "--resume" in flags else 1) and len(checks) > epochs


def _step_loss_and_grad(tiny_dir, out, train_dtype, *flags):
    """(the step's logged losses, the gradient it applies) of one ExP-GRPO step on fixed rollouts and targets."""
    t = train.Trainer(train.parse_args(_args(tiny_dir, out, "--train_dtype", train_dtype, *flags)))
    fixed_rollouts(t, TWO_TEXTS, [[1, 0], [0, 1]])  # mixed groups, and a self-explanation per question
    t.optimizer_step = lambda: 0.0
    stats = t.grpo_step(t.train_set[:2])
    return stats, torch.cat([p.grad.flatten() for p in t.model.parameters()]), t


@pytest.mark.exercise10
def test_bf16_autocast_training_is_within_bf16_rounding_of_fp32(tiny_dir, tmp_path, monkeypatch):
    """--train_dtype bf16 on a CPU: the forward passes run under bf16 autocast, the weights and gradients stay fp32,
    and the step's likelihood term and gradient agree with fp32's to bf16's rounding. Tolerance: bf16 keeps 8
    significant bits; the tiny random model's logits are near 0, so each rounds by ~1e-4 and the token-mean NLL moves
    by ~1e-5 relative (1.3e-5 measured on an AVX2 CPU; cosine 1 - 1e-6, norm 4e-5). 1e-3 (cosine 0.9999, norm 0.5%)
    leaves 100x room across CPUs, while a log-softmax taken in bf16 (logsumexp ~10.8 rounds in steps of 1/16) or a
    gradient kept in bf16 misses it. `auto` follows bf16.is_native, as --sampler_dtype does."""
    fp32, grad32, t32 = _step_loss_and_grad(tiny_dir, tmp_path / "fp32", "fp32")
    bf16, grad16, t16 = _step_loss_and_grad(tiny_dir, tmp_path / "bf16", "bf16")
    assert t32.amp is contextlib.nullcontext and t16.amp is not contextlib.nullcontext
    assert all(p.dtype == torch.float32 and p.grad.dtype == torch.float32 for p in t16.model.parameters())
    assert bf16["loss_sft"] != fp32["loss_sft"] and bf16["loss_sft"] == pytest.approx(fp32["loss_sft"], rel=1e-3)
    assert bf16["loss_pg"] == fp32["loss_pg"] == 0.0  # on-policy, the surrogate's value is -mean(A) = 0; its gradient:
    cosine = float(torch.nn.functional.cosine_similarity(grad16, grad32, dim=0))
    assert cosine > 0.9999 and float(grad16.norm() / grad32.norm()) == pytest.approx(1.0, rel=5e-3), cosine
    for caps, want in [({"avx512_bf16": False, "amx_bf16": False}, False), ({"avx512_bf16": True}, True)]:
        monkeypatch.setattr(torch.cpu, "get_capabilities", lambda caps=caps: caps)
        t = train.Trainer(train.parse_args(_args(tiny_dir, tmp_path / f"auto-{want}", "--train_dtype", "auto")))
        assert (t.amp is not contextlib.nullcontext) == want, f"--train_dtype auto with {caps}"


@pytest.mark.exercise10
def test_fp32_sampler_samples_in_fp32_whatever_the_train_dtype(tiny_dir, tmp_path):
    """--sampler_dtype fp32 --train_dtype bf16 draws exactly what an fp32 run draws: only the update changes, so the
    two can be compared step for step. (Sampling the fp32 policy under the trainer's autocast broke this.) A run that
    samples bf16 samples an fp32 model (DPO's reference) under bf16 autocast, as its bf16 copy."""
    draws = {}
    for train_dtype in ("fp32", "bf16"):
        t = train.Trainer(train.parse_args(_args(tiny_dir, tmp_path / train_dtype, "--train_dtype", train_dtype)))
        roll, _, explanations = t.rollouts(t.train_set[:2])
        draws[train_dtype] = (roll.completion_ids, roll.sampler_logp, explanations.sampler_logp)
    assert all(torch.equal(a, b) for a, b in zip(draws["fp32"], draws["bf16"])), "--train_dtype changed the sampler"
    t = train.Trainer(train.parse_args(_args(tiny_dir, tmp_path / "bf16-sampler", "--sampler_dtype", "bf16")))
    with t.sampling(t.model):
        assert torch.is_autocast_enabled("cpu") and torch.get_autocast_dtype("cpu") == torch.bfloat16
    with t.sampling():
        assert not torch.is_autocast_enabled("cpu")  # the bf16 copy needs none


@pytest.mark.exercise10
@pytest.mark.parametrize("train_dtype", ["fp32", "bf16"])
def test_first_ppo_epoch_ratio_is_exactly_one_and_no_gradient_means_no_step(tiny_dir, tmp_path, monkeypatch,
                                                                              train_dtype):
    """In both training dtypes: pi_old is the first epoch's own log-probs, so that epoch's ratio is exactly 1 (not
    within rounding: a second forward pass under autocast could round otherwise); and a step whose groups are all
    equal and that has no targets changes no weight and no AdamW state."""
    calls, real = [], expo.grpo_loss
    monkeypatch.setattr(train.expo, "grpo_loss", lambda logp, **k: calls.append((logp.detach(), k)) or real(logp, **k))
    t = train.Trainer(train.parse_args(_args(tiny_dir, tmp_path / "ppo", "--method", "grpo", "--ppo_epochs", "2",
                                             "--train_dtype", train_dtype, "--learning_rate", "1e-2")))
    fixed_rollouts(t, TWO_TEXTS, [[1, 0], [0, 1]])
    t.grpo_step(t.train_set[:2])
    first, k = calls[0]
    assert torch.equal(first, k["old_logp"]), "the first epoch's ratio is not exactly 1"
    assert not torch.equal(calls[-1][0], calls[-1][1]["old_logp"]), "the second epoch did not see an update"
    t = train.Trainer(train.parse_args(_args(tiny_dir, tmp_path / "none", "--method", "grpo",
                                             "--train_dtype", train_dtype, "--learning_rate", "1e-2")))
    fixed_rollouts(t, TWO_TEXTS, [[0, 0], [1, 1]])  # all-equal groups: no gradient anywhere
    before = [p.detach().clone() for p in t.model.parameters()]
    stats = t.grpo_step(t.train_set[:2])
    assert stats["pg_rows"] == 0 and not t.optimizer.state, "AdamW took a step without a gradient"
    assert all(torch.equal(a, p) for a, p in zip(before, t.model.parameters())), "weights moved without a gradient"


@pytest.mark.exercise10
def test_tis_weight_is_exactly_one_when_the_sampler_is_the_trainer(tiny_dir, tmp_path, monkeypatch, capsys):
    """--sampler_dtype fp32 samples from the policy itself: --tis_cap changes nothing (the cached decoder's tiny
    rounding differences are not corrected); with a bf16 copy the mismatch is logged and the correction applied, and
    the run's first line says so (and that bf16 is emulated, where it is)."""
    monkeypatch.setattr(train.reward, "score", lambda text, gold, question=None: float(len(text) % 2))  # mixed groups
    flags = ["--method", "grpo", "--kl_coef", "0.1", "--steps", "2", "--learning_rate", "1e-2", "--num_generations", "4"]
    for name, extra in [("plain", []), ("tis", ["--tis_cap", "2"])]:
        train.main(_args(tiny_dir, tmp_path / name, *flags, *extra))
    plain, tis = _steps(tmp_path / "plain"), _steps(tmp_path / "tis")
    assert [(s["loss_pg"], s["grad_norm"]) for s in plain] == [(s["loss_pg"], s["grad_norm"]) for s in tis], \
        "--tis_cap changed the update although the sampler is the fp32 policy"
    assert all(abs(s["mismatch_log_ratio"]) < 1e-5 and s["mismatch_k3"] < 1e-6 for s in plain)
    assert "sampling from the fp32 policy, training in fp32," in capsys.readouterr().out
    train.main(_args(tiny_dir, tmp_path / "bf16", *flags, "--sampler_dtype", "bf16"))
    assert all(s["mismatch_k3"] > 0 and s["mismatch_max_ratio"] > 1 for s in _steps(tmp_path / "bf16"))
    emulated = "" if bf16.is_native(torch.device("cpu")) else " (bf16 emulated on this CPU: slower than fp32)"
    assert f"sampling from a bf16 copy of the policy{emulated}, training in fp32," in capsys.readouterr().out


@pytest.mark.exercise10
@pytest.mark.parametrize("train_dtype", ["bf16", "fp32"])
def test_every_trainer_forward_pass_runs_under_the_trainers_autocast(tiny_dir, tmp_path, monkeypatch, train_dtype):
    """With --train_dtype bf16 every forward pass of an update -- the policy gradient's log-probs, the self-explanation
    targets', the KL's frozen reference, ExP-DPO's policy and reference, the fkl teacher -- runs under bf16 autocast,
    and with fp32 none does: a pass scored outside the autocast mixes two roundings in one loss."""
    seen, real = [], rollout.completion_logits
    monkeypatch.setattr(rollout, "completion_logits", lambda *a, **kw: seen.append(
        torch.is_autocast_enabled("cpu")) or real(*a, **kw))
    for method, flags in (("expo", ["--kl_coef", "0.1"]), ("expo_dpo", []), ("expo", ["--explain_loss", "fkl"])):
        t = train.Trainer(train.parse_args(_args(tiny_dir, tmp_path / f"{method}{flags}", "--method", method,
                                                 "--train_dtype", train_dtype, *flags)))
        fixed_rollouts(t, TWO_TEXTS, [[1, 0], [0, 1]])  # mixed groups: a policy gradient, targets, pairs
        t.update(t.train_set[:2])
    assert len(seen) >= 8 and set(seen) == {train_dtype == "bf16"}, seen


def test_row_chunked_scoring_recomputes_when_any_input_needs_a_gradient(monkeypatch):
    """memory.by_rows keeps a chunk's fp32 intermediates for backward only through activation checkpointing, and
    decides it on *any* input needing a gradient: fkl's (teacher, student) pair has its gradient in the second."""
    calls, real = [], memory.checkpoint
    monkeypatch.setattr(memory, "checkpoint", lambda *a, **kw: calls.append(1) or real(*a, **kw))
    teacher, student = torch.randn(6, 3, 5), torch.randn(6, 3, 5, requires_grad=True)  # [rows, T, V]
    out = memory.by_rows(lambda t, s: (t.softmax(-1) * s.log_softmax(-1)).sum(-1), (teacher, student), rows_per_chunk=2)
    out.sum().backward()
    assert len(calls) == 3 and student.grad is not None, "a chunk kept its intermediates, or lost its gradient"
    calls.clear()
    memory.by_rows(lambda t, s: t + s, (teacher, student.detach()), rows_per_chunk=2)
    assert not calls, "recomputed although nothing needs a gradient"


def test_torch_threads_follow_the_process_cpu_affinity_not_the_machine(monkeypatch):
    """A 2-core slot of a 64-core machine runs 2 threads (os.cpu_count() would give 64 threads fighting over 2 cores),
    and every command line sets them through backend/threads.py: no other file counts the machine's CPUs."""
    monkeypatch.delenv("OMP_NUM_THREADS", raising=False)
    monkeypatch.setattr(threads.os, "sched_getaffinity", lambda pid: {0, 1}, raising=False)
    monkeypatch.setattr(threads.os, "cpu_count", lambda: 64)
    before = torch.get_num_threads()
    try:
        threads.use_this_process_cpus()
        assert torch.get_num_threads() == 2
    finally:
        torch.set_num_threads(before)
    sources = {p: p.read_text() for p in [*HERE.glob("*.py"), *HERE.glob("*/*.py")]
               if p.parent.name not in ("tests", "docs") and not p.name.startswith(("test_", "conftest"))}
    assert not [p.name for p, text in sources.items() if re.search(r"cpu_count\(|set_num_threads\(", text)
                and p.name != "threads.py"], "a command line counts the machine's CPUs itself"
    for name in ("train.py", "evaluate.py", "lab/analyze.py", "lab/compare.py"):
        assert "threads.use_this_process_cpus()" in (HERE / name).read_text().split('if __name__ == "__main__":')[1]
