"""The lab (lab/): analysis, comparison, the distance figure."""
from __future__ import annotations

import importlib.util
import itertools
import json
import math
import shutil

import pytest
import torch

import data
import expo
import rollout
import train
from conftest import _args, _steps, tiny_llama
from lab import analyze, compare


@pytest.mark.exercise7
def test_analyze_writes_the_three_kinds_of_sample(tiny_dir, tmp_path):
    result = analyze.main(["--model", str(tiny_dir), "--n", "3", "--k", "2", "--max_new_tokens", "5",
                           "--json", str(tmp_path / "a.json"), "--no_drop_leaks"])
    saved = json.loads((tmp_path / "a.json").read_text())
    assert saved["own"]["n"] == 6 and saved["self_explanation"]["n"] == 3 and saved["expert"]["n"] == 3
    for key in ("own", "self_explanation", "expert"):
        assert all(math.isfinite(saved[key][m]) for m in ("nll_per_token", "nll_per_seq", "correct", "length"))
        assert saved[key] == result[key]
    assert saved["expert"]["correct"] == 1.0  # arith's worked solutions end on the gold answer
    assert saved["own"]["truncated"] > 0.5  # a random model rarely stops within 5 tokens
    assert 0 < saved["stop_at_target_end"]["answer_free"] < 1 and 0 < saved["stop_at_target_end"]["hinted"] < 1


@pytest.mark.exercise7
def test_analyze_scores_under_train_dtype_and_samples_by_sampler_dtype_alone(tiny_dir, monkeypatch):
    """--train_dtype bf16 scores the NLLs under bf16 autocast; sampling never runs under it (--sampler_dtype fp32
    draws from the fp32 model in fp32, as train.py does), or the analysis would describe other samples than a run's."""
    seen = {"sample": set(), "score": set()}
    real_sample, real_nll = analyze.rollout.sample, analyze.sequence_nll
    monkeypatch.setattr(analyze.rollout, "sample", lambda *a, **k: seen["sample"].add(
        torch.is_autocast_enabled("cpu")) or real_sample(*a, **k))
    monkeypatch.setattr(analyze, "sequence_nll", lambda *a, **k: seen["score"].add(
        torch.is_autocast_enabled("cpu")) or real_nll(*a, **k))
    analyze.main(["--model", str(tiny_dir), "--n", "2", "--k", "2", "--max_new_tokens", "4", "--no_drop_leaks",
                  "--sampler_dtype", "fp32", "--train_dtype", "bf16", "--pass_k", "2"])
    assert seen == {"sample": {False}, "score": {True}}, seen


@pytest.mark.exercise2
def test_end_probability_is_the_last_targets_token_probability(tokenizer):
    """analyze.end_probability: p(turn end | the target before it), the last masked token of each row."""
    model, turn_end = tiny_llama(tokenizer), rollout.turn_end_id(tokenizer)
    batch = rollout.encode_targets(tokenizer, ["q one", "a longer question two"], ["Short.", "A longer target."],
                                   turn_end)
    logp = rollout.token_logprobs(model, batch.prompt_ids, batch.prompt_mask, batch.completion_ids, 1.0)
    last = batch.completion_mask.sum(1) - 1
    assert (batch.completion_ids[torch.arange(2), last] == turn_end).all()
    assert analyze.end_probability(model, batch, rows_per_pass=1) == pytest.approx(
        logp[torch.arange(2), last].exp().tolist(), rel=1e-5)


@pytest.mark.exercise2
def test_stop_at_rollout_end_scores_the_stopped_rollouts_after_both_prompts(tokenizer):
    """analyze.stop_at_rollout_end: only rollouts that stopped (not cut off by the budget) count, each scored after
    its own question's answer-free prompt and after its hinted one; k rows per question."""
    model, turn_end = tiny_llama(tokenizer), rollout.turn_end_id(tokenizer)
    examples = [data.Example("What is 2 + 3?", "5"),  # prompts of unlike length: a random model's p(stop) hardly
                data.Example("A farmer has 17 cows and buys 4 more each week for 6 weeks; how many then?", "41")]
    # depends on the prompt, so the tolerances below are tight (fp32 rounding of p ~ 2e-5 is ~1e-6 of it)
    own = rollout.encode_targets(tokenizer, [expo.solve_prompt(e.question) for e in examples for _ in range(2)],
                                 ["Five.", "It is", "Forty-one it is.", "Forty"], turn_end)
    own.truncated = torch.tensor([False, True, False, True])  # rows 1 and 3 "ran out of budget"
    got = analyze.stop_at_rollout_end(model, tokenizer, own, examples, k=2)

    def p_stop(prompt, text):
        one = rollout.encode_targets(tokenizer, [prompt], [text], turn_end)
        return analyze.end_probability(model, one)[0]
    texts = ["Five.", "Forty-one it is."]
    free = [p_stop(expo.solve_prompt(e.question), t) for e, t in zip(examples, texts)]
    hinted = [p_stop(expo.explain_prompt(e.question, e.answer), t) for e, t in zip(examples, texts)]
    assert got["answer_free"] == pytest.approx(sum(free) / 2, rel=2e-5)
    assert got["hinted"] == pytest.approx(sum(hinted) / 2, rel=2e-5) and got["hinted"] != got["answer_free"]
    own.truncated[:] = True
    assert analyze.stop_at_rollout_end(model, tokenizer, own, examples, k=2) is None


