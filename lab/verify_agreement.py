"""How often does reward.py agree with two independent graders on MATH answers, and who is right? Dev only.

    pip install math-verify                                   # reference 1: Math-Verify (sympy + an ANTLR parser)
    pip install math-verify pylatexenc latex2sympy2_extended  # reference 2 also needs these, and its file:
    python -m lab.verify_agreement --pairs 3000 --drgrpo path/to/drgrpo_grader.py
    python -m lab.verify_agreement --scan        # the restatement scan: padded copies of every question, every split

Reference 2 is the Dr. GRPO grader that Stanford CS336's assignment 5 ships (stanford-cs336/assignment5-alignment,
`cs336_alignment/drgrpo_grader.py`, public; it is loaded from the path you give and never copied here); it judges
with `question_only_reward_fn(completion, gold, fast=False)`, i.e. its string/sympy rules and then Math-Verify.

Pairs come from the MATH test set: each gold answer is rewritten into an equivalent form a model might write
(a positive: `\\dfrac` for `\\frac`, `a/b`, a decimal for a terminating fraction, `2\\sqrt{3}` as `\\sqrt{12}`,
`x = ...`, extra spaces and `\\left(`, a unit word, thousands separators, a mixed number as an improper fraction and
back, a list of solutions in another order), turned into a near miss (a negative: a 4-digit rounding of a
non-terminating fraction, the integer + 1, a swapped pair, flipped interval brackets, a mixed number read as a
product, an unreduced `\\frac{2a}{2b}` for a reduced gold: half the work, which the checker refuses on purpose and
Math-Verify accepts), or replaced by another problem's answer (a negative). Each completion is "... so the answer
is $\\boxed{...}$." and every grader judges it against the original gold. Since each pair's truth is known by
construction, the script prints each grader's accuracy as well as their agreement, the disagreements by kind with
who is right, and the worst time per call of reward.score. Math-Verify runs with its own timeouts disabled.
"""
from __future__ import annotations

import argparse
import math
import random
import re
import time
import warnings
from collections import Counter
from fractions import Fraction

import data
import reward


def rewrites(gold: str) -> list[tuple[str, str]]:
    """Equivalent spellings of `gold`, each with the name of the rewrite."""
    one_number = re.search(r"\d,(\\!)?\s*\d{3}", gold)  # "2,500" and "16,\!386.16" are one number, not a list
    spaced = gold if one_number else gold.replace(",", ", ")
    out = [("same", gold), ("spaces", " " + spaced + " ")]
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
    if re.fullmatch(r"[a-z]", gold) is None and "=" not in gold and "\\text" not in gold and "\\in" not in gold:
        out.append(("x_equals", "x = " + gold))
    if gold.startswith("(") and gold.endswith(")"):
        out.append(("left_right", "\\left" + gold[:-1] + "\\right)"))
    if m:
        if int(a) > int(b) and int(a) % int(b):
            whole, rest = divmod(int(a), int(b))
            out.append(("improper_to_mixed", f"{sign}{whole}\\frac{{{rest}}}{{{b}}}"))
    mixed = _MIXED.fullmatch(gold)
    if mixed:
        sign, whole, a, b = mixed.groups()
        out.append(("mixed_to_improper", f"{sign}\\frac{{{int(whole) * int(b) + int(a)}}}{{{b}}}"))
    items = _bare_list(gold)
    if items and len(set(items)) > 1 and "\\text" not in gold:
        out.append(("reordered_list", ", ".join(reversed(items))))
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
    if m and math.gcd(int(m.group(2)), int(m.group(3))) == 1:  # half the work: an unreduced fraction (issue 53)
        out.append(("unreduced_frac", f"{m.group(1)}\\frac{{{2 * int(m.group(2))}}}{{{2 * int(m.group(3))}}}"))
    if re.fullmatch(r"-?\d+", gold):
        out.append(("off_by_one", str(int(gold) + 1)))
    t = re.fullmatch(r"\((-?\d+),\s*(-?\d+)\)", gold)
    if t and t.group(1) != t.group(2):
        out.append(("swapped_tuple", f"({t.group(2)}, {t.group(1)})"))
    if re.fullmatch(r"[\[(].*,.*[\])]", gold) and gold[0] + gold[-1] in ("()", "[]", "(]", "[)"):
        flip = {"(": "[", "[": "("}[gold[0]] + gold[1:-1] + {")": "]", "]": ")"}[gold[-1]]
        out.append(("bracket_flip", flip))
    mixed = _MIXED.fullmatch(gold)
    if mixed and int(mixed.group(2)) > 1:
        sign, whole, a, b = mixed.groups()
        out.append(("mixed_as_product", f"{sign}\\frac{{{int(whole) * int(a)}}}{{{b}}}"))  # 3 * 1/2, not 3 + 1/2
    return out


