"""The run folder: checkpoints written atomically in safetensors, the newest complete one found again, and the logs cut
back to it on --resume, so that a resumed run leaves exactly the files an uninterrupted run would have.

    runs/expo-arith/
        config.json         the flags the run started with                (written once, at the start)
        metrics.jsonl       one JSON line per step, plus eval lines       (train.py appends)
        eval_samples.jsonl  every evaluation's completions, per question  (train.py appends; evaluate.py --rescore)
        samples.md          readable rollouts and training targets        (train.py appends)
        curve.png           when matplotlib is installed                  (train.py rewrites at the end)
        checkpoint/         model + tokenizer (from_pretrained loads it), optimizer.safetensors, trainer_state.json

Rules, each for a reason:
* A fresh run never writes into a folder that holds a run: it would append to that run's logs and replace its
  checkpoint. `claim` refuses, and names the two ways on (--resume, --overwrite).
* A checkpoint is complete once its trainer_state.json exists: that file is written last, under a temporary name, then
  renamed. `save` writes a whole new folder, then swaps it in with two renames; a crash between them leaves a complete
  copy under another name, and `latest` looks at all three names and takes the newest complete one.
* On --resume the logs are cut back to the checkpoint's step (`truncate_logs`): steps run after the checkpoint by the
  interrupted process are replayed, and must not appear twice.
* One process at a time: a run holds a kernel lock on `out/.lock` (`flock`; the file names its PID and host) while
  it uses the folder, so a second process (a fresh run, --resume or --overwrite) is refused before it touches a
  file. The kernel releases the lock when its process ends, even by SIGKILL, so a dead run's lock never blocks.
* SIGTERM (what schedulers and `timeout` send before a kill) and SIGINT (Ctrl-C) stop a run cleanly (`StopSignals`):
  a checkpoint of the completed steps, then exit 143 or 130, as a shell reports those signals. --save_every_minutes
  bounds what a hard kill (SIGKILL, a crash) can lose.
* --resume continues the *same* run (`check_config`): flags that say what the run is (method, model, data, seed,
  objective, sampling) must equal the checkpoint's; flags of how long it trains and how it is evaluated, saved and
  placed (MAY_CHANGE) may differ, and each change is listed.
"""
from __future__ import annotations

import fcntl
import json
import os
import re
import shutil
import signal
import socket
from pathlib import Path

import torch
from safetensors.torch import load_file, save_file

NAMES = ("checkpoint", ".checkpoint-tmp", ".checkpoint-old")  # the live one, one being written, one being replaced
RUN_FILES = ("metrics.jsonl", "eval_samples.jsonl", "samples.md", "curve.png", "config.json", *NAMES)


LOCK = ".lock"
# Config fields a resumed run may change: how long it trains, how it is evaluated and saved, where it runs (the same
# gradient in micro-batches or with recomputed activations). Any other field is what the run *is*.
MAY_CHANGE = ("steps", "eval_every", "eval_before", "eval_k", "eval_temperature", "eval_limit", "eval_max_new_tokens",
              "eval_seed", "save_every", "save_every_minutes", "output_dir", "resume", "overwrite", "device",
              "grad_accum", "gradient_checkpointing")


class RunFolderError(Exception):
    """The run folder cannot be used as asked (held by a live process, a run of other flags): a one-line reason."""


_HELD: dict[Path, int] = {}  # lock file -> the descriptor this process holds its flock through


def lock(out: Path) -> None:
    """Hold `out/.lock` for this process, or raise RunFolderError naming the live process that does.

    The lock is the kernel's (`fcntl.flock` on the file), not the file's existence: it is released when its process
    ends, however it ends, so a lock left by a dead process is free without any judgement of staleness, and two
    processes racing for it cannot both win. The file holds the holder's PID and host, for the error message.
    """
    out.mkdir(parents=True, exist_ok=True)
    path = (out / LOCK).resolve()
    if path in _HELD:
        return  # this process holds it already (one process runs its trainers one after another)
    for _ in range(10):
        fd = os.open(path, os.O_CREAT | os.O_RDWR, 0o644)
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            holder = os.read(fd, 256).decode(errors="replace").split()
            os.close(fd)
            who = f"process {holder[0]} on {holder[1]}" if len(holder) == 2 else "another process"
            raise RunFolderError(f"{out} is in use by {who} (lock file {path}); wait for it to end") from None
        try:
            current = os.stat(path).st_ino == os.fstat(fd).st_ino
        except FileNotFoundError:
            current = False
        if current:
            os.ftruncate(fd, 0)
            os.write(fd, f"{os.getpid()} {socket.gethostname()}".encode())
            _HELD[path] = fd
            return
        os.close(fd)  # the holder removed this file as we opened it: lock the one that replaced it
    raise RunFolderError(f"{path}: could not take the lock")