@pytest.mark.exercise10
def test_hint_reliance_and_pass_at_k_curve(tiny_dir, tmp_path, monkeypatch, tokenizer):
    """Hint reliance is (NLL without the hint - NLL with it) / tokens per explanation; the coverage curve is the
    unbiased pass@k at k = 1, 2, 4 from 4 samples per question (here exactly 1 of each question's 4 is right)."""
    assert analyze.hint_reliance([10.0, 4.0], [6.0, 4.0], [4, 2]) == {"mean": 0.5, "per_sample": [1.0, 0.0]}
    saved = analyze.main(["--model", str(tiny_dir), "--n", "3", "--k", "2", "--max_new_tokens", "5", "--no_drop_leaks",
                          "--pass_k", "4", "--json", str(tmp_path / "a.json")])
    assert len(saved["hint_reliance"]["per_sample"]) == saved["self_explanation"]["n"] == 3
    assert list(saved["pass_at_k"]) == ["pass@1", "pass@2", "pass@4"]
    verdicts = itertools.cycle([1.0, 0.0, 0.0, 0.0])
    monkeypatch.setattr(analyze.reward, "score", lambda text, gold, question=None: next(verdicts))
    curve = analyze.pass_at_k_curve(tiny_llama(tokenizer), tokenizer, data.load("arith", "test", limit=3), n=4,
                                    max_new_tokens=3)
    assert curve == pytest.approx({"pass@1": 0.25, "pass@2": 0.5, "pass@4": 1.0})


@pytest.mark.exercise8
def test_analyze_nll_falls_on_a_target_the_model_was_fitted_to(tokenizer):
    model = tiny_llama(tokenizer)
    examples = data.load("arith", "train", levels=[2], limit=2)
    before = analyze.measure(model, tokenizer, examples, k=2, max_new_tokens=4)["expert"]
    targets = rollout.encode_targets(tokenizer, [expo.solve_prompt(e.question) for e in examples],
                                     [e.solution for e in examples], tokenizer.eos_token_id)
    optimizer = torch.optim.Adam(model.parameters(), lr=1e-2)
    for _ in range(5):
        logp = rollout.token_logprobs(model, targets.prompt_ids, targets.prompt_mask, targets.completion_ids)
        expo.sft_loss(logp, targets.completion_mask).backward()
        optimizer.step()
        optimizer.zero_grad()
    after = analyze.measure(model, tokenizer, examples, k=2, max_new_tokens=4)["expert"]
    assert after["nll_per_token"] < before["nll_per_token"] - 0.5
    assert after["nll_per_seq"] == pytest.approx(after["nll_per_token"] * after["length"], rel=0.2)


