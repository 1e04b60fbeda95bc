"""ExPO on TRL (scale/trl_expo.py) computes our step: the same questions, rollouts and self-explanations, injected into
both trainers instead of sampled, give the same loss and the same gradient of every parameter, with TRL's conventions
matched by configuration (docs/trl.md lists them). Runs where trl is installed (requirements-dev.txt)."""
import importlib.util
import json

import pytest
import torch

import data
import dpo
import expo
import reward
import rollout
import train
from conftest import _args
from scale import dpo_pairs

needs_trl = pytest.mark.skipif(importlib.util.find_spec("trl") is None,
                               reason="pip install trl==1.16.0 (requirements-dev.txt; CI installs it)")

G = 4
BATCH = [data.Example("What is 12 + 34?", "46", id="q0"), data.Example("What is 25 + 13?", "38", id="q1")]
ROLLOUTS = {  # question 0's group has a success (its advantages are not zero), question 1's is all wrong
    "What is 12 + 34?": ["12 + 34 = 46. \\boxed{46}", "The answer is \\boxed{45}.", "I get \\boxed{47}",
                         "Adding: 12 + 34 = 48, so \\boxed{48}."],
    "What is 25 + 13?": ["\\boxed{37}", "25 + 13 = 39, so \\boxed{39}.", "It is 40.", "The sum is \\boxed{36}."],
}
EXPLANATIONS = {"What is 12 + 34?": "12 + 34 = 46, so \\boxed{46}.",
                "What is 25 + 13?": "25 + 13 = 38.\nSo the sum is \\boxed{38}."}


def completion_of(user_text: str, k: int) -> str:
    """The injected k-th completion of a user message: a self-explanation, or a rollout of its question."""
    question = next(q for q in ROLLOUTS if q in user_text)
    return EXPLANATIONS[question] if "The correct final answer is" in user_text else ROLLOUTS[question][k]


def our_step(tiny_dir, tmp_path, monkeypatch, method, beta, norm, adv_scale):
    """(loss, gradients by name) of train.Trainer.grpo_step on the injected completions (no optimizer step)."""
    cfg = train.parse_args(_args(tiny_dir, tmp_path / "ours", "--method", method, "--beta", str(beta),
                                 "--num_generations", str(G), "--loss_norm", norm, "--adv_scale", adv_scale))
    t = train.Trainer(cfg)

    users = [expo.solve_prompt(e.question) for e in BATCH] + [expo.explain_prompt(e.question, e.answer) for e in BATCH]
    user_of = {tuple(ids): text for ids, text in zip(rollout.encode_prompts(t.tokenizer, users), users)}

    def sample(model, tokenizer, prompts, counts, *_, **__):
        texts = [user_of[tuple(p)] for p in prompts]
        users = [text for text, n in zip(texts, counts) for _ in range(n)]
        roll = rollout.encode_targets(tokenizer, users, [completion_of(u, k % n) for i, (u, n) in
                                                         enumerate(zip(texts, counts)) for k in range(n)],
                                      t.turn_end)
        roll.prompt_index = torch.arange(len(prompts)).repeat_interleave(torch.tensor(counts))
        return roll
    monkeypatch.setattr(rollout, "sample", sample)
    losses, spy = [], expo.microbatch_loss
    monkeypatch.setattr(expo, "microbatch_loss", lambda *a, **k: losses.append(spy(*a, **k)[0]) or (losses[-1], {}))
    grads = {}
    t.optimizer_step = lambda: grads.update({n: p.grad.clone() for n, p in t.model.named_parameters()}) or 0.0
    t.grpo_step(BATCH)
    return float(sum(losses)), grads


