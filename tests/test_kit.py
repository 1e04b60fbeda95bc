"""The teaching kit: the notebook, the README's size promise, the floors of the house, the student copy."""
from __future__ import annotations

import json
import os
import re
import subprocess
import sys

import pytest
import torch

import conftest
import expo
import rollout
import train
from conftest import HERE, TWO_TEXTS, _args, fixed_rollouts
from lab import exercises


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
          ("dpo", "train"), ("lab",), ("scale",)]


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
        return subprocess.run([sys.executable, "-m", "pytest", "-q", "-p", "no:cacheprovider", *args],
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