@pytest.mark.exercise10
def test_compare_two_methods_two_seeds_one_evaluation_set(tiny_dir, tmp_path, capsys):
    """A folder per method and seed; every run evaluated on the same questions (the training seed never picks them);
    the table gives each seed, the mean ± spread and pass@1 by level; complete runs are reused, not retrained, and
    only if they were trained with the same flags."""
    args = _args(tiny_dir, tmp_path, "--steps", "1", "--levels", "1", "2", "--eval_limit", "6")  # both levels
    del args[args.index("--output_dir") : args.index("--output_dir") + 2]  # compare.py names each run's folder
    summary = compare.main(["--methods", "expo", "grpo", "--seeds", "0", "1", "--out", str(tmp_path), "--", *args])
    for method in ("expo", "grpo"):
        for seed in (0, 1):
            folder = tmp_path / method / f"seed-{seed}"
            assert [s["step"] for s in _steps(folder)] == [0]
            evals = [json.loads(line)["eval"] for line in open(folder / "metrics.jsonl") if '"eval"' in line]
            assert evals == (["before", "after"] if (method, seed) == ("expo", 0) else ["after"])  # "before" once
    eval_sets = [[e.id for e in train.Trainer(train.parse_args(
        [*args, "--seed", str(seed), "--output_dir", str(tmp_path / f"probe-{seed}")])).eval_set] for seed in (0, 1)]
    assert eval_sets[0] == eval_sets[1]
    table = (tmp_path / "compare.md").read_text()
    rows = table.splitlines()
    assert rows[2].startswith("| initial model |") and rows[3].startswith("| `expo` | 0, 1 |")
    assert rows[4].startswith("| `grpo` | 0, 1 |") and " ± " in rows[3] and "| level 1 | level 2 |" in table
    assert [r["seed"] for r in summary["methods"][0]["runs"]] == [0, 1]
    mean, sd = summary["methods"][0]["pass@1"]
    assert mean == pytest.approx(sum(r["after"]["pass@1"] for r in summary["methods"][0]["runs"]) / 2) and sd >= 0
    if importlib.util.find_spec("matplotlib"):
        assert (tmp_path / "compare.png").stat().st_size > 1000
    else:
        assert "pip install matplotlib" in capsys.readouterr().out
    log = (tmp_path / "grpo" / "seed-1" / "metrics.jsonl").read_text()
    compare.main(["--methods", "expo", "grpo", "--seeds", "0", "1", "--out", str(tmp_path), "--", *args])
    assert (tmp_path / "grpo" / "seed-1" / "metrics.jsonl").read_text() == log  # reused as it was
    compare.main(["--methods", "grpo", "--seeds", "2", "--out", str(tmp_path), "--", *args])  # extended later
    evals = [json.loads(line)["eval"] for line in open(tmp_path / "grpo" / "seed-2" / "metrics.jsonl") if '"eval"' in line]
    assert evals == ["after"], "a run added to a comparison evaluated the initial model again"
    with pytest.raises(SystemExit, match="--learning_rate"):
        compare.main(["--methods", "grpo", "--seeds", "1", "--out", str(tmp_path), "--", *args, "--learning_rate", "1"])
    shutil.rmtree(tmp_path / "grpo" / "seed-1" / "checkpoint")  # a finished run kept as its logs (e.g. committed)
    with pytest.raises(SystemExit, match="--learning_rate"):  # is still checked, against its config.json
        compare.main(["--methods", "grpo", "--seeds", "1", "--out", str(tmp_path), "--", *args, "--learning_rate", "1"])


@pytest.mark.exercise11
def test_compare_runs_a_variant_beside_a_method_under_its_own_name(tiny_dir, tmp_path):
    """A --methods entry METHOD:flag=value runs train.py with those flags too, in a folder of its own, and the table
    names it; a malformed variant or a bad value fails before any run trains."""
    args = _args(tiny_dir, tmp_path, "--steps", "1", "--eval_limit", "2")
    del args[args.index("--output_dir") : args.index("--output_dir") + 2]
    with pytest.raises(SystemExit, match="flag=value"):
        compare.main(["--methods", "grpo", "expo:explain_loss", "--out", str(tmp_path), "--", *args])
    with pytest.raises(SystemExit):
        compare.main(["--methods", "grpo", "expo:explain_loss=kl", "--out", str(tmp_path), "--", *args])
    assert not (tmp_path / "grpo").exists(), "a run trained before a bad variant was refused"
    assert compare.variant_flags("expo:explain_loss=rkl,teacher=initial") == [
        "--method", "expo", "--explain_loss", "rkl", "--teacher", "initial"]
    compare.main(["--methods", "grpo", "expo:explain_loss=rkl", "--out", str(tmp_path), "--", *args])
    folder = tmp_path / "expo-explain_loss=rkl" / "seed-0"
    config = json.loads((folder / "config.json").read_text())
    assert (config["method"], config["explain_loss"]) == ("expo", "rkl") and "loss_distill" in _steps(folder)[0]
    assert "| `expo:explain_loss=rkl` | 0 |" in (tmp_path / "compare.md").read_text()


