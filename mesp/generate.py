"""Text generation with a KV cache: greedy at temperature 0, else seeded temperature / top-p sampling.

    text = generate(model, tokenizer, "What is the capital of France?", chat=True)
    for piece in generate_stream(model, tokenizer, prompt): print(piece, end="")
"""

from __future__ import annotations

import logging
from collections.abc import Iterator

import torch

from .errors import MespError
from .model import Model
from .tokenizer import encode_prompt

log = logging.getLogger(__name__)


def stop_token_ids(model: Model, tokenizer=None) -> set[int]:
    """End-of-sequence ids: the model config's eos (int or list) and the tokenizer's."""
    stops: set[int] = set()
    eos = model.config.eos_token_id
    if isinstance(eos, int):
        stops.add(eos)
    elif isinstance(eos, (list, tuple)):
        stops.update(int(e) for e in eos)
    tok_eos = getattr(tokenizer, "eos_token_id", None) if tokenizer is not None else None
    if isinstance(tok_eos, int):
        stops.add(tok_eos)
    return stops


def check_sampling(max_new_tokens, temperature, top_p):
    """MespError naming the setting when a generation setting is out of range."""
    if max_new_tokens < 0:
        raise MespError(f"max_new_tokens must be >= 0, got {max_new_tokens}")
    if not temperature >= 0:
        raise MespError(f"temperature must be >= 0, got {temperature}")
    if not 0 < top_p <= 1:
        raise MespError(f"top_p must be in (0, 1], got {top_p}")


def _pick(logits: torch.Tensor, temperature: float, top_p: float, gen: torch.Generator) -> int:
    """One token id from the logits [V] of the last position."""
    logits = logits.float()
    if temperature == 0:
        return int(torch.argmax(logits))
    probs = torch.softmax(logits / temperature, dim=-1)
    if top_p < 1.0:
        sorted_p, order = torch.sort(probs, descending=True)
        cum = torch.cumsum(sorted_p, dim=-1)
        drop = cum - sorted_p >= top_p  # keep the smallest prefix whose mass reaches top_p
        sorted_p[drop] = 0.0
        probs = torch.zeros_like(probs).scatter_(0, order, sorted_p)
    return int(torch.multinomial(probs, 1, generator=gen))


def tokens_that_fit(model: Model, prompt_len: int, max_new_tokens: int) -> int:
    """max_new_tokens, cut to what the model's context leaves after a prompt of prompt_len tokens (the KV cache
    grows with every token: the context bounds it, and RoPE means nothing past it)."""
    context = model.config.max_position_embeddings
    if prompt_len >= context:
        raise MespError(f"prompt: {prompt_len} tokens fill the model's context of {context}")
    if max_new_tokens > context - prompt_len:
        log.info("max_new_tokens %d cut to %d: the model's context is %d tokens", max_new_tokens,
                 context - prompt_len, context)
    return min(max_new_tokens, context - prompt_len)


@torch.no_grad()
def generate_ids(model: Model, input_ids: list[int], max_new_tokens: int = 64, temperature: float = 0.0,
                 seed: int = 0, top_p: float = 1.0, stop_ids: set[int] | frozenset = frozenset()) -> Iterator[int]:
    """Yield new token ids one at a time (a stop id is yielded, then generation ends)."""
    check_sampling(max_new_tokens, temperature, top_p)
    max_new_tokens = tokens_that_fit(model, len(input_ids), max_new_tokens)
    if max_new_tokens == 0:
        return
    gen = torch.Generator().manual_seed(seed)
    was_training = model.training
    model.eval()
    try:
        ids = torch.tensor([list(input_ids)], dtype=torch.long, device=model.device)
        logits, cache = model(ids)
        for step in range(max_new_tokens):
            tok = _pick(logits[0, -1], temperature, top_p, gen)
            yield tok
            if tok in stop_ids or step == max_new_tokens - 1:
                return
            logits, cache = model(torch.tensor([[tok]], dtype=torch.long, device=model.device), cache=cache)
    finally:
        model.train(was_training)


