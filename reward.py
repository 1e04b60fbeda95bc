"""The verifier: pull the committed final answer out of a completion and decide whether it equals the gold answer.

The 0/1 verdict of `score` is the only learning signal of GRPO and ExPO and decides every pass@k we report, so this
file is strict in both directions:

* `extract_answer` takes only an answer the text *commits* to -- the last `\\boxed{}`, else a GSM8K `####` line, else
  an "answer is ..." phrase -- and never falls back to "the last number in the text" (that turns `\\frac{1}{2}` into 2).
* `is_equiv` normalises LaTeX surface forms, then compares values. Plain numbers compare exactly as rationals
  (`fractions.Fraction`), so `0.5 == \\frac{1}{2}` but `0.67 != \\frac{2}{3}`. Anything with `\\sqrt`, `\\pi`, powers or
  variables goes through a small recursive-descent evaluator (no `eval`, no sympy) and is compared numerically to a
  relative tolerance of 1e-9, at several fixed points when it has variables. An integer directly followed by a
  `\\frac` of two integers is a mixed number (`3\\frac{1}{2}` = 7/2); any other juxtaposition is a product
  (`2\\frac{\\pi}{3}`, `2\\sqrt{3}`). Tuples and intervals compare element-wise keeping their brackets; `\\{...\\}` sets and
  bare comma lists ("enter all the solutions, separated by commas") compare as multisets, in any order. Anything
  else is compared as text.
* A plain number (`4536`, `-0.5`, `\\frac{3}{4}`, `3\\frac{1}{2}`) equals only a plain number: an answer that still
  has arithmetic to do (`81 \\times 56`, `2^{10}`, `\\sqrt{4}`, `23+\\frac{45}{1}`) is not an answer to "What is 81 x
  56?" but the question restated, and a policy rewarded for it learns to restate (a levels 4-5 run did, in 15 steps).
  A mixed number is one only when 0 < numerator < denominator (`23\\frac{45}{1}` is a product).
* Given the question (`score(completion, gold, question)`, as every caller does), an answer that restates it scores
  0 (`restates`): one of its math spans, or a rewrite of one with the same integers (`(x+5)(x+2)` for "Expand
  (x+2)(x+5)", `\\frac{3}{20}` for "Write 3/20 as a decimal"), unless it is the gold's own spelling. Before this rule
  boxing a span of the question scored 1 on 129 MATH train, 87 MATH test and 14 MATH-500 questions.
* Hedges commit to nothing: two different values joined by "or" (two boxes, or "the answer is $a$ or $b$") give no
  answer. Only known units (`UNITS`) are dropped after a value, so "4536 or more" and `4536 \\text{ is not the
  answer}` are unreadable, not 4536. A lone variable's `x =` (or `f(x) =`, `x \\in`) is dropped unless the gold names
  another variable; a list of them (`x = 1, x = 2`, `x = 1 \\text{ or } x = 2`) is the list of values. A true chain
  `81 \\times 56 = 4536` reads as its last side; a decimal inside an expression is exact, like a bare one.

Model output is untrusted text, so nothing here can raise or run long: answers longer than `MAX_ANSWER_CHARS` are
compared as plain strings, the parser caps tokens and nesting depth, exact powers are size-checked before they are
computed and any exact value past `MAX_EXACT_DIGITS` goes on as a float, and the regexes have no nested quantifiers
that could backtrack.
"""
from __future__ import annotations

import math
import re
from collections import Counter
from fractions import Fraction

MAX_ANSWER_CHARS = 1000  # longer "answers" are compared as plain strings: no real answer is that long
MAX_TOKENS = 300  # the evaluator gives up (text comparison) on longer expressions
MAX_DEPTH = 40  # nesting depth the recursive-descent parser accepts
MAX_EXACT_DIGITS = 5000  # an exact value with more digits goes on in floats (and may overflow): bounded time
MAX_SET_PAIRING = 16  # set elements left to match pairwise after identical ones pair off
REL_TOL = 1e-9
# where expressions in variables are compared: spread out, so that domains like x >= 2 still leave several points
SAMPLE_POINTS = (0.5377, 1.8339, 2.2588, 0.8622, 1.3188, 3.5784, 4.7131, 6.2832, 9.4247, 12.5664, 25.1327)