def test_distance_figure_places_each_style_at_its_nll_ratio_with_its_seeds(tmp_path, monkeypatch):
    """lab/distance.py: a style's x is its expert NLL per token over the self-explanations' (not the other way, not
    the raw NLL); each style lists its own seeds' pass@1 in order, its mean a level bar at that x in the figure; expo
    and grpo are the bands; styles without runs are left out; a --styles entry without a path is refused."""
    from lab import distance

    def analysis(expert, self_explanation):
        return {"expert": {"nll_per_token": expert}, "self_explanation": {"nll_per_token": self_explanation}}

    def method(name, values):
        runs = [{"seed": s, "after": {"pass@1": v}} for s, v in enumerate(values)]
        return {"method": name, "runs": runs, "pass@1": [sum(values) / len(values), 0.01], "pass@4": [0.2, 0.02],
                "commit": [0.9, 0.0], "acc_committed": [0.1, 0.0], "tokens": 50.0, "cut_off": 0.0}
    (tmp_path / "base.json").write_text(json.dumps(analysis(1.3, 1.0)))
    (tmp_path / "far.json").write_text(json.dumps(analysis(3.0, 1.2)))
    (tmp_path / "none.json").write_text(json.dumps(analysis(2.0, 1.0)))
    summary = {"before": {"all": {"pass@1": 0.02}}, "methods": [
        method("expo", [0.06, 0.07]), method("grpo", [0.02, 0.03]), method("grpo_sft_gt", [0.12, 0.10, 0.11]),
        method("grpo_sft_gt:expert_style=far", [0.0, 0.01, 0.02])]}
    (tmp_path / "compare.json").write_text(json.dumps(summary))
    import matplotlib.figure
    figures, real_save = [], matplotlib.figure.Figure.savefig
    monkeypatch.setattr(matplotlib.figure.Figure, "savefig", lambda fig, *a, **kw: figures.append(fig) or
                        real_save(fig, *a, **kw))
    distance.main(["--compare", str(tmp_path / "compare.json"), "--base", str(tmp_path / "base.json"), "--styles",
                   f"far={tmp_path / 'far.json'}", f"none={tmp_path / 'none.json'}", "--out", str(tmp_path / "d")])
    bars = {round(float(line.get_xdata()[0]) + 0.05, 2): list(line.get_ydata()) for line in figures[0].axes[0].lines
            if len(line.get_xdata()) == 2 and line.get_xdata()[1] - line.get_xdata()[0] == pytest.approx(0.1)}
    assert bars == {1.3: [pytest.approx(0.11)] * 2, 2.5: [pytest.approx(0.01)] * 2}, bars  # a style's mean, level
    rows = (tmp_path / "d.md").read_text().splitlines()[2:]
    assert rows[0].startswith("| `grpo_sft_gt`, worded | 1.30x | 0, 1, 2 | 0.120, 0.100, 0.110 |"), rows[0]
    assert rows[1].startswith("| `grpo_sft_gt`, far | 2.50x | 0, 1, 2 | 0.000, 0.010, 0.020 |"), rows[1]
    assert [r.split(" |")[0] for r in rows[2:]] == ["| `expo` (no expert text)", "| `grpo` (no expert text)"]
    assert not any("none" in r for r in rows), "a style without runs got a row"
    with pytest.raises(SystemExit):
        distance.main(["--compare", str(tmp_path / "compare.json"), "--base", str(tmp_path / "base.json"),
                       "--styles", "far", "--out", str(tmp_path / "e")])


ANALYZE_FLAGS = [  # (flags, where the flag is read, what it must have received)
    (["--expert_style", "rpn"], "load", ("expert_style", "rpn")), (["--n", "3"], "load", ("limit", 3)),
    (["--seed", "5"], "load", ("seed", 5)), (["--split", "test"], "load", ("split", "test")),
    (["--levels", "4"], "load", ("levels", [4])), (["--drop_truncated"], "measure", ("drop_truncated", True)),
    (["--no_drop_leaks"], "measure", ("drop_leaks", False)), (["--k", "3"], "measure", ("k", 3)),
    (["--max_new_tokens", "7"], "measure", ("max_new_tokens", 7)), (["--temperature", "0.9"], "measure",
                                                                    ("temperature", 0.9)),
    (["--explain_hint", "step_by_step"], "measure", ("explain_hint", "step_by_step")),
    (["--explain_temperature", "0.6"], "measure", ("explain_temperature", 0.6)),
    (["--pass_k", "2"], "pass_at_k", ("n", 2)),
]


@pytest.mark.parametrize("flags, reader, expected", ANALYZE_FLAGS, ids=[" ".join(r[0]) for r in ANALYZE_FLAGS])
def test_every_flag_of_lab_analyze_reaches_the_code_that_reads_it(tiny_dir, monkeypatch, flags, reader, expected):
    """lab.analyze's flags arrive where they are read: the question set (data.load), the measurement (`measure`), the
    pass@k curve. (Its --expert_style once stopped at the parser: the analysis measured the worded solutions.)"""
    seen, real_load = {}, data.load

    def load(name, split, **kw):
        seen["load"] = {"split": split, **kw}
        return real_load(name, split, **kw)
    monkeypatch.setattr(analyze.data, "load", load)
    monkeypatch.setattr(analyze, "measure", lambda model, tok, ex, k, max_new_tokens, temperature, seed, **kw:
                        seen.setdefault("measure", dict(k=k, max_new_tokens=max_new_tokens, temperature=temperature,
                                                        **kw)) and {})
    monkeypatch.setattr(analyze, "pass_at_k_curve", lambda model, tok, ex, n, *a: seen.setdefault("pass_at_k", {"n": n})
                        and {})
    monkeypatch.setattr(analyze, "table", lambda result: "")
    analyze.main(["--model", str(tiny_dir), "--n", "2", *flags])
    key, value = expected
    assert seen[reader][key] == value, seen[reader]
