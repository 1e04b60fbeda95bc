r"""The verifier: read the answer a completion commits to, and decide whether it is the gold answer.

`score` is the only learning signal of GRPO and ExPO and decides every pass@k, and a policy will find any string that
scores. So the checker reads an answer as a grader does, into an expression tree, and compares trees, by value and
then by the form the question asks for; and it refuses the ways to score without answering, each a named rule (RULES).

    score(completion, gold, question)
      1. extract_answer   the last \boxed{} (else a `####` line, else the last "answer is"); "or" offers two values
      2. parse            the answer, the gold and the question's math spans into trees, by one grammar (below)
      3. RULES            0 if one holds: restates the question, offers two values, ...
      4. same_value       0 unless equal: exact rationals where it can, else numerically, at sample points in variables
      5. in_form          0 unless in the gold's kind of number and the form the question asks for (lowest terms, ...)

The grammar (`parse`, after `clean` has dropped LaTeX's spacing, sizing and font macros, read Unicode math as LaTeX,
joined thousands separators, and kept whitespace as a separator, so that `2 \cdot x` never becomes `\cdotx`):

    answer := chain ("," chain)* | chain ("or" chain)*   a list: the solutions, in any order
    chain  := [label ("=" | "\in")] union ("=" union)* [unit]   `x =`, `f(3) =`, `a_5 =`, `AB =` name the answer; a
                                                         chain of numbers reads as its last side, if all sides agree
    union  := sum ("\cup" sum)*                          in any order
    sum    := term (("+" | "-" | "\pm") term)*           `a \pm b` is the list a + b, a - b
    term   := ["-"] factor (("\cdot" | "\times" | "/" | "\div" | nothing) factor)*
    factor := atom ("^" atom | "!" | "%" | "°")*
    atom   := number | digits_base | letter[_index] | \pi | \infty | \frac a b | \sqrt[n] a | \binom a b | \sin a ...
            | ( answer ) | ( a , b ] | \{ answer \} | matrix | \text{...}

A mixed number is an integer and \frac{p}{q} with 0 < p < q; `1.2 \times 10^{6}` is a number; `1011_2` is in base 2.
A unit is a word of UNITS, or words in \text / \mbox / \mathrm after a value that claim nothing about it (NOT_UNITS);
a single letter is always a variable, never a unit. What does not parse is text, compared as text.

Model output is untrusted: nothing here raises, runs `eval`, or runs long. A call spends at most WORK_BUDGET units of
counted work (a token, a tree node evaluated, 64 bits of exact arithmetic), an exact value past MAX_EXACT_BITS goes
on as a float, and `last_work()` reports both.
"""
from __future__ import annotations

import functools
import math
import re
import unicodedata
from collections import Counter
from fractions import Fraction

# A rule refuses an answer that would otherwise score, because a policy rewarded for it would learn it instead of the
# answer: name -> (predicate on (answer tree, gold tree, question), why). The predicates follow `parse` below.
RULES = {
    "restates the question": (lambda p, g, q: restates(p, g, q),
                              "a copy of one of its math spans, padded (\\cdot 1, + 0, 06, 275.0) or reordered"),
    "offers two values": (lambda p, g, q: offers_two_values(p, g),
                          "`69 or 68`, two boxes joined by or, `$68$ (or $69$)`: a hedge between candidates"),
    "contradicts the gold's left side": (lambda p, g, q: contradicts_label(p, g),
                                         "`x = 2x + 3` for `y = 2x + 3` names another quantity"),
    "a percent only on the answer's side": (lambda p, g, q: percent_only_in_answer(p, g, q),
                                            "`0.25\\%` is 0.0025, not the probability 0.25 (unless a percent is asked)"),
}
MAX_ANSWER_CHARS = 1000  # a longer "answer" is compared as a plain string: no real answer is that long
MAX_DEPTH = 40  # nesting the parser accepts
MAX_EXACT_BITS = 16_000  # an exact value of more bits (~5,000 digits) goes on as a float
WORK_BUDGET = 6_000  # units of work a call may spend (a real answer spends a few hundred; a unit is ~1-5 us)
REL_TOL = 1e-9
# where expressions in variables are compared: spread out, so that domains like x >= 2 still leave several points
SAMPLE_POINTS = (0.5377, 1.8339, 2.2588, 0.8622, 1.3188, 3.5784, 4.7131, 6.2832, 9.4247, 12.5664, 25.1327)


def score(completion: str, gold: str, question: str | None = None) -> float:
    """1.0 when the answer `completion` commits to is `gold` (in value and form) and no rule refuses it, else 0.0.
    Without the `question` the rules and forms that read it are skipped (every caller in training passes it)."""
    return 1.0 if verdict(completion, gold, question) == "right" else 0.0


def verdict(completion: str, gold: str, question: str | None = None) -> str:
    """"right", "no answer", "wrong", "wrong form", or the name of the rule that refused the answer."""
    _WORK.spent = _WORK.largest = 0
    pred = extract_answer(completion)
    return "no answer" if pred is None else _judge(pred, gold, question or "", RULES)


def refused(completion: str, gold: str, question: str) -> str | None:
    """The rule that refused `completion`, or None: samples.md marks it, so that a learner can watch a policy try."""
    name = verdict(completion, gold, question)
    return name if name in RULES else None


def is_equiv(pred: str, gold: str) -> bool:
    """Do two answer strings name the same answer (value, the gold's kind of number and left side; no question)?"""
    left, _WORK.spent, _WORK.largest = "contradicts the gold's left side", 0, 0
    return isinstance(pred, str) and _judge(pred, gold, "", {left: RULES[left]}) == "right"


def _judge(pred: str, gold: str, question: str, rules: dict) -> str:
    """Steps 2-5 of `score` on an extracted answer, within the work budget."""
    try:
        if not isinstance(gold, str) or not pred.strip() or not gold.strip():
            return "no answer"
        if max(len(pred), len(gold)) > MAX_ANSWER_CHARS:
            return "right" if pred.strip() == gold.strip() else "wrong"
        p, g = parse(pred), parse(gold)
        refusal = next((name for name, (holds, _) in rules.items() if holds(p, g, question)), None)
        return refusal or ("wrong" if not same_value(p, g) else "right" if in_form(p, g, question) else "wrong form")
    except Exception:  # untrusted text never crashes a run: any surprise (the budget spent included) is "wrong"
        return "wrong"


