"""What a learner reads first: the method (expo.py), models and tokens (rollout.py), and the mechanics of one step
(train.py), each test named after the bug it catches. The other rooms' tests are in tests/; one command runs them all:

    python -m pytest -q
"""
from __future__ import annotations

import json
import math
import os

import pytest
import torch
from transformers import AutoModelForCausalLM, GPT2Config, GPT2LMHeadModel, LlamaConfig, LlamaForCausalLM

import data
import dpo
import evaluate
import expo
import reward
import rollout
import train
from conftest import TWO_TEXTS, _args, _rollout_tensors, _steps, fixed_rollouts, tiny_llama
from engine import lora, run
from lab import analyze
from variants import distill


@pytest.mark.exercise4
def test_group_advantages_exact_values():
    adv = expo.group_advantages(torch.tensor([1.0, 0, 0, 0, 1, 1, 1, 1]), group_size=4)
    assert torch.allclose(adv[:4], torch.tensor([0.75, -0.25, -0.25, -0.25]) / (0.5 + 1e-4))
    assert torch.allclose(adv[:4], torch.tensor([1.5, -0.5, -0.5, -0.5]), atol=1e-3)
    assert torch.equal(adv[4:], torch.zeros(4))  # all-equal group: nothing to learn
    assert torch.allclose(expo.group_advantages(torch.tensor([1.0, 0, 0, 0]), 4, scale="none"),
                          torch.tensor([0.75, -0.25, -0.25, -0.25]))
    with pytest.raises(ValueError):
        expo.group_advantages(torch.ones(6), group_size=4)


@pytest.mark.exercise5
@pytest.mark.parametrize("norm", expo.LOSS_NORMS)
def test_grpo_gradient_is_reinforce_at_ratio_one(norm):
    logp, mask, adv = _rollout_tensors()
    loss, stats = expo.grpo_loss(logp, logp.detach(), None, adv, mask, norm=norm)
    loss.backward()
    normaliser = {"seq": mask.sum(1, keepdim=True) * 3, "token": mask.sum(), "constant": 3 * 5}[norm]
    assert torch.allclose(logp.grad, -adv[:, None] * mask / normaliser)
    assert stats == {"tokens": 9.0, "clipped": 0.0, "kl": 0.0}  # sums over the 9 completion tokens


@pytest.mark.exercise5
def test_grpo_clipping_zeroes_gradient_exactly_where_it_should():
    # token 0: ratio 1.5, token 1: ratio 0.5, token 2: ratio 1.1 (inside) -- for A = +1 and A = -1
    shift = torch.log(torch.tensor([1.5, 0.5, 1.1]))
    old = torch.zeros(2, 3)
    logp = (old + shift).requires_grad_()
    loss, stats = expo.grpo_loss(logp, old, None, torch.tensor([1.0, -1.0]), torch.ones(2, 3), norm="token")
    loss.backward()
    ratio = shift.exp()
    expected = torch.stack([torch.tensor([0.0, -ratio[1], -ratio[2]]),  # A>0: ratio above 1+eps is clipped
                            torch.tensor([ratio[0], 0.0, ratio[2]])]) / 6  # A<0: ratio below 1-eps is clipped
    assert torch.allclose(logp.grad, expected)
    assert stats["clipped"] == 2 and stats["tokens"] == 6


@pytest.mark.exercise5
@pytest.mark.parametrize("norm", expo.LOSS_NORMS)
def test_grpo_loss_value_counts_completion_tokens_only(norm):
    """The loss *value* (logged as loss_pg), not only its gradient, leaves padding out: padding positions contribute
    nothing to the sum, whatever the ratio there (here 1, which unmasked would add -A per padding token)."""
    logp, mask, adv = _rollout_tensors()
    old = logp.detach() - 0.3  # ratio exp(0.3) = 1.35 on every completion token: clipped where A > 0
    loss, _ = expo.grpo_loss(logp, old, None, adv, mask, norm=norm, max_tokens=5)
    ratio = torch.exp(torch.tensor(0.3))
    per_token = -torch.minimum(ratio * adv, ratio.clamp(0.8, 1.2) * adv)[:, None] * mask  # [3, 5], 0 at padding
    expected = {"seq": (per_token.sum(1) / mask.sum(1)).mean(), "token": per_token.sum() / mask.sum(),
                "constant": per_token.sum() / (3 * 5)}[norm]
    assert loss.item() == pytest.approx(expected.item(), rel=1e-5)


@pytest.mark.exercise5
@pytest.mark.parametrize("sign", [1.0, -1.0])
def test_grpo_loss_zeroes_padding_before_exp(sign):
    """Padding may hold any finite values. A log-ratio of 200 there overflows exp to inf, and the mask cannot remove
    it afterwards (inf * 0 is nan, in the loss or in its gradient): it must be zeroed before exp. No KL term here."""
    logp, mask, adv = _rollout_tensors()
    garbage = torch.where(mask.bool(), 0.0, 100.0)
    dirty_logp = (logp.detach() + garbage).requires_grad_()
    loss, _ = expo.grpo_loss(dirty_logp, logp.detach() - garbage, None, sign * adv, mask)
    clean, _ = expo.grpo_loss(logp, logp.detach(), None, sign * adv, mask)
    assert torch.isfinite(loss) and torch.allclose(loss, clean)
    loss.backward()
    assert torch.isfinite(dirty_logp.grad).all() and torch.all(dirty_logp.grad[~mask.bool()] == 0)


@pytest.mark.exercise6
def test_grpo_padding_garbage_changes_nothing():
    logp, mask, adv = _rollout_tensors()
    old, ref = logp.detach() - 0.1, logp.detach() + 0.2
    clean, _ = expo.grpo_loss(logp, old, ref, adv, mask, kl_coef=0.1)
    garbage = torch.where(mask.bool(), 0.0, 80.0)  # exp(80) would overflow fp32 ratios if it reached exp
    logp2 = (logp.detach() + garbage).requires_grad_()
    dirty, _ = expo.grpo_loss(logp2, old - garbage, ref + garbage * 3, adv, mask, kl_coef=0.1)
    assert torch.allclose(clean, dirty)
    dirty.backward()
    assert torch.all(logp2.grad[~mask.bool()] == 0)


@pytest.mark.exercise6
def test_k3_kl_values():
    logp = torch.log(torch.tensor([[0.5, 0.2]]))
    ref = torch.log(torch.tensor([[0.5, 0.4]]))
    loss, stats = expo.grpo_loss(logp, logp, ref, torch.zeros(1), torch.ones(1, 2), kl_coef=1.0, norm="token")
    k3 = 2.0 - math.log(2.0) - 1  # exp(d) - d - 1 with d = log(0.4 / 0.2)
    assert loss.item() == pytest.approx(k3 / 2)
    assert stats["kl"] == pytest.approx(k3) and stats["tokens"] == 2  # summed over the two tokens
    same, stats = expo.grpo_loss(logp, logp, logp, torch.zeros(1), torch.ones(1, 2), kl_coef=1.0)
    assert same.item() == 0.0 and stats["kl"] == 0.0


@pytest.mark.exercise6
def test_k3_kl_estimator_values():
    logp = torch.log(torch.tensor([[0.5, 0.5, 0.3]]))
    ref = torch.log(torch.tensor([[0.25, 0.5, 0.9]]))
    ref[0, 2] = 1e30  # padding garbage
    kl = expo.k3_kl(logp, ref, torch.tensor([[True, True, False]]))
    assert kl[0, 0].item() == pytest.approx(0.5 + math.log(2) - 1) and kl[0, 1:].tolist() == [0.0, 0.0]


@pytest.mark.exercise8
def test_sft_loss_and_sequence_logp_values():
    logp = torch.full((2, 3), math.log(0.5))
    mask = torch.tensor([[1.0, 1, 0], [1, 0, 0]])
    assert expo.sft_loss(logp + 100 * (1 - mask), mask).item() == pytest.approx(math.log(2))
    assert torch.allclose(expo.sequence_logp(logp, mask), torch.tensor([2, 1]) * math.log(0.5))
    logp = torch.log(torch.tensor([[0.5, 0.25, 0.9]])).requires_grad_()
    (grad,) = torch.autograd.grad(expo.sft_loss(logp, torch.tensor([[1, 1, 0]])), logp)
    assert grad.tolist() == [[-0.5, -0.5, 0.0]]  # a token mean over the two masked tokens; padding gets nothing


@pytest.mark.exercise8
def test_sft_loss_is_a_token_mean_not_a_mean_of_row_means():
    """Every target token weighs the same: a row of 3 tokens counts 3 times a row of 1 (a mean of per-row means would
    give the short row's token the weight of all three)."""
    logp = torch.log(torch.tensor([[0.5, 0.5, 0.5, 0.9], [0.1, 0.9, 0.9, 0.9]]))
    mask = torch.tensor([[1.0, 1, 1, 0], [1, 0, 0, 0]])
    assert expo.sft_loss(logp, mask).item() == pytest.approx(-(3 * math.log(0.5) + math.log(0.1)) / 4)  # 1.0956


@pytest.mark.exercise9
def test_dpo_loss_values():
    x = torch.tensor([-3.0, -7.0])
    assert expo.dpo_loss(x, x, x, x, beta=0.1).item() == pytest.approx(math.log(2))
    better = expo.dpo_loss(x + 1, x, x, x, beta=0.1).item()
    assert better == pytest.approx(-math.log(1 / (1 + math.exp(-0.1))))