# ----------------------------------------------------------------------------------------------------- extraction


def boxed_span(text: str) -> tuple[int, int] | None:
    """(start, end) of the content of the last `\\boxed{...}` / `\\fbox{...}`, braces balanced, or None.

    Example: "so \\boxed{\\frac{1}{2}}." -> (10, 21), the span of "\\frac{1}{2}". expo.py uses it to swap the answer.
    """
    # exercise 3: the span of the last \boxed{...}
    start = max(text.rfind("\\boxed"), text.rfind("\\fbox"))
    if start < 0:
        return None
    i = start + (6 if text.startswith("\\boxed", start) else 5)
    if i >= len(text) or text[i] != "{":
        return None
    depth = 0
    for j in range(i, len(text)):
        if text[j] == "{":
            depth += 1
        elif text[j] == "}":
            depth -= 1
            if depth == 0:
                return i + 1, j
    return None  # the braces never close


def _last_boxed(text: str) -> str | None:
    span = boxed_span(text)
    if span is not None:
        return text[span[0] : span[1]]
    start = max(text.rfind("\\boxed"), text.rfind("\\fbox"))
    i = start + (6 if text.startswith("\\boxed", start) else 5)
    m = re.match(r"[ \t]+([^\s$]+)", text[i : i + 200])  # `\boxed 5`: a single token
    return m.group(1) if m else None


def _two_boxes_or(text: str) -> bool:
    """Is the last box joined to the one before it by "or", with another value (a hedge between two answers)? The same
    value twice (`\\boxed{15\\frac{39}{40}}, or \\boxed{\\frac{639}{40}}`) is one answer."""
    last = boxed_span(text)
    if last is None:
        return False
    head = text[: max(text.rfind("\\boxed", 0, last[0]), text.rfind("\\fbox", 0, last[0]))]
    before = boxed_span(head)
    between = head[before[1] + 1 :] if before else ""
    joined = before is not None and re.fullmatch(r"[\s$.,)\\]*\b(?:or|otherwise)\b[\s$(\\]*", between)
    return bool(joined) and not is_equiv(head[before[0] : before[1]], text[last[0] : last[1]])  # two *values*


def _clean(answer: str) -> str | None:
    answer = answer.strip().strip("*").strip()
    answer = re.sub(r"^\\?\$\s*", "", answer)  # `#### $18`
    answer = answer.rstrip(".").strip().strip("$").strip()
    return answer or None


def _after_hashes(text: str) -> str | None:
    line = text[text.rfind("####") + 4 :].lstrip().split("\n", 1)[0]
    return _clean(line)


_PHRASE = re.compile(r"answer is\s*:?", re.IGNORECASE)


def _after_phrase(text: str) -> str | None:
    last = None
    for last in _PHRASE.finditer(text):
        pass
    if last is None:
        return None
    rest = text[last.end() : last.end() + 500].lstrip().lstrip("*").lstrip()
    for left, right in (("$$", "$$"), ("$", "$"), ("\\(", "\\)"), ("\\[", "\\]")):
        if rest.startswith(left):  # a math span: take exactly its content, unless "or" offers another value
            end = rest.find(right, len(left))
            if end < 0:
                return None
            answer, after = _clean(rest[len(left) : end]), rest[end + len(right) :]
            other = re.match(r"\s*(?:,\s*)?(?:or|otherwise)\s*\$([^$]*)\$", after)  # "$a$ or $b$": a hedge

            if other or re.match(r"\s*(?:,\s*)?(?:or|otherwise)\b", after):
                return answer if other and is_equiv(other.group(1), answer or "") else None
            return answer
    rest = rest.split("\n", 1)[0]
    rest = re.split(r"\.(?:\s|$)", rest, maxsplit=1)[0]  # end of the sentence (a decimal point is not followed by space)
    return _clean(rest)