def last_work() -> tuple[int, int]:
    """What the latest call spent: (units of work, at most WORK_BUDGET; bits of the largest exact value it held)."""
    return _WORK.spent, _WORK.largest


class _Work:
    """The latest call's work. `spend` raises _OutOfWork past WORK_BUDGET: the call then scores 0."""
    spent = largest = 0

    def spend(self, units: int = 1) -> None:
        if self.spent + units > WORK_BUDGET:
            raise _OutOfWork
        self.spent += units


class _OutOfWork(Exception):
    pass


_WORK = _Work()

# ---------------------------------------------------------------------------------------------------- extraction


def extract_answer(text: str, trusted: bool = False) -> str | None:
    r"""The final answer `text` commits to, or None: the last `\boxed{...}` / `\fbox{...}` (balanced braces, or
    `\boxed 5`), else what follows the last `####`, else what follows the last "answer is" ("The answer is $18." reads
    18). Two boxes joined by "or", or "the answer is $a$ (or $b$)", come back as `a \text{ or } b` (the rule "offers
    two values" refuses them), or as the last box when `trusted` (a dataset's own solution). An empty or unbalanced
    box, or no committed answer, gives None."""
    if not isinstance(text, str):
        return None
    last = max(text.rfind("\\boxed"), text.rfind("\\fbox"))
    if last >= 0:
        answer, _ = _box(text, last, len(text))
        before = max(text.rfind("\\boxed", 0, last), text.rfind("\\fbox", 0, last))
        if answer and before >= 0 and not trusted:
            other, end = _box(text, before, last)
            between = re.sub(r"\\text\s*\{|\\[()\[\]]|[\s$.,;:*(){}]", "", text[end:last]).lower()
            if other and between in ("or", "otherwise"):
                return f"{other} \\text{{ or }} {answer}"
        return answer
    if "####" in text:
        return _clean_answer(text[text.rfind("####") + 4 :].lstrip().split("\n", 1)[0])
    return _after_phrase(text)


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


def _box(text: str, start: int, end: int) -> tuple[str | None, int]:
    """(content or None if empty or unbalanced, where it ends) of the box at `start`, the last in text[start:end]."""
    span = boxed_span(text[start:end])
    if span is not None:
        return text[start + span[0] : start + span[1]].strip() or None, start + span[1] + 1
    i = start + (6 if text.startswith("\\boxed", start) else 5)
    m = re.match(r"[ \t]+([^\s$]+)", text[i : min(end, i + 200)])  # `\boxed 5`: one token
    return (m.group(1).rstrip(".,") or None, i + m.end()) if m else (None, end)


_PHRASE = re.compile(r"answer is\s*:?", re.IGNORECASE)
_HEDGE = re.compile(r"\s*(?:,\s*)?\(?\s*(?:or|otherwise)\b", re.IGNORECASE)  # "or $b$", "(or $b$)", "or so"


def _after_phrase(text: str) -> str | None:
    """What follows the last "answer is": a currency amount, a math span's content, or the rest of the sentence."""
    last = None
    for last in _PHRASE.finditer(text):
        pass
    if last is None:
        return None
    rest = text[last.end() : last.end() + 500].lstrip().lstrip("*").lstrip()
    money = re.match(r"\\?\$\s*(\d[\d,]*(?:\.\d+)?)(?=[.,;!]?(?:\s|$))", rest)
    if money:  # "The answer is $18." (GSM8K's money): no math span
        return money.group(1)
    for left, right in (("$$", "$$"), ("$", "$"), ("\\(", "\\)"), ("\\[", "\\]")):
        end = rest.find(right, len(left)) if rest.startswith(left) else -1
        if end >= 0:
            answer, after = _clean_answer(rest[len(left) : end]), rest[end + len(right) :]
            if _HEDGE.match(after):  # "$a$ or $b$", "$68$ (or $69$)", "$68$ or so": two values offered
                other = re.match(r"[^$\n]*?\$([^$\n]*)\$", after)
                return f"{answer} \\text{{ or }} {other.group(1) if other else '?'}"
            return answer
    return _clean_answer(re.split(r"\.(?:\s|$)", rest.split("\n", 1)[0], maxsplit=1)[0])  # to the sentence's end


def _clean_answer(answer: str) -> str | None:
    answer = re.sub(r"^\\?\$\s*", "", answer.strip().strip("*").strip())  # `#### $18`
    return answer.rstrip(".").strip().strip("$").strip() or None

# ------------------------------------------------------------------------------------------------------- parsing

_UNICODE = str.maketrans({"×": " \\times ", "·": " \\cdot ", "⋅": " \\cdot ", "÷": " \\div ", "−": "-", "–": "-",
                          "—": "-", "π": "\\pi ", "√": "\\sqrt ", "∞": "\\infty ", "±": "\\pm ", "∓": "\\mp ",
                          "∪": "\\cup ", "∈": "\\in ", "°": "°", "≤": "\\le ", "≥": "\\ge ",
                          **{c: f"^{{{d}}}" for d, c in enumerate("⁰¹²³⁴⁵⁶⁷⁸⁹")},
                          **{c: f"\\frac{{{p}}}{{{q}}}" for c, p, q in ("½12", "⅓13", "⅔23", "¼14", "¾34", "⅛18")}})
_NOISE = re.compile(r"\\(?:left|right)\.|\\(?:left|right|[Bb]igg?[lrm]?|displaystyle|textstyle|limits|!)(?![A-Za-z])"
                    r"|\\\$|\$|\\(?:mathbf|boldsymbol|bm|mathit|mathsf|mathbb|mathcal)(?![A-Za-z])")