@pytest.mark.exercise9
def test_dpo_loss_is_exact_at_large_margins():
    """-log sigmoid(z) for z = beta * margin far below 0 is -z: log(sigmoid(z)) underflows to log(0) = -inf there
    (sigmoid(-495) is 0 in fp32), while F.logsigmoid stays exact, and so does the gradient (-beta per unit margin)."""
    chosen = torch.tensor([-500.0], requires_grad=True)
    zero = torch.zeros(1)
    loss = expo.dpo_loss(chosen, torch.tensor([-5.0]), zero, zero, beta=1.0)
    assert loss.item() == pytest.approx(495.0)
    loss.backward()
    assert chosen.grad.item() == pytest.approx(-1.0)


def test_beta_schedule():
    assert expo.beta_at(5, 10, 0.04) == 0.04
    assert expo.beta_at(0, 10, 0.04, "linear") == 0.04
    assert expo.beta_at(5, 10, 0.04, "linear") == pytest.approx(0.02)
    assert expo.beta_at(10, 10, 0.04, "linear") == 0.0


def test_pg_denominator_counts_rows_tokens_or_the_budget():
    mask = torch.tensor([[1, 1, 1, 0], [1, 0, 0, 0]])
    assert [expo.pg_denominator(mask, norm) for norm in expo.LOSS_NORMS] == [2.0, 4.0, 8.0]
    assert expo.pg_denominator(mask, "constant", max_tokens=5) == 10.0
    with pytest.raises(ValueError):
        expo.pg_denominator(mask, "mean")


@pytest.mark.exercise8
@pytest.mark.parametrize("norm", expo.LOSS_NORMS)
def test_one_denominator_makes_micro_batches_add_up_exactly(norm):
    """Each micro-batch's loss divided by the step's denominator: the parts sum to the full-batch loss, value and
    gradient, with no re-weighting; the same holds for the likelihood term over the target tokens."""
    logp, mask, adv = _rollout_tensors()
    full, _ = expo.grpo_loss(logp, logp.detach() - 0.05, None, adv, mask, norm=norm, max_tokens=5)
    (grad_full,) = torch.autograd.grad(full, logp)
    denominator = expo.pg_denominator(mask, norm, max_tokens=5)
    parts = [expo.grpo_loss(logp[rows], logp.detach()[rows] - 0.05, None, adv[rows], mask[rows], norm=norm,
                            denominator=denominator)[0] for rows in (slice(0, 2), slice(2, 3))]
    (grad_parts,) = torch.autograd.grad(sum(parts), logp)
    assert torch.allclose(sum(parts), full) and torch.allclose(grad_parts, grad_full)
    nll = [expo.sft_loss(logp[rows], mask[rows], float(mask.sum())) for rows in (slice(0, 1), slice(1, 3))]
    assert torch.allclose(sum(nll), expo.sft_loss(logp, mask))


@pytest.mark.exercise8
def test_microbatch_loss_is_grpo_plus_beta_nll_with_summed_stats():
    """expo.microbatch_loss on plain tensors, against hand-computed values: at ratio 1 with "token" norm the GRPO part
    is -sum(A_i |o_i|) / tokens, the likelihood part beta * NLL / target tokens; over two micro-batches (one with
    rollout rows only, one with targets only) the parts add up to one big batch's loss."""
    logp, mask, adv = _rollout_tensors()  # 9 tokens: rows of 3, 5, 1 with A = 1, -0.5, 2
    target_logp, target_mask = torch.log(torch.tensor([[0.5, 0.5, 0.5], [0.1, 0.9, 0.9]])), torch.tensor(
        [[1, 1, 1], [1, 0, 0]])
    den = expo.Denominators(pg=9.0, target_tokens=4.0)
    loss, stats = expo.microbatch_loss(logp, logp.detach(), None, adv, mask, target_logp, target_mask,
                                       denominators=den, beta=0.04, norm="token")
    pg = -(1 * 3 - 0.5 * 5 + 2 * 1) / 9  # -0.2778
    nll = -(3 * math.log(0.5) + math.log(0.1)) / 4  # 1.0956
    assert loss.item() == pytest.approx(pg + 0.04 * nll)
    assert stats["loss_pg"] == pytest.approx(pg) and stats["loss_sft"] == pytest.approx(nll)
    assert (stats["tokens"], stats["target_tokens"], stats["clipped"]) == (9.0, 4.0, 0.0)
    first, _ = expo.microbatch_loss(logp, logp.detach(), None, adv, mask, None, None, denominators=den, beta=0.04,
                                    norm="token")
    second, st = expo.microbatch_loss(None, None, None, None, None, target_logp, target_mask, denominators=den,
                                      beta=0.04, norm="token")
    assert (first + second).item() == pytest.approx(loss.item()) and "loss_pg" not in st


@pytest.mark.exercise11
def test_vocab_kl_hand_values_both_ways_zero_at_equal_and_never_negative():
    """KL(p || q) over the vocabulary: p = [.5, .5], q = [.75, .25] gives 0.1438, the other way 0.1308 (so the
    direction matters); identical distributions give exactly 0, whatever their shift; random pairs are >= 0."""
    p, q = torch.tensor([[[0.0, 0.0]]]), torch.tensor([[[math.log(3), 0.0]]])  # [1, 1, 2] logits
    assert distill.vocab_kl(p, q).item() == pytest.approx(0.5 * math.log(0.5 / 0.75) + 0.5 * math.log(2), abs=1e-6)
    assert distill.vocab_kl(q, p).item() == pytest.approx(0.75 * math.log(1.5) + 0.25 * math.log(0.5), abs=1e-6)
    logits = torch.randn(3, 5, 11)
    assert distill.vocab_kl(logits, logits + 7.0).abs().max() < 1e-5, "a shift of the logits is the same distribution"
    assert (distill.vocab_kl(logits, torch.randn(3, 5, 11)) >= -1e-6).all()
    half = distill.vocab_kl(logits.bfloat16(), logits.bfloat16())
    assert half.dtype == torch.float32 and half.abs().max() < 1e-6, "the KL is not computed in fp32"


@pytest.mark.exercise11
def test_vocab_kl_gradient_is_student_minus_teacher_probabilities():
    """d KL(p_T || softmax(z)) / dz = softmax(z) - p_T: the forward KL's gradient, the identity that ties it to the NLL
    (d -log softmax(z)_v / dz = softmax(z) - onehot(v), whose mean over v ~ p_T is the same)."""
    teacher, z = torch.randn(2, 3, 7), torch.randn(2, 3, 7, requires_grad=True)
    distill.vocab_kl(teacher, z).sum().backward()
    assert torch.allclose(z.grad, z.detach().softmax(-1) - teacher.softmax(-1), atol=1e-6)


@pytest.mark.exercise11
@pytest.mark.parametrize("reverse", [False, True])
def test_token_kl_chunks_and_kl_loss_a_token_mean_that_ignores_padding(reverse):
    """distill.token_kl is vocab_kl over row chunks in the right direction, with the same gradient, and no gradient
    into the teacher; kl_loss is a token mean over the masked tokens (padding may hold anything), and the micro-batch
    term given -KL as its target log-probs (what the step passes) is beta * kl_loss over the step's target tokens."""
    student, teacher = torch.randn(5, 4, 9, requires_grad=True), torch.randn(5, 4, 9)
    kl = distill.token_kl(student, teacher, reverse=reverse, rows_per_chunk=2)  # [5, 4]
    direct = distill.vocab_kl(student, teacher) if reverse else distill.vocab_kl(teacher, student)
    assert torch.allclose(kl, direct, atol=1e-6)
    mask = torch.tensor([[1, 1, 0, 0], [1, 1, 1, 1], [1, 0, 0, 0], [0, 0, 0, 0], [1, 1, 1, 0]])
    loss = distill.kl_loss(kl, mask)
    assert loss.item() == pytest.approx(float((direct.detach() * mask).sum() / mask.sum()), rel=1e-6)
    loss.backward()
    grad, student.grad = student.grad.clone(), None
    (direct * mask).sum().div(mask.sum()).backward()
    assert torch.allclose(grad, student.grad, atol=1e-7) and grad[3].abs().max() == 0, "padding rows got a gradient"
    garbage = torch.where(mask.bool(), kl.detach(), torch.tensor(1e30))
    assert distill.kl_loss(garbage, mask).item() == pytest.approx(loss.item(), rel=1e-6)
    den = expo.Denominators(pg=1.0, target_tokens=20.0)
    term, stats = expo.microbatch_loss(None, None, None, None, None, -kl.detach(), mask,  # the step passes -KL
                                       denominators=den, beta=0.04)
    total = float((direct.detach() * mask).sum())
    assert term.item() == pytest.approx(0.04 * total / 20, rel=1e-5)
    assert stats["loss_sft"] == pytest.approx(total / 20, rel=1e-5) and stats["target_tokens"] == 10.0


@pytest.mark.exercise7
def test_prompts_differ_only_by_the_hint():
    q, a = "What is 47 + 38?", "85"
    solve, explain = expo.solve_prompt(q), expo.explain_prompt(q, a)
    assert q in solve and "\\boxed{}" in solve and a not in solve
    assert explain.startswith(solve) and a in explain[len(solve):]
    target = expo.explanation_target("47 + 38 = 85. So \\boxed{84}. Extra words.", a)
    assert target == "47 + 38 = 85. So \\boxed{85}."
    assert a not in solve  # the context a target is scored under never holds the answer


