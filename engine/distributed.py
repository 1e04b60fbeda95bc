"""Data parallelism with torch.distributed: the same train.py on 1 process or N (torchrun), training one policy.

    torchrun --nproc_per_node 8 train.py ...                        # one machine, 8 GPUs (NCCL)
    torchrun --nnodes 2 --node_rank R --master_addr HOST --master_port 29500 --nproc_per_node 8 train.py ...
    torchrun --nproc_per_node 2 train.py --device cpu ...           # 2 CPU processes (gloo): how the tests run it

What each rank does, and why:
* Every rank holds the whole policy (and the frozen reference) and its own optimizer. All start from the same weights
  and apply the same summed gradient, so they stay identical without ever exchanging weights.
* `--batch_size` is global: each step's B questions are cut into contiguous shares, one per rank (`share`). A
  question's G rollouts stay on its rank, so group advantages need no communication. Ranks sample with their own seed.
* Loss normalisers (rows, tokens, pairs) are summed over ranks before any loss is formed (`all_sum`), so each rank's
  loss is exactly its share of the global loss and the global gradient is the *sum* of the ranks' gradients: one
  all-reduce per parameter after accumulation (`sum_gradients`). We do not wrap the model in DDP: DDP all-reduces
  inside every backward, so a rank that skips a backward (all its groups all-wrong, no policy-gradient rows) would
  hang the others. Here backward is local and the collectives sit at points that every rank reaches every step.
* A decision that gates an update is taken on global numbers: the gradient norm is measured after the all-reduce, so
  every rank applies, or skips, the same update.
* Rank 0 alone evaluates, logs, writes samples and checkpoints; the others wait for it at a barrier.
In a single process (no torchrun) every function here is a no-op, and train.py runs exactly as it always has.
"""
from __future__ import annotations

import datetime
import os
from dataclasses import dataclass

import torch
import torch.distributed as dist


@dataclass(frozen=True)
class Ranks:
    rank: int = 0
    world: int = 1
    local_rank: int = 0

    @property
    def main(self) -> bool:
        return self.rank == 0


def init(use_cuda: bool) -> Ranks:
    """Join the process group torchrun describes in the environment; a single process needs none."""
    world = int(os.environ.get("WORLD_SIZE", "1"))
    if world == 1:
        return Ranks()
    local_rank = int(os.environ.get("LOCAL_RANK", "0"))
    if use_cuda:
        torch.cuda.set_device(local_rank)
    if not dist.is_initialized():  # rank 0 may evaluate for a long time while the others wait at a barrier
        dist.init_process_group("nccl" if use_cuda else "gloo", timeout=datetime.timedelta(hours=2))
    return Ranks(dist.get_rank(), world, local_rank)


def share(items: list, ranks: Ranks) -> list:
    """This rank's contiguous share of a global list (sizes differ by at most one)."""
    n = len(items)
    return items[ranks.rank * n // ranks.world : (ranks.rank + 1) * n // ranks.world]


def all_sum(values: list[float], ranks: Ranks) -> list[float]:
    """Element-wise sums over ranks of a few numbers (row, token and pair counts), in one collective."""
    if ranks.world == 1:
        return values
    t = torch.tensor(values, dtype=torch.float64, device=_device(ranks))
    dist.all_reduce(t)
    return t.tolist()


def sum_gradients(model: torch.nn.Module, ranks: Ranks) -> None:
    """Sum every parameter's gradient over ranks; a rank that ran no backward contributes zeros."""
    if ranks.world == 1:
        return
    for p in model.parameters():
        if p.requires_grad:
            if p.grad is None:
                p.grad = torch.zeros_like(p)
            dist.all_reduce(p.grad)


def gather(obj, ranks: Ranks) -> list:
    """Every rank's `obj` (any picklable object), in rank order, on every rank."""
    if ranks.world == 1:
        return [obj]
    out = [None] * ranks.world
    dist.all_gather_object(out, obj)
    return out


# Per-rank values that are shares of a global total (the losses and token-weighted means carry global normalisers,
# and counts) add up over ranks; every other statistic is averaged over the ranks that report it.
SUMMED = ("loss_pg", "loss_sft", "loss_dpo", "clip_frac", "kl", "entropy", "targets", "pg_rows", "pairs",
          "explain_dropped", "explain_dropped_truncated", "explain_dropped_wrong", "explanations", "explain_cut_off",
          "explain_reached", "targets_finished", "explain_dropped_solved", "mismatch_log_ratio", "mismatch_k3")
MAXED = ("mismatch_max_ratio",)  # the largest over ranks


def merge_stats(per_rank: list[dict]) -> dict:
    """One log line from train.py's stats of every rank (a single process: its own stats, unchanged)."""
    merged = {}
    for key in dict.fromkeys(k for stats in per_rank for k in stats):
        values = [stats[key] for stats in per_rank if key in stats]
        merged[key] = sum(values) if key in SUMMED else max(values) if key in MAXED else sum(values) / len(values)
    return merged


def barrier(ranks: Ranks) -> None:
    if ranks.world > 1:
        dist.barrier()


def close(ranks: Ranks) -> None:
    """Leave the process group together: a rank that destroys it while a peer still talks to it can make gloo abort
    that peer at exit ("terminate called without an active exception")."""
    if ranks.world > 1 and dist.is_initialized():
        dist.barrier()
        dist.destroy_process_group()


def _device(ranks: Ranks) -> torch.device:
    return torch.device("cuda", ranks.local_rank) if dist.get_backend() == "nccl" else torch.device("cpu")