_SPACE = re.compile(r"\\[,;: ]|\\q?quad(?![A-Za-z])|~")
_TEXT = re.compile(r"\\(?:text|textbf|textit|textrm|textnormal|mbox|mathrm|operatorname)\s*(?=\{)")
_THOUSANDS = re.compile(r"(?<=\d)(?:\{,\}|,\\!\s*|\\[,!]|[\u00a0\u2009\u202f])(?=\d{3}(?!\d))")  # 2{,}500, 2\,500
_THOUSANDS_GROUP = re.compile(r"(?<=[{(])\d{1,3}(?:,\d{3})+(?=[)}])")  # 12/(5,525), \frac{1}{5,525}: one number
_MATRIX = re.compile(r"\\(begin|end)\{[pbBvV]?matrix\}")


def clean(answer: str) -> str:
    """An answer string as the tokenizer reads it: Unicode math as LaTeX, full-width forms as ASCII, LaTeX's sizing,
    spacing and font macros gone (a space left where they separated), `\\dfrac` as `\\frac`, `\\frac12` as
    `\\frac{1}{2}`, degrees as `°`, matrices as ⟦ rows ⏎ ⟧, thousands separators joined (2,500 and 2{,}500 are 2500)."""
    s = answer.translate(_UNICODE)
    s = unicodedata.normalize("NFKC", s) if not s.isascii() else s
    s = _MATRIX.sub(lambda m: " ⟦ " if m.group(1) == "begin" else " ⟧ ", s).replace("\\\\", " ⏎ ")  # before `\ `
    s = _THOUSANDS_GROUP.sub(lambda m: m.group(0).replace(",", ""), _THOUSANDS.sub("", s))
    s = re.sub(r"\^\s*\{?\s*\\circ\s*\}?|\\circ|\\degree", "°", s)
    s = _TEXT.sub(r"\\text", _SPACE.sub(" ", _NOISE.sub(" ", s)).replace("\\%", "%"))
    s = re.sub(r"\\[dt](frac|binom)", r"\\\1", s)
    s = re.sub(r"\\(frac|binom)\s*(\d)\s*(\d)", r"\\\1{\2}{\3}", s)  # \frac12
    s = re.sub(r"\\(frac|binom)\s*(\d)\s*\{", r"\\\1{\2}{", s)  # \frac1{2}
    s = re.sub(r"\\(frac|binom)\s*(\{[^{}]*\})\s*(\d)", r"\\\1\2{\3}", s)  # \frac{1}2
    s = re.sub(r"\\[lr]brace", lambda m: "\\{" if m.group(0)[1] == "l" else "\\}", s)
    s = re.sub(r"\\(?:emptyset|varnothing)", "\\{\\}", s).strip().rstrip(".").strip()
    one = re.fullmatch(r"([A-Za-z]\s*=\s*)?([+-]?\d{1,3}(?:[, ]\d{3})+(?:\.\d+)?)", s)
    if one:  # "2,500", "x = 61,328" or "2 500" is one number; "1, 2" is two
        s = (one.group(1) or "") + one.group(2).replace(",", "").replace(" ", "")
    return s


_TOKEN = re.compile(r"\d+(?:\.\d+)?|\.\d+|\\text\{[^{}]*\}|\\[A-Za-z]+|\\[{}]|[A-Za-z]+|\S")
_FUNCTIONS = {"\\sin": math.sin, "\\cos": math.cos, "\\tan": math.tan, "\\sec": lambda x: 1 / math.cos(x),
              "\\csc": lambda x: 1 / math.sin(x), "\\cot": lambda x: 1 / math.tan(x), "\\arcsin": math.asin,
              "\\arccos": math.acos, "\\arctan": math.atan, "\\ln": math.log, "\\log": math.log10, "\\exp": math.exp}
_GREEK = frozenset("alpha beta gamma delta epsilon theta lambda mu phi psi omega sigma tau rho".split())
_OPERATORS = {"\\cdot": "*", "\\times": "*", "\\ast": "*", "\\div": "/", "\\cup": "∪", "\\in": "=", "\\pm": "±",
              "\\mp": "±"}
# the words dropped after a value (`5 cm`, `60 miles per hour`); any other bare word makes an answer text, so
# "4536 or more" never reads as 4536
UNITS = frozenset("""unit units square sq cubic cm mm km m meter meters metre metres centimeter centimeters kilometer
    kilometers kilometre kilometres millimeter millimeters inch inches in ft foot feet yd yard yards mile miles mi mph
    kph kg g gram grams kilogram kilograms mg lb lbs pound pounds oz ounce ounces ton tons tonne tonnes l liter liters
    litre litres ml gallon gallons quart quarts pint pints cup cups second seconds sec secs s minute minutes min mins
    hour hours hr hrs h day days week weeks month months year years degree degrees dollar dollars cent cents percent
    per acre acres hectare hectares radian radians""".split())
# words in \text after a value that make it a claim about the value, not a unit: `68 \text{ is not the answer}`
NOT_UNITS = frozenset("""is isn't not or and than more less least most about approximately roughly nearly over under
    answer wrong incorrect maybe perhaps probably possibly either neither no none if""".split())


def parse(answer: str) -> tuple:
    """An answer's tree (the grammar above), or ("text", its cleaned, lower-cased string) when it is not math."""
    s = clean(answer)
    try:
        return _settle(_Parser(_tokenize(s)).parse())
    except (_ParseError, ValueError, ZeroDivisionError, RecursionError, OverflowError):
        return ("text", re.sub(r"\s+", " ", re.sub(r"\\text\{([^{}]*)\}", r"\1", s)).strip().lower())


def _tokenize(s: str) -> list[str]:
    tokens = []
    for tok in _TOKEN.findall(s):
        _WORK.spend()
        word = tok[6:-1].strip().lower() if tok.startswith("\\text{") else ""
        tokens.append(word if word in ("or", "and") else _OPERATORS.get(tok, tok))
    return tokens


class _ParseError(Exception):
    pass


