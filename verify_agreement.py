"""How often does reward.py agree with Math-Verify (the sympy-based grader) on MATH answers? A dev-only measurement.

    pip install math-verify          # test/dev only: it pulls sympy and an ANTLR LaTeX parser
    python verify_agreement.py --pairs 1200 --show 40

Pairs come from the MATH test set: each gold answer is rewritten into an equivalent form a model might write
(a positive: `\\dfrac` for `\\frac`, `a/b`, `\\frac{2a}{2b}`, a decimal for a terminating fraction, `2\\sqrt{3}` as
`\\sqrt{12}`, `x = ...`, extra spaces and `\\left(`, a unit word, thousands separators), turned into a near miss (a
negative: a 4-digit rounding of a non-terminating fraction, the integer + 1, a swapped pair, flipped interval
brackets), or replaced by another problem's answer (a negative).
Each completion is "... so the answer is $\\boxed{...}$." and both graders judge it against the original gold.
Math-Verify runs with its own timeouts disabled. Prints the agreement, the worst time per call of reward.score,
and the disagreements by kind.
"""
from __future__ import annotations

import argparse
import random
import re
import time
from collections import Counter
from fractions import Fraction

import data
import reward


def rewrites(gold: str) -> list[tuple[str, str]]:
    """Equivalent spellings of `gold`, each with the name of the rewrite."""
    out = [("same", gold), ("spaces", " " + gold.replace(",", ", ") + " ")]
    if "\\frac" in gold:
        out.append(("dfrac", gold.replace("\\frac", "\\dfrac")))
    m = re.fullmatch(r"(-?)\\frac\{(\d+)\}\{(\d+)\}", gold)
    if m:
        sign, a, b = m.groups()
        out.append(("slash", f"{sign}{a}/{b}"))
        value = Fraction(int(a), int(b)) * (-1 if sign else 1)
        if all(p in (2, 5) for p in _primes(value.denominator)):
            out.append(("decimal", str(float(value))))
    if re.fullmatch(r"-?\d+", gold):
        out += [("point_zero", gold + ".0"), ("unit_word", gold + " \\text{ units}")]
        if len(gold.lstrip("-")) > 3:
            out.append(("thousands", f"{int(gold):,}"))
    if re.fullmatch(r"[a-z]", gold) is None and "=" not in gold:
        out.append(("x_equals", "x = " + gold))
    if gold.startswith("(") and gold.endswith(")"):
        out.append(("left_right", "\\left" + gold[:-1] + "\\right)"))
    if m:
        out.append(("scaled_frac", f"{sign}\\frac{{{2 * int(a)}}}{{{2 * int(b)}}}"))
    r = re.fullmatch(r"(\d*)\\sqrt\{(\d+)\}", gold)
    if r:
        out.append(("sqrt_folded", f"\\sqrt{{{int(r.group(1) or 1) ** 2 * int(r.group(2))}}}"))
    return out


def near_misses(gold: str) -> list[tuple[str, str]]:
    """Spellings that look like `gold` but are a different answer (by reward.py's rules)."""
    out = []
    m = re.fullmatch(r"(-?)\\frac\{(\d+)\}\{(\d+)\}", gold)
    if m and not all(p in (2, 5) for p in _primes(int(m.group(3)))):
        value = int(m.group(2)) / int(m.group(3)) * (-1 if m.group(1) else 1)
        out.append(("rounded_decimal", f"{value:.4f}"))  # 0.3333 for 1/3: a rounding, not the answer
    if re.fullmatch(r"-?\d+", gold):
        out.append(("off_by_one", str(int(gold) + 1)))
    t = re.fullmatch(r"\((-?\d+),\s*(-?\d+)\)", gold)
    if t and t.group(1) != t.group(2):
        out.append(("swapped_tuple", f"({t.group(2)}, {t.group(1)})"))
    if re.fullmatch(r"[\[(].*,.*[\])]", gold) and gold[0] + gold[-1] in ("()", "[]", "(]", "[)"):
        flip = {"(": "[", "[": "("}[gold[0]] + gold[1:-1] + {")": "]", "]": ")"}[gold[-1]]
        out.append(("bracket_flip", flip))
    return out


def _primes(n: int) -> set[int]:
    found, p = set(), 2
    while p * p <= n:
        while n % p == 0:
            found.add(p)
            n //= p
        p += 1
    return found | ({n} if n > 1 else set())


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--pairs", type=int, default=1200, help="(completion, gold) pairs to judge")
    parser.add_argument("--show", type=int, default=30, help="disagreements to print")
    parser.add_argument("--seed", type=int, default=0)
    args = parser.parse_args()
    from math_verify import parse, verify  # imported here: a dev-only dependency

    rng = random.Random(args.seed)
    golds = [e.answer for e in data.load("math", "test")]
    pairs = []  # (kind, completion, gold)
    while len(pairs) < args.pairs:
        gold = rng.choice(golds)
        roll, misses = rng.random(), near_misses(gold)
        if roll < 0.45:
            kind, pred = rng.choice(rewrites(gold))
            kind = "pos:" + kind
        elif roll < 0.7 and misses:
            kind, pred = rng.choice(misses)
            kind = "neg:" + kind
        else:
            pred = rng.choice(golds)
            kind = "neg:other_answer" if pred != gold else "pos:same"
        pairs.append((kind, f"We compute carefully, so the answer is $\\boxed{{{pred}}}$.", gold))

    agree, worst, disagreements = 0, 0.0, []
    for kind, completion, gold in pairs:
        start = time.perf_counter()
        ours = reward.score(completion, gold) == 1.0
        worst = max(worst, time.perf_counter() - start)
        theirs = bool(verify(parse(f"${gold}$", parsing_timeout=None), parse(completion, parsing_timeout=None),
                             timeout_seconds=None))
        if ours == theirs:
            agree += 1
        else:
            disagreements.append((kind, ours, theirs, reward.extract_answer(completion), gold))
    print(f"agreement with Math-Verify: {agree}/{len(pairs)} = {100 * agree / len(pairs):.1f}%")
    print(f"worst reward.score time on these pairs: {worst * 1000:.2f} ms")
    print("disagreements by kind (ours, math-verify):",
          dict(Counter((k, o, t) for k, o, t, _, _ in disagreements)))
    for kind, ours, theirs, pred, gold in disagreements[: args.show]:
        print(f"  {kind:22} ours={ours!s:5} math-verify={theirs!s:5} pred={pred!r}  gold={gold!r}")


if __name__ == "__main__":
    main()
