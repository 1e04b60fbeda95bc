"""Models and tokens: load a policy, turn prompts into ids, sample G completions per prompt, score token log-probs.

This file knows models and tokenizers and nothing about rewards or the method. Its contracts are where most GRPO
bugs live, so each one is stated (and tested in test_expo.py):

* Prompts go through the model's chat template as *text*, then are tokenized with `add_special_tokens=False`: the
  template already holds any BOS, so it is never doubled. A model without a template gets the plain text.
* Sampling is plain temperature sampling -- no top-k, no top-p -- so the policy we sample from is exactly the policy
  `token_logprobs` scores (logits divided by the same temperature). It runs in eval mode under `torch.no_grad()`
  (not `inference_mode`: its tensors are used for training later) with the KV cache on, even when training uses
  gradient checkpointing (which turns the cache off in train mode).
* The completion mask is built *by position*: every token up to and including the first EOS is 1, everything after
  is 0. Never `ids != pad_id`: SmolLM2's pad token is its EOS, so that test would drop the EOS we must train on.
* Log-probs are fp32 and position ids follow the left padding, so a row scores the same alone or in a padded batch.
  Logits are computed only for completion positions (`logits_to_keep`), never for the prompt.

Reading order: the contracts above, then `completion_mask`, `sample` and `token_logprobs`. How `sample` is made fast
(the decode loop, KV-cache decoders, row compaction, the bf16 sampler copy) is backend/decode.py's, behind one call
(`decode.generate`); a first reading skips it.
"""
from __future__ import annotations

import math
from dataclasses import dataclass

import torch
from torch.nn.utils.rnn import pad_sequence
from transformers import AutoModelForCausalLM, AutoTokenizer

from backend import assets, decode, memory

# ---------------------------------------------------------------------------------------------------------- loading


def load_policy(name: str | None = None, device: str = "cpu", dtype: torch.dtype = torch.float32):
    """(model, tokenizer) for a hub id or local folder; the embedded SmolLM2-135M-Instruct when `name` is None."""
    path = assets.embedded_model_dir() if name is None else name
    tokenizer = AutoTokenizer.from_pretrained(path)  # trust_remote_code stays off
    if tokenizer.pad_token_id is None:
        tokenizer.pad_token = tokenizer.eos_token
    model = AutoModelForCausalLM.from_pretrained(path, dtype=dtype).to(device)
    return model, tokenizer


def turn_end_id(tokenizer) -> int:
    """The token the chat template closes an assistant turn with, read from the template (the first token after a
    rendered reply): what every training target ends in. `<|im_end|>` for ChatML (SmolLM2, Qwen2.5), `<|eot_id|>` for
    Llama-3; not the smallest EOS id (Qwen2.5 also lists `<|endoftext|>`). Without a template: the EOS token."""
    if not tokenizer.chat_template:
        return tokenizer.eos_token_id
    reply = "Reply text."
    text = tokenizer.apply_chat_template([{"role": "user", "content": "Question text?"},
                                          {"role": "assistant", "content": reply}], tokenize=False)
    after = text[text.rindex(reply) + len(reply):].strip()
    ids = tokenizer(after, add_special_tokens=False).input_ids if after else []
    if not ids:
        raise ValueError("the chat template writes nothing after an assistant turn: cannot tell its turn-end token")
    return ids[0]


def stop_ids(model, tokenizer) -> list[int]:
    """Token ids that end a completion: the tokenizer's EOS, any the model's generation config lists, and the chat
    template's turn-end token (`turn_end_id`)."""
    ids = {tokenizer.eos_token_id, turn_end_id(tokenizer)}
    config_eos = getattr(getattr(model, "generation_config", None), "eos_token_id", None)
    ids.update(config_eos if isinstance(config_eos, list) else [config_eos])
    return sorted(i for i in ids if i is not None)


# ------------------------------------------------------------------------------------------------------- tokenizing


def encode_prompts(tokenizer, user_texts: list[str]) -> list[list[int]]:
    """Token ids of each user message, as the model's chat template frames it, ending where the reply starts."""
    if not tokenizer.chat_template:
        return [tokenizer(text).input_ids for text in user_texts]
    framed = [tokenizer.apply_chat_template([{"role": "user", "content": text}], tokenize=False,
                                            add_generation_prompt=True) for text in user_texts]
    return [tokenizer(text, add_special_tokens=False).input_ids for text in framed]  # the template holds any BOS


def left_pad(rows: list[list[int]], pad_id: int, device="cpu") -> tuple[torch.Tensor, torch.Tensor]:
    """Left-pad id lists into (ids [B, P], mask [B, P]) so every row ends at the same column."""
    width = max(len(r) for r in rows)
    ids = torch.full((len(rows), width), pad_id, dtype=torch.long)
    mask = torch.zeros((len(rows), width), dtype=torch.long)
    for i, r in enumerate(rows):
        ids[i, width - len(r):], mask[i, width - len(r):] = torch.tensor(r, dtype=torch.long), 1
    return ids.to(device), mask.to(device)