class _Parser:
    """Recursive descent over the tokens -> a tree of tuples: ("n", Fraction, "int" | "dec"), ("v", name), ("c", "pi" |
    "in"), ("neg" | "!" | "%" | "°", a), ("+" | "-" | "*" | "/" | "^" | "±" | "root" | "binom", a, b), ("f", name, a),
    ("mixed", whole, p, q), ("base", digits, b), ("unit", a, words), ("label", name, a), ("eq" | "list" | "or" | "set"
    | "∪", items), ("tuple", brackets, items), ("matrix", rows), ("text", s)."""

    def __init__(self, tokens: list[str]):
        self.toks, self.i, self.depth = tokens, 0, 0

    def peek(self, ahead: int = 0) -> str | None:
        return self.toks[self.i + ahead] if self.i + ahead < len(self.toks) else None

    def take(self, *expected: str) -> str:
        tok = self.peek()
        if tok is None or (expected and tok not in expected):
            raise _ParseError
        self.i += 1
        return tok

    def parse(self) -> tuple:
        tree = self.answer()
        if self.peek() is not None:
            raise _ParseError
        return tree

    def answer(self) -> tuple:
        self.depth += 1
        if self.depth > MAX_DEPTH:
            raise _ParseError
        items, seps = [self.chain()], set()
        while self.peek() in (",", ";", "or", "and"):
            seps.add(self.take())
            items.append(self.chain())
        self.depth -= 1
        return items[0] if len(items) == 1 else ("or" if seps == {"or"} else "list", tuple(items))

    def chain(self) -> tuple:
        label, sides = self.label(), [self.union()]
        while self.peek() == "=":
            self.take()
            sides.append(self.union())
        tree = sides[0] if len(sides) == 1 else ("eq", tuple(sides))
        tok = self.peek() or ""
        if tok[:6] == "\\text{" or (tok.isalpha() and len(tok) > 1 and tok not in ("or", "and")):
            tree = ("unit", tree, self.unit())
        return ("label", label, tree) if label else tree

    def label(self) -> str | None:
        """`x =`, `a_5 =`, `f(3) =`, `AB =`, `\\angle A =`, `x \\in` before the first top-level `=`: taken, and named."""
        depth = 0
        for j in range(self.i, min(len(self.toks), self.i + 12)):
            depth += {"(": 1, "[": 1, "{": 1, ")": -1, "]": -1, "}": -1}.get(self.toks[j], 0)
            if depth < 0 or self.toks[j] in (",", ";") or (depth == 0 and self.toks[j] == "="):
                break
        else:
            return None
        name = "".join(self.toks[self.i : j])
        if self.toks[j] != "=" or not re.fullmatch(r"[A-Za-z](?:_\{?\w+\}?)?(?:\([^()=]*\))?|[A-Z]{2,4}|"
                                                   r"m?\\angle[A-Z]{1,3}|\\overline\{[A-Z]{2}\}|\\[a-z]+", name):
            return None
        self.i = j + 1
        return name

    def union(self) -> tuple:
        items = [self.sum()]
        while self.peek() == "∪":
            self.take()
            items.append(self.sum())
        return items[0] if len(items) == 1 else ("∪", tuple(items))

    def sum(self) -> tuple:
        tree = self.term()
        while self.peek() in ("+", "-", "±"):
            tree = (self.take(), tree, self.term())
        return tree

    def term(self) -> tuple:
        if self.peek() in ("-", "+", "±"):  # a sign applies to the whole product: -2\frac{1}{4} is -(2 1/4)
            sign, inner = self.take(), self.term()
            return ("neg", inner) if sign == "-" else ("±", ("n", Fraction(0), "int"), inner) if sign == "±" else inner
        tree = self.factor()
        while True:
            tok, t = self.peek(), self.toks[self.i : self.i + 7]
            if tok in ("*", "/"):
                tree = (self.take(), tree, self.factor())
            elif tree[0] == "n" and tree[2] == "int" and t[:2] + t[3:5] + t[6:] == ["\\frac", "{", "}", "{", "}"] \
                    and (t[2] + t[5]).isdigit() and 0 < int(t[2]) < int(t[5]):  # a mixed number: 3\frac{1}{2}
                self.i += 7
                tree = ("mixed", tree[1], int(t[2]), int(t[5]))
            elif tok is not None and self.starts_atom(tok):  # juxtaposition: 2\sqrt{3}, 3x, (x+1)(x-1)
                tree = ("*", tree, self.factor())
            else:
                return tree

    @staticmethod
    def starts_atom(tok: str) -> bool:
        return tok[0].isdigit() or tok[0] == "." or (tok.isalpha() and tok.lower() not in UNITS | NOT_UNITS) \
            or tok in ("(", "{", "\\frac", "\\sqrt", "\\pi", "\\binom") or tok in _FUNCTIONS or tok[1:] in _GREEK

    def factor(self) -> tuple:
        tree = self.atom()
        while self.peek() in ("^", "!", "%", "°"):
            if self.take() != "^":
                tree = (self.toks[self.i - 1], tree)
            elif self.peek() in ("-", "+"):  # x^-1, 2^{-3}
                tree = ("^", tree, ("neg", self.group()) if self.take() == "-" else self.group())
            else:
                tree = ("^", tree, self.group())
        return tree

    def unit(self) -> str:
        """Words after a value: every bare word a unit (UNITS), or words in \\text that claim nothing (NOT_UNITS, no
        digit); `cm^2`, `km/h`."""
        words = []
        while (tok := self.peek()) is not None and (tok[:6] == "\\text{" or tok.isalpha() and len(tok) > 1 or
                                                    (words and tok in ("/", "^") and self.peek(1) is not None)):
            tok = self.take()
            if tok in ("/", "^"):
                words.append(tok + self.take())
                continue
            inside = tok[:6] == "\\text{"
            for word in re.findall(r"[A-Za-z'0-9]+", tok[6:-1] if inside else tok):
                if word.lower() in NOT_UNITS or not word.isalpha() or not (inside or word.lower() in UNITS):
                    raise _ParseError  # "4536 or more", `68 \text{ is not the answer}`: no unit, no answer
                words.append(word.lower())
        return " ".join(words)

    def group(self) -> tuple:
        """A braced group, or a single atom (`\\sqrt x`, `x^2`)."""
        if self.peek() != "{":
            return self.atom()
        self.take()
        tree = self.answer()
        self.take("}")
        return tree

    def atom(self) -> tuple:
        """One operand: a number, a constant, a variable, a bracket, \\frac / \\binom, a root, a function, a matrix, or
        the math inside \\text{}."""
        _WORK.spend()
        tok = self.take()
        if tok[0].isdigit() or tok[0] == ".":
            return self.number(tok)
        if tok in ("\\pi", "\\infty"):
            return ("c", tok[1:3])
        if tok.isalpha() or tok[1:] in _GREEK:
            return self.variable(tok)
        if tok in ("(", "[", "{", "\\{"):
            return self.bracket(tok)
        if tok in ("\\frac", "\\binom"):
            return ("/" if tok == "\\frac" else "binom", self.group(), self.group())
        if tok == "\\sqrt":
            index = ("n", Fraction(2), "int")
            if self.peek() == "[":
                self.take()
                index = self.answer()
                self.take("]")
            return ("root", self.group(), index)
        if tok in _FUNCTIONS:
            return ("f", tok, self.factor())
        if tok == "⟦":
            return self.matrix()
        if tok[:6] == "\\text{":  # \text{(C)}, \text{5}: the math inside; else the answer is text
            return _Parser(_tokenize(clean(tok[6:-1]))).parse()
        raise _ParseError

    def number(self, tok: str) -> tuple:
        """12, 0.5, or a number in base b: 1011_2, 1011_{2}."""
        if self.peek() != "_" or not tok.isdigit():
            return ("n", Fraction(tok), "dec" if "." in tok else "int")
        self.take()
        base = self.group()
        if base[0] != "n" or not 2 <= base[1] <= 36 or any(int(d, 36) >= base[1] for d in tok):
            raise _ParseError
        return ("base", tok.lstrip("0") or "0", int(base[1]))

    def variable(self, tok: str) -> tuple:
        """x, \\alpha, x_1, a_{10}; `xy` is a product of one-letter variables; a longer word is text."""
        if tok.isalpha() and len(tok) > 1:
            if len(tok) > 3 or tok.lower() in UNITS | NOT_UNITS:
                raise _ParseError
            return functools.reduce(lambda a, b: ("*", a, b), [("v", c) for c in tok])
        if self.peek() != "_":
            return ("v", tok)
        self.take()
        index = self.take()
        while index.count("{") > index.count("}") and self.peek() is not None:
            index += self.take()
        return ("v", f"{tok}_{index.strip('{}')}")

    def bracket(self, tok: str) -> tuple:
        """A parenthesis; a tuple or an interval: (1, 2], [0, 5); a set: \\{1, 2\\}."""
        inner = ("list", ()) if tok + (self.peek() or "") == "\\{\\}" else self.answer()
        close = self.take(*{"(": (")", "]"), "[": (")", "]"), "{": ("}",), "\\{": ("\\}",)}[tok])
        if tok == "\\{":
            return ("set", inner[1] if inner[0] in ("list", "or") else (inner,))
        if inner[0] == "list" and tok != "{":
            return ("tuple", tok + close, inner[1])
        if tok + close in ("(]", "[)"):
            raise _ParseError
        return inner

    def matrix(self) -> tuple:
        """A matrix: rows (⏎) of entries (&), up to ⟧."""
        rows = [[self.sum()]]
        while self.peek() in ("&", "⏎"):
            if self.take() == "⏎" and self.peek() != "⟧":  # a row ends (the last may end in ⏎ too)
                rows.append([])
            if self.peek() != "⟧":
                rows[-1].append(self.sum())
        self.take("⟧")
        return ("matrix", tuple(map(tuple, rows)))


