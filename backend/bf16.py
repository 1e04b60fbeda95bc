"""bf16 where the hardware multiplies it: the sampler's bf16 copy of the policy and the trainer's bf16 autocast.

RL stacks sample from a low-precision inference engine and train in higher precision; here the engine is a bf16 copy
of the fp32 policy (`sampler_copy`, refreshed after every optimizer step by `refresh_sampler`), and the trainer's
forward passes may run under `autocast` (--train_dtype) while its weights, gradients and AdamW stay fp32. Both
are chosen where bf16 matmuls are native (`is_native`: a GPU, a CPU with AMX or AVX512-BF16); elsewhere bf16 is
emulated and slower than fp32. The copy changes the sampled distribution slightly: variants/tis.py measures by how
much, every step. On a CPU with bf16 matmuls its linear layers keep their weights pre-packed for oneDNN
(`PackedLinear`), which gives the same products faster at a decode step's shapes. A first reading skips this file.
"""
from __future__ import annotations

import copy

import torch


def is_native(device: torch.device) -> bool:
    """Does `device` multiply bf16 matrices in hardware: CUDA with bf16, or a CPU with AMX-BF16 or AVX512-BF16?"""
    if device.type == "cuda":
        return torch.cuda.is_bf16_supported()
    caps = torch.cpu.get_capabilities() if hasattr(torch.cpu, "get_capabilities") else {}
    return bool(caps.get("amx_bf16") or caps.get("avx512_bf16"))


def autocast(device: torch.device):
    """The bf16 autocast context of --train_dtype bf16 (and of sampling an fp32 model the bf16 way), without autocast's
    weight cache: the weights change after every step."""
    return torch.autocast(device.type, dtype=torch.bfloat16, cache_enabled=False)


def sampler_copy(model, dtype: torch.dtype = torch.bfloat16):
    """A copy of the policy to sample from, its parameters in `dtype` (buffers such as RoPE frequencies stay fp32),
    as RL stacks sample from a low-precision inference engine, its linear layers `PackedLinear`s on a CPU with bf16
    matmuls. `refresh_sampler` keeps it equal to the policy."""
    sampler = copy.deepcopy(model).eval().requires_grad_(False)
    for p in sampler.parameters():
        p.data = p.data.to(dtype)
    device = next(sampler.parameters()).device
    if dtype == torch.bfloat16 and device.type == "cpu" and is_native(device) and PackedLinear.available():
        for m in sampler.modules():
            if type(m) is torch.nn.Linear:
                m.__class__ = PackedLinear  # the same module and parameters, another forward
                m.pack()
    return sampler


@torch.no_grad()
def refresh_sampler(sampler, model) -> None:
    """Copy the policy's (fp32) weights into the sampler, cast to its dtype: after every optimizer step."""
    for s, p in zip(sampler.parameters(), model.parameters(), strict=True):
        s.copy_(p)
    for m in sampler.modules():
        if isinstance(m, PackedLinear):
            m.pack()


class PackedLinear(torch.nn.Linear):
    """A linear layer of the CPU bf16 sampler that also holds its weight pre-packed in oneDNN's layout (`pack`, after
    every change of the weight), about 2x faster at a decode step's few rows, where F.linear reorders the weight at
    every call (SmolLM2-135M's [32, 576] x [576, 1536] at one thread: 306 -> 166 us). The products are F.linear's bit
    for bit at one thread and at a decode step's rows (tested); a prefill's thousands of rows at two threads can be
    split otherwise and round differently ([32 x 60, 576] x [576, 1536]: last-bit differences), so the tokens sampled
    there depend on the thread count. The packed weight is opaque to torch: copies and pickles leave it out and pack
    again."""

    @staticmethod
    def available() -> bool:
        """oneDNN is built in, has these (private, inductor's) ops, and says this CPU runs its bf16 kernels."""
        ops = torch.ops.mkldnn
        return (torch.backends.mkldnn.is_available() and hasattr(ops, "_reorder_linear_weight")
                and hasattr(ops, "_is_mkldnn_bf16_supported") and ops._is_mkldnn_bf16_supported())

    def pack(self) -> None:
        self.packed = torch.ops.mkldnn._reorder_linear_weight(self.weight.detach())

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return torch.ops.mkldnn._linear_pointwise(x, self.packed, self.bias, "none", [], "")

    def __getstate__(self):
        return {k: v for k, v in self.__dict__.items() if k != "packed"}

    def __setstate__(self, state) -> None:
        super().__setstate__(state)
        self.pack()