def unlock(out: Path) -> None:
    """Release the lock if this process holds it (the file is removed first, then the flock released)."""
    path = (out / LOCK).resolve()
    fd = _HELD.pop(path, None)
    if fd is not None:
        path.unlink(missing_ok=True)
        os.close(fd)


def check_config(out: Path, config: dict) -> list[str]:
    """The changes of a resumed run's flags against its checkpoint's (`--name old -> new`, MAY_CHANGE ones only);
    RunFolderError if any other flag differs, since the log would then mix two different runs."""
    found = latest(out)
    saved = found[1]["config"] if found else read_config(out)
    changed = [name for name, value in config.items() if name in saved and saved[name] != value]
    refused = [f"--{n} {saved[n]} -> {config[n]}" for n in changed if n not in MAY_CHANGE]
    if refused:
        raise RunFolderError(f"{out} holds a run with other settings: {'; '.join(refused)}. Resume it with its own "
                             "flags, or start a new run in another --output_dir")
    return [f"--{n} {saved[n]} -> {config[n]}" for n in changed if n not in ("resume", "overwrite", "eval_before")]


def write_config(out: Path, config: dict) -> None:
    """out/config.json: the flags a fresh run started with (a finished run's log can be checked without its weights)."""
    tmp = out / "config.json.partial"
    tmp.write_text(json.dumps(config, indent=1))
    tmp.rename(out / "config.json")


def read_config(out: Path) -> dict:
    try:
        return json.loads((out / "config.json").read_text())
    except (OSError, ValueError):
        return {}


def claim(out: Path, resume: bool, overwrite: bool) -> None:
    """Make `out` ready for a run: refuse to mix a fresh run into an old one, or clear the old one with --overwrite.
    The caller must hold the folder's lock first (`lock`), so a live run's files are never touched."""
    found = [name for name in RUN_FILES if (out / name).exists()]
    if found and not resume:
        if not overwrite:
            raise FileExistsError(f"{out} already holds a run ({', '.join(found)}): continue it with --resume, "
                                  "replace it with --overwrite, or choose another --output_dir")
        for name in found:
            path = out / name
            shutil.rmtree(path) if path.is_dir() else path.unlink()
    out.mkdir(parents=True, exist_ok=True)


def _state(folder: Path) -> dict | None:
    try:
        return json.loads((folder / "trainer_state.json").read_text())
    except (OSError, ValueError):
        return None


def latest(out: Path) -> tuple[Path, dict] | None:
    """(folder, trainer state) of the newest complete checkpoint in `out`, or None."""
    complete = [(folder, state) for folder in (out / name for name in NAMES) if (state := _state(folder))]
    return max(complete, key=lambda fs: fs[1]["step"], default=None)


def save(out: Path, model, tokenizer, optimizer: torch.optim.Optimizer, state: dict,
         weights: dict[str, torch.Tensor] | None = None, extra: dict[str, dict[str, torch.Tensor]] | None = None) -> Path:
    """Write out/checkpoint: model, tokenizer, optimizer state (safetensors) and `state` (JSON, written last).

    `weights` replaces the model's own state dict (LoRA: the merged weights); `extra` maps file names to more
    tensors to keep (LoRA: the adapters themselves, for an exact --resume).
    """
    target, tmp, old = (out / name for name in NAMES)
    shutil.rmtree(tmp, ignore_errors=True)
    model.save_pretrained(tmp, safe_serialization=True, **({"state_dict": weights} if weights is not None else {}))
    tokenizer.save_pretrained(tmp)
    for name, tensors in (extra or {}).items():
        save_file(tensors, tmp / name)
    tensors, layout = flatten_optimizer(optimizer.state_dict())
    save_file(tensors, tmp / "optimizer.safetensors")
    (tmp / "trainer_state.json.partial").write_text(json.dumps({**state, "optimizer": layout}, indent=1))
    (tmp / "trainer_state.json.partial").rename(tmp / "trainer_state.json")  # now tmp is complete
    if target.exists():
        shutil.rmtree(old, ignore_errors=True)
        target.rename(old)  # a crash here leaves tmp complete, and `latest` finds it
    tmp.rename(target)
    shutil.rmtree(old, ignore_errors=True)
    return target


