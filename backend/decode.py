"""Fast decoding: how `rollout.sample` draws its tokens quickly, without changing which tokens it draws.

rollout.py states what sampling is (plain temperature sampling from the policy that `token_logprobs` scores, masks by
position); this file is how it is made fast, and a first reading may skip it. The decode loop is ours, not
`model.generate`, so it can
  1. prefill each prompt once and share its KV cache across its G rows (`EagerDecoder`), not G times, and grow
     the cache in place (`GrowingLayer`), not by copying all of it at every token;
  2. on a GPU, run each decode step as one replayed CUDA graph over a static KV cache (`GraphedDecoder`): a small
     model's step is otherwise dominated by launching hundreds of tiny kernels from Python (this path prefills every
     row into its fixed-size cache: prefill is a small share of the time there);
  3. on a CPU, drop finished rows from the batch as they finish (`decode`, `COMPACT_AT`): a CPU decode step costs in
     proportion to its rows, and most rows stop long before the longest (a GPU step costs about the same for 8 or 72
     rows, so the graphed decoder keeps its static shapes);
  4. stop as soon as every row has emitted a stop token (checked every few steps on a GPU to avoid syncs).
None of them changes what is sampled: the same seed gives the same tokens with or without them (tested; a batch of
another shape may round a logit differently, which moves a token only when its uniform number falls within rounding
of a boundary of the cumulative distribution). Tokens are drawn by inverse-CDF sampling (`pick`). Sampling from a
bf16 copy of the policy, which does change the distribution slightly, is backend/bf16.py's.
"""
from __future__ import annotations

import inspect

import torch
from transformers import DynamicCache, StaticCache
from transformers.cache_utils import DynamicLayer

def _cache_kwarg(model) -> str:
    """transformers renamed `past_key_values` to `cache` during 5.x; use whichever this model's forward takes."""
    return "cache" if "cache" in inspect.signature(model.forward).parameters else "past_key_values"


# ------------------------------------------------------------------------------------------------- the decode loop


def pick(logits: torch.Tensor, temperature: float | torch.Tensor, generator: torch.Generator | None = None,
          u: torch.Tensor | None = None) -> torch.Tensor:
    """Next tokens [N] from last-position logits [N, V]: plain temperature sampling, argmax at temperature 0.
    `temperature` is a number, or one per row [N, 1] (each > 0).

    Inverse-CDF sampling: one uniform number per row (`u` [N, 1] float64 if given, else drawn from `generator`),
    located in the cumulative distribution (float64, so rounding cannot favour any token). Same distribution as
    torch.multinomial, and ~20x faster on a CPU, where multinomial draws a random number per vocabulary entry.
    """
    if not torch.is_tensor(temperature) and temperature == 0:
        return logits.argmax(dim=-1)
    cdf = torch.softmax(logits.float() / temperature, dim=-1).double().cumsum(dim=-1)  # [N, V]
    if u is None:
        u = torch.rand(cdf.shape[0], 1, generator=generator, device=cdf.device, dtype=cdf.dtype)
    return torch.searchsorted(cdf, u * cdf[:, -1:], right=True).squeeze(1).clamp(max=cdf.shape[1] - 1)


@torch.no_grad()
def generate(model, p_ids: torch.Tensor, p_mask: torch.Tensor, index: torch.Tensor, stop: list[int], pad_id: int,
             max_new_tokens: int, temperature: float | list[float], seed: int | list[int], min_new_tokens: int = 0,
             cuda_graph: bool | None = None, compact: bool = True) -> tuple[torch.Tensor, torch.Tensor]:
    """`rollout.sample`'s one call into the engine: ([N, T] tokens, [N, T] the sampler's log-probs) for the rows
    `index` [N] of the left-padded prompts [B, P]. In eval mode (dropout off, and the KV cache on even under gradient
    checkpointing), with the graphed decoder on a GPU that supports it, else the eager one; `temperature` a number or
    one per prompt; `seed` an int (one stream for the batch) or one per prompt (`per_prompt_uniforms`)."""
    device = p_ids.device
    if not isinstance(temperature, (int, float)):  # one per prompt -> one per row [N]
        if len(temperature) != len(p_ids) or min(temperature, default=1) <= 0:
            raise ValueError(f"need a temperature > 0 for each of the {len(p_ids)} prompts, got {temperature}")
        temperature = torch.tensor(temperature, dtype=torch.float32, device=device)[index]
    generator = per_prompt_uniforms(seed, index, max_new_tokens, device) if isinstance(seed, list) else \
        torch.Generator(device=device).manual_seed(seed)
    was_training = model.training
    model.eval()
    try:
        if cuda_graph is None:
            cuda_graph = device.type == "cuda" and GraphedDecoder.supported(model)
        if cuda_graph:
            step = GraphedDecoder(model, p_ids[index], p_mask[index], max_new_tokens)
        else:
            step = EagerDecoder(model, p_ids, p_mask, index, room=max_new_tokens)
        return decode(step, stop, pad_id, max_new_tokens, temperature, generator, min_new_tokens, compact)
    finally:
        model.train(was_training)