def encode_targets(tokenizer, user_texts: list[str], targets: list[str | None], turn_end: int,
                   device="cpu") -> "Rollouts | None":
    """The targets that are not None as completions of their user messages (the hint is never in the context a
    training target is scored in), each ending in the turn-end token, masked by length; each row's `prompt_index` is
    its index in the lists. None when every target is None."""
    kept = [i for i, t in enumerate(targets) if t is not None]
    if not kept:
        return None
    completions = [tokenizer(targets[i], add_special_tokens=False).input_ids + [turn_end] for i in kept]
    p_ids, p_mask = left_pad(encode_prompts(tokenizer, [user_texts[i] for i in kept]), tokenizer.pad_token_id)
    c_ids = pad_sequence([torch.tensor(c) for c in completions], batch_first=True, padding_value=tokenizer.pad_token_id)
    c_mask = pad_sequence([torch.ones(len(c), dtype=torch.long) for c in completions], batch_first=True)  # right-padded
    return Rollouts(p_ids, p_mask, c_ids, c_mask, [targets[i] for i in kept], torch.zeros(len(kept), dtype=torch.bool),
                    torch.tensor(kept)).to(device)


def completion_mask(completion_ids: torch.Tensor, stop: list[int]) -> tuple[torch.Tensor, torch.Tensor]:
    """(mask [N, T], truncated [N]) by position: 1 up to and including the first stop token, 0 after it.

    Example, EOS = 2 = pad:  ids [[5, 7, 2, 2], [5, 2, 9, 2], [5, 7, 8, 9]]
                          -> mask [[1, 1, 1, 0], [1, 1, 0, 0], [1, 1, 1, 1]],  truncated [False, False, True]
    """
    # exercise 1: the completion mask, by position
    is_stop = torch.isin(completion_ids, torch.tensor(stop, device=completion_ids.device))
    stops_before = is_stop.long().cumsum(dim=1) - is_stop.long()  # stop tokens strictly before each position
    mask = (stops_before == 0).long()
    return mask, ~is_stop.any(dim=1)


# --------------------------------------------------------------------------------------------------------- sampling


@dataclass
class Rollouts:
    """Completions of B prompts, in prompt order: G rows per prompt for a group (rows [G*i, G*i + G) belong to
    prompt i), or any number per prompt (see `sample`); `prompt_index` says which prompt each row answers."""

    prompt_ids: torch.Tensor  # [N, P] left-padded
    prompt_mask: torch.Tensor  # [N, P]
    completion_ids: torch.Tensor  # [N, T] right-padded
    completion_mask: torch.Tensor  # [N, T] 1 through the first EOS inclusive
    texts: list[str]  # decoded completions, special tokens dropped
    truncated: torch.Tensor  # [N] bool: hit max_new_tokens without an EOS
    prompt_index: torch.Tensor  # [N] which prompt each row belongs to
    sampler_logp: torch.Tensor | None = None  # [N, T] log-prob of each sampled token under the sampler (at T)

    def to(self, device) -> "Rollouts":
        return Rollouts(*(x.to(device) if torch.is_tensor(x) else x for x in vars(self).values()))

    def select(self, rows: torch.Tensor | list[int] | range) -> "Rollouts":
        """The given rows as a batch of their own, without the padding columns only other rows needed (leading prompt
        columns, trailing completion columns): a micro-batch is scored at its own width."""
        rows = torch.as_tensor(rows, dtype=torch.long)
        p_mask, c_mask = self.prompt_mask[rows], self.completion_mask[rows]
        start, end = p_mask.shape[1] - int(p_mask.sum(1).max()), int(c_mask.sum(1).max())
        return Rollouts(self.prompt_ids[rows, start:], p_mask[:, start:], self.completion_ids[rows, :end],
                        c_mask[:, :end], [self.texts[i] for i in rows.tolist()], self.truncated[rows],
                        self.prompt_index[rows], None if self.sampler_logp is None else self.sampler_logp[rows, :end])


@torch.no_grad()
def sample(model, tokenizer, prompts: list[list[int]], group_size: int | list[int], max_new_tokens: int,
           temperature: float | list[float] = 1.0, seed: int | list[int] = 0, min_new_tokens: int = 0,
           cuda_graph: bool | None = None, compact: bool = True) -> Rollouts:
    """Sample `group_size` completions of each prompt (token ids: `encode_prompts`) at `temperature`, or `group_size[i]`
    at `temperature[i]` for prompt i: ExP-GRPO draws G rollouts and one cooler self-explanation a question in one call.

    How this is fast (backend/decode.py: a shared prefill, CUDA graphs, finished rows dropped) changes no token
    (tested). One `seed`: the tokens depend on the whole batch; a list, one per prompt: a prompt's completions are the
    same in any batch (evaluation). `min_new_tokens` forbids stopping earlier (fixed-length benchmarks only)."""
    device = next(model.parameters()).device
    stop_tokens = stop_ids(model, tokenizer)
    pad_id = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else stop_tokens[0]
    counts = [group_size] * len(prompts) if isinstance(group_size, int) else list(group_size)
    if len(counts) != len(prompts) or min(counts, default=1) < 1:
        raise ValueError(f"need a sample count >= 1 for each of the {len(prompts)} prompts, got {counts}")
    index = torch.arange(len(prompts), device=device).repeat_interleave(torch.tensor(counts, device=device))  # [N]
    p_ids, p_mask = left_pad(prompts, pad_id, device)  # [B, P]
    tokens, logp = decode.generate(model, p_ids, p_mask, index, stop_tokens, pad_id, max_new_tokens, temperature,
                                   seed, min_new_tokens, cuda_graph, compact)  # [N, T] each: the engine's fast loop
    c_mask, truncated = completion_mask(tokens, stop_tokens)
    texts = tokenizer.batch_decode([row[m.bool()].tolist() for row, m in zip(tokens.cpu(), c_mask.cpu())],
                                   skip_special_tokens=True)
    return Rollouts(p_ids[index], p_mask[index], tokens, c_mask, texts, truncated, index, logp)