_MIXED = re.compile(r"(-?)(\d+)\s*\\frac\{(\d+)\}\{(\d+)\}")


def _bare_list(gold: str) -> list[str] | None:
    """The items of a comma list outside any bracket ("1, -2, 5"), or None."""
    depth, items, start = 0, [], 0
    for i, c in enumerate(gold):
        depth += c in "([{"
        depth -= c in ")]}"
        if c == "," and depth == 0:
            items.append(gold[start:i].strip())
            start = i + 1
    items.append(gold[start:].strip())
    if len(items) < 2 or any(not x for x in items) or re.search(r"\d,(\\!)?\s*\d{3}", gold):
        return None  # "25,\!972,\!650" is one number
    return items


def _primes(n: int) -> set[int]:
    found, p = set(), 2
    while p * p <= n:
        while n % p == 0:
            found.add(p)
            n //= p
        p += 1
    return found | ({n} if n > 1 else set())


def make_pairs(n: int, seed: int) -> list[tuple[str, str, str, bool]]:
    """(kind, completion, gold, equal by construction) for n pairs drawn from the MATH test answers."""
    rng = random.Random(seed)
    golds = [e.answer for e in data.load("math", "test")]
    pairs = []
    while len(pairs) < n:
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
        pairs.append((kind, f"We compute carefully, so the answer is $\\boxed{{{pred}}}$.", gold,
                      kind.startswith("pos:")))
    for gold in sorted(set(golds)):  # plus every rewrite of the kinds that random draws rarely reach
        for kind, pred in [("pos:" + k, p) for k, p in rewrites(gold)] + [("neg:" + k, p) for k, p in near_misses(gold)]:
            if kind.split(":")[1] in TARGETED:
                pairs.append((kind, f"So the answer is $\\boxed{{{pred}}}$.", gold, kind.startswith("pos:")))
    return pairs


TARGETED = ("mixed_to_improper", "improper_to_mixed", "reordered_list", "mixed_as_product")


# ------------------------------------------------------------------------------- the restatement scan (--scan)

# A math span of a question, as a policy would copy it: $...$, $$...$$, \(...\), or an arithmetic expression
SPANS = re.compile(r"\$\$(.+?)\$\$|\$(.+?)\$|\\\((.+?)\\\)|[\d(][\d\s.,()]*(?:[-+*/×÷^][\d\s.,()]*)+[\d)]", re.DOTALL)
_FULL_WIDTH = str.maketrans("0123456789", "０１２３４５６７８９")


def padded(span: str) -> list[str]:
    """A span and its padded copies: what a policy refused for copying the question tries next."""
    return [span, span + " \\cdot 1", span + " + 0", re.sub(r"(?<![\d.])(\d+)", r"0\1", span, count=1),
            re.sub(r"(?<![\d.])(\d+)(?![\d.])", r"\1.0", span, count=1), span.translate(_FULL_WIDTH)]


def restatement_scan(names=("arith", "gsm8k", "math", "math500"), every: int = 1, timing: dict | None = None) -> dict:
    """{(dataset, split): (questions scanned, [(id, boxed copy, gold) that scored 1])}: every `every`-th question of
    every split, each of its math spans boxed as it is and padded (`padded`), the gold's own form excepted (a span
    whose canonical tree is the gold's). `timing`, when given, gets the worst seconds of one `reward.score` call."""
    out = {}
    for name in names:
        for split in ("train", "test") if name != "math500" else ("test",):
            with warnings.catch_warnings():
                warnings.simplefilter("ignore")
                examples = data.load(name, split, levels=[1, 2, 3, 4, 5] if name == "arith" else None)[::every]
            copied = []
            for e in examples:
                gold = reward.canonical(e.answer)
                for m in SPANS.finditer(e.question):
                    span = next((g for g in m.groups() if g is not None), m.group(0))
                    if reward.canonical(span) == gold:
                        continue
                    for copy in padded(span):
                        start = time.perf_counter()
                        if reward.score(f"\\boxed{{{copy}}}", e.answer, e.question) == 1.0:
                            copied.append((e.id, copy, e.answer))
                        if timing is not None:
                            timing["worst"] = max(timing.get("worst", 0.0), time.perf_counter() - start)
            out[(name, split)] = (len(examples), copied)
    return out