@pytest.mark.exercise7
def test_explanation_targets_and_leak_filter():
    assert expo.explanation_target("We add 40 and 5 to get 45.", "45") == \
        "We add 40 and 5 to get 45.\nThe answer is \\boxed{45}."
    assert expo.explanation_target("so $\\boxed{\\frac{1}{2}}$.", "\\frac{1}{3}") == "so $\\boxed{\\frac{1}{3}}$."
    targets, counts = expo.self_explanation_targets(
        ["Since the given answer is 85, we work back.", "7 + 8 = 15", "As the hint says, 3."], ["85", "15", "3"],
        [False] * 3)
    assert targets == [None, "7 + 8 = 15\nThe answer is \\boxed{15}.", None] and counts["explain_dropped"] == 2
    assert expo.self_explanation_targets(["The given answer is 85"], ["85"], [False], drop_leaks=False)[1][
        "explain_dropped"] == 0
    assert not expo.mentions_hint("So the final answer is 85.")  # an ordinary closing line is not a leak


@pytest.mark.exercise7
@pytest.mark.parametrize("explanation, truncated, target", [
    ("48 + 8 = 56.\nSo 56 + 1 = 5", True, "48 + 8 = 56.\nThe answer is \\boxed{56}."),  # the half-written line goes
    ("We add 48 and 8, which gives 5", True, "The answer is \\boxed{56}."),  # no finished line: the answer line alone
    ("48 + 8 = 56.\nSo 56 + 1 = 5", False, "48 + 8 = 56.\nSo 56 + 1 = 5\nThe answer is \\boxed{56}."),  # finished
    ("48 + 8 = 56, so \\boxed{56}. Then 56 +", True, "48 + 8 = 56, so \\boxed{56}."),  # boxed: the box rule
])
def test_a_cut_off_explanation_keeps_its_finished_lines_only(explanation, truncated, target):
    """A self-explanation the budget cut off, without a box, keeps its finished lines and then "The answer is
    \\boxed{gold}.": never a sum broken off mid-way followed by another number."""
    assert expo.explanation_target(explanation, "56", truncated) == target
    targets, counts = expo.self_explanation_targets([explanation], ["56"], [truncated])
    assert targets == [target] and counts["targets_finished"] == (not truncated)


@pytest.mark.exercise7
@pytest.mark.parametrize("explanation, target", [
    ("so $\\boxed{7}$. Done", "so $\\boxed{85}$."),
    ("\\[\n\\boxed{5}\n\\]\nThus we are done.", "\\[\n\\boxed{85}\n\\]"),
    ("Hence \\(\\boxed{5}\\). More prose.", "Hence \\(\\boxed{85}\\)."),
    ("**\\boxed{5}** is it", "**\\boxed{85}**"),
    ("$$\\boxed{5}$$ and so on", "$$\\boxed{85}$$"),
    ("\\boxed{\\boxed{5}} extra", "\\boxed{\\boxed{85}}"),
    ("**Answer: $\\boxed{5}$**.\n\nI hope this helps!", "**Answer: $\\boxed{85}$**."),
    ("\\boxed{5}\n\nSo 5 it is.", "\\boxed{85}"),
])
def test_explanation_target_keeps_what_closes_the_box_and_cuts_the_prose(explanation, target):
    """Qwen2.5 ends MATH answers in display math: the target keeps the closers of the box's math and emphasis (text
    the policy writes) and drops the prose after them."""
    assert expo.explanation_target(explanation, "85") == target


@pytest.mark.parametrize("text", [
    "The correct final answer is 85.",  # the hint's own sentence
    "We are given that the answer is 85.", "Since the answer is 85, we work back.",
    "Building on the explanation that you have already provided, 85.", "I will explain step by step how to reach it.",
    "Let me do it as if you were solving it: 85.",
])
def test_leak_filter_catches_the_hints_own_wording(text):
    assert expo.mentions_hint(text), f"leak filter missed: {text!r}"


@pytest.mark.parametrize("text", ["We are given a triangle with sides 3 and 4.", "So the final answer is 85.",
                                  "Step by step: 40 + 45 = 85.", "Working backwards from the last digit, 5."])
def test_leak_filter_keeps_ordinary_reasoning(text):
    assert not expo.mentions_hint(text), f"leak filter dropped an ordinary sentence: {text!r}"


def tiny_gpt2(tokenizer, seed=0):
    torch.manual_seed(seed)
    config = GPT2Config(vocab_size=len(tokenizer), n_embd=32, n_layer=2, n_head=4, n_positions=512,
                        bos_token_id=tokenizer.bos_token_id, eos_token_id=tokenizer.eos_token_id)
    return GPT2LMHeadModel(config).eval()


@pytest.mark.exercise11
def test_nll_gradient_on_teacher_samples_approaches_the_forward_kl_gradient():
    """The identity behind ExPO's place among the self-distillation methods: for explanations e~ sampled from the
    hint-conditioned policy (the teacher, detached) at T = 1, the mean gradient of the NLL -log pi_theta(e~ | q) equals,
    in expectation, the gradient of the forward KL(teacher || student) summed along the same sampled prefixes. On a
    tiny model with a 12-token vocabulary (weights drawn wide enough that the hint moves its distribution: KL ~1.6
    nats per token) and 4-token explanations, the two mean gradients have cosine 0.9997 over 4,096 samples and 0.94 over
    64 (the KL is the lower-variance estimate of the same direction); the reverse KL, another objective, 0.81."""
    torch.manual_seed(0)
    config = LlamaConfig(vocab_size=12, hidden_size=16, intermediate_size=32, num_hidden_layers=1,
                         num_attention_heads=2, num_key_value_heads=1, max_position_embeddings=32, initializer_range=0.5)
    student = LlamaForCausalLM(config).eval()
    question, hint = torch.tensor([[3, 5, 7]]), torch.tensor([[3, 5, 7, 1, 9]])  # the teacher's prompt has the answer
    n, length = 4096, 4
    with torch.no_grad():  # e~ ~ teacher, token by token
        sampled = torch.zeros(n, 0, dtype=torch.long)
        for _ in range(length):
            logits = student(torch.cat([hint.expand(n, -1), sampled], 1)).logits[:, -1]
            sampled = torch.cat([sampled, torch.multinomial(logits.softmax(-1), 1)], 1)
        teacher = rollout.completion_logits(student, hint.expand(n, -1), torch.ones(n, 5, dtype=torch.long), sampled)

    def mean_grad(objective, rows):
        student.zero_grad()
        z = rollout.completion_logits(student, question.expand(len(rows), -1), torch.ones(len(rows), 3,
                                      dtype=torch.long), sampled[rows])  # [rows, 4, 12]
        objective(z, teacher[rows]).sum().div(len(rows)).backward()
        return torch.cat([p.grad.flatten() for p in student.parameters()])

    nll = lambda z, t, ids: -z.log_softmax(-1).gather(-1, ids[..., None])  # noqa: E731
    cos = lambda a, b: float(torch.nn.functional.cosine_similarity(a, b, dim=0))  # noqa: E731
    everything = torch.arange(n)
    fkl = mean_grad(lambda z, t: distill.vocab_kl(t, z), everything)
    many = cos(mean_grad(lambda z, t: nll(z, t, sampled), everything), fkl)
    assert many > 0.995, f"the NLL of teacher samples does not follow the forward-KL gradient (cosine {many:.3f})"
    assert cos(mean_grad(lambda z, t: nll(z, t, sampled[:64]), everything[:64]), fkl) < many - 0.02, "no noise?"
    assert cos(mean_grad(lambda z, t: distill.vocab_kl(z, t), everything), fkl) < 0.9, "forward and reverse KL agree"


@pytest.mark.exercise1
def test_completion_mask_by_position_with_pad_equal_eos():
    ids = torch.tensor([[5, 7, 2, 2], [5, 2, 9, 2], [5, 7, 8, 9], [2, 2, 2, 2]])
    mask, truncated = rollout.completion_mask(ids, stop=[2])
    assert mask.tolist() == [[1, 1, 1, 0], [1, 1, 0, 0], [1, 1, 1, 1], [1, 0, 0, 0]]
    assert truncated.tolist() == [False, False, True, False]


def test_encode_prompts_uses_chat_template_without_double_bos(tokenizer):
    ids = rollout.encode_prompts(tokenizer, ["What is 2 + 2?"])[0]
    text = tokenizer.decode(ids)
    assert text.startswith("<|im_start|>system") and text.endswith("<|im_start|>assistant\n")
    assert "What is 2 + 2?" in text and ids[1] != tokenizer.bos_token_id


@pytest.mark.exercise2
@pytest.mark.parametrize("make", [tiny_llama, tiny_gpt2])
def test_left_padded_logprobs_equal_rows_scored_alone(tokenizer, make):
    model = make(tokenizer)
    prompts = [[1, 400, 401, 402, 403, 404], [1, 500], [1, 600, 601]]
    completions = torch.tensor([[10, 11, 12, 2], [20, 21, 2, 2], [30, 31, 32, 33]])
    p_ids, p_mask = rollout.left_pad(prompts, tokenizer.pad_token_id)
    batch = rollout.token_logprobs(model, p_ids, p_mask, completions, temperature=0.7)
    for i, p in enumerate(prompts):
        alone = rollout.token_logprobs(model, torch.tensor([p]), torch.ones(1, len(p), dtype=torch.long),
                                       completions[i : i + 1], temperature=0.7)
        assert torch.allclose(batch[i], alone[0], atol=1e-5)
    assert batch.dtype == torch.float32