# --------------------------------------------------------------------------------------------------------- scoring


def token_logprobs(model, prompt_ids: torch.Tensor, prompt_mask: torch.Tensor, completion_ids: torch.Tensor,
                   temperature: float = 1.0, with_entropy: bool = False, rows_per_chunk: int = 4):
    """fp32 log pi(token | prefix) [N, T] of each completion token at the sampling temperature (with `with_entropy`,
    also the per-token entropy [N, T], no gradient, for the log); with or without gradients. Prompt [N, P] left-padded,
    completion [N, T] right-padded; entries past a row's first EOS are meaningless: mask them. `chunk_logprobs` is the
    math, run a few rows at a time (backend/memory.py) so its fp32 [rows, T, V] tensors stay small."""
    if temperature <= 0:
        raise ValueError("scoring needs temperature > 0")
    logits = completion_logits(model, prompt_ids, prompt_mask, completion_ids)  # [N, T, V] in the model's dtype
    logp = memory.by_rows(chunk_logprobs, (logits, completion_ids), temperature, rows_per_chunk=rows_per_chunk)
    return (logp, memory.entropy(logits, temperature, rows_per_chunk)) if with_entropy else logp  # [N, T] each


def logprobs(model, part: Rollouts, temperature: float, **kw):
    """Token log-probs [n, w] of a micro-batch, `part = batch.select(rows)`: at its own width w, not the batch's."""
    return token_logprobs(model, part.prompt_ids, part.prompt_mask, part.completion_ids, temperature, **kw)


def micro_batches(n_rows: int, grad_accum: int, lengths: list[int] | None = None) -> list[list[int]]:
    """Rows 0 .. n_rows - 1 in `grad_accum` micro-batches of (nearly) equal size; given their lengths, longest first,
    so rows of like length share a micro-batch (scored at its own width) and the widest, which sets the peak memory,
    comes first. Example: lengths [3, 9, 5, 7], grad_accum 2 -> [[1, 3], [2, 0]]."""
    order = sorted(range(n_rows), key=lambda i: -lengths[i]) if lengths is not None else list(range(n_rows))
    size = max(1, math.ceil(n_rows / grad_accum))
    return [order[i : i + size] for i in range(0, n_rows, size)]


def completion_logits(model, prompt_ids: torch.Tensor, prompt_mask: torch.Tensor,
                      completion_ids: torch.Tensor) -> torch.Tensor:
    """The logits [N, T, V] (model dtype) that predict each completion token: those at positions P - 1 .. P + T - 2
    of prompt [N, P] (left-padded) + completion [N, T] (right-padded), and no others (`logits_to_keep`)."""
    p, t = prompt_ids.shape[1], completion_ids.shape[1]
    ids = torch.cat([prompt_ids, completion_ids], dim=1)  # [N, P + T]
    attention = torch.cat([prompt_mask, torch.ones_like(completion_ids)], dim=1)
    positions = (attention.cumsum(dim=1) - 1).clamp(min=0)  # left padding: the first real token is at position 0
    keep = decode.kept_positions(p - 1, p + t - 1, ids.device)  # [T] the positions that predict the completion
    return model(input_ids=ids, attention_mask=attention, position_ids=positions, use_cache=False,
                 logits_to_keep=keep).logits


def chunk_logprobs(logits: torch.Tensor, completion_ids: torch.Tensor, temperature: float) -> torch.Tensor:
    """fp32 log-softmax of logits [rows, T, V] / temperature, read at the completion ids [rows, T] -> [rows, T].

    Example, one position with vocabulary logits [2, 0, 0] at temperature 1 and token 0: logsumexp = log(e^2 + 2)
    = 2.2395, so log p = 2 - 2.2395 = -0.2395.
    """
    # exercise 2: per-token log-probs of a completion
    logits = logits.float() / temperature
    log_norm = torch.logsumexp(logits, dim=-1)  # [rows, T]
    return logits.gather(-1, completion_ids[..., None]).squeeze(-1) - log_norm