def extract_answer(text: str, trusted: bool = False) -> str | None:
    """The final answer `text` commits to, or None. `trusted` (a dataset's own solution, not a policy's output): two
    boxes joined by "or" give the last one, as the dataset means it, instead of no answer.

    Order: the last `\\boxed{...}` / `\\fbox{...}` (balanced braces, or `\\boxed 5`); else what follows the last
    `####`; else what follows the last "answer is" ("The answer is 42.", "The final answer is $\\frac12$").
    An empty or unbalanced box, or text with no committed answer, gives None.
    """
    if not isinstance(text, str):
        return None
    if "\\boxed" in text or "\\fbox" in text:
        if not trusted and _two_boxes_or(text):
            return None  # "\boxed{4537} or \boxed{4536}": a hedge commits to no answer
        boxed = _last_boxed(text)
        return boxed.strip() or None if boxed is not None else None
    if "####" in text:
        return _after_hashes(text)
    return _after_phrase(text)


# -------------------------------------------------------------------------------------------------- normalisation

_UNWRAP = re.compile(r"\\(?:text|textbf|textit|mathrm|mathbf|mbox|operatorname)\s*\{([^{}]*)\}")
_DROP = re.compile(r"\\left|\\right|\\!|\\,|\\;|\\:|\\displaystyle|\\\$|\$|~|\\%|%|\{,\}")
_DEGREES = re.compile(r"\^\s*\{?\s*\\circ\s*\}?|\\circ|°|\\degree")
_UNITS = re.compile(  # trailing words after a number or a closing brace: `5 cm^2`, `18 dollars`, `\frac12 cup`, `18 m`
    r"(?<=[\d})])\s*(?:[A-Za-z]+\.?(?:\s+|$|(?=\^)))+(?:\^\s*\{?\d\}?\s*)?$"
)
_ASSIGN = re.compile(r"^\s*(?:[A-Za-z]|\\[a-z]+)(?:\([A-Za-z]\))?\s*(?:=(?!=)|\\in\b)")  # `x =`, `f(x) =`, `x \in`
_THOUSANDS = re.compile(r"[+-]?\d{1,3}(?:,\d{3})+(?:\.\d+)?")
# a thousands-separated integer that can only be one number: a denominator `/(5,525)`, or a whole `{5,525}` group
_THOUSANDS_INSIDE = re.compile(r"(?<=/\()\d{1,3}(?:,\d{3})+(?=\))|(?<=\{)\d{1,3}(?:,\d{3})+(?=\})")
# an integer directly followed by \frac{integer}{integer}, not part of a number, power, index or command before it
_MIXED = re.compile(r"(?<![\w.^_}\\])(\d+)\\frac\{(\d+)\}\{(\d+)\}")
# the words dropped after a value (`5 cm`, `\text{ square units}`); any other trailing words make an answer unreadable,
# so "4536 or more" or "4536 \text{ is not the answer}" never reads as 4536
UNITS = frozenset("""unit units square sq cubic cm mm km m meter meters metre metres centimeter centimeters inch inches in
    ft foot feet yd yard yards mile miles mi mph kg g gram grams lb lbs pound pounds oz ounce ounces l liter liters ml
    gallon gallons cup cups second seconds sec s minute minutes min hour hours hr hrs day days week weeks month months
    year years degree degrees dollar dollars cent cents percent""".split())
# Unicode a model (or `arith`'s own questions) may write for the LaTeX operators and plain spaces we parse
_UNICODE = str.maketrans({"×": " \\times ", "·": " \\cdot ", "⋅": " \\cdot ", "÷": " \\div ", "−": "-",
                          "\u00a0": " ", "\u2009": " ", "\u202f": " ", "\u200a": " ", "\u2002": " ", "\u2003": " "})