def per_prompt_uniforms(seeds: list[int], index: torch.Tensor, max_new_tokens: int, device) -> torch.Tensor:
    """[N, T] float64 uniforms, the rows of prompt i drawn from a generator seeded with seeds[i] alone."""
    counts = torch.bincount(index.cpu(), minlength=len(seeds)).tolist()
    draws = [torch.rand(c, max_new_tokens, generator=torch.Generator().manual_seed(s), dtype=torch.float64)
             for s, c in zip(seeds, counts)]
    return torch.cat(draws).to(device)



COMPACT_AT = 0.25  # the eager decoder drops its finished rows once they are this share of its batch (bench.py)


def decode(step, stop: list[int], pad_id: int, max_new_tokens: int, temperature: float | torch.Tensor,
            generator: torch.Generator | torch.Tensor, min_new_tokens: int = 0, compact: bool = True) -> torch.Tensor:
    """The decode loop: ([N, T] sampled tokens, pad after each row's first stop token, T <= max_new_tokens; [N, T]
    the sampler's log-prob of each sampled token at its row's `temperature` (a number, or one per row [N], each > 0):
    0 at greedy decoding, meaningless after the stop).

    Finished rows leave the batch (`compact`, for a decoder with a `keep` method: EagerDecoder). On a CPU a decode
    step costs in proportion to its rows, and at a realistic budget most rows finish long before the longest one.
    `live` [M] maps the decoder's batch back to the original rows. Every step still draws one uniform number per
    *original* row, so a row samples the same tokens whenever the others leave. `generator` may instead be those
    numbers drawn in advance, [N, max_new_tokens] float64 (`rollout.sample` with one seed per prompt).
    """
    logits = step.prefill_logits  # [M, V] next-token logits of the rows still decoding (M = N at first)
    device, n = logits.device, logits.shape[0]
    stop_t = torch.tensor(stop, device=device)
    tokens = torch.full((n, max_new_tokens), pad_id, dtype=torch.long, device=device)  # [N, T]
    logps = torch.zeros(n, max_new_tokens, device=device)  # [N, T]
    done = torch.zeros(n, dtype=torch.bool, device=device)  # [N]
    live = torch.arange(n, device=device)  # [M] the original row of each row of the decoder's batch
    compact = compact and hasattr(step, "keep")
    greedy = not torch.is_tensor(temperature) and temperature == 0
    check_every = 8 if device.type == "cuda" else 1  # a GPU checks "all done?" every few steps: each check syncs
    for t in range(max_new_tokens):
        if t < min_new_tokens:
            logits[:, stop_t] = -float("inf")
        scale = temperature[live, None] if torch.is_tensor(temperature) else temperature  # [M, 1] or a number
        if greedy:
            u = None
        elif isinstance(generator, torch.Tensor):
            u = generator[:, t : t + 1]  # [N, 1] drawn in advance
        else:
            u = torch.rand(n, 1, generator=generator, device=device, dtype=torch.float64)
        finished = done[live]  # [M] rows of the batch that stopped earlier (they emit padding)
        nxt = torch.where(finished, pad_id, pick(logits, scale, u=None if u is None else u[live]))  # [M]
        tokens[live, t] = nxt
        if not greedy:
            logps[live, t] = torch.log_softmax(logits.float() / scale, -1).gather(1, nxt[:, None]).squeeze(1)
        finished = finished | torch.isin(nxt, stop_t)
        done[live] = finished
        if t + 1 == max_new_tokens or ((t + 1) % check_every == 0 and bool(done.all())):
            return tokens[:, : t + 1], logps[:, : t + 1]
        if compact and int(finished.sum()) >= COMPACT_AT * len(live):
            keep = (~finished).nonzero().squeeze(1)  # [M'] batch positions of the rows still decoding
            step.keep(keep)
            live, nxt = live[keep], nxt[keep]
        logits = step(nxt)
    return tokens, logps  # max_new_tokens == 0


