"""LoRA in a few lines: train low-rank adapters on every linear layer, keep the base weights frozen.

    python train.py --lora_rank 16 --lora_alpha 32 --learning_rate 1e-5 ...   # ~10x the full fine-tuning rate

Why a module of our own and not `peft`: what training needs is small -- wrap each linear layer, switch the adapters
off to get the frozen reference policy, and merge them for a checkpoint that `from_pretrained` loads -- and it reads
in one screen, with no extra dependency and no adapter format to learn.

* `apply(model, rank, alpha)` replaces every `nn.Linear` except the output head by `LoRALinear`:
  y = W x + (alpha / rank) * B A x, with W frozen, A [rank, in] small random, B [out, rank] zero, so training starts
  from exactly the base model. Only A and B are trained: AdamW keeps state for them alone, which is what lets a 3B
  model train on one 24 GiB GPU (fp32 weights + grads + AdamW would be 16 bytes per parameter).
* `disabled(model)` is the base model: the frozen reference for the KL penalty and for DPO, without a second copy.
* `merged_state_dict(model)` folds B A into W under the original parameter names (the checkpoint's weights);
  `adapter_state` / `load_adapter_state` save and restore A and B exactly, for --resume.
"""
from __future__ import annotations

import contextlib
import math

import torch
from torch import nn


class LoRALinear(nn.Module):
    """A frozen linear layer plus a trainable low-rank update (alpha / rank) * B @ A."""

    def __init__(self, base: nn.Linear, rank: int, alpha: float):
        super().__init__()
        self.base, self.scale, self.enabled = base.requires_grad_(False), alpha / rank, True
        self.lora_A = nn.Parameter(torch.empty(rank, base.in_features, device=base.weight.device))
        self.lora_B = nn.Parameter(torch.zeros(base.out_features, rank, device=base.weight.device))
        nn.init.kaiming_uniform_(self.lora_A, a=math.sqrt(5))  # as nn.Linear initialises its weight

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        y = self.base(x)
        if not self.enabled:
            return y
        return y + (x.to(self.lora_A.dtype) @ self.lora_A.T @ self.lora_B.T * self.scale).to(y.dtype)


def apply(model: nn.Module, rank: int, alpha: float) -> nn.Module:
    """Freeze `model` and wrap its linear layers (all but the output head) with adapters, in place."""
    model.requires_grad_(False)
    head = model.get_output_embeddings()
    targets = [(name, m) for name, m in model.named_modules() if isinstance(m, nn.Linear) and m is not head]
    for name, layer in targets:
        parent, _, child = name.rpartition(".")
        setattr(model.get_submodule(parent) if parent else model, child, LoRALinear(layer, rank, alpha))
    return model


def layers(model: nn.Module) -> list[LoRALinear]:
    return [m for m in model.modules() if isinstance(m, LoRALinear)]


@contextlib.contextmanager
def disabled(model: nn.Module):
    """The base model, adapters off, inside the block (the frozen reference policy)."""
    for layer in layers(model):
        layer.enabled = False
    try:
        yield model
    finally:
        for layer in layers(model):
            layer.enabled = True


def merged_state_dict(model: nn.Module) -> dict[str, torch.Tensor]:
    """The weights of the adapted model under the base model's names: W + scale * B @ A for each wrapped layer."""
    merged = {}
    wrapped = {name: m for name, m in model.named_modules() if isinstance(m, LoRALinear)}
    for key, value in model.state_dict().items():
        owner, _, leaf = key.rpartition(".")
        if leaf in ("lora_A", "lora_B"):
            continue
        if owner.endswith(".base") and owner[:-5] in wrapped:
            layer = wrapped[owner[:-5]]
            if leaf == "weight":
                value = value + (layer.lora_B @ layer.lora_A * layer.scale).to(value.dtype)
            key = f"{owner[:-5]}.{leaf}"
        merged[key] = value.detach().contiguous()
    return merged


def adapter_state(model: nn.Module) -> dict[str, torch.Tensor]:
    return {k: v.detach().contiguous() for k, v in model.state_dict().items() if k.rsplit(".", 1)[-1].startswith("lora_")}


def load_adapter_state(model: nn.Module, tensors: dict[str, torch.Tensor]) -> None:
    missing, unexpected = model.load_state_dict(tensors, strict=False)
    if unexpected or any(k.rsplit(".", 1)[-1].startswith("lora_") for k in missing):
        raise ValueError("the checkpoint's adapters do not match this model and --lora_rank")