@torch.no_grad()
def generate_batch_ids(model: Model, prompts: list[list[int]], max_new_tokens: int,
                       stop_ids: set[int] | frozenset = frozenset()) -> list[list[int]]:
    """Greedy continuations of several prompts at once (each ends at its first stop id, not included, or after
    max_new_tokens): the prompts are left-padded to one batch, the padding masked and each row's RoPE positions
    counted from its first real token, so each row's tokens are generate_ids' for that prompt alone, while every
    decoding step reads the weights once for all rows."""
    check_sampling(max_new_tokens, 0.0, 1.0)
    longest = max((len(p) for p in prompts), default=0)
    steps = tokens_that_fit(model, longest, max_new_tokens)
    if not prompts or steps == 0:
        return [[] for _ in prompts]
    device = model.device
    pad = [longest - len(p) for p in prompts]
    ids = torch.tensor([[0] * n + list(p) for n, p in zip(pad, prompts)], dtype=torch.long, device=device)
    mask = torch.tensor([[0] * n + [1] * len(p) for n, p in zip(pad, prompts)], dtype=torch.long, device=device)
    positions = (mask.cumsum(1) - 1).clamp_min(0)
    out: list[list[int]] = [[] for _ in prompts]
    done = [False] * len(prompts)
    was_training = model.training
    model.eval()
    try:
        # the prompts' last positions only: [B, T, V] logits of whole prompts would dwarf the model's own memory
        hidden, cache = model(ids, mask, return_hidden=True, positions=positions)
        for step in range(steps):
            toks = model.logits(hidden[:, -1]).float().argmax(-1).tolist()
            for row, tok in enumerate(toks):
                if not done[row]:
                    done[row] = tok in stop_ids
                    if not done[row]:
                        out[row].append(tok)
            if all(done) or step == steps - 1:
                break
            positions = positions[:, -1:] + 1
            mask = torch.cat([mask, torch.ones(len(prompts), 1, dtype=mask.dtype, device=device)], dim=1)
            hidden, cache = model(torch.tensor(toks, dtype=torch.long, device=device)[:, None], mask, cache=cache,
                                  return_hidden=True, positions=positions)
    finally:
        model.train(was_training)
    return out


def generate_batch(model: Model, tokenizer, prompts: list[str], chat: bool = False,
                   max_new_tokens: int = 64) -> list[str]:
    """Greedy continuations of `prompts`, decoded together (generate_batch_ids); each equals generate()'s."""
    stops = stop_token_ids(model, tokenizer)
    ids = generate_batch_ids(model, [encode_prompt(tokenizer, p, chat) for p in prompts], max_new_tokens, stops)
    return [tokenizer.decode(t, skip_special_tokens=True) for t in ids]


def generate_stream(model: Model, tokenizer, prompt: str, chat: bool = False, max_new_tokens: int = 64,
                    temperature: float = 0.0, seed: int = 0, top_p: float = 1.0) -> Iterator[str]:
    """Yield the continuation of `prompt` as text pieces, as the tokens come (eos excluded)."""
    check_sampling(max_new_tokens, temperature, top_p)
    prompt_ids = encode_prompt(tokenizer, prompt, chat)
    stops = stop_token_ids(model, tokenizer)
    out: list[int] = []
    shown = ""
    for tok in generate_ids(model, prompt_ids, max_new_tokens, temperature, seed, top_p, stops):
        if tok in stops:
            break
        out.append(tok)
        text = tokenizer.decode(out, skip_special_tokens=True)
        if text.endswith("\ufffd"):
            continue  # an incomplete UTF-8 sequence: wait for the next token
        if text.startswith(shown):
            piece, shown = text[len(shown):], text
            if piece:
                yield piece
    text = tokenizer.decode(out, skip_special_tokens=True)
    if text != shown and text.startswith(shown):
        yield text[len(shown):]


def generate(model: Model, tokenizer, prompt: str, chat: bool = False, max_new_tokens: int = 64,
             temperature: float = 0.0, seed: int = 0, top_p: float = 1.0) -> str:
    """The continuation of `prompt` (greedy at temperature 0; stops at eos or after max_new_tokens)."""
    check_sampling(max_new_tokens, temperature, top_p)
    prompt_ids = encode_prompt(tokenizer, prompt, chat)
    stops = stop_token_ids(model, tokenizer)
    out = [t for t in generate_ids(model, prompt_ids, max_new_tokens, temperature, seed, top_p, stops)
           if t not in stops]
    return tokenizer.decode(out, skip_special_tokens=True)
