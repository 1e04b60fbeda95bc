"""How long one ExP-GRPO step reads: `Trainer.grpo_step` and every function and class it reaches, counted in lines.

    python -m lab.step_lines            # the files, the definitions reached, and the total

The rule, a static walk of the source (no code runs): start at train.py's `Trainer.grpo_step`; follow every call of
a function or method defined in the concept files (train.py, expo.py, rollout.py, data.py) -- `self.x(...)` to a
Trainer method, `expo.x(...)` / `rollout.x(...)` to a module function, a bare `x(...)` to one of the same file -- and
every class named there (`rollout.Rollouts`, `expo.Denominators`), whole. Not followed: engine/ and variants/ (the
speed, scale and research add-ons a first reading skips; the step calls each in one line), torch and transformers,
and the checker: `reward.score` counts as one call, since the verifier is its own concept (reward.py). A definition's
lines run from its `def` (or decorator) to its last line, docstring included.
"""
from __future__ import annotations

import argparse
import ast
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
FILES = ("train.py", "expo.py", "rollout.py", "data.py")


def definitions() -> dict[tuple[str, str], tuple[str, ast.AST]]:
    """(module, name) -> (file, node) for every top-level function and class, and ("Trainer", name) for its methods."""
    found = {}
    for file in FILES:
        module = file[:-3]
        for node in ast.parse((ROOT / file).read_text()).body:
            if isinstance(node, (ast.FunctionDef, ast.ClassDef)):
                found[(module, node.name)] = (file, node)
            if isinstance(node, ast.ClassDef) and node.name == "Trainer":
                for item in node.body:
                    if isinstance(item, ast.FunctionDef):
                        found[("Trainer", item.name)] = (file, item)
    return found


def references(node: ast.AST, module: str, owner: str | None) -> set[tuple[str, str]]:
    """The (module, name) pairs a definition refers to: self.x in a Trainer method, m.x for a concept module m, and
    bare names (looked up in the same module)."""
    out = set()
    for sub in ast.walk(node):
        if isinstance(sub, ast.Attribute) and isinstance(sub.value, ast.Name):
            base = sub.value.id
            if base == "self" and owner == "Trainer":
                out.add(("Trainer", sub.attr))
            elif base in {f[:-3] for f in FILES}:
                out.add((base, sub.attr))
        elif isinstance(sub, ast.Name):
            out.add((module, sub.id))
    return out


def reached(start=("Trainer", "grpo_step")) -> dict[tuple[str, str], tuple[str, int]]:
    """Every definition the step reaches: (module, name) -> (file, lines)."""
    table, seen, todo = definitions(), {}, [start]
    while todo:
        key = todo.pop()
        if key in seen or key not in table:
            continue
        file, node = table[key]
        first = min([node.lineno] + [d.lineno for d in getattr(node, "decorator_list", [])])
        seen[key] = (file, node.end_lineno - first + 1)
        owner = "Trainer" if key[0] == "Trainer" else None
        if isinstance(node, ast.ClassDef) and node.name == "Trainer":
            continue  # the class is reached through its methods, one by one
        todo.extend(references(node, file[:-3], owner))
    return seen


def main(argv=None) -> int:
    argparse.ArgumentParser(description=__doc__.split("\n\n")[0]).parse_args(argv)
    found = reached()
    by_file: dict[str, list[tuple[str, int]]] = {}
    for (module, name), (file, lines) in sorted(found.items(), key=lambda kv: kv[1][0]):
        by_file.setdefault(file, []).append((name, lines))
    total = 0
    for file, items in by_file.items():
        lines = sum(n for _, n in items)
        total += lines
        print(f"{file:<11} {lines:>4} lines  {', '.join(name for name, _ in sorted(items))}")
    print(f"one ExP-GRPO step: {total} lines in {len(by_file)} files, {len(found)} definitions "
          "(engine/, variants/ and the checker's internals not counted: see the docstring)")
    return total


if __name__ == "__main__":
    main()