def normalize(answer: str) -> str:
    """A canonical spelling of an answer string (LaTeX noise, units, `x =` and separators removed)."""
    s = answer.translate(_UNICODE).strip()
    s = re.sub(r"\\[dtc]frac", r"\\frac", s)
    for _ in range(3):  # nested wrappers: \text{\textbf{C}}
        s = _UNWRAP.sub(r"\1", s)
    s = re.sub(r",\\!\s*", ",", s)  # `11,\! 111` is a thousands separator, never a list
    s = _DEGREES.sub("", _DROP.sub("", s))
    s = s.replace("\\le", "\\le ").replace("\\ge", "\\ge ")  # keep `\le5` from reading as a command `\le5`
    s = s.strip().rstrip(".").strip()
    m = _UNITS.search(s)
    if m and all(w.lower() in UNITS for w in re.findall(r"[A-Za-z]+", m.group(0))):
        s = s[: m.start()]
    parts = re.split(r",|\bor\b", s) if re.search(r",|\bor\b", s) else [s]
    if len(parts) > 1 and all(_ASSIGN.match(p) and p.count("=") <= 1 for p in parts):  # x = 1, x = 2 / x = 1 or x = 2
        s = ",".join(_ASSIGN.sub("", p) for p in parts)
    elif s.count("=") == 1 or (s.count("=") == 0 and "\\in" in s):
        s = _ASSIGN.sub("", s)
    s = s.strip()
    if _THOUSANDS.fullmatch(s):  # `2,500` but not `1, 2` or `(1,234)`: decided before spaces go
        s = s.replace(",", "")
    s = re.sub(r"\s+", "", s)
    s = re.sub(r"\\frac(\d)(\d)", r"\\frac{\1}{\2}", s)  # \frac12
    s = re.sub(r"\\frac(\d)\{", r"\\frac{\1}{", s)  # \frac1{2}
    s = re.sub(r"\\frac\{([^{}]*)\}(\d)", r"\\frac{\1}{\2}", s)  # \frac{1}2
    s = re.sub(r"\\sqrt(\d)", r"\\sqrt{\1}", s)  # \sqrt2
    s = _THOUSANDS_INSIDE.sub(lambda m: m.group(0).replace(",", ""), s)  # 12/(5,525)
    s = _MIXED.sub(_improper, s)  # 3\frac{1}{2} -> \frac{7}{2}; 23\frac{45}{1} stays a product (not a mixed number)
    return s


def _improper(m: re.Match) -> str:
    """A mixed number as one fraction, when it is one: 0 < numerator < denominator; else the text as it was."""
    whole, num, den = (int(g) for g in m.groups())
    return f"\\frac{{{whole * den + num}}}{{{den}}}" if 0 < num < den else m.group(0)


# ------------------------------------------------------------------------------------------------------ evaluator


class _ParseError(Exception):
    pass


_TOKEN = re.compile(r"\d+\.?\d*|\.\d+|\\[A-Za-z]+|\\\{|\\\}|[A-Za-z]|\S")
_FUNCS = {"\\sin": math.sin, "\\cos": math.cos, "\\tan": math.tan, "\\ln": math.log, "\\log": math.log10,
          "\\exp": math.exp}
_OPERATORS = {"\\cdot": "*", "\\times": "*", "\\div": "/"}


def _tokenize(s: str) -> list[str]:
    if re.search(r"[A-Za-z]{2,}", re.sub(r"\\[A-Za-z]+", " ", s)):
        raise _ParseError  # a word that is not a LaTeX command means text ("Tuesday"), not a product of variables
    tokens = _TOKEN.findall(s)
    if len(tokens) > MAX_TOKENS:
        raise _ParseError
    return [_OPERATORS.get(t, t) for t in tokens]