def trl_step(tiny_dir, tmp_path, beta, loss_type, scale_rewards, grad_accum):
    """(loss, gradients by name) of ExPOTrainer on the same completions: one generation batch of both questions,
    split into `grad_accum` micro-batches as TRL's training loop splits it, one backward each."""
    from datasets import Dataset  # installed with trl
    from transformers import AutoModelForCausalLM, AutoTokenizer
    from trl.trainer.utils import split_tensor_dict

    from scale import trl_expo
    config = trl_expo.ExPOConfig(
        output_dir=str(tmp_path / "trl"), per_device_train_batch_size=len(BATCH) * G // grad_accum,
        gradient_accumulation_steps=grad_accum, num_generations=G, max_completion_length=6, temperature=0.7,
        loss_type=loss_type, scale_rewards=scale_rewards, beta=0.0, expo_beta=beta, report_to="none", use_cpu=True,
        learning_rate=1e-5, bf16=False)  # TRL trains under bf16 autocast by default; ours here in fp32
    rows = trl_expo.dataset_rows(BATCH)
    trainer = trl_expo.ExPOTrainer(model=AutoModelForCausalLM.from_pretrained(tiny_dir), args=config,
                                   reward_funcs=trl_expo.correctness, train_dataset=Dataset.from_list(rows),
                                   processing_class=AutoTokenizer.from_pretrained(tiny_dir))
    seen, temperatures = {}, set()

    def generate(prompt_ids, *_):
        out = []
        for ids in prompt_ids:
            text = trainer._tokenizer.decode(ids)
            k = seen[text] = seen.get(text, -1) + 1
            temperatures.add(("The correct final answer is" in text, trainer.generation_config.temperature))
            out.append(trainer._tokenizer(completion_of(text, k), add_special_tokens=False).input_ids +
                       [trainer.turn_end])
        return out, None
    trainer._generate_single_turn = generate  # the injected completions, in place of sampling
    trainer.model.train()
    trainer.current_gradient_accumulation_steps = grad_accum  # as TRL's training loop sets it
    batch = trainer._generate_and_score_completions([row for row in rows for _ in range(G)])
    loss = 0.0
    for part in split_tensor_dict(batch, grad_accum):
        part_loss = trainer.compute_loss(trainer.model, part)
        part_loss.backward()
        loss += part_loss.item()
    assert temperatures == {(False, 0.7)} | ({(True, 0.3)} if beta else set())  # rollouts, explanations
    return loss, {n: p.grad.clone() for n, p in trainer.model.named_parameters()}


@needs_trl
@pytest.mark.exercise8
@pytest.mark.parametrize("beta, norm, loss_type, adv_scale, scale_rewards, grad_accum", [
    (0.0, "seq", "grpo", "std", "group", 1),  # plain GRPO: DeepSeekMath's row means, TRL's "grpo"
    (0.04, "seq", "grpo", "std", "group", 1),  # ExP-GRPO, the same conventions
    (0.04, "token", "dapo", "none", "none", 2),  # DAPO's token mean, Dr. GRPO's advantage, two micro-batches
])
def test_trl_expo_trainer_gives_our_steps_loss_and_gradients(tiny_dir, tmp_path, monkeypatch, beta, norm, loss_type,
                                                             adv_scale, scale_rewards, grad_accum):
    """beta = 0: TRL's own GRPO loss against our --method grpo; beta = 0.04: ExPOTrainer against --method expo. A wrong
    sign or a wrong denominator of the added term (its tokens counted per micro-batch) breaks the 1e-5 agreement; the
    self-explanations are asked of TRL's generation at explain_temperature (0.3), the rollouts at temperature (0.7)."""
    ours_loss, ours = our_step(tiny_dir, tmp_path, monkeypatch, "expo" if beta else "grpo", beta, norm, adv_scale)
    trl_loss, theirs = trl_step(tiny_dir, tmp_path, beta, loss_type, scale_rewards, grad_accum)
    assert trl_loss == pytest.approx(ours_loss, abs=1e-5)
    assert ours.keys() == theirs.keys()
    assert max(float((ours[n] - theirs[n]).abs().max()) for n in ours) < 1e-5
    assert sum(float(g.abs().sum()) for g in ours.values()) > 1e-3  # a gradient that says something


@pytest.mark.exercise9
def test_the_trl_preference_pairs_are_the_pairs_our_expo_dpo_trains_on(tiny_dir, tmp_path, monkeypatch):
    """scale.dpo_pairs writes, for step 0, the (question, self-explanation, own wrong answer) pairs that our ExP-DPO
    step trains on at step 0 (spied where dpo.step encodes them), in TRL's conversational preference format; chosen is
    the self-explanation target (on the gold), rejected an own wrong answer, never the other way round."""
    flags = ["--method", "expo_dpo", "--steps", "1", "--batch_size", "4", "--num_generations", "2"]
    trained = []
    encode = dpo.pair_batch
    monkeypatch.setattr(dpo, "pair_batch", lambda t, q, c, r: trained.extend(zip(q, c, r)) or encode(t, q, c, r))
    t = train.Trainer(train.parse_args(_args(tiny_dir, tmp_path / "run", *flags)))
    t.train_step()  # step 0, as the run's loop makes it
    assert trained, "the tiny model's step made no pairs: the comparison would say nothing"
    gold = {e.question: e.answer for e in t.train_set}
    for question, chosen, rejected in trained:  # chosen: a target ending on the gold; rejected: an own wrong answer
        assert f"\\boxed{{{gold[question]}}}" in chosen and reward.score(rejected, gold[question], question) == 0
    dpo_pairs.main(_args(tiny_dir, tmp_path / "pairs", *flags))
    rows = [json.loads(line) for line in open(tmp_path / "pairs" / "pairs.jsonl")]
    assert rows == [dpo_pairs.trl_row(*pair) for pair in trained]
    assert rows[0]["prompt"] == [{"role": "user", "content": expo.solve_prompt(trained[0][0])}]