def _settle(tree: tuple) -> tuple:
    """A chain of numbers reads as its last side when every side is equal (`81 \\times 56 = 4536` is 4536), as
    nothing when not; an equation in variables stays one."""
    if tree[0] in ("list", "or", "set", "∪"):
        return (tree[0], tuple(map(_settle, tree[1])))
    if tree[0] in ("label", "unit", "tuple"):
        return tree[:2] + (tuple(map(_settle, tree[2])) if tree[0] == "tuple" else _settle(tree[2]),)
    if tree[0] != "eq" or any(_variables(side) for side in tree[1]):
        return tree
    return tree[1][-1] if all(_equal_values(tree[1][0], side) for side in tree[1][1:]) else ("text", "a false chain")

# --------------------------------------------------------------------------------------------------------- rules


def restates(p: tuple, g: tuple, question: str) -> bool:
    """Is the answer one of the question's math spans, padding aside (`_canon`), and not the gold's own form?"""
    mine = _canon(p)
    return bool(question) and mine != _canon(g) and mine in _question_forms(question)


def offers_two_values(p: tuple, g: tuple) -> bool:
    """Two values joined by "or" where the gold is one value (a list of solutions may say "or")."""
    while p[0] == "label":
        p = p[2]
    return p[0] == "or" and _core(p)[0] == "list" and _core(g)[0] not in ("list", "set")


def contradicts_label(p: tuple, g: tuple) -> bool:
    """The answer names another variable than the gold: `x = 2x + 3` for `y = 2x + 3` (`f(x) =` passes)."""
    names = [t[1] for t in (p, g) if t[0] == "label" and re.fullmatch(r"[A-Za-z](?:_\w+)?", t[1])]
    return len(names) == 2 and names[0] != names[1]


def percent_only_in_answer(p: tuple, g: tuple, question: str) -> bool:
    """`0.25\\%` for a gold 0.25: a percent sign divides by 100, unless the question asks for a percent."""
    while p[0] in ("label", "unit"):
        p = p[2] if p[0] == "label" else p[1]
    return p[0] == "%" and bool(question) and not re.search(r"percent|%", question, re.IGNORECASE) and \
        not any(x[0] == "%" for x in _walk(g))


def canonical(answer: str) -> tuple:
    """An answer string's canonical tree (`_canon`): two spellings that differ only by padding have the same one."""
    _WORK.spent = _WORK.largest = 0
    return _canon(parse(answer))