# ------------------------------------------------------------------------------------------------------ the decoders
# How `decode` gets the next-token logits of every row still decoding: one forward step per token over a KV cache.
# Neither class changes what is sampled (tested); they only make it fast, on a CPU and on a GPU respectively.


def kept_positions(start: int, stop: int, device) -> torch.Tensor:
    """`logits_to_keep` for positions start .. stop - 1, as a tensor of indices, not an int. With an int the model
    keeps a strided slice of its hidden states, which torch's matmul multiplies by an lm_head that needs no gradient
    (the sampler copy, LoRA's head, a frozen reference) as a batched product over a per-row copy of the weight; an
    index gathers a contiguous copy instead (a 16-prompt prefill of SmolLM2-135M's sampler: 5.9 s -> 1.2 s)."""
    return torch.arange(start, stop, device=device)


class GrowingLayer(DynamicLayer):
    """A DynamicLayer that grows in place: its keys and values are views of buffers with `room` spare positions, and
    a decode step writes its one new position there. DynamicLayer torch.cat's the whole cache every step instead
    (quadratic copying over a completion). Rows leave as in DynamicLayer (`batch_select_indices`); more tokens than
    the room reallocates once."""

    def __init__(self, room: int):
        super().__init__()
        self.room, self.length = room, 0

    def update(self, key_states: torch.Tensor, value_states: torch.Tensor, *args, **kwargs):
        if not self.is_initialized:
            self.lazy_initialization(key_states, value_states)
            self.buffers = [x.new_empty(*x.shape[:2], 0, x.shape[3]) for x in (key_states, value_states)]
        end = self.length + key_states.shape[-2]
        if end > self.buffers[0].shape[-2]:  # the prefill, or more tokens than the room: make room for `room` more
            self.buffers = [self._grown(b, end + self.room) for b in self.buffers]
        for buffer, new in zip(self.buffers, (key_states, value_states)):
            buffer[:, :, self.length: end] = new  # [N, heads, new positions, head_dim]
        self.length = end
        self.keys, self.values = (b[:, :, :end] for b in self.buffers)  # [N, heads, length, head_dim] views
        return self.keys, self.values

    def _grown(self, buffer: torch.Tensor, size: int) -> torch.Tensor:
        """`buffer`'s first `length` positions in a new buffer of `size` positions."""
        grown = buffer.new_empty(*buffer.shape[:2], size, buffer.shape[3])  # [N, heads, size, head_dim]
        grown[:, :, : self.length] = buffer[:, :, : self.length]
        return grown

    def batch_select_indices(self, indices: torch.Tensor) -> None:
        if self.length:
            self.buffers = [b[indices] for b in self.buffers]
            self.keys, self.values = (b[:, :, : self.length] for b in self.buffers)


def growing_cache(config, room: int) -> DynamicCache:
    """A DynamicCache whose full-attention layers are GrowingLayers with `room` spare positions (sliding-window and
    other special layers stay as transformers makes them)."""
    cache = DynamicCache(config=config)
    cache.layers = [GrowingLayer(room) if type(layer) is DynamicLayer else layer for layer in cache.layers]
    return cache