@pytest.mark.exercise2
def test_chunk_logprobs_divides_by_the_temperature_in_fp32():
    """Under bf16 autocast the logits arrive in bf16 (8 significant bits): they are cast to fp32 *before* the division
    by the temperature and the log-softmax, so no bf16 rounding (~0.05 at these magnitudes) reaches a log-prob."""
    torch.manual_seed(0)
    logits = (torch.randn(2, 3, 50) * 8).to(torch.bfloat16)  # [rows, T, V]
    ids = torch.randint(0, 50, (2, 3))
    got = rollout.chunk_logprobs(logits, ids, 0.7)
    exact = torch.log_softmax(logits.float() / 0.7, dim=-1).gather(-1, ids[..., None]).squeeze(-1)
    assert got.dtype == torch.float32 and torch.allclose(got, exact, atol=1e-5)


@pytest.mark.exercise2
def test_select_drops_only_the_padding_other_rows_needed(tokenizer):
    """A sub-batch keeps its rows' tokens and masks, loses the columns only other rows were padded for (on both
    sides), and scores the same."""
    batch = rollout.encode_targets(tokenizer, ["A much longer question than the other one?", "Hi"],
                                   ["one two three four five six", "ok"], tokenizer.eos_token_id)
    sub = batch.select([1])
    assert bool(sub.prompt_mask[:, 0].all()) and bool(sub.completion_mask[:, -1].all()) and sub.texts == ["ok"]
    assert sub.prompt_ids.shape[1] < batch.prompt_ids.shape[1]
    assert sub.completion_ids.shape[1] < batch.completion_ids.shape[1]
    model = tiny_llama(tokenizer)
    whole = rollout.token_logprobs(model, batch.prompt_ids, batch.prompt_mask, batch.completion_ids, 1.0)
    part = rollout.token_logprobs(model, sub.prompt_ids, sub.prompt_mask, sub.completion_ids, 1.0)
    assert torch.allclose(part[0], whole[1, : sub.completion_ids.shape[1]], atol=1e-5)


@pytest.mark.exercise2
def test_scored_logprobs_are_log_softmax_of_tempered_logits(tokenizer):
    model = tiny_llama(tokenizer)
    prompt = rollout.encode_prompts(tokenizer, ["Hi"])
    out = rollout.sample(model, tokenizer, prompt, group_size=2, max_new_tokens=6, temperature=0.8, seed=1)
    scored, entropy = rollout.token_logprobs(model, out.prompt_ids, out.prompt_mask, out.completion_ids, 0.8,
                                             with_entropy=True)
    full = torch.cat([out.prompt_ids, out.completion_ids], dim=1)
    logits = model(full).logits[:, out.prompt_ids.shape[1] - 1 : -1].float() / 0.8
    expected = torch.log_softmax(logits, -1).gather(-1, out.completion_ids[..., None]).squeeze(-1)
    assert torch.allclose(scored, expected, atol=1e-5)
    probs = torch.softmax(logits, -1)
    assert torch.allclose(entropy, -(probs * probs.log()).sum(-1), atol=1e-4)


@pytest.mark.exercise1
def test_sampling_is_seeded_grouped_and_greedy_at_zero_temperature(tokenizer):
    model = tiny_llama(tokenizer)
    prompts = rollout.encode_prompts(tokenizer, ["What is 1 + 1?", "Name a color."])
    a = rollout.sample(model, tokenizer, prompts, group_size=3, max_new_tokens=8, temperature=1.0, seed=7)
    b = rollout.sample(model, tokenizer, prompts, group_size=3, max_new_tokens=8, temperature=1.0, seed=7)
    c = rollout.sample(model, tokenizer, prompts, group_size=3, max_new_tokens=8, temperature=1.0, seed=8)
    assert torch.equal(a.completion_ids, b.completion_ids) and not torch.equal(a.completion_ids, c.completion_ids)
    assert a.prompt_index.tolist() == [0, 0, 0, 1, 1, 1]
    for row in range(6):
        prompt = prompts[a.prompt_index[row]]
        assert a.prompt_ids[row, -len(prompt):].tolist() == prompt
    assert a.completion_mask.shape == a.completion_ids.shape and len(a.texts) == 6
    # temperature near 0 is greedy, and greedy equals transformers' own generate (left padding included)
    cold = rollout.sample(model, tokenizer, prompts, group_size=2, max_new_tokens=8, temperature=1e-6, seed=3)
    ids, mask = rollout.left_pad(prompts, tokenizer.pad_token_id)
    reference = model.generate(ids, attention_mask=mask, max_new_tokens=8, do_sample=False,
                               pad_token_id=tokenizer.pad_token_id)[:, ids.shape[1]:]
    assert torch.equal(cold.completion_ids, reference.repeat_interleave(2, 0))


@pytest.mark.exercise1
@pytest.mark.parametrize("cuda_graph", [False, True])
def test_per_prompt_sample_counts_in_one_pass(tokenizer, cuda_graph):
    """Counts [3, 1, 2] give rows of prompts 0,0,0,1,2,2, each continuing its own prompt's cache: greedy rows equal
    that prompt decoded alone. An int count is the same as a list of it, seed for seed."""
    model = tiny_llama(tokenizer)
    prompts = rollout.encode_prompts(tokenizer, ["What is 1 + 1?", "The answer is 4. Explain why 2 + 2 = 4.", "Hi"])
    mixed = rollout.sample(model, tokenizer, prompts, [3, 1, 2], 8, temperature=1e-6, cuda_graph=cuda_graph)
    assert mixed.prompt_index.tolist() == [0, 0, 0, 1, 2, 2] and len(mixed.texts) == 6
    for row, i in enumerate(mixed.prompt_index.tolist()):
        alone = rollout.sample(model, tokenizer, [prompts[i]], 1, 8, temperature=1e-6, cuda_graph=cuda_graph)
        width = alone.completion_ids.shape[1]
        assert mixed.completion_ids[row, :width].tolist() == alone.completion_ids[0].tolist()
        assert mixed.completion_mask[row, :width].tolist() == alone.completion_mask[0].tolist()
        assert mixed.prompt_ids[row, -len(prompts[i]):].tolist() == prompts[i]
    as_int = rollout.sample(model, tokenizer, prompts, 2, 8, seed=4, cuda_graph=cuda_graph)
    as_list = rollout.sample(model, tokenizer, prompts, [2, 2, 2], 8, seed=4, cuda_graph=cuda_graph)
    assert torch.equal(as_int.completion_ids, as_list.completion_ids)
    for counts in ([2, 0, 1], [2, 2]):  # a zero, a list of the wrong length
        with pytest.raises(ValueError, match="sample count"):
            rollout.sample(model, tokenizer, prompts, counts, 8)


@pytest.mark.exercise10
@pytest.mark.parametrize("method", train.METHODS)
def test_two_steps_of_each_method_write_log_and_checkpoint(tiny_dir, tmp_path, method):
    train.main(_args(tiny_dir, tmp_path, "--method", method, "--steps", "2"))
    steps = _steps(tmp_path)
    assert [s["step"] for s in steps] == [0, 1]
    loss_key = "loss_dpo" if "dpo" in method else "loss_pg"
    assert all(math.isfinite(s[loss_key]) and "reward" in s and "t_sample" in s for s in steps)
    if method in ("expo", "grpo_sft_gt"):
        assert all(s["loss_sft"] > 0 and s["targets"] == 2 for s in steps)
    evals = [json.loads(line) for line in open(tmp_path / "metrics.jsonl") if '"eval"' in line]
    assert [e["eval"] for e in evals] == ["before", "after"] and "pass@2" in evals[0]["all"]
    state = json.loads((tmp_path / "checkpoint" / "trainer_state.json").read_text())
    assert state["step"] == 2 and state["config"]["method"] == method
    assert AutoModelForCausalLM.from_pretrained(tmp_path / "checkpoint") is not None
    assert (tmp_path / "samples.md").read_text().count("## step") >= 1


@pytest.mark.exercise8
@pytest.mark.parametrize("explain_on", ["all", "failed"])
def test_expo_samples_rollouts_and_self_explanations_in_one_pass(tiny_dir, tmp_path, monkeypatch, explain_on):
    """The B explain prompts ride in the rollouts' sampling call, one row each, also when only all-wrong groups are
    explained (--explain_on failed then drops the others' explanations, a filter like the rest)."""
    t = train.Trainer(train.parse_args(_args(tiny_dir, tmp_path, "--method", "expo", "--explain_on", explain_on)))
    batch = [t.train_set[i] for i in range(2)]
    calls, real = [], rollout.sample
    monkeypatch.setattr(rollout, "sample", lambda model, tok, prompts, counts, *a, **kw: calls.append(
        (prompts, counts)) or real(model, tok, prompts, counts, *a, **kw))
    monkeypatch.setattr(reward, "score", lambda text, answer, question=None: 0.0)  # every group all-wrong: both settings explain all
    stats = t.grpo_step(batch)
    explain = rollout.encode_prompts(t.tokenizer, [expo.explain_prompt(e.question, e.answer) for e in batch])
    assert len(calls) == 1 and calls[0][1] == [2, 2, 1, 1] and calls[0][0][2:] == explain
    assert stats["targets"] == 2 and stats["explain_len"] > 0 and stats["loss_sft"] > 0