def _canon(t: tuple) -> tuple:
    """A tree without what pads a copy: numbers by value (06, 6.0 and ６ are 6), factors of value 1 and terms of value
    0 in any spelling (\\cdot 1, + 0, \\frac{3}{3}), ^1, labels and units dropped; sums and products flattened and
    sorted, and the rational constants of a sum or product in variables folded into one ((2x + 2)/2 is x + 1)."""
    _WORK.spend()
    while t[0] in ("label", "unit", "°", "%"):
        t = t[2] if t[0] == "label" else t[1]
    kind = t[0]
    if kind == "n":
        return ("n", t[1])
    if kind == "neg":
        inner = _canon(t[1])
        return inner[1] if inner[0] == "neg" else ("n", -inner[1]) if inner[0] == "n" else ("neg", inner)
    if kind in ("+", "-", "*", "/"):
        op, identity = ("+", 0) if kind in ("+", "-") else ("*", 1)
        flat = [y for x in _split(t, op) if not _is_constant(x, identity)
                for y in (lambda c: c[1] if c[0] == op else (c,))(_canon(x))]
        if any(_variables(x) for x in flat):  # x + 4 - 2 is x + 2; 2(x+1)/2 is x + 1
            folded = (sum if op == "+" else math.prod)((x[1] for x in flat if x[0] == "n"), start=Fraction(identity))
            flat = [x for x in flat if x[0] != "n"] + ([("n", folded)] if folded != identity else [])
        return (op, tuple(sorted(flat, key=repr))) if len(flat) > 1 else flat[0] if flat else ("n", Fraction(identity))
    if kind == "^" and _is_constant(t[2], 1):
        return _canon(t[1])
    if kind in ("list", "or", "set", "∪"):
        return (kind, tuple(sorted(map(_canon, t[1]), key=repr)))
    return tuple(_canon(x) if isinstance(x, tuple) and x and isinstance(x[0], str) else
                 tuple(map(_canon, x)) if isinstance(x, tuple) else x for x in t)


def _split(t: tuple, op: str) -> list[tuple]:
    """The terms of a sum (a - b: a, -b) or the factors of a product (a / b: a, b^-1)."""
    if op == "+" and t[0] in ("+", "-"):
        return _split(t[1], op) + (_split(t[2], op) if t[0] == "+" else [("neg", t[2])])
    if op == "*" and t[0] in ("*", "/"):
        return _split(t[1], op) + (_split(t[2], op) if t[0] == "*" else [("^", t[2], ("n", Fraction(-1), "int"))])
    return [t]


def _is_constant(t: tuple, value: int) -> bool:
    try:
        return not _variables(t) and _value(t, {}) == value
    except _NO_VALUE:
        return False


_QUESTION_FORMS: dict[str, frozenset] = {}
# A math span of the question: $...$, \(...\), \[...\], and in plain text an arithmetic expression ("81 × 56").
_MATH_SPAN = re.compile(r"\$\$(.+?)\$\$|\$(.+?)\$|\\\((.+?)\\\)|\\\[(.+?)\\\]", re.DOTALL)
_ARITHMETIC = re.compile(r"[\d(][\d\s.,()]*(?:[-+*/×÷^][\d\s.,()]*)+[\d)]")


def _question_forms(question: str) -> frozenset:
    """The canonical trees of the question's math spans, each also split at `=` (at most 40, each at most
    MAX_ANSWER_CHARS long), kept for the question's next rollouts."""
    if question not in _QUESTION_FORMS:
        spans = [next(g for g in m.groups() if g is not None) for m in _MATH_SPAN.finditer(question)]
        spans += _ARITHMETIC.findall(_MATH_SPAN.sub(" ", question))
        spans = [s.strip() for span in spans for s in [span, *(span.split("=") if "=" in span else [])]]
        if len(_QUESTION_FORMS) > 256:
            _QUESTION_FORMS.clear()
        _QUESTION_FORMS[question] = frozenset(_canon(parse(s)) for s in spans[:40] if 0 < len(s) <= MAX_ANSWER_CHARS)
    return _QUESTION_FORMS[question]

# -------------------------------------------------------------------------------------------------------- values


def same_value(p: tuple, g: tuple) -> bool:
    """Do two trees have the same value? Labels, units and degree and percent signs aside (the rules judge them);
    numbers exactly as rationals (a decimal never equals an irrational), expressions in variables at sample points,
    lists and sets in any order (`a \\pm b` is the list a + b, a - b), unions in any order, tuples, intervals and
    matrices entry by entry, equations up to a constant factor, text as text."""
    return _same(_core(p), _core(g))


def _core(t: tuple) -> tuple:
    """The value a tree names: without its label, unit, degree or percent sign; `a \\pm b` as a list; two values
    offered with "or" that are one value, that value."""
    while t[0] in ("label", "unit", "°", "%"):
        t = t[2] if t[0] == "label" else t[1]
    if t[0] in ("list", "or", "set"):
        items = tuple(map(_core, t[1]))
        if t[0] == "or" and all(_same(items[0], x) for x in items[1:]):
            return items[-1]
        return ("set" if t[0] == "set" else "list", items)
    options = _expand_pm(t)
    return options[0] if len(options) == 1 else ("list", tuple(options))


def _expand_pm(t: tuple) -> list[tuple]:
    """The trees `t` names with each ± read both ways (at most 4)."""
    if t[0] in ("±", "+", "-", "*", "/", "^", "root", "binom"):
        return [(op, x, y) for x in _expand_pm(t[1]) for y in _expand_pm(t[2])
                for op in ("+-" if t[0] == "±" else [t[0]])][:4]
    if t[0] in ("neg", "!", "f"):
        return [t[:-1] + (x,) for x in _expand_pm(t[-1])]
    return [t]


