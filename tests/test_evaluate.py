"""Evaluation (evaluate.py): pass@k, its draws, its temperature, and stored completions scored again."""
from __future__ import annotations

import json
import math

import pytest

import data
import evaluate
import expo
import rollout
import train
from conftest import _args, tiny_llama


@pytest.mark.exercise10
def test_eval_samples_hold_every_completion_and_score_again_to_the_log(uninterrupted_run, tmp_path, monkeypatch):
    """A run stores each evaluation's completions (eval_samples.jsonl); evaluate.rescore_file gives back the logged
    numbers with the checker they were scored by, and other numbers with another checker, sampling nothing."""
    logged = {r["eval"]: r for r in map(json.loads, open(uninterrupted_run / "metrics.jsonl")) if "eval" in r}
    stored = [json.loads(line) for line in open(uninterrupted_run / "eval_samples.jsonl")]
    assert [r["eval"] for r in stored] == ["before"] * 2 + ["after"] * 2  # --eval_limit 2 questions, twice
    assert all(len(r["completions"]) == 2 for r in stored)  # --eval_k 2
    again = evaluate.rescore_file(uninterrupted_run / "eval_samples.jsonl")
    for label in ("before", "after"):
        result, k = again[label]
        assert k == 2 and result["all"] == pytest.approx(logged[label]["all"]), label
    monkeypatch.setattr(evaluate.reward, "score", lambda text, gold, question=None: 1.0)  # a checker that accepts anything
    assert evaluate.rescore_file(uninterrupted_run / "eval_samples.jsonl")["after"][0]["all"]["pass@1"] == 1.0
    bad = tmp_path / "eval_samples.jsonl"
    bad.write_text(json.dumps(stored[0]) + "\n" + json.dumps({"eval": "after", "question": "q", "gold": "1"}) + "\n")
    with pytest.raises(SystemExit, match=r"eval_samples.jsonl:2: no field 'completions'"):
        evaluate.rescore_file(bad)


@pytest.mark.exercise10
def test_pass_at_k_estimator():
    assert evaluate.pass_at_k(4, 1, 1) == 0.25
    assert evaluate.pass_at_k(4, 1, 4) == 1.0 and evaluate.pass_at_k(4, 0, 4) == 0.0
    assert evaluate.pass_at_k(5, 2, 2) == pytest.approx(1 - 3 / 10)
    assert evaluate.pass_at_k(10, 3, 5) == pytest.approx(1 - 21 / 252)
    with pytest.raises(ValueError, match="at least 4 samples"):
        evaluate.pass_at_k(3, 1, 4)  # pass@4 from 3 samples is undefined, not 1.0 or 0.0
    ex = [data.Example("q", "1", level=1), data.Example("q", "1", level=1), data.Example("q", "1", level=5)]
    rows = [evaluate.Row(ex[0], 2, 2, tokens=30, cut_off=1), evaluate.Row(ex[1], 0, 1, tokens=10),
            evaluate.Row(ex[2], 1, 1, tokens=20, cut_off=2)]
    summary = evaluate.summarize(rows, k=2)
    assert summary["all"]["pass@1"] == pytest.approx(0.5) and summary["all"]["pass@2"] == pytest.approx(2 / 3)
    assert summary["level"]["1"]["pass@2"] == 0.5 and summary["level"]["5"]["pass@1"] == 0.5
    # standard error over questions: pass@1 per question 1, 0, 0.5 -> sample variance 0.25 -> sqrt(0.25 / 3)
    assert summary["all"]["pass@1_se"] == pytest.approx(math.sqrt(0.25 / 3))
    # pass@2 per question 1, 0, 1 -> mean 2/3, sample variance 1/3 -> sqrt(1/9)
    assert summary["all"]["pass@2_se"] == pytest.approx(1 / 3)
    # 4 of 6 completions commit to an answer, and 3 of those 4 are right
    assert summary["all"]["commit"] == pytest.approx(4 / 6) and summary["all"]["acc_committed"] == pytest.approx(3 / 4)
    # 60 tokens over 6 completions, 3 of them cut off; level 5 alone: 20 tokens over 2, both cut off
    assert summary["all"]["tokens"] == 10 and summary["all"]["cut_off"] == 0.5
    assert summary["level"]["5"]["tokens"] == 10 and summary["level"]["5"]["cut_off"] == 1.0
    assert evaluate.mean_se([0.7]) == (0.7, 0.0)