class _Parser:
    """Recursive descent over tokens -> a tiny AST of tuples:  ('num', Fraction) ('var', 'x') ('pi',) ('inf',)
    ('neg', a) ('+', a, b) ('-', a, b) ('*', a, b) ('/', a, b) ('^', a, b) ('sqrt', a, n) ('fn', name, a)."""

    def __init__(self, tokens: list[str]):
        self.toks, self.i, self.depth = tokens, 0, 0

    def peek(self) -> str | None:
        return self.toks[self.i] if self.i < len(self.toks) else None

    def take(self, expected: str | None = None) -> str:
        tok = self.peek()
        if tok is None or (expected is not None and tok != expected):
            raise _ParseError
        self.i += 1
        return tok

    def parse(self):
        tree = self.expr()
        if self.peek() is not None:
            raise _ParseError
        return tree

    def expr(self):
        self.depth += 1
        if self.depth > MAX_DEPTH:
            raise _ParseError
        tree = self.term()
        while self.peek() in ("+", "-"):
            op = self.take()
            tree = (op, tree, self.term())
        self.depth -= 1
        return tree

    def term(self):
        tree = self.unary()
        while True:
            tok = self.peek()
            if tok in ("*", "/"):
                self.take()
                tree = (tok, tree, self.unary())
            elif tok is not None and self.starts_atom(tok):  # implicit product: 2\sqrt{3}, 3x, (x+1)(x-1)
                tree = ("*", tree, self.power())
            else:
                return tree

    def unary(self):
        if self.peek() in ("+", "-"):
            sign = self.take()
            operand = self.unary()
            return ("neg", operand) if sign == "-" else operand
        return self.power()

    def power(self):
        base = self.atom()
        if self.peek() == "^":
            self.take()
            return ("^", base, self.unary() if self.peek() in ("+", "-") else self.power())
        return base

    @staticmethod
    def starts_atom(tok: str) -> bool:
        return tok[0].isdigit() or tok[0] == "." or tok.isalpha() or tok in ("(", "{", "\\frac", "\\sqrt", "\\pi") \
            or tok in _FUNCS

    def group(self):
        """A braced group, or a single token (`\\sqrt x`, `\\frac{1}x`)."""
        if self.peek() == "{":
            self.take()
            tree = self.expr()
            self.take("}")
            return tree
        return self.atom()

    def atom(self):
        tok = self.take()
        if tok in ("\\pi", "\\infty"):
            return (tok[1:],)
        if tok[0].isdigit() or tok[0] == ".":
            return ("num", Fraction(tok))
        if tok.isalpha() and len(tok) == 1:
            return ("var", tok)
        if tok in ("(", "{", "["):
            tree = self.expr()
            self.take({"(": ")", "{": "}", "[": "]"}[tok])
            return tree
        if tok == "\\frac":
            return ("/", self.group(), self.group())
        if tok == "\\sqrt":
            index = ("num", Fraction(2))
            if self.peek() == "[":
                self.take()
                index = self.expr()
                self.take("]")
            return ("sqrt", self.group(), index)
        if tok in _FUNCS:
            return ("fn", tok, self.power())
        raise _ParseError


def _pow(base, exp):
    if isinstance(base, Fraction) and isinstance(exp, Fraction) and exp.denominator == 1:
        size = max(abs(base.numerator), base.denominator).bit_length() * abs(exp.numerator)
        if size * 0.302 <= MAX_EXACT_DIGITS:  # exact, when the result has a sane number of digits
            return base ** int(exp)
    result = float(base) ** float(exp)  # may raise OverflowError or ZeroDivisionError: both mean "no value"
    if isinstance(result, complex):
        raise ValueError("complex power")
    return result


def _root(x, n):
    if isinstance(x, Fraction) and isinstance(n, Fraction) and n.denominator == 1 and 2 <= n <= 10 and x >= 0:
        num, den = round(float(x.numerator) ** (1 / int(n))), round(float(x.denominator) ** (1 / int(n)))
        if num ** int(n) == x.numerator and den ** int(n) == x.denominator:  # a perfect power stays exact
            return Fraction(num, den)
    if x < 0:
        raise ValueError("root of a negative number")
    return float(x) ** (1 / float(n))


def _evaluate(tree, env: dict[str, float]):
    """The value of an AST: a Fraction while every step is exact, else a float. Raises on division by zero etc."""
    kind = tree[0]
    if kind == "num":
        return tree[1]
    if kind == "var":
        return env[tree[1]]
    if kind == "pi":
        return math.pi
    if kind == "infty":
        return math.inf
    if kind == "neg":
        return -_evaluate(tree[1], env)
    if kind == "fn":
        return _FUNCS[tree[1]](float(_evaluate(tree[2], env)))
    a, b = _evaluate(tree[1], env), _evaluate(tree[2], env)
    if kind == "sqrt":
        return _bounded(_root(a, b))
    if kind == "^":
        return _bounded(_pow(a, b))
    return _bounded({"+": lambda: a + b, "-": lambda: a - b, "*": lambda: a * b, "/": lambda: a / b}[kind]())