class EagerDecoder:
    """Decode steps over a `growing_cache` with `room` for the completion; each prompt is prefilled once, then
    shared by all its rows."""

    def __init__(self, model, p_ids: torch.Tensor, p_mask: torch.Tensor, index: torch.Tensor, room: int):
        self.model, self.kw = model, _cache_kwarg(model)
        self.cache, p = growing_cache(model.config, room), p_ids.shape[1]
        out = model(input_ids=p_ids, attention_mask=p_mask, position_ids=(p_mask.cumsum(1) - 1).clamp(min=0),
                    use_cache=True, logits_to_keep=kept_positions(p - 1, p, p_ids.device), **{self.kw: self.cache})
        self.cache.batch_select_indices(index)  # [B, ...] -> [N, ...]: row n continues prompt index[n]'s cache
        self.mask = p_mask[index]  # [N, P], grows by one column per step
        self.pos = self.mask.sum(1, keepdim=True) - 1  # [N, 1] position of each row's last token
        self.prefill_logits = out.logits[:, -1].float()[index]  # [N, V]

    def __call__(self, tokens: torch.Tensor) -> torch.Tensor:
        self.mask = torch.cat([self.mask, torch.ones_like(self.mask[:, :1])], dim=1)
        self.pos = self.pos + 1
        out = self.model(input_ids=tokens[:, None], attention_mask=self.mask, position_ids=self.pos, use_cache=True,
                         **{self.kw: self.cache})
        return out.logits[:, -1].float()

    def keep(self, rows: torch.Tensor) -> None:
        """Keep only these rows of the batch (the others have finished): their KV cache, mask and positions."""
        self.cache.batch_select_indices(rows)
        self.mask, self.pos = self.mask[rows], self.pos[rows]


class GraphedDecoder:
    """Decode steps as one CUDA graph: a StaticCache, static input buffers, and a boolean 4D attention mask.

    The graph is captured once per call to `sample` and replayed per token; each replay reads the buffers
    `ids`/`pos`/`mask`, which the loop updates in place, and the cache advances its own on-device length counter.
    """

    def __init__(self, model, p_ids: torch.Tensor, p_mask: torch.Tensor, max_new_tokens: int):
        n, p = p_ids.shape
        self.model, self.kw = model, _cache_kwarg(model)
        self.cache = StaticCache(config=model.config, max_cache_len=p + max_new_tokens)
        out = model(input_ids=p_ids, attention_mask=p_mask, position_ids=(p_mask.cumsum(1) - 1).clamp(min=0),
                    use_cache=True, logits_to_keep=kept_positions(p - 1, p, p_ids.device), **{self.kw: self.cache})
        self.prefill_logits = out.logits[:, -1].float()
        self.col = p  # the cache column the next token is written to
        self.mask = torch.zeros(n, 1, 1, p + max_new_tokens, dtype=torch.bool, device=p_ids.device)
        self.mask[:, 0, 0, :p] = p_mask.bool()
        self.ids = torch.zeros(n, 1, dtype=torch.long, device=p_ids.device)
        self.pos = p_mask.sum(1, keepdim=True) - 1
        self.graph = self._capture() if p_ids.is_cuda else None  # on a CPU the same steps run eagerly (tests)

    @staticmethod
    def supported(model) -> bool:
        """Needs the 5.2x cache API (StaticCache with an on-device length) and a decoder whose forward takes `cache`."""
        return _cache_kwarg(model) == "cache" and hasattr(StaticCache(model.config, 8).layers[0], "cumulative_length")

    def _forward(self) -> torch.Tensor:
        return self.model(input_ids=self.ids, attention_mask=self.mask, position_ids=self.pos, use_cache=True,
                          **{self.kw: self.cache}).logits[:, -1]

    def _capture(self) -> torch.cuda.CUDAGraph:
        lengths = [layer.cumulative_length.clone() for layer in self.cache.layers]
        stream = torch.cuda.Stream()
        stream.wait_stream(torch.cuda.current_stream())
        with torch.cuda.stream(stream):  # warm-up runs (allocator, cuBLAS handles) must precede capture
            for _ in range(2):
                self._forward()
        torch.cuda.current_stream().wait_stream(stream)
        graph = torch.cuda.CUDAGraph()
        with torch.cuda.graph(graph):
            self.logits = self._forward()
        for layer, length in zip(self.cache.layers, lengths):  # undo the warm-up's advance of the cache
            layer.cumulative_length.copy_(length)
        return graph

    def __call__(self, tokens: torch.Tensor) -> torch.Tensor:
        self.ids.copy_(tokens[:, None])
        self.pos += 1
        self.mask[:, 0, 0, self.col] = True
        self.col += 1
        if self.graph is None:
            return self._forward().float()
        self.graph.replay()
        return self.logits.float()  # a copy (bf16 -> fp32): the next replay overwrites self.logits
