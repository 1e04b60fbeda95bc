"""The teaching kit: a student copy of this repository, with the bodies of the functions that carry the method cut out.

    python -m lab.exercises ../expo-student                       # write the copy, then, inside it:
    python -m pytest -q -m exercise1                          # grade one exercise
    python -m pytest -q                                       # the whole suite

A function body that starts with a one-line comment `# exercise N: title` is an exercise. In the copy, everything from
that comment to the end of the function becomes `raise NotImplementedError("exercise N: title, see EXERCISES.md")`;
the signature and the docstring (the contract, often with a worked example) stay, and every other file and line is
copied unchanged, tests included. The reference implementation is the only source of the kit: nothing is kept twice.
EXERCISES.md is the guide; the tests of exercise N carry the pytest mark `exerciseN` (registered in conftest.py).
"""
from __future__ import annotations

import argparse
import ast
import re
import shutil
import sys
from dataclasses import dataclass
from pathlib import Path

MARKER = re.compile(r"^(\s*)# exercise (\d+): (.+)$")
SKIP = {".git", ".venv", "venv", "runs", "__pycache__", ".pytest_cache", ".hypothesis"}
STUDENT_FLAG = ".student-copy"  # written into the copy; the test that makes copies skips itself there


@dataclass(frozen=True)
class Exercise:
    number: int
    title: str
    file: str
    function: str
    first: int  # 1-based line of the marker comment
    last: int  # 1-based last line of the function


def find(source: str, file: str = "") -> list[Exercise]:
    """The exercises marked in one Python source, in order of appearance."""
    lines = source.split("\n")
    functions = [n for n in ast.walk(ast.parse(source)) if isinstance(n, (ast.FunctionDef, ast.AsyncFunctionDef))]
    found = []
    for i, line in enumerate(lines, start=1):
        m = MARKER.match(line)
        if m:
            inner = min((f for f in functions if f.lineno < i <= f.end_lineno), key=lambda f: f.end_lineno - f.lineno,
                        default=None)
            if inner is None:
                raise ValueError(f"{file}:{i}: an exercise marker outside any function")
            found.append(Exercise(int(m.group(2)), m.group(3).strip(), file, inner.name, i, inner.end_lineno))
    return found


def student_version(source: str, file: str = "") -> str:
    """`source` with each marked body replaced by a NotImplementedError naming its exercise."""
    lines = source.split("\n")
    for ex in reversed(find(source, file)):  # from the bottom up, so earlier line numbers stay valid
        indent = MARKER.match(lines[ex.first - 1]).group(1)
        message = f"exercise {ex.number}: {ex.title}, see EXERCISES.md"
        stub = f"{indent}raise NotImplementedError({message!r})"
        lines[ex.first - 1 : ex.last] = [stub]
    return "\n".join(lines)


def make_copy(src: Path, dst: Path) -> list[Exercise]:
    """Write the student copy of `src` into `dst` (new or empty); returns the exercises cut out."""
    if dst.exists() and any(dst.iterdir()):
        raise FileExistsError(f"{dst} is not empty: the student copy goes into a new folder")
    exercises = []
    for path in sorted(src.rglob("*")):
        rel = path.relative_to(src)
        if any(part in SKIP or part.endswith(".egg-info") for part in rel.parts) or path.suffix == ".pyc" \
                or dst.resolve() in (path.resolve(), *path.resolve().parents) or not path.is_file():
            continue
        target = dst / rel
        target.parent.mkdir(parents=True, exist_ok=True)
        if path.suffix == ".py" and not rel.name.startswith("test_"):
            text = path.read_text(encoding="utf-8")
            exercises += find(text, str(rel))
            target.write_text(student_version(text, str(rel)), encoding="utf-8")
        else:
            shutil.copy2(path, target)
    (dst / STUDENT_FLAG).write_text("made by exercises.py: the marked function bodies are cut out\n")
    return sorted(exercises, key=lambda e: (e.number, e.file, e.first))


def main(argv=None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("out", type=Path, help="a new (or empty) folder for the student copy")
    args = parser.parse_args(argv)
    try:
        exercises = make_copy(Path(__file__).resolve().parents[1], args.out)
    except FileExistsError as e:
        sys.exit(f"error: {e}")
    print(f"student copy in {args.out}: {len({e.number for e in exercises})} exercises")
    for e in exercises:
        print(f"  exercise {e.number:>2}  {e.file}:{e.function:<22} {e.title}")
    print(f"grade one:  cd {args.out} && python -m pytest -q -m exercise1")


if __name__ == "__main__":
    main()