def _bounded(x):
    """An exact value with more than MAX_EXACT_DIGITS digits goes on as a float (inf if it overflows): exact
    arithmetic on huge rationals is what an adversarial string would use to make a call run long."""
    if isinstance(x, Fraction) and max(abs(x.numerator), x.denominator).bit_length() > 3.33 * MAX_EXACT_DIGITS:
        try:
            return float(x)
        except OverflowError:
            return math.inf if x > 0 else -math.inf
    return x


def _variables(tree) -> set[str]:
    if tree[0] == "var":
        return {tree[1]}
    return set().union(*(_variables(t) for t in tree[1:] if isinstance(t, tuple)))


def _parse(s: str):
    try:
        return _Parser(_tokenize(s)).parse()
    except (_ParseError, ValueError, ZeroDivisionError, RecursionError):
        return None


def _close(a, b) -> bool:
    if isinstance(a, Fraction) and isinstance(b, Fraction):
        return a == b
    a, b = float(a), float(b)
    if math.isinf(a) or math.isinf(b) or math.isnan(a) or math.isnan(b):
        return a == b
    return abs(a - b) <= REL_TOL * max(abs(a), abs(b)) + 1e-12


_NO_VALUE = (ValueError, ZeroDivisionError, OverflowError, KeyError, TypeError, RecursionError)


def _equal_values(ta, tb) -> bool:
    """Compare two ASTs: exactly/numerically for constants, at SAMPLE_POINTS when they have variables."""
    names = sorted(_variables(ta) | _variables(tb))
    if not names:
        try:
            return _close(_evaluate(ta, {}), _evaluate(tb, {}))
        except _NO_VALUE:
            return False  # division by zero (or no value at all) equals nothing
    agreed = 0
    for k in range(len(SAMPLE_POINTS)):
        env = {name: SAMPLE_POINTS[(k + 2 * j) % len(SAMPLE_POINTS)] for j, name in enumerate(names)}
        try:
            va, vb = float(_evaluate(ta, env)), float(_evaluate(tb, env))
        except _NO_VALUE:
            continue  # outside the domain of one side (log of a negative, say): try the next point
        if not abs(va - vb) <= REL_TOL * max(1.0, abs(va), abs(vb)):
            return False
        agreed += 1
    return agreed >= 3


# ------------------------------------------------------------------------------------------------ equivalence


def _split_top(s: str, sep: str) -> list[str]:
    """Split on `sep` where it is outside every (), [], {} pair."""
    parts, depth, start, i = [], 0, 0, 0
    while i < len(s):
        if s[i] in "([{":
            depth += 1
        elif s[i] in ")]}":
            depth -= 1
        elif depth == 0 and s.startswith(sep, i):
            parts.append(s[start:i])
            start = i + len(sep)
            i = start
            continue
        i += 1
    return parts + [s[start:]]


def _closing_index(s: str) -> int:
    """Index of the bracket closing the one at s[0] (any bracket type), or -1."""
    depth = 0
    for i, c in enumerate(s):
        depth += c in "([{"
        depth -= c in ")]}"
        if depth == 0:
            return i
    return -1


# a number written as one: an integer or decimal, a fraction of two integers, or a mixed number (as `_MIXED` writes it)
_PLAIN_NUMBER = re.compile(r"(?:\d+\.?\d*|\.\d+)(?:/\(?\d+\)?)?|\\frac\{-?\d+\}\{-?\d+\}")


def _is_plain_number(s: str) -> bool:
    """Is normalised `s` a number written as a number, with any sign and enclosing parentheses? `-\\frac{7}{2}`,
    `(5)`, `12/(5525)` are; `81\\times56`, `2^{10}`, `\\sqrt{4}`, `\\pi`, `23+\\frac{45}{1}` are not."""
    s = s.lstrip("+-")
    while s.startswith("(") and _closing_index(s) == len(s) - 1:
        s = s[1:-1].lstrip("+-")
    return _PLAIN_NUMBER.fullmatch(s) is not None