@pytest.mark.exercise1
def test_rkl_samples_no_self_explanation(tiny_dir, tmp_path, monkeypatch):
    """--explain_loss rkl distills along the rollouts alone: its sampling call holds no explain prompt."""
    t = train.Trainer(train.parse_args(_args(tiny_dir, tmp_path, "--explain_loss", "rkl")))
    calls, real = [], rollout.sample
    monkeypatch.setattr(rollout, "sample", lambda model, tok, prompts, counts, *a, **kw: calls.append(counts) or
                        real(model, tok, prompts, counts, *a, **kw))
    assert t.rollouts(t.train_set[:2])[2] is None and calls == [[2, 2]], "rkl sampled self-explanations"


@pytest.mark.exercise7
@pytest.mark.parametrize("flags, kept", [([], [0, 1, 2]), (["--drop_truncated"], [0, 1]), (["--drop_wrong"], [0, 2]),
                                          (["--drop_truncated", "--drop_wrong"], [0])])
def test_self_explanation_filters(tiny_dir, tmp_path, flags, kept):
    """By default every explanation is a target, the gold answer in its last box; --drop_truncated drops the cut-off
    ones and --drop_wrong those whose own answer was not the gold one (judged before the swap); the log counts each."""
    t = train.Trainer(train.parse_args(_args(tiny_dir, tmp_path, *flags)))
    questions = [t.train_set[i] for i in range(3)]
    texts = [f"Adding gives \\boxed{{{questions[0].answer}}}.", "Adding gives \\boxed{-1}.",
             f"Adding gives \\boxed{{{questions[2].answer}}}, and then"]
    out = rollout.encode_targets(t.tokenizer, ["q"] * 3, texts, t.turn_end)
    out.truncated = torch.tensor([False, False, True])
    _, targets, stats, _ = t.likelihood_targets(questions, None, torch.zeros(3 * t.cfg.num_generations), out)
    assert [i for i, x in enumerate(targets) if x is not None] == kept
    assert all(reward.extract_answer(targets[i]) == questions[i].answer for i in kept)
    assert stats["explain_correct"] == pytest.approx(2 / 3)
    assert (stats["explain_dropped_truncated"], stats["explain_dropped_wrong"]) == (
        int("--drop_truncated" in flags), int("--drop_wrong" in flags))


def seq_logp(model, batch: rollout.Rollouts, temperature: float = 1.0) -> torch.Tensor:
    """[N] log pi(completion | prompt) of each row."""
    with torch.no_grad():
        logp = rollout.token_logprobs(model, batch.prompt_ids, batch.prompt_mask, batch.completion_ids, temperature)
    return expo.sequence_logp(logp, batch.completion_mask)


def test_micro_batches_take_rows_longest_first():
    assert rollout.micro_batches(4, 2, [3, 9, 5, 7]) == [[1, 3], [2, 0]]  # the docstring's example
    assert rollout.micro_batches(5, 2) == [[0, 1, 2], [3, 4]] and rollout.micro_batches(0, 4, []) == []
    assert sorted(sum(rollout.micro_batches(7, 3, [2, 2, 9, 1, 9, 4, 2]), [])) == list(range(7))  # each row once


@pytest.mark.exercise8
@pytest.mark.parametrize("explain_loss", ["nll", "rkl"])
def test_micro_batches_at_their_own_width_give_the_one_batch_gradient(tiny_dir, tmp_path, explain_loss):
    """Rows of unlike length, every row scored (a KL term): one micro-batch at the batch's width, or one row per
    micro-batch at its own width (longest first), give the same loss and gradient, to fp32 summation order."""
    texts = [["Five.", "It is five, because two and three make five together."],
             ["Seven, I think, or eight.", "7"]]
    grads, losses = {}, {}
    for accum in ("1", "4"):
        t = train.Trainer(train.parse_args(_args(tiny_dir, tmp_path / accum, "--explain_loss", explain_loss,
                                                 "--kl_coef", "0.05", "--grad_accum", accum)))
        fixed_rollouts(t, texts, [[1, 0], [0, 1]])
        t.optimizer_step = lambda: 0.0  # keep the gradient, move nothing
        stats = t.grpo_step(t.train_set[:2])
        losses[accum] = (stats["loss_pg"], stats.get("loss_sft", 0.0) + stats.get("loss_distill", 0.0))
        grads[accum] = {n: p.grad.clone() for n, p in t.model.named_parameters()}
    assert losses["4"] == pytest.approx(losses["1"], rel=1e-4, abs=1e-6) and losses["1"][1] > 0  # KLs of ~1e-4 nats
    for name, g in grads["1"].items():
        assert torch.allclose(grads["4"][name], g, rtol=1e-4, atol=1e-5 * float(g.abs().max())), name


@pytest.mark.exercise8
def test_likelihood_pass_raises_the_targets_likelihood(tiny_dir, tmp_path):
    """One likelihood pass logs the targets' token-mean NLL at T = 1, its gradient is beta times the unweighted one,
    and one optimizer step lowers that NLL."""
    t = train.Trainer(train.parse_args(_args(tiny_dir, tmp_path, "--learning_rate", "1e-3", "--temperature", "0.5")))
    targets = rollout.encode_targets(t.tokenizer, [expo.solve_prompt(e.question) for e in t.train_set[:3]],
                                     ["We add them: 5.", "Short.", "A longer target that has more tokens in it."],
                                     t.turn_end)
    nll = lambda: float(expo.sft_loss(rollout.token_logprobs(t.model, targets.prompt_ids, targets.prompt_mask,  # noqa
                                                             targets.completion_ids, 1.0), targets.completion_mask))
    den = expo.Denominators(pg=1.0, target_tokens=float(targets.completion_mask.sum()))
    def likelihood_pass(beta):
        return t.backward_pass(None, None, {}, [], targets, None, den, beta)["loss_sft"]
    before = nll()
    assert likelihood_pass(1.0) == pytest.approx(before, rel=1e-5), "loss_sft is not the token-mean NLL at T=1"
    full = {n: p.grad.clone() for n, p in t.model.named_parameters()}
    t.optimizer.zero_grad(set_to_none=True)
    likelihood_pass(0.04)
    # fp32 sums over micro-batches round each way: an entry where the rows' gradients cancel is compared to the scale
    # of its tensor, not to itself
    assert all(torch.allclose(p.grad, 0.04 * full[n], rtol=1e-4, atol=1e-5 * float(0.04 * full[n].abs().max()))
               for n, p in t.model.named_parameters()), "the likelihood term's gradient is not beta times the NLL's"
    t.optimizer_step()
    assert nll() < before, "a likelihood pass did not raise the targets' likelihood (sign of the beta term?)"


@pytest.mark.exercise8
def test_targets_are_scored_under_the_answer_free_prompt(tiny_dir, tmp_path, monkeypatch):
    """The single line that makes this ExPO: every self-explanation target is a completion of solve_prompt(q), exactly
    as the chat template renders it, with no word of the hint."""
    built, real = [], rollout.encode_targets
    monkeypatch.setattr(rollout, "encode_targets", lambda tok, users, *a: built.append(users) or real(tok, users, *a))
    t = train.Trainer(train.parse_args(_args(tiny_dir, tmp_path)))
    fixed_rollouts(t, TWO_TEXTS, [[0, 0], [1, 0]])
    t.grpo_step(t.train_set[:2])
    assert built[-1] == [expo.solve_prompt(e.question) for e in t.train_set[:2]], \
        "targets are not scored under the answer-free prompt: the hint is in the context"


@pytest.mark.exercise8
def test_analyze_scores_self_explanations_without_hint(tiny_dir, monkeypatch):
    """analyze.py scores the self-explanations under the answer-free prompt, and again with the hint only for the
    hint-reliance measure (which is 0 when both are the same context)."""
    built, real = [], rollout.encode_targets
    monkeypatch.setattr(rollout, "encode_targets", lambda tok, users, *a: built.append(users) or real(tok, users, *a))
    model, tok = rollout.load_policy(str(tiny_dir))
    examples = data.load("arith", "test", limit=2)
    analyze.measure(model, tok, examples, k=2, max_new_tokens=4, drop_leaks=False)
    solve = [expo.solve_prompt(e.question) for e in examples]
    assert built[0] == solve, "analyze.py scores self-explanations under a prompt with the hint"
    assert built[1] == [expo.explain_prompt(e.question, e.answer) for e in examples] and built[2] == solve


@pytest.mark.exercise5
def test_grpo_step_raises_rewarded_rollouts_lowers_others(tiny_dir, tmp_path):
    t = train.Trainer(train.parse_args(_args(tiny_dir, tmp_path, "--method", "grpo", "--learning_rate", "1e-3")))
    fixed_rollouts(t, TWO_TEXTS, [[1, 0], [0, 1]])
    roll = t.rollouts(t.train_set[:2])[0]
    before = seq_logp(t.model, roll, t.cfg.temperature)
    t.grpo_step(t.train_set[:2])
    change = seq_logp(t.model, roll, t.cfg.temperature) - before
    assert change[0] > 0 and change[3] > 0, f"rewarded rollouts became less likely: {change.tolist()}"
    assert change[1] < 0 and change[2] < 0, f"unrewarded rollouts became more likely: {change.tolist()}"