@pytest.mark.exercise1
@pytest.mark.exercise10
def test_evaluation_reports_its_completions_length_and_cut_off_rate(tokenizer):
    """The eval's `tokens` and `cut_off` are the sampled completions' own: the same draws, counted by hand."""
    model = tiny_llama(tokenizer)
    examples = [data.Example(f"What is {i} + 1?", str(i + 1)) for i in range(3)]
    result = evaluate.evaluate(model, tokenizer, examples, k=2, max_new_tokens=6, seed=3, progress=False)
    prompts = rollout.encode_prompts(tokenizer, [expo.solve_prompt(e.question) for e in examples])
    out = rollout.sample(model, tokenizer, prompts, 2, 6, 0.7, seed=3)  # evaluate's one call at this size
    assert result["all"]["tokens"] == pytest.approx(float(out.completion_mask.sum()) / 6)
    assert result["all"]["cut_off"] == pytest.approx(float(out.truncated.float().mean()))
    assert 0 < result["all"]["tokens"] <= 6


@pytest.mark.exercise10
def test_evaluation_samples_at_its_own_temperature_not_the_trainings(tiny_dir, tmp_path, monkeypatch):
    """Rollouts are drawn at --temperature, self-explanations at --explain_temperature (in the same call), evaluations
    at --eval_temperature (a run evaluated at its training temperature would be measured differently from the initial
    model and from the paper's T = 0.7)."""
    t = train.Trainer(train.parse_args(_args(tiny_dir, tmp_path, "--temperature", "1.3", "--eval_temperature", "0.4",
                                             "--explain_temperature", "0.2")))
    temperatures, real = [], rollout.sample
    def spy(model, tok, prompts, counts, max_new_tokens, temperature=1.0, **kw):
        temperatures.append(temperature)
        return real(model, tok, prompts, counts, max_new_tokens, temperature, **kw)
    monkeypatch.setattr(rollout, "sample", spy)
    t.evaluate("before")
    assert set(temperatures) == {0.4}, f"evaluation sampled at {temperatures}, not --eval_temperature 0.4"
    temperatures.clear()
    t.grpo_step(t.train_set[:2])
    assert temperatures == [[1.3, 1.3, 0.2, 0.2]], f"training sampled at {temperatures}, not --temperature 1.3 for " \
        "the 2 questions' rollouts and --explain_temperature 0.2 for their self-explanations"


@pytest.mark.exercise10
def test_evaluation_draws_are_per_question_whatever_the_batch_size(tokenizer):
    """The evaluation's contract: question i's completions come from a stream seeded by seed + i alone, so batching
    changes none of them, and two questions never share draws (here the same question asked twice, at positions 0
    and 2, gets different completions: one seed per batch of questions would give them the same)."""
    model = tiny_llama(tokenizer)
    examples = data.load("arith", "test", levels=[2], limit=4, seed=0)
    examples[2] = examples[0]
    runs = {size: evaluate.evaluate(model, tokenizer, examples, k=2, temperature=1.0, max_new_tokens=8,
                                    batch_size=size, seed=5, progress=False)["completions"] for size in (1, 2, 16)}
    texts = {size: [r["completions"] for r in records] for size, records in runs.items()}
    assert texts[1] == texts[2] == texts[16], "changing the evaluation's batch size changed what a question drew"
    assert texts[16][0] != texts[16][2], "two questions drew the same random numbers"