def _equiv_norm(a: str, b: str) -> bool:
    if not a or not b:
        return False
    a, b = _last_side(a), _last_side(b)
    if a.startswith("\\{") and a.endswith("\\}") and "\\{" not in b:  # a set of solutions against a bare list
        a = a[2:-2]
    if b.startswith("\\{") and b.endswith("\\}") and "\\{" not in a:
        b = b[2:-2]
    pa, pb = _split_top(a, "\\cup"), _split_top(b, "\\cup")  # unions of intervals, in order
    if len(pa) > 1 or len(pb) > 1:
        return len(pa) == len(pb) and all(_equiv_norm(x, y) for x, y in zip(pa, pb))
    pa, pb = _split_top(a, ","), _split_top(b, ",")  # a bare list: the solutions, in any order
    if len(pa) > 1 or len(pb) > 1:
        return _equiv_sets(pa, pb)
    if a.startswith("\\{") and a.endswith("\\}") and b.startswith("\\{") and b.endswith("\\}"):
        return _equiv_sets(_split_top(a[2:-2], ","), _split_top(b[2:-2], ","))
    ta, tb = _tuple(a), _tuple(b)
    if ta or tb:  # (3,-1), [0,5): same bracket types, same elements in order
        return bool(ta and tb) and ta[0] == tb[0] and len(ta[1]) == len(tb[1]) and all(
            _equiv_norm(x, y) for x, y in zip(ta[1], tb[1]))
    if a == b:  # the same spelling is the same answer, unless it is a constant with no value (`1/0`)
        tree = _parse(a)
        return tree is None or bool(_variables(tree)) or _equal_values(tree, tree)
    letter_a, letter_b = re.fullmatch(r"\(?([A-Za-z])\)?", a), re.fullmatch(r"\(?([A-Za-z])\)?", b)
    if letter_a or letter_b:  # multiple choice: C == (C)
        return bool(letter_a and letter_b) and letter_a.group(1).upper() == letter_b.group(1).upper()
    if _is_plain_number(a) != _is_plain_number(b):  # `81\times56` is not an answer to "What is 81 x 56?"
        return False
    tree_a, tree_b = _parse(a), _parse(b)
    if tree_a is not None and tree_b is not None:
        if re.search(r"\d\.\d", a + b) and _exact_against_irrational(tree_a, tree_b):
            return False  # `1.4142135624 \cdot 1` is not \sqrt{2}: a decimal is exact, inside an expression too
        return _equal_values(tree_a, tree_b)
    return a.lower() == b.lower()  # text answers


def _last_side(s: str) -> str:
    """`81\\times56=4536` -> `4536`: a chain of equal values reads as its last side (a false chain as nothing); one
    with a variable (an equation to solve, `y=2x+3`) stays as it is."""
    sides = _split_top(s, "=")
    if len(sides) < 2 or any(not side for side in sides):
        return s
    trees = [_parse(side) for side in sides]
    if any(t is None or _variables(t) for t in trees):
        return s
    return sides[-1] if all(_equal_values(trees[0], t) for t in trees[1:]) else "\\text{false chain}"


def _exact_against_irrational(ta, tb) -> bool:
    """Is one constant exact (a Fraction) and the other not (a float: a root, pi, ...)?"""
    if _variables(ta) or _variables(tb):
        return False
    try:
        return isinstance(_evaluate(ta, {}), Fraction) != isinstance(_evaluate(tb, {}), Fraction)
    except _NO_VALUE:
        return False


def _is_bracketed(s: str) -> bool:
    return len(s) >= 2 and s[0] in "([" and s[-1] in ")]" and _closing_index(s) == len(s) - 1


def _tuple(s: str):
    """('()' or '(]' ..., [elements]) when s is a bracketed comma list, else None."""
    if not _is_bracketed(s):
        return None
    items = _split_top(s[1:-1], ",")
    return (s[0] + s[-1], items) if len(items) > 1 else None


def _equiv_sets(xs: list[str], ys: list[str]) -> bool:
    """Order-free matching: identical spellings pair off first, the few left are matched pairwise."""
    if len(xs) != len(ys):
        return False
    left_x, left_y = Counter(xs), Counter(ys)
    common = left_x & left_y
    left_x, left_y = list((left_x - common).elements()), list((left_y - common).elements())
    if len(left_x) > MAX_SET_PAIRING:  # pairing is quadratic: refuse rather than run long on hostile input
        return False
    for x in left_x:
        hit = next((i for i, y in enumerate(left_y) if _equiv_norm(x, y)), None)
        if hit is None:
            return False
        left_y.pop(hit)
    return True