def _same(a: tuple, b: tuple) -> bool:
    _WORK.spend()
    kinds = {a[0], b[0]}
    if kinds & {"list", "set", "∪"}:
        return (len(kinds) == 1 or kinds == {"list", "set"}) and _same_multiset(a[1], b[1])
    if kinds & {"tuple", "matrix", "eq", "text"}:
        if len(kinds) > 1:
            return False
        if a[0] == "tuple":  # (3, -1), [0, 5): the same brackets, the same entries in order
            return a[1] == b[1] and len(a[2]) == len(b[2]) and all(map(_same, a[2], b[2]))
        if a[0] == "matrix":
            return list(map(len, a[1])) == list(map(len, b[1])) and all(map(_same, sum(a[1], ()), sum(b[1], ())))
        if a[0] == "eq":  # 2x + 3y = 6 and 4x + 6y = 12: the sides' differences in a constant ratio
            return len(a[1]) == len(b[1]) == 2 and _equal_values(("-", *a[1]), ("-", *b[1]), ratio=True)
        return a[1] == b[1]
    if "base" in kinds:  # 1011_2 is answered by 1011_2, 1011_{2} or its digits 1011, never by its value 11
        mine, other = (a, b) if a[0] == "base" else (b, a)
        return mine[1:] == other[1:] if other[0] == "base" else other[0] == "n" and str(other[1]) == mine[1]
    return _equal_values(a, b)


def _same_multiset(xs: tuple, ys: tuple) -> bool:
    """Order-free matching: identical trees pair off first, the rest pairwise (at most 16 left: bounded)."""
    common = Counter(xs) & Counter(ys)
    left_x, left_y = list((Counter(xs) - common).elements()), list((Counter(ys) - common).elements())
    if len(xs) != len(ys) or len(left_x) > 16:
        return False
    for x in left_x:
        hit = next((i for i, y in enumerate(left_y) if _same(x, y)), None)
        if hit is None:
            return False
        left_y.pop(hit)
    return True


_NO_VALUE = (ValueError, ZeroDivisionError, OverflowError, KeyError, TypeError, RecursionError)


def _equal_values(a: tuple, b: tuple, ratio: bool = False) -> bool:
    """Constants: exactly, or to REL_TOL when one is irrational (a decimal literal never equals an irrational). In
    variables: at SAMPLE_POINTS, at least 3 inside both domains, all agreeing (`ratio`: in one nonzero ratio)."""
    names = sorted(_variables(a) | _variables(b))
    values = []
    for k in range(len(SAMPLE_POINTS) if names else 1):
        env = {name: SAMPLE_POINTS[(k + 2 * j) % len(SAMPLE_POINTS)] for j, name in enumerate(names)}
        try:
            va, vb = _value(a, env), _value(b, env)
        except _NO_VALUE:
            if not names:
                return False  # no value (1/0) equals nothing
            continue  # outside one side's domain (the log of a negative, say): the next point
        if not names and a == b:
            return True  # the same tree: \frac{1}{2004!} is \frac{1}{2004!}, whatever its float
        if not names and isinstance(va, Fraction) != isinstance(vb, Fraction) and _decimal_in(a, b):
            return False  # `1.4142135624 \cdot 1` is not \sqrt{2}: a decimal is exact
        values.append((va, vb))
    if ratio:  # equations: the two differences in one nonzero ratio at every point
        ratios = [va / vb for va, vb in values if vb]
        values = [(r, ratios[0]) for r in ratios] if len(ratios) == len(values) and ratios and ratios[0] else []
    return len(values) >= (3 if names else 1) and all(_close(x, y) for x, y in values)


def _close(a, b) -> bool:
    if isinstance(a, Fraction) and isinstance(b, Fraction):
        return a == b
    a, b = float(a), float(b)
    return a == b if not (math.isfinite(a) and math.isfinite(b)) else abs(a - b) <= REL_TOL * max(1, abs(a), abs(b))


def _value(t: tuple, env: dict):
    """The value of an arithmetic tree: a Fraction while every step is exact, else a float; raises for no value."""
    _WORK.spend()
    kind = t[0]
    if kind in ("n", "v", "c", "mixed", "base"):
        return t[1] if kind == "n" else env[t[1]] if kind == "v" else {"pi": math.pi, "in": math.inf}[t[1]] \
            if kind == "c" else t[1] + Fraction(t[2], t[3]) if kind == "mixed" else Fraction(int(t[1], t[2]))
    if kind in ("neg", "°", "%", "unit"):  # a degree or percent sign is a mark, not a value: the rules judge it
        return -_value(t[1], env) if kind == "neg" else _value(t[1], env)
    if kind == "!":
        n = _value(t[1], env)
        if not (isinstance(n, Fraction) and n.denominator == 1 and n >= 0):
            raise ValueError("factorial")
        return math.inf if math.lgamma(n + 1) > MAX_EXACT_BITS * math.log(2) else _bounded(math.factorial(int(n)))
    if kind == "f":
        return _FUNCTIONS[t[1]](float(_value(t[2], env)))
    if kind not in ("+", "-", "*", "/", "^", "root", "binom"):
        raise TypeError(kind)  # a list, a tuple, text: no single value
    a, b = _value(t[1], env), _value(t[2], env)
    if kind == "binom":
        if not all(isinstance(x, Fraction) and x.denominator == 1 and 0 <= x <= 10_000 for x in (a, b)):
            raise ValueError("binomial")
        return _bounded(math.comb(int(a), int(b)))
    if kind in ("^", "root"):
        return _bounded(_pow(a, b) if kind == "^" else _root(a, b))
    return _bounded(a + b if kind == "+" else a - b if kind == "-" else a * b if kind == "*" else a / b)


def _pow(base, exp):
    if isinstance(base, Fraction) and isinstance(exp, Fraction) and exp.denominator == 1 and \
            (base.numerator.bit_length() + base.denominator.bit_length()) * abs(exp.numerator) <= MAX_EXACT_BITS:
        return base ** int(exp)  # exact, at a sane size
    result = float(base) ** float(exp)  # may raise OverflowError or ZeroDivisionError: both mean "no value"
    if isinstance(result, complex):
        raise ValueError("complex power")
    return result


def _root(x, n):
    if isinstance(x, Fraction) and isinstance(n, Fraction) and n.denominator == 1 and 2 <= n <= 10 and x >= 0:
        num, den = (round(float(v) ** (1 / int(n))) for v in (x.numerator, x.denominator))
        if num ** int(n) == x.numerator and den ** int(n) == x.denominator:  # a perfect power stays exact
            return Fraction(num, den)
    if x < 0:
        raise ValueError("root of a negative number")
    return float(x) ** (1 / float(n))