def load_optimizer(folder: Path, optimizer: torch.optim.Optimizer, state: dict) -> None:
    optimizer.load_state_dict(unflatten_optimizer(load_file(folder / "optimizer.safetensors"), state["optimizer"]))


def truncate_logs(out: Path, step: int) -> None:
    """Cut metrics.jsonl, eval_samples.jsonl and samples.md back to what the run had written when its checkpoint of
    `step` was taken.

    Kept: training lines of steps < `step`, and eval lines up to `step` except "after" (the resumed run writes its
    own). Dropped: everything the interrupted process logged after the checkpoint, which the resumed run replays.
    """
    for log in (out / "metrics.jsonl", out / "eval_samples.jsonl"):
        if not log.exists():
            continue
        lines = []
        for line in log.read_text().splitlines(keepends=True):
            try:
                record = json.loads(line)
            except ValueError:  # a line cut short by the crash
                continue
            is_eval = "eval" in record
            if (record["step"] <= step and record["eval"] != "after") if is_eval else record["step"] < step:
                lines.append(line)
        log.write_text("".join(lines))
    samples = out / "samples.md"
    if samples.exists():
        text = samples.read_text()
        later = next((m for m in re.finditer(r"\n## step (\d+)\n", text) if int(m.group(1)) >= step), None)
        samples.write_text(text[: later.start()] if later else text)


# ------------------------------------------------------------------------------------------------ stop signals


class Stopped(Exception):
    def __init__(self, signum: int):
        super().__init__(signum)
        self.signum = signum


class StopSignals:
    """SIGTERM (schedulers, `timeout`) and SIGINT (Ctrl-C) stop training cleanly: `train` writes a checkpoint of the
    completed steps and exits with 128 + the signal's number (143, 130), as a shell reports it.

    One process abandons the step in progress at once (`abandon`): nothing of it reaches the weights before the
    optimizer step, and the next step starts from zeroed gradients. From the update on (`hold`) the step is
    finished, logged and counted first (`release`). Under torchrun a rank may be inside a collective, so every rank
    finishes its step and they stop together at the step boundary (`train` sums the flags over ranks there).
    """

    def __init__(self, abandon: bool):
        self.abandon, self.signal, self.holding = abandon, None, False

    def __enter__(self) -> "StopSignals":
        self.previous = {s: signal.signal(s, self.handle) for s in (signal.SIGTERM, signal.SIGINT)}
        return self

    def __exit__(self, *exc) -> None:
        for s, handler in self.previous.items():
            signal.signal(s, handler)

    def handle(self, signum, frame) -> None:
        self.signal = signum
        if self.abandon and not self.holding:
            raise Stopped(signum)

    def hold(self) -> None:
        self.holding = True

    def release(self) -> None:
        self.holding = False
        if self.abandon and self.signal is not None:
            raise Stopped(self.signal)


# ---------------------------------------------------------------------------------------- optimizer <-> safetensors


def flatten_optimizer(state: dict) -> tuple[dict[str, torch.Tensor], dict]:
    """AdamW's state dict as flat tensors (for safetensors) plus a JSON-able layout of everything else."""
    tensors, scalars = {}, {}
    for pid, entry in state["state"].items():
        for name, value in entry.items():
            if torch.is_tensor(value):
                tensors[f"{pid}.{name}"] = value.detach().contiguous().cpu()
            else:
                scalars[f"{pid}.{name}"] = value
    return tensors, {"param_groups": state["param_groups"], "scalars": scalars}


def unflatten_optimizer(tensors: dict[str, torch.Tensor], layout: dict) -> dict:
    state: dict[int, dict] = {}
    for key, value in list(tensors.items()) + list(layout["scalars"].items()):
        pid, name = key.split(".", 1)
        state.setdefault(int(pid), {})[name] = value
    return {"state": state, "param_groups": layout["param_groups"]}