def is_equiv(pred: str, gold: str) -> bool:
    """Do two answer strings denote the same answer? Never raises; False for empty or non-string input."""
    if not isinstance(pred, str) or not isinstance(gold, str):
        return False
    if len(pred) > MAX_ANSWER_CHARS or len(gold) > MAX_ANSWER_CHARS:
        return pred.strip() == gold.strip() != ""  # no real answer is this long: do no work on it
    try:
        if _contradicting_sides(pred, gold):
            return False
        return _equiv_norm(normalize(pred), normalize(gold))
    except Exception:  # untrusted text must never crash a training run: any surprise is "not equal"
        return False


_LONE_SIDE = re.compile(r"^\s*([A-Za-z])\s*=(?!=)(.*)$", re.DOTALL)


def _contradicting_sides(pred: str, gold: str) -> bool:
    """`normalize` drops a lone variable's `x =`; not when the gold names another variable (`x = 2x+3` for
    `y = 2x+3`: an answer may name the variable the gold names, or none)."""
    mp, mg = _LONE_SIDE.match(pred), _LONE_SIDE.match(gold)
    return bool(mp and mg and mp.group(1) != mg.group(1))


def score(completion: str, gold: str, question: str | None = None) -> float:
    """1.0 when the answer `completion` commits to is equivalent to `gold` and, given the `question`, does not restate
    it (`restates`); else 0.0. Without a question, only the first test."""
    pred = extract_answer(completion)
    if pred is None or not is_equiv(pred, gold):
        return 0.0
    return 0.0 if question is not None and restates(pred, gold, question) else 1.0


# A math span of the question: $...$, \(...\), \[...\], and in plain text an arithmetic expression ("81 × 56").
_MATH_SPAN = re.compile(r"\$\$(.+?)\$\$|\$(.+?)\$|\\\((.+?)\\\)|\\\[(.+?)\\\]", re.DOTALL)
_ARITHMETIC = re.compile(r"[\d(][\d\s.,()]*(?:[-+*/×÷^][\d\s.,()]*)+[\d)]")
_INTEGERS = re.compile(r"\d+")


def refused(completion: str, gold: str, question: str) -> bool:
    """Would `completion` have scored without its question, and is it refused for restating it? (Logged and marked, so
    a learner can watch a policy try.)"""
    pred = extract_answer(completion)
    return pred is not None and is_equiv(pred, gold) and restates(pred, gold, question)


def question_spans(question: str) -> list[str]:
    """The math spans of a question, each also split at a top-level `=` (both sides are spans): what an answer
    restating the question would copy. At most 40, each at most MAX_ANSWER_CHARS long (bounded time)."""
    spans = [next(g for g in m.groups() if g is not None) for m in _MATH_SPAN.finditer(question)]
    spans += _ARITHMETIC.findall(_MATH_SPAN.sub(" ", question))
    out = []
    for span in spans:
        out += [span] + (_split_top(span, "=") if "=" in span else [])
    return [s.strip() for s in out if s.strip() and len(s) <= MAX_ANSWER_CHARS][:40]


def restates(answer: str, gold: str, question: str) -> bool:
    """Does `answer` restate the question instead of answering it? The rule: it is not the gold's own spelling, and it
    equals one of the question's math spans in value *and* is written with the same integers (`\\frac{3}{20}` for
    "Write 3/20 as a decimal", `(x+5)(x+2)` for "Expand (x+2)(x+5)"). Why: a policy rewarded for copying the question
    learns to copy it; an answer that merely has the span's value in another form (`0.5` for "Simplify 2/4") is an
    answer. (`81 \\times 56` for "What is 81 x 56?" is refused earlier: a plain number equals only a plain number.)"""
    if normalize(answer) == normalize(gold):
        return False
    mine = Counter(_INTEGERS.findall(normalize(answer)))
    return any(Counter(_INTEGERS.findall(normalize(span))) == mine and is_equiv(answer, span)
               for span in question_spans(question))