def _bounded(x):
    """Exact arithmetic costs work by its size; past MAX_EXACT_BITS it goes on as a float (inf if it overflows)."""
    if not isinstance(x, (Fraction, int)):
        return x
    x = Fraction(x)
    bits = x.numerator.bit_length() + x.denominator.bit_length()
    _WORK.spend(bits // 64)
    _WORK.largest = max(_WORK.largest, bits)
    if bits <= MAX_EXACT_BITS:
        return x
    try:
        return float(x)
    except OverflowError:
        return math.inf if x > 0 else -math.inf


def _walk(t):
    """Every subtree of `t`, `t` first."""
    if isinstance(t, tuple) and t and isinstance(t[0], str):
        yield t
        t = t[1:]
    for x in t if isinstance(t, tuple) else ():
        if isinstance(x, tuple):
            yield from _walk(x)


def _variables(t: tuple) -> set[str]:
    return {x[1] for x in _walk(t) if x[0] == "v"}


def _decimal_in(*trees) -> bool:
    return any(x[0] == "n" and x[2:] == ("dec",) for t in trees for x in _walk(t))

# ---------------------------------------------------------------------------------------------------------- form

# What a question's words ask of its answer's form.
_ASKS = {"lowest terms": r"lowest terms|simplest form|common fraction|reduced fraction|\bsimplify",
         "decimal": r"\bdecimal|nearest (?:tenth|hundredth|thousandth)", "rationalized": r"rationali[sz]e",
         "radical": r"simplest radical form|\bsimplify", "expanded": r"\bexpand", "factored": r"\bfactor\b(?! of)"}


def in_form(p: tuple, g: tuple, question: str) -> bool:
    """Is the answer in the gold's kind of number and the form the question asks for? A number equals only a number
    (`81 \\times 56` restates "What is 81 x 56?"); fractions are in lowest terms where the gold's are or the question
    asks; a decimal, a rationalised denominator, the simplest radical form, an expanded or a completely factored
    polynomial where the question asks (half the work is not the answer: \\frac{28}{49} for "Simplify 56/98")."""
    a, b = _core(p), _core(g)
    items_a, items_b = (a[1], b[1]) if a[0] in ("list", "set") and b[0] in ("list", "set") else ((a,), (b,))
    asked = {form for form, words in _ASKS.items() if re.search(words, question, re.IGNORECASE)}
    fractions_b = [f for f in _walk(b) if _is_fraction(f)]
    reduced = "lowest terms" in asked or (fractions_b and all(map(_reduced, fractions_b)))
    return not (all(map(_is_number, items_b)) != all(map(_is_number, items_a))
                or (reduced and not all(_reduced(f) for f in _walk(a) if _is_fraction(f)))
                or ("decimal" in asked and b[0] == "n" and a[0] != "n")
                or ({"rationalized", "radical"} & asked and any(map(_denominator_root, _walk(a))))
                or ("radical" in asked and not all(_simplest_root(x) for x in _walk(a) if x[0] == "root"))
                or ("expanded" in asked and _variables(b) and not _expanded(a))
                or ("factored" in asked and _variables(b) and _factor_count(a) < _factor_count(b)))


def _is_number(t: tuple) -> bool:
    """A number written as one: an integer or decimal, a fraction of two, a mixed number, 1.2 \\times 10^{6}, a base-b
    number, with any sign; not `81 \\times 56`, `2^{10}`, `\\sqrt{4}` or `23+\\frac{45}{1}`."""
    while t[0] == "neg":
        t = t[1]
    if t[0] == "/":
        return all(_is_number(x) and x[0] != "/" for x in t[1:])
    return t[0] in ("n", "mixed", "base") or (t[0] == "*" and t[1][0] == "n" and t[2][:2] == ("^", ("n", 10, "int"))
                                              and _is_number(t[2][2]) and t[2][2][0] != "/")


def _is_fraction(t: tuple) -> bool:
    return (t[0] == "/" and all(x[0] == "n" and x[2] == "int" for x in t[1:])) or t[0] == "mixed"


def _reduced(t: tuple) -> bool:
    p, q = (t[1][1], t[2][1]) if t[0] == "/" else (t[2], t[3])
    return q > 1 and math.gcd(int(p), int(q)) == 1


def _denominator_root(t: tuple) -> bool:
    return (t[0] == "/" and any(x[0] == "root" for x in _walk(t[2]))) or \
        (t[0] == "^" and t[1][0] == "root" and t[2][0] == "neg")


def _simplest_root(t: tuple) -> bool:
    """\\sqrt{n} with no square factor (\\sqrt[3]{n}: no cube factor); a root of anything but an integer passes."""
    if t[1][0] != "n" or t[2][0] != "n" or t[1][1].denominator != 1 or not 1 < t[1][1] < 10**9:
        return t[1][:2] != ("n", 1)
    n, k = int(t[1][1]), int(t[2][1])
    return all(n % d**k for d in range(2, int(round(n ** (1 / k))) + 2))


def _expanded(t: tuple) -> bool:
    """No product or power of a sum in variables: `x^2 + 7x + 10`, not `(x+2)(x+5)`."""
    def sum_in_variables(x: tuple) -> bool:
        return x[0] in ("+", "-") and bool(_variables(x))
    return not any((x[0] == "*" and (sum_in_variables(x[1]) or sum_in_variables(x[2]))) or
                   (x[0] == "^" and sum_in_variables(x[1])) for x in _walk(t))


def _factor_count(t: tuple) -> int:
    """Factors in variables of a product, a power counted by its exponent: 3(x-5)(x+5) has 2, 3(x^2-25) has 1."""
    while t[0] == "neg":
        t = t[1]
    if t[0] == "*":
        return _factor_count(t[1]) + _factor_count(t[2])
    if t[0] == "^" and t[2][0] == "n" and t[2][1].denominator == 1:
        return _factor_count(t[1]) * int(t[2][1])
    return 1 if _variables(t) else 0
