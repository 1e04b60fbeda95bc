"""The run around the step (engine/): the run folder, checkpoints, exact --resume, SIGTERM, locks, torchrun, LoRA."""
from __future__ import annotations

import itertools
import json
import math
import os
import re
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch
from transformers import AutoModelForCausalLM

import data
import dpo
import evaluate
import expo
import reward
import rollout
import train
from conftest import HERE, RESUME_ARGS, _args, _steps, tiny_llama
from engine import checkpoint, lora, run
from lab import compare


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
def test_resume_reproduces_the_uninterrupted_run(tiny_dir, tmp_path, uninterrupted_run, monkeypatch, capsys, cut):
    """A run stopped after 2 steps (cleanly, or killed mid-checkpoint, or killed later) and resumed to 4 steps has the
    uninterrupted run's weights and the same log: every step once, one before and one after evaluation; its closing
    lines compare against the logged "before" evaluation, as the uninterrupted run's do."""
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
    capsys.readouterr()
    _resume_and_match(tiny_dir, out, uninterrupted_run)
    evals = [json.loads(line) for line in open(out / "metrics.jsonl") if '"eval"' in line]
    assert [e["eval"] for e in evals] == ["before", "after"]
    before, after = (e["all"]["pass@1"] for e in evals)
    assert f"pass@1 {before:.3f} -> {after:.3f}" in capsys.readouterr().out
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


# ---------------------------------------------------------------------------------------- what the run says of itself

SUMMARY_REWARDS = [[[0, 0], [0, 0], [0, 0]], [[1, 0], [0, 0], [0, 0]], [[1, 1], [0, 0], [1, 0]]]  # [step][question][g]


@pytest.mark.exercise7
@pytest.mark.parametrize("drop", [False, True])
def test_the_closing_summary_counts_what_the_steps_logged(tiny_dir, tmp_path, monkeypatch, capsys, drop):
    """On a run with known groups and explanations, every count the closing summary prints is the truth and the sum of
    metrics.jsonl's: the steps in which *every* group was all wrong (not any), the groups read as [questions, G] (not
    [G, questions]), the explanations cut off (every one the budget stopped, whatever --drop_truncated then does) and
    those that reached the gold (counts, not shares times a batch)."""
    def rollouts(self, batch):  # 3 questions x G = 2; explanations: one right, one finished and wrong, one cut off
        G = self.cfg.num_generations
        roll = rollout.encode_targets(self.tokenizer, [expo.solve_prompt(e.question) for e in batch for _ in range(G)],
                                      [f"try {g}" for _ in batch for g in range(G)], self.turn_end)
        roll.prompt_index = torch.arange(len(batch)).repeat_interleave(G)
        explanations = rollout.encode_targets(self.tokenizer, [expo.explain_prompt(e.question, e.answer) for e in batch],
                                              [f"So \\boxed{{{batch[0].answer}}}.", "No idea.", "So the sum is"],
                                              self.turn_end)
        explanations.truncated = torch.tensor([False, False, True])
        return roll, torch.tensor(SUMMARY_REWARDS[self.step], dtype=torch.float).view(-1), explanations
    monkeypatch.setattr(train.Trainer, "rollouts", rollouts)
    train.main(_args(tiny_dir, tmp_path, "--batch_size", "3", "--steps", "3", "--no-eval_before",
                     *["--drop_truncated"] * drop))
    out, steps = capsys.readouterr().out, _steps(tmp_path)
    assert [s["all_wrong"] for s in steps] == pytest.approx([1, 2 / 3, 1 / 3])
    assert [s["all_right"] for s in steps] == pytest.approx([0, 0, 1 / 3])
    assert sum(s["explain_cut_off"] for s in steps) == 3 and sum(s["explain_reached"] for s in steps) == 3
    assert [s["explain_truncated"] for s in steps] == pytest.approx([1 / 3] * 3)
    assert "GRPO's term was exactly zero in 1 of 3 steps" in out, out
    assert "9 self-explanations sampled: 3 cut off by the budget, 3 reached the gold answer alone" in out, out
    assert f"{6 if drop else 9} self-explanation targets trained on, beta = 0.04: 6 finished explanations, " \
        f"{0 if drop else 3} cut off" in out, out


# ------------------------------------------------------------------------------------- every flag reaches its reader


def test_every_flag_of_train_py_is_read_by_the_code_that_runs():
    """Every field of train.Config is read as `cfg.<name>` outside the parser: a flag added and never read would
    parse, print in --help, and change nothing."""
    import dataclasses
    sources = "\n".join(p.read_text() for p in [*HERE.glob("*.py"), *HERE.glob("*/*.py")]
                        if p.parent.name not in ("tests", "docs") and not p.name.startswith("test_"))
    unread = [f.name for f in dataclasses.fields(train.Config) if not re.search(rf"\bcfg\.{f.name}\b", sources)]
    assert not unread, unread


def _beta_by_step(t, monkeypatch):
    seen, real = [], expo.microbatch_loss
    monkeypatch.setattr(expo, "microbatch_loss", lambda *a, **kw: seen.append((t.step, kw["beta"])) or real(*a, **kw))
    for _ in range(2):
        t.update(t.train_set[:2])
        t.step += 1
    return sorted(set(seen))


def _eval_budget(t, monkeypatch):
    seen, real = [], evaluate.evaluate
    monkeypatch.setattr(evaluate, "evaluate", lambda model, tok, ex, k, temp, budget, **kw: seen.append(budget) or
                        real(model, tok, ex, k, temp, budget, **kw))
    t.evaluate("before")
    return seen