def _initial(tiny_dir):
    return AutoModelForCausalLM.from_pretrained(tiny_dir).eval()


@pytest.mark.exercise9
def test_dpo_step_raises_the_margin_against_reference(tiny_dir, tmp_path, monkeypatch):
    """dpo_gt: one step makes (chosen - ref) - (rejected - ref) positive (the expert solution over the wrong rollout)."""
    built, real = [], dpo.pair_batch
    monkeypatch.setattr(dpo, "pair_batch", lambda *a: built.append(real(*a)) or built[-1])
    t = train.Trainer(train.parse_args(_args(tiny_dir, tmp_path, "--method", "dpo_gt", "--learning_rate", "1e-3")))
    fixed_rollouts(t, TWO_TEXTS, [[0, 0], [0, 0]])
    dpo.step(t, t.train_set[:2])
    both, ref = built[0], _initial(tiny_dir)
    margin = (seq_logp(t.model, both) - seq_logp(ref, both)).view(2, -1)  # [chosen | rejected, pairs]
    assert (margin[0] - margin[1] > 0).all(), f"DPO lowered the chosen-minus-rejected margin: {margin.tolist()}"


@pytest.mark.exercise10
@pytest.mark.parametrize("lora", [False, True])
def test_references_are_the_frozen_initial_model(tiny_dir, tmp_path, monkeypatch, lora):
    """The KL term's and DPO's reference log-probs are the initial model's, after the policy has moved, after
    --resume, and with LoRA (the adapters off)."""
    extra = ["--learning_rate", "1e-2", *(["--lora_rank", "4"] if lora else [])]
    for method in ("expo", "dpo_gt"):  # expo: its targets move the policy at every step, so a wrong reference shows
        out = tmp_path / method
        train.main(_args(tiny_dir, out, "--method", method, "--kl_coef", "0.1", "--steps", "1", *extra))
        seen = []
        real_inputs, real_dpo = train.Trainer.rollout_inputs, expo.dpo_loss
        monkeypatch.setattr(train.Trainer, "rollout_inputs", lambda self, roll, adv, frozen, rows: seen.append(
            (roll, rows, real_inputs(self, roll, adv, frozen, rows))) or seen[-1][2])
        built, real_batch = [], dpo.pair_batch
        monkeypatch.setattr(dpo, "pair_batch", lambda *a: built.append(real_batch(*a)) or built[-1])
        monkeypatch.setattr(train.expo, "dpo_loss", lambda *a: seen.append(a) or real_dpo(*a))
        train.main(_args(tiny_dir, out, "--method", method, "--kl_coef", "0.1", "--steps", "2", "--resume", *extra))
        monkeypatch.undo()
        initial = _initial(tiny_dir)
        if method == "expo":
            roll, rows, (inputs, _) = seen[0]
            with torch.no_grad():
                want = rollout.logprobs(initial, roll.select(rows), 0.7)
            mask = inputs["mask"].bool()
            assert torch.allclose(inputs["ref_logp"][mask], want[mask], atol=1e-6), \
                "the KL reference is not the initial model"
        else:
            both, (_, _, ref_chosen, ref_rejected, *_) = built[0], seen[0]
            want = seq_logp(initial, both)
            k = len(ref_chosen)
            assert torch.allclose(torch.cat([ref_chosen, ref_rejected]), torch.cat([want[:k], want[len(want) // 2:][:k]]),
                                  atol=1e-4), "DPO's reference is not the initial model"


@pytest.mark.exercise6
def test_kl_coef_scales_the_kl_term_exactly(tiny_dir, tmp_path):
    """All-equal groups (zero advantages): the policy-gradient loss is kl_coef times the logged mean k3, for two
    coefficients, against a reference that differs from the policy."""
    losses = {}
    for coef in (0.1, 0.3):
        t = train.Trainer(train.parse_args(_args(tiny_dir, tmp_path / str(coef), "--method", "grpo", "--kl_coef",
                                                 str(coef), "--loss_norm", "token")))
        with torch.no_grad():
            for p in t.ref.parameters():
                p.add_(0.05 * torch.randn(p.shape, generator=torch.Generator().manual_seed(p.numel())))
        fixed_rollouts(t, TWO_TEXTS, [[0, 0], [1, 1]])
        stats = t.grpo_step(t.train_set[:2])
        assert stats["kl"] > 0 and stats["loss_pg"] == pytest.approx(coef * stats["kl"], rel=1e-5), \
            f"kl_coef does not scale the KL term: loss {stats['loss_pg']} vs {coef} * {stats['kl']}"
        losses[coef] = stats["loss_pg"]
    assert losses[0.3] == pytest.approx(3 * losses[0.1], rel=1e-5)


@pytest.mark.exercise5
def test_old_logprobs_are_frozen_at_the_sampling_temperature(tiny_dir, tmp_path, monkeypatch):
    """--ppo_epochs 2: old log-probs are the pre-update policy's at the sampling temperature; the first epoch's ratio
    is exactly 1, the second's is not."""
    calls, real = [], expo.grpo_loss
    monkeypatch.setattr(train.expo, "grpo_loss", lambda logp, **k: calls.append((logp.detach(), k)) or real(logp, **k))
    t = train.Trainer(train.parse_args(_args(tiny_dir, tmp_path, "--method", "grpo", "--ppo_epochs", "2",
                                             "--temperature", "0.5", "--learning_rate", "1e-2", "--grad_accum", "1")))
    fixed_rollouts(t, TWO_TEXTS, [[1, 0], [0, 1]])
    roll = t.rollouts(t.train_set[:2])[0]
    with torch.no_grad():
        at_t = rollout.token_logprobs(t.model, roll.prompt_ids, roll.prompt_mask, roll.completion_ids, 0.5)
    t.grpo_step(t.train_set[:2])
    (first, k1), (second, k2) = calls
    rows = rollout.micro_batches(len(roll.texts), 1, roll.completion_mask.sum(1).tolist())[0]  # the one micro-batch
    mask = k1["mask"].bool()  # its rows, longest first, at their own width
    at_t = at_t[rows, : mask.shape[1]]
    assert torch.allclose(k1["old_logp"][mask], at_t[mask], atol=1e-5), "old log-probs not at the sampling temperature"
    assert torch.allclose(first[mask], k1["old_logp"][mask], atol=1e-6), "the first epoch's ratio is not 1"
    assert torch.equal(k2["old_logp"], k1["old_logp"]), "old log-probs were not frozen for the second epoch"
    assert not torch.allclose(second[mask], k2["old_logp"][mask], atol=1e-4), "the second epoch's ratio is still 1"


@pytest.mark.exercise8
def test_explain_on_failed_explains_only_all_wrong_groups(tiny_dir, tmp_path, monkeypatch):
    t = train.Trainer(train.parse_args(_args(tiny_dir, tmp_path, "--explain_on", "failed")))
    fixed_rollouts(t, TWO_TEXTS, [[1, 0], [0, 0]])  # question 0 mixed, question 1 all wrong
    kept, real = [], t.likelihood_targets  # each question's target text, None where it has none
    t.likelihood_targets = lambda *a: (out := real(*a), kept.append([x is not None for x in out[1]]))[0]
    stats = t.grpo_step(t.train_set[:2])
    assert kept == [[False, True]] and stats["targets"] == 1 and stats["explain_dropped_solved"] == 1, \
        f"--explain_on failed kept the targets of questions {kept}, not only the all-wrong group's (question 1)"


def _unpadded(ids: torch.Tensor, mask: torch.Tensor) -> list[list[int]]:
    return [row[m.bool()].tolist() for row, m in zip(ids, mask)]


@pytest.mark.exercise11
@pytest.mark.parametrize("loss", ["fkl", "rkl"])
def test_distillation_step_scores_the_teacher_after_the_hint(tiny_dir, tmp_path, monkeypatch, loss):
    """--explain_loss fkl trains on the self-explanations, rkl on the rollouts themselves (and samples no
    self-explanation); either way each target is scored by the student after solve_prompt(q) and by the teacher after
    explain_prompt(q, a*), and the step's gradient is exactly beta * the gradient of the token-mean full-vocabulary KL
    in the flag's direction at T = 1, the teacher's logits held constant. (All groups all-wrong: no policy gradient.)"""
    t = train.Trainer(train.parse_args(_args(tiny_dir, tmp_path, "--explain_loss", loss, "--temperature", "0.5")))
    fixed_rollouts(t, TWO_TEXTS, [[0, 0], [0, 0]])
    batch, asked, seen, grads = t.train_set[:2], [], {}, {}
    sample, view = t.rollouts, distill.teacher_view
    t.rollouts = lambda b: (lambda out: asked.append(out[2] is not None) or out)(sample(b))
    monkeypatch.setattr(distill, "teacher_view", lambda tr, b, targets: seen.setdefault("teacher", view(tr, b, targets)))
    t.optimizer_step = lambda: grads.update({n: p.grad.clone() for n, p in t.model.named_parameters()}) or 0.0
    stats = t.grpo_step(batch)
    teacher, targets = seen["teacher"], t.likelihood_targets(batch, *sample(batch))[0]
    assert asked == [loss == "fkl"], "rkl sampled self-explanations it does not use (or fkl none)"
    assert targets.texts == (TWO_TEXTS[0] + TWO_TEXTS[1] if loss == "rkl" else
                             [f"So \\boxed{{{e.answer}}}." for e in batch])
    questions = targets.prompt_index.tolist()
    assert _unpadded(targets.prompt_ids, targets.prompt_mask) == rollout.encode_prompts(
        t.tokenizer, [expo.solve_prompt(batch[i].question) for i in questions])
    assert _unpadded(teacher.prompt_ids, teacher.prompt_mask) == rollout.encode_prompts(
        t.tokenizer, [expo.explain_prompt(batch[i].question, batch[i].answer) for i in questions]), \
        "the teacher does not see the answer"
    assert torch.equal(teacher.completion_ids, targets.completion_ids)
    t.model.zero_grad()
    with torch.no_grad():
        teacher_logits = rollout.completion_logits(t.model, teacher.prompt_ids, teacher.prompt_mask,
                                                   teacher.completion_ids)
    student_logits = rollout.completion_logits(t.model, targets.prompt_ids, targets.prompt_mask, targets.completion_ids)
    pair = (student_logits, teacher_logits) if loss == "rkl" else (teacher_logits, student_logits)
    kl = distill.vocab_kl(*pair)
    kl_term = distill.kl_loss(kl, targets.completion_mask)
    (0.04 * kl_term).backward()
    assert stats["loss_distill"] == pytest.approx(kl_term.item(), rel=1e-3, abs=1e-7) \
        and stats["pg_rows"] == 0  # a KL of ~1e-4 nats here: fp32 cancellation
    assert all(torch.allclose(grads[n], p.grad, rtol=1e-4, atol=1e-8) for n, p in t.model.named_parameters()), \
        f"the {loss} step's gradient is not beta * the gradient of its KL with the teacher detached"


@pytest.mark.exercise11
@pytest.mark.parametrize("loss", ["fkl", "rkl"])
def test_fkl_and_rkl_each_take_the_kl_in_their_own_direction_in_the_step(tiny_dir, tmp_path, monkeypatch, loss):
    """With a teacher far from the student (the frozen initial policy; the student's weights moved), the step's
    logged term is the KL in its flag's direction -- fkl: KL(teacher || student), rkl: KL(student || teacher) -- and
    not the other one. (Next to the hinted current policy the two directions differ by less than fp32 noise, so the
    test above cannot tell them apart; here they differ by far more than the tolerance, which is asserted first.)"""
    t = train.Trainer(train.parse_args(_args(tiny_dir, tmp_path, "--explain_loss", loss, "--teacher", "initial")))
    fixed_rollouts(t, TWO_TEXTS, [[0, 0], [0, 0]])
    with torch.no_grad():  # as if trained far from the start: sharp next-token distributions (a random tiny model's
        t.model.get_output_embeddings().weight.mul_(40.0)  # are near uniform, where the two directions nearly agree)
    seen, batch = {}, t.train_set[:2]
    view = distill.teacher_view
    monkeypatch.setattr(distill, "teacher_view", lambda tr, b, targets: seen.setdefault("teacher", view(tr, b, targets)))
    t.likelihood_targets = lambda *a, real=t.likelihood_targets: seen.setdefault("targets", real(*a))
    t.optimizer_step = lambda: 0.0
    stats = t.grpo_step(batch)
    targets, teacher = seen["targets"][0], seen["teacher"]
    with torch.no_grad():
        student = rollout.completion_logits(t.model, targets.prompt_ids, targets.prompt_mask, targets.completion_ids)
        initial = rollout.completion_logits(t.ref, teacher.prompt_ids, teacher.prompt_mask, teacher.completion_ids)
        forward = distill.kl_loss(distill.vocab_kl(initial, student), targets.completion_mask).item()
        reverse = distill.kl_loss(distill.vocab_kl(student, initial), targets.completion_mask).item()
    assert abs(forward - reverse) > 0.05 * max(forward, reverse), (forward, reverse)  # the test can tell them apart
    want, other = (forward, reverse) if loss == "fkl" else (reverse, forward)
    assert stats["loss_distill"] == pytest.approx(want, rel=1e-4), \
        f"--explain_loss {loss} logged {stats['loss_distill']}, the other direction's KL is {other}"


@pytest.mark.exercise7
def test_rkl_with_explain_on_failed_distills_only_the_all_wrong_groups_rollouts(tiny_dir, tmp_path):
    t = train.Trainer(train.parse_args(_args(tiny_dir, tmp_path, "--explain_loss", "rkl", "--explain_on", "failed")))
    fixed_rollouts(t, TWO_TEXTS, [[1, 0], [0, 0]])  # question 0 mixed, question 1 all wrong
    roll, rewards, _ = t.rollouts(t.train_set[:2])
    targets = t.likelihood_targets(t.train_set[:2], roll, rewards, None)[0]
    assert targets.texts == TWO_TEXTS[1] and targets.prompt_index.tolist() == [1, 1]


def test_the_teacher_is_the_current_policy_or_the_frozen_initial_one(tiny_dir, tmp_path):
    current = train.Trainer(train.parse_args(_args(tiny_dir, tmp_path / "c", "--explain_loss", "fkl")))
    with distill.teacher_model(current) as model:
        assert model is current.model
    t = train.Trainer(train.parse_args(_args(tiny_dir, tmp_path / "i", "--explain_loss", "rkl",
                                             "--teacher", "initial")))
    with torch.no_grad():
        for p in t.model.parameters():
            p.add_(0.01)  # as if trained
    initial = _initial(tiny_dir)
    with distill.teacher_model(t) as model:
        assert model is not t.model and all(torch.equal(a, b) for a, b in zip(model.state_dict().values(),
                                                                              initial.state_dict().values()))


@pytest.mark.exercise8
@pytest.mark.parametrize("norm", expo.LOSS_NORMS)
def test_policy_gradient_normalisers_in_the_step(tiny_dir, tmp_path, norm):
    """At ratio 1 the GRPO loss is -sum_i A_i |o_i| over the step's denominator: rows for seq (which makes it the mean
    of A: 0), tokens for token, rows x the generation budget for constant (wider than any row here)."""
    t = train.Trainer(train.parse_args(_args(tiny_dir, tmp_path, "--method", "grpo", "--loss_norm", norm,
                                             "--max_new_tokens", "40")))
    fixed_rollouts(t, TWO_TEXTS, [[1, 0], [0, 1]])
    roll, rewards = t.rollouts(t.train_set[:2])[:2]
    adv, lengths = expo.group_advantages(rewards, 2), roll.completion_mask.sum(1).float()
    assert lengths.max() < 40
    want = {"seq": -adv.mean(), "token": -(adv * lengths).sum() / lengths.sum(),
            "constant": -(adv * lengths).sum() / (4 * 40)}[norm]
    assert t.grpo_step(t.train_set[:2])["loss_pg"] == pytest.approx(float(want), abs=1e-6), f"the {norm} denominator"


@pytest.mark.exercise10
def test_seeds_vary_training_and_never_evaluation(tiny_dir, tmp_path, monkeypatch):
    """Each step samples with its own seed; epochs are shuffled differently; the evaluation set and its draws depend
    on --eval_seed only, never on --seed."""
    assert len({run.step_seed(0, s) for s in range(100)}) == 100
    assert run.batch_indices(20, 20, 0, seed=0) != run.batch_indices(20, 20, 1, seed=0), "epochs in one order"
    assert run.batch_indices(20, 20, 0, seed=0) != run.batch_indices(20, 20, 0, seed=1)
    seeds, evals = [], []
    real_sample, real_eval = rollout.sample, evaluate.evaluate
    monkeypatch.setattr(rollout, "sample", lambda *a, seed, **k: seeds.append(seed) or real_sample(*a, seed=seed, **k))
    monkeypatch.setattr(evaluate, "evaluate", lambda m, tok, ex, *a, seed, **k: evals.append(([e.id for e in ex], seed))
                        or real_eval(m, tok, ex, *a, seed=seed, **k))
    for i, flags in enumerate([["--seed", "0"], ["--seed", "1"], ["--seed", "0", "--eval_seed", "1"]]):
        seeds.clear()
        train.main(_args(tiny_dir, tmp_path / str(i), "--method", "grpo", "--steps", "2", "--eval_limit", "3", *flags))
        if i == 0:
            assert len(set(seeds[1:-1])) == len(seeds[1:-1]) == 2, "two training steps sampled with one seed"
    assert evals[0] == evals[1] == evals[2] == evals[3], "the evaluation depends on the training seed"
    assert evals[4][0] != evals[0][0] and evals[4][1] != evals[0][1], "--eval_seed does not choose the evaluation"
    with pytest.raises(SystemExit, match="--seed 0 -> 1"):  # a resumed run is the same run: its seed cannot change
        train.main(_args(tiny_dir, tmp_path / "0", "--method", "grpo", "--steps", "3", "--eval_limit", "3", "--seed",
                         "1", "--resume"))


@pytest.mark.exercise2
def test_the_logged_entropy_is_the_mean_over_the_scored_completion_tokens(tiny_dir, tmp_path):
    """metrics.jsonl's `entropy`: the sampling distribution's entropy (at T) averaged over the completion tokens of the
    rollouts the policy gradient scored -- never the padding after an EOS, nor divided by rows it did not score."""
    t = train.Trainer(train.parse_args(_args(tiny_dir, tmp_path, "--method", "grpo", "--temperature", "0.5",
                                             "--grad_accum", "1")))  # one micro-batch: its rows share a width
    fixed_rollouts(t, TWO_TEXTS, [[1, 0], [0, 0]])  # question 0 mixed: its rows are scored; question 1 all wrong: not
    part = t.rollouts(t.train_set[:2])[0].select([0, 1])  # rows of unequal length: padding after the shorter's EOS
    with torch.no_grad():
        logits = rollout.completion_logits(t.model, part.prompt_ids, part.prompt_mask, part.completion_ids) / 0.5
        entropy = torch.logsumexp(logits, -1) - (logits.softmax(-1) * logits).sum(-1)  # [2, T]
    expected = float((entropy * part.completion_mask).sum() / part.completion_mask.sum())
    assert t.grpo_step(t.train_set[:2])["entropy"] == pytest.approx(expected, rel=1e-5)


@pytest.mark.exercise7
def test_every_score_of_a_completion_gets_its_question(tiny_dir, tmp_path, monkeypatch):
    """Wherever a completion is scored -- training rewards, self-explanations, samples.md, DPO's pairs, evaluation's
    pass@k, lab.analyze -- the checker is given the question, so a restated question scores 0 everywhere (dropped at
    one call site, "the answer is 81 \\times 56" earns reward again there)."""
    from lab import analyze
    seen, real_score, real_refused = [], reward.score, reward.refused
    monkeypatch.setattr(reward, "score", lambda text, gold, question=None: seen.append(question) or
                        real_score(text, gold, question))
    monkeypatch.setattr(reward, "refused", lambda text, gold, question=None: seen.append(question) or
                        real_refused(text, gold, question))
    for method in ("expo", "expo_dpo"):
        t = train.Trainer(train.parse_args(_args(tiny_dir, tmp_path / method, "--method", method)))
        t.update(t.train_set[:2])
        t.evaluate("before")
        questions = {e.question for e in t.train_set[:2] + t.eval_set}
    analyze.measure(t.model, t.tokenizer, t.train_set[:2], k=2, max_new_tokens=4)
    analyze.pass_at_k_curve(t.model, t.tokenizer, t.train_set[:2], 2, 4, 0.7, 0)
    questions |= {e.question for e in t.train_set[:2]}
    assert seen and all(q in questions for q in seen), f"scored without its question: {[q for q in seen if q is None]}"


def test_the_papers_settings_are_the_defaults():
    """Where each default comes from; a change here changes what `python train.py` reproduces."""
    cfg = train.parse_args([])
    assert cfg.beta == 0.04  # ExPO paper: the self-explanation term's weight
    assert cfg.clip_eps == 0.2  # PPO / DeepSeekMath GRPO clipping range
    assert cfg.temperature == cfg.eval_temperature == 0.7  # ExPO paper: sampling and pass@k at T = 0.7
    assert cfg.eval_k == 4  # ExPO paper: pass@4
    assert cfg.explain_on == "all" and not cfg.drop_wrong  # ExPO paper: every question, gold answer in the last box
    assert (cfg.loss_norm, cfg.adv_scale, cfg.beta_schedule) == ("seq", "std", "constant")  # DeepSeekMath GRPO
    assert cfg.kl_coef == 0.0 and cfg.ppo_epochs == 1  # on-policy, no reference model (ExPO's GRPO setting here)
    assert cfg.method == "expo" and cfg.dpo_beta == 0.1  # DPO paper's usual beta


@pytest.mark.parametrize("call, message", [
    pytest.param(lambda: expo.group_advantages(torch.zeros(6), 4), "do not split into groups", marks=pytest.mark.exercise4),
    pytest.param(lambda: expo.group_advantages(torch.zeros(4), 1), "at least 2", marks=pytest.mark.exercise4),
    pytest.param(lambda: expo.group_advantages(torch.zeros(4), 2, scale="max"), "scale must be",
                 marks=pytest.mark.exercise4),
    pytest.param(lambda: expo.grpo_loss(torch.zeros(1, 2), torch.zeros(1, 2), None, torch.ones(1), torch.ones(1, 2),
                                        kl_coef=0.1), "needs ref_logp", marks=pytest.mark.exercise5),
    pytest.param(lambda: expo.grpo_loss(torch.zeros(1, 2), torch.zeros(1, 2), None, torch.ones(1), torch.ones(1, 2),
                                        norm="row"), "norm must be", marks=pytest.mark.exercise5),
    (lambda: expo.beta_at(0, 10, 0.04, "cosine"), "beta schedule"),
    (lambda: rollout.token_logprobs(None, None, None, torch.zeros(1, 1, dtype=torch.long), temperature=0), "temperature"),
    pytest.param(lambda: evaluate.pass_at_k(3, 1, 4), "at least 4 samples", marks=pytest.mark.exercise10),
])
def test_every_promised_value_error_is_raised(call, message):
    with pytest.raises(ValueError, match=message):
        call()


def test_lora_starts_at_the_base_model_and_merges_to_alpha_over_r_BA(tokenizer):
    model, base = tiny_llama(tokenizer), tiny_llama(tokenizer)
    lora.apply(model, rank=4, alpha=8.0)
    ids = torch.tensor([[1, 400, 401, 402]])
    with torch.no_grad():
        assert torch.equal(model(ids).logits, base(ids).logits), "LoRA does not start at the base model (B != 0?)"
        for layer in lora.layers(model):
            layer.lora_B.normal_(generator=torch.Generator().manual_seed(layer.lora_B.numel()))
        merged = lora.merged_state_dict(model)
        name, layer = next((n, m) for n, m in model.named_modules() if isinstance(m, lora.LoRALinear))
        want = layer.base.weight + 8.0 / 4 * layer.lora_B @ layer.lora_A
        assert torch.allclose(merged[f"{name}.weight"], want, atol=1e-6), "the merged update is not alpha/r * B A"
        base.load_state_dict(merged)
        assert torch.allclose(base(ids).logits, model(ids).logits, atol=1e-5)


# Two logged steps of each method on a model whose weights are a fixed formula (not torch's initialisation, which may
# change between versions). Catches what no named test foresaw. When a change is *meant* to change these numbers,
# regenerate them with `EXPO_GOLDEN=print python -m pytest -q test_expo.py -k golden -s` and paste the printed dict.
GOLDEN = {  # per method, per step: reward, loss_pg, loss_sft, loss_dpo, grad_norm
    'expo': [[0.25, 0.0, 11.875798, None, 1.890414], [0.5, 0.000291, 11.606723, None, 0.248161]],
    'grpo': [[0.0, 0.0, 0.0, None, 0.0], [0.75, 0.0, 0.0, None, 1.261176]],
    'grpo_sft_gt': [[0.0, 0.0, 11.450475, None, 0.17956], [0.75, 0.00061, 11.261265, None, 0.948553]],
    'expo_dpo': [[0.0, None, None, 0.693147, 5.777899], [0.5, None, None, 0.478393, 2.761709]],
    'dpo_gt': [[0.0, None, None, 0.693147, 7.286591], [0.5, None, None, 0.444608, 3.934265]],
}


GOLDEN_KEYS = ("reward", "loss_pg", "loss_sft", "loss_dpo", "grad_norm")


@pytest.fixture(scope="session")
def golden_dir(tmp_path_factory, tokenizer):
    model = tiny_llama(tokenizer)
    with torch.no_grad():
        for i, (name, p) in enumerate(sorted(model.named_parameters())):
            if p.dim() == 1:
                p.fill_(1.0)  # the RMSNorm gains
            else:  # a quasi-random pattern, the same on every platform and version
                wave = torch.sin(torch.arange(p.numel(), dtype=torch.float64) * 0.6180339887 + i)
                p.copy_((wave * 2.0 / math.sqrt(p.shape[-1])).view(p.shape))
    path = tmp_path_factory.mktemp("golden") / "model"
    model.save_pretrained(path)
    tokenizer.save_pretrained(path)
    return path


@pytest.mark.exercise10
def test_golden_run_of_each_method(golden_dir, tmp_path, monkeypatch):
    """(A reward that depends on the text's length gives mixed groups; the checker has its own tests.)"""
    monkeypatch.setattr(train.reward, "score", lambda text, gold, question=None: float(len(text) % 3 == 0))
    got = {}
    for method in train.METHODS:
        train.main(_args(golden_dir, tmp_path / method, "--method", method, "--steps", "2", "--no-eval_before",
                         "--eval_limit", "1", "--eval_k", "1", "--learning_rate", "1e-3", "--kl_coef", "0.05"))
        got[method] = [[round(s[k], 6) if k in s else None for k in GOLDEN_KEYS] for s in _steps(tmp_path / method)]
    if os.environ.get("EXPO_GOLDEN") == "print":
        print("\nGOLDEN =", got)
    def same(a, b):
        return a is b is None or None not in (a, b) and math.isclose(a, b, rel_tol=1e-4, abs_tol=1e-6)
    for method, steps in got.items():
        want = GOLDEN.get(method, [])
        assert len(steps) == len(want) and all(same(a, b) for x, y in zip(steps, want) for a, b in zip(x, y)), (
            f"{method}'s logged {GOLDEN_KEYS} moved from the golden values: {steps} vs {GOLDEN.get(method)}. If the "
            "change is intended, regenerate: EXPO_GOLDEN=print python -m pytest -q test_expo.py -k golden -s")