# Strings a policy (or a bug) could hand the checker: long, deeply nested, huge exact values, chains of fractions, up
# to 100,000 characters (a run's longest completion is --max_new_tokens tokens: a few thousand characters).
HOSTILE = ["\\boxed{" * 20000, "{" * 50000 + "}" * 50000, "10^{10^{10^{10}}}", "2^{2^{2^{2^{2^{2}}}}}", "9" * 100000,
           "(" * 3000 + "1" + ")" * 3000, "\\sqrt{" * 3000 + "2" + "}" * 3000, "5 " + "aa " * 30000 + "!", "1," * 40000,
           "x^" * 20000, "\\frac" * 20000, "The answer is " * 5000, "#### " + "\\frac{1}{2}" * 8000,
           "=".join(f"\\frac{{{7 ** 40 + i}}}{{{11 ** 40 + i}}}" for i in range(12)),
           "*".join(["99^{4999}"] * 25), "\\sqrt{" * 39 + "2" + "}" * 39, "(x+1)" * 150, "1 \\pm " * 200 + "1"]


def worst_times(texts=HOSTILE) -> tuple[float, float]:
    """(worst wall seconds, worst CPU seconds) of one checker call over `texts`, each as the completion, the gold and
    the question, boxed and bare, after a warm-up call."""
    reward.score("\\boxed{1}", "1", "What is 1?")
    wall = cpu = 0.0
    for text in texts:
        for call in (lambda: reward.score("\\boxed{" + text + "}", text, text), lambda: reward.score(text, "1", text),
                     lambda: reward.is_equiv(text, text)):
            start, start_cpu = time.perf_counter(), time.process_time()
            call()
            wall, cpu = max(wall, time.perf_counter() - start), max(cpu, time.process_time() - start_cpu)
    return wall, cpu


def references(drgrpo_path: str | None) -> dict:
    """The independent graders, each a function (completion, gold) -> bool; imported here: dev-only dependencies."""
    from math_verify import parse, verify

    graders = {"Math-Verify": lambda c, g: bool(verify(parse(f"${g}$", parsing_timeout=None),
                                                       parse(c, parsing_timeout=None), timeout_seconds=None))}
    if drgrpo_path:
        import importlib.util
        spec = importlib.util.spec_from_file_location("drgrpo_grader", drgrpo_path)
        module = importlib.util.module_from_spec(spec)
        spec.loader.exec_module(module)
        graders["Dr. GRPO"] = lambda c, g: module.question_only_reward_fn(c, g, fast=False)["reward"] == 1.0
    return graders


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--pairs", type=int, default=1500, help="(completion, gold) pairs to judge")
    parser.add_argument("--drgrpo", default=None, help="path to drgrpo_grader.py, the second reference")
    parser.add_argument("--show", type=int, default=30, help="disagreements to print per reference")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--scan", action="store_true", help="instead: the restatement scan of every question of every "
                        "split, padded copies included (no reference grader needed)")
    args = parser.parse_args()
    if args.scan:
        timing = {}
        for (name, split), (n, copied) in restatement_scan(timing=timing).items():
            print(f"{name} {split}: {n} questions, {len({c[0] for c in copied})} answered by a (padded) copy "
                  f"{copied[:3]}")
        wall, cpu = worst_times()
        print(f"worst reward.score time in the scan: {timing['worst'] * 1000:.1f} ms; on the hostile strings "
              f"(HOSTILE): {wall * 1000:.1f} ms ({cpu * 1000:.1f} ms of CPU)")
        return
    pairs = make_pairs(args.pairs, args.seed)
    graders = references(args.drgrpo)

    worst, verdicts = 0.0, {name: [] for name in ["reward.py", *graders]}
    for kind, completion, gold, _ in pairs:
        start = time.perf_counter()
        verdicts["reward.py"].append(reward.score(completion, gold) == 1.0)
        worst = max(worst, time.perf_counter() - start)
        for name, grade in graders.items():
            verdicts[name].append(grade(completion, gold))
    truth = [t for *_, t in pairs]
    print(f"{len(pairs)} pairs; worst reward.score time on them: {worst * 1000:.2f} ms")
    for name, v in verdicts.items():
        print(f"  {name:12} right by construction on {sum(a == t for a, t in zip(v, truth)) / len(v):.2%}")
    ours = verdicts["reward.py"]
    for name in graders:
        theirs = verdicts[name]
        differ = [i for i in range(len(pairs)) if ours[i] != theirs[i]]
        print(f"\nagreement with {name}: {len(pairs) - len(differ)}/{len(pairs)} = "
              f"{100 * (1 - len(differ) / len(pairs)):.2f}%; where they differ, reward.py is right on "
              f"{sum(ours[i] == truth[i] for i in differ)} of {len(differ)}")
        kinds = Counter((pairs[i][0], "reward.py" if ours[i] == truth[i] else name) for i in differ)
        print("  disagreements by (kind, who is right):", dict(kinds))
        for i in differ[: args.show]:
            kind, completion, gold, _ = pairs[i]
            print(f"  {kind:22} reward.py={ours[i]!s:5} {name}={theirs[i]!s:5} "
                  f"pred={reward.extract_answer(completion)!r}  gold={gold!r}")


if __name__ == "__main__":
    main()