def _refresh_steps(t, monkeypatch):
    stamps = []
    for _ in range(4):  # the same two questions every step: their explanations renewed every --dpo_refresh steps
        t.update(t.train_set[:2])
        stamps.append(sorted(v[0] for v in dpo.cache(t).values()))
        t.step += 1
    return stamps


STEPS = pytest.mark.exercise10  # the rows that run steps or evaluations
FLAG_EFFECTS = [  # (flags, what the code that reads the flag saw, expected)
    pytest.param(["--expert_style", "rpn"], lambda t, mp: t.train_set[0].solution,
                 data.load("arith", "train", levels=[2], expert_style="rpn")[0].solution, id="--expert_style rpn"),
    pytest.param(["--beta_schedule", "linear", "--steps", "2"], _beta_by_step, [(0, 0.04), (1, 0.02)], marks=STEPS,
                 id="--beta_schedule linear"),
    pytest.param(["--eval_max_new_tokens", "3"], _eval_budget, [3], marks=STEPS, id="--eval_max_new_tokens 3"),
    pytest.param(["--method", "expo_dpo", "--dpo_refresh", "2"], _refresh_steps, [[0, 0], [0, 0], [2, 2], [2, 2]],
                 marks=STEPS, id="--dpo_refresh 2"),
]


@pytest.mark.parametrize("flags, seen, expected", FLAG_EFFECTS)
def test_a_flag_reaches_the_code_that_reads_it(tiny_dir, tmp_path, monkeypatch, flags, seen, expected):
    """Set the flag, observe it where it is consumed: the training set's expert text, the beta each step trains with,
    the evaluation's budget, the step an ExP-DPO explanation was renewed at (a flag that stops at the parser fails)."""
    two = tmp_path / "two.jsonl"  # ExP-DPO's renewal needs questions seen again: a dataset of two
    two.write_text('{"question": "What is 2 + 3?", "answer": "5"}\n{"question": "What is 4 + 4?", "answer": "8"}\n')
    extra = ["--dataset", str(two), "--eval_limit", "1"] if "--dpo_refresh" in flags else []
    t = train.Trainer(train.parse_args(_args(tiny_dir, tmp_path / "run", *flags, *extra)))
    try:
        assert seen(t, monkeypatch) == expected
    finally:
        checkpoint.unlock(t.out)


# ------------------------------------------------------------------------------------------------------- checkpoints


def test_a_checkpoint_is_complete_only_when_every_file_it_needs_is_written(tiny_dir, tmp_path, monkeypatch):
    """Kill the writer of a checkpoint between any two of its writes: the newest checkpoint `latest` then finds is
    whole (weights, tokenizer, AdamW's state, trainer state) -- the earlier one, or the new one if it was done. (Writing
    AdamW's state after the file that marks a checkpoint complete leaves a "complete" one without it.)"""
    t = train.Trainer(train.parse_args(_args(tiny_dir, tmp_path, "--method", "grpo")))
    t.step = 1
    t.save()
    real = {"save_file": checkpoint.save_file, "write_text": Path.write_text, "rename": Path.rename,
            "model": type(t.model).save_pretrained, "tokenizer": type(t.tokenizer).save_pretrained}
    for k in itertools.count(1):
        writes = []

        def crashing(name):
            def write(*a, **kw):
                writes.append(name)
                if len(writes) == k:
                    raise Killed(f"write {k} ({name})")
                return real[name](*a, **kw)
            return write
        monkeypatch.setattr(checkpoint, "save_file", crashing("save_file"))
        for cls, name, attr in ((Path, "write_text", "write_text"), (Path, "rename", "rename"),
                                (type(t.model), "model", "save_pretrained"), (type(t.tokenizer), "tokenizer",
                                                                              "save_pretrained")):
            monkeypatch.setattr(cls, attr, crashing(name))
        t.step = 2
        try:
            t.save()
            done = True
        except Killed:
            done = False
        monkeypatch.undo()
        folder, state = checkpoint.latest(tmp_path)
        files = {p.name for p in folder.iterdir()}
        assert state["step"] in (1, 2) and {"model.safetensors", "tokenizer.json", "optimizer.safetensors",
                                            "trainer_state.json"} <= files, (k, writes, sorted(files))
        checkpoint.load_optimizer(folder, t.optimizer, state)
        if done:
            assert state["step"] == 2 and k > 4
            break
    checkpoint.unlock(t.out)


@pytest.mark.exercise10
def test_timed_checkpoints_come_every_save_every_minutes_on_a_fake_clock(tiny_dir, tmp_path, monkeypatch):
    """--save_every_minutes 2.5 with a clock that advances a minute a step: a checkpoint after steps 3 and 6 (and the
    final one), not after every step once the first timed save has happened (a timer never reset)."""
    now, saved = [0.0], []
    real_step, real_save = train.Trainer.train_step, train.Trainer.save
    monkeypatch.setattr(run.time, "monotonic", lambda: now[0])
    monkeypatch.setattr(train.Trainer, "train_step", lambda self: now.__setitem__(0, now[0] + 60) or real_step(self))
    monkeypatch.setattr(train.Trainer, "save", lambda self: saved.append(self.step) or real_save(self))
    train.main(_args(tiny_dir, tmp_path, "--method", "grpo", "--steps", "6", "--save_every_minutes", "2.5",
                     "--no-eval_before", "--eval_limit", "1", "--eval_k", "1"))
    assert saved == [3, 6, 6], saved
