"""Training data in the formats users already have (mlx-lm / Hugging Face), tokenized, masked, batched.

A JSONL file, a Parquet or CSV file, or a Hugging Face `datasets` directory (read lazily by mesp.tables, whose
`columns` mapping renames a file's columns to the keys below). One record per line or row, in one of four
formats (extra keys are ignored):

    {"text": "..."}                                   loss on every token (EOS appended)
    {"prompt": "...", "completion": "..."}            loss on the completion only
    {"messages": [{"role": "user", "content": ...}, {"role": "assistant", "content": ...}, ...]}
                                                      rendered with the tokenizer's chat template;
                                                      loss on the assistant turns only
    {"input_ids": [...], "labels": [...]}             pre-tokenized ("labels" optional, -100 = no loss;
                                                      without it every token counts). Needs no tokenizer.

A prompt/completion pair goes through the chat template as one user turn and one assistant turn when the
tokenizer has a template (as mlx-lm does, and as `mesp generate --chat` prompts); without a template the
prompt and completion are tokenized one after the other and EOS is appended. `train_on_prompt` puts the loss
on every token of the text, chat and prompt/completion formats (explicit pre-tokenized labels are kept).

Samples longer than seq_len are cut to their first seq_len tokens and counted (long_samples="truncate"), or
left out and counted (long_samples="skip": a step never meets more tokens than its memory plan allows, and no
sample is trained on half of its text). A string longer than a bound
that depends on seq_len only (see `char_bound`) is cut before it is tokenized, so one huge line costs no more to
tokenize than a long sample. A UTF-8 byte order mark at the start of the file is skipped. Labels follow transformers
(same length as input_ids, shifted inside the loss), so a sample is trainable when some label after the
first is not -100. Bad input raises MespError naming the file and line (or row).
"""

from __future__ import annotations

import codecs
import json
import logging
import math
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path

import torch

from .errors import MespError
from .seeds import mix_seed
from .tables import read_records
from .tokenizer import assistant_tokens

log = logging.getLogger(__name__)

IGNORE = -100  # the label of a token without loss (transformers' convention)
FORMATS = ("text", "prompt/completion", "messages", "input_ids")


@dataclass
class Sample:
    input_ids: torch.Tensor  # int64 [n]
    labels: torch.Tensor  # int64 [n], IGNORE where no loss
    line: int  # 1-based line of a JSONL file, or row of a table

    @property
    def n_targets(self) -> int:
        """Tokens the loss counts (labels are shifted: the first position is never a target)."""
        return int((self.labels[1:] != IGNORE).sum())


@dataclass
class Batch:
    """Collated samples, labels unshifted (methods.common.prepare_batch turns one into the loss's LossBatch)."""
    input_ids: torch.Tensor  # [B, T] right-padded
    attention_mask: torch.Tensor  # [B, T], 1 = real token
    labels: torch.Tensor  # [B, T], IGNORE on pads and masked tokens

    @property
    def n_tokens(self) -> int:
        """Real (non-pad) tokens."""
        return int(self.attention_mask.sum())

    @property
    def n_targets(self) -> int:
        """Tokens the loss counts, after the shift (matches methods.common.prepare_batch)."""
        return int((self.labels[:, 1:] != IGNORE).sum())


@dataclass
class Dataset:
    path: str
    samples: list[Sample]
    n_truncated: int = 0  # samples cut to seq_len
    n_skipped: int = 0  # samples longer than seq_len left out (long_samples="skip")
    formats: dict[str, int] = field(default_factory=dict)  # format -> sample count

    def __len__(self) -> int:
        return len(self.samples)

    @property
    def n_tokens(self) -> int:
        return sum(len(s.input_ids) for s in self.samples)

    @property
    def n_targets(self) -> int:
        return sum(s.n_targets for s in self.samples)

    def collate(self, indices) -> Batch:
        return collate([self.samples[i] for i in indices])

    def batches_in_order(self, batch_size: int):
        """Every sample once, in file order (for evaluation)."""
        for start in range(0, len(self), batch_size):
            yield self.collate(range(start, min(start + batch_size, len(self))))


def collate(samples: list[Sample], pad_id: int = 0) -> Batch:
    """Right-pad to the longest sample: attention_mask 0 and label IGNORE on pads (pad_id is never seen)."""
    T = max(len(s.input_ids) for s in samples)
    ids = torch.full((len(samples), T), pad_id, dtype=torch.long)
    labels = torch.full((len(samples), T), IGNORE, dtype=torch.long)
    mask = torch.zeros((len(samples), T), dtype=torch.long)
    for b, s in enumerate(samples):
        n = len(s.input_ids)
        ids[b, :n] = s.input_ids
        labels[b, :n] = s.labels
        mask[b, :n] = 1
    return Batch(ids, mask, labels)


# ---- order: a pure function of (seed, epoch), so a resumed run sees the same batches ----------------------

def epoch_order(n: int, seed: int, epoch: int) -> list[int]:
    """The sample order of `epoch`: a permutation of range(n) that depends only on seed and epoch."""
    g = torch.Generator().manual_seed(mix_seed(seed, epoch))
    return torch.randperm(n, generator=g).tolist()


class MicroBatchStream:
    """Micro-batches of `batch_size` samples, epoch after epoch, each epoch in its own seeded order.

    Micro-batch m is the (m % per_epoch)-th slice of epoch (m // per_epoch)'s order (the last slice of an
    epoch may be smaller), so any position can be resumed from the counter alone. A step of grad_accum
    micro-batches never reaches into the next epoch (see `step`), so an epoch is one pass however the data
    divides."""

    def __init__(self, n_samples: int, batch_size: int, seed: int):
        if n_samples < 1:
            raise MespError("no training samples")
        self.n, self.batch_size, self.seed = n_samples, batch_size, seed
        self.per_epoch = math.ceil(n_samples / batch_size)
        self._order: tuple[int, list[int]] | None = None

    def steps_per_epoch(self, grad_accum: int) -> int:
        return math.ceil(self.per_epoch / grad_accum)

    def step(self, m: int, grad_accum: int) -> range:
        """The micro-batches of the step that starts at micro-batch m: grad_accum of them, or what is left of
        m's epoch when fewer."""
        return range(m, m + min(grad_accum, self.per_epoch - m % self.per_epoch))

    def indices(self, m: int) -> list[int]:
        epoch, j = divmod(m, self.per_epoch)
        if self._order is None or self._order[0] != epoch:
            self._order = (epoch, epoch_order(self.n, self.seed, epoch))
        return self._order[1][j * self.batch_size:(j + 1) * self.batch_size]


# ---- loading ----------------------------------------------------------------------------------------------

def read_jsonl(path):
    """Yield (line number, "FILE:LINE", object) for every non-blank line of a JSONL file of JSON objects; any problem is a
    MespError naming the file and line."""
    path = Path(path)
    if not path.is_file():
        raise MespError(f"{path}: no such file")
    try:
        lines = path.read_bytes().split(b"\n")
    except OSError as e:
        raise MespError(f"{path}: unreadable ({e.strerror})") from e
    if lines[0].startswith(codecs.BOM_UTF8):  # editors on Windows write one; it is not part of the JSON
        lines[0] = lines[0][len(codecs.BOM_UTF8):]
    for lineno, raw in enumerate(lines, start=1):
        where = f"{path}:{lineno}"
        try:
            text = raw.decode("utf-8").strip()
        except UnicodeDecodeError as e:
            raise MespError(f"{where}: not UTF-8 (byte {e.start})") from e
        if not text:
            continue
        try:
            obj = json.loads(text)
        except json.JSONDecodeError as e:
            raise MespError(f"{where}: invalid JSON ({e.msg} at column {e.colno})") from e
        if not isinstance(obj, dict):
            raise MespError(f"{where}: expected a JSON object, got {type(obj).__name__}")
        yield lineno, where, obj


LONG_SAMPLES = ("truncate", "skip")  # what load_data does with a sample longer than seq_len


def load_data(path, get_tokenizer: Callable[[], object] | None = None, seq_len: int | None = None,
              train_on_prompt: bool = False, vocab_size: int | None = None,
              long_samples: str = "truncate", columns: dict[str, str] | None = None) -> Dataset:
    """Read, tokenize, mask and truncate (or skip) a data file or directory (see the module docstring).

    get_tokenizer() is called only when a line needs a tokenizer, so pre-tokenized data works with models that
    have none. vocab_size, if given, bounds pre-tokenized ids. columns: mesp key -> the file's column name."""
    path = Path(path)
    tokenizer = max_chars = None
    samples: list[Sample] = []
    formats: dict[str, int] = {}
    if long_samples not in LONG_SAMPLES:
        raise MespError(f"long_samples: unknown {long_samples!r}; choose from {', '.join(LONG_SAMPLES)}")
    n_truncated = n_skipped = 0
    for lineno, where, obj in read_records(path, columns):
        fmt = detect_format(obj, where)
        if fmt != "input_ids" and tokenizer is None:
            if get_tokenizer is None:
                raise MespError(f"{where}: the {fmt!r} format needs a tokenizer")
            try:
                tokenizer = get_tokenizer()
            except MespError as e:
                raise MespError(f"{where}: the {fmt!r} format needs a tokenizer: {e}") from e
            max_chars = char_bound(tokenizer, seq_len) if seq_len is not None else None
        ids, labels = encode(obj, fmt, tokenizer, train_on_prompt, where, vocab_size, max_chars)
        if seq_len is not None and len(ids) > seq_len:
            if long_samples == "skip":
                n_skipped += 1
                continue
            ids, labels = ids[:seq_len], labels[:seq_len]
            n_truncated += 1
        sample = Sample(torch.tensor(ids, dtype=torch.long), torch.tensor(labels, dtype=torch.long), lineno)
        if sample.n_targets == 0:
            cut = f" after truncation to seq_len {seq_len}" if seq_len is not None and len(ids) == seq_len else ""
            raise MespError(f"{where}: no token to train on{cut} ({_why_untrainable(fmt)})")
        samples.append(sample)
        formats[fmt] = formats.get(fmt, 0) + 1
    if not samples:
        if n_skipped:
            raise MespError(f"{path}: all {n_skipped} samples are longer than seq_len {seq_len} and were skipped "
                            f"(long_samples skip)")
        raise MespError(f"{path}: no samples (the file is empty)")
    if n_truncated:
        log.info("%s: %d of %d samples truncated to %d tokens", path, n_truncated, len(samples), seq_len)
    if n_skipped:
        log.info("%s: %d of %d samples longer than %d tokens skipped", path, n_skipped, len(samples) + n_skipped,
                 seq_len)
    return Dataset(str(path), samples, n_truncated, formats=formats, n_skipped=n_skipped)


def char_bound(tokenizer, seq_len: int) -> int | None:
    """How many characters of a string to tokenize when only its first seq_len tokens can be kept (None: no
    bound, for a tokenizer that does not list its vocabulary).

    No token covers more characters than the longest string in the vocabulary, M (byte-level BPE spells each
    byte as one character, so a token's vocabulary string is at least as long as the text it covers; added
    tokens are listed too). The first 2 (seq_len + 1) M characters therefore hold at least 2 (seq_len + 1)
    tokens, and cutting there can only change the tokens next to the cut (merges are local to the pre-token
    they act in), which lie far past the first seq_len + 1 tokens that truncation keeps and counts."""
    vocabulary = getattr(tokenizer, "get_vocab", None)
    if vocabulary is None:
        return None
    longest = max((len(t) for t in vocabulary()), default=1)
    return 2 * (seq_len + 1) * max(longest, 1)


def check_data(path, columns: dict[str, str] | None = None) -> None:
    """Check every record's JSON, format and field types without a tokenizer, so bad data is reported before a
    model is loaded (load_data repeats these checks while tokenizing)."""
    for _, where, obj in read_records(path, columns):
        fmt = detect_format(obj, where)
        if fmt == "input_ids":
            _pretokenized(obj, where, None)
        elif fmt == "messages":
            _messages(obj, where)
        else:
            for key in ("text",) if fmt == "text" else ("prompt", "completion"):
                _string(obj, key, where)


def _why_untrainable(fmt: str) -> str:
    return {"text": "the text has fewer than 2 tokens", "prompt/completion": "the completion is empty",
            "messages": "no assistant message with content", "input_ids": "every label is -100"}[fmt]


def detect_format(obj: dict, where: str) -> str:
    found = [fmt for fmt, keys in (("text", ("text",)), ("prompt/completion", ("prompt", "completion")),
                                   ("messages", ("messages",)), ("input_ids", ("input_ids",)))
             if all(k in obj for k in keys)]
    if len(found) == 1:
        return found[0]
    if len(found) > 1:
        raise MespError(f"{where}: ambiguous sample: keys for formats {' and '.join(found)}")
    if "prompt" in obj or "completion" in obj:
        missing = "completion" if "prompt" in obj else "prompt"
        raise MespError(f"{where}: missing field {missing!r}")
    if "labels" in obj:
        raise MespError(f"{where}: missing field 'input_ids' (labels given without it)")
    keys = ", ".join(sorted(obj)) or "none"
    raise MespError(f"{where}: unknown format (keys: {keys}); expected text, prompt+completion, messages or "
                    f"input_ids")


def encode(obj: dict, fmt: str, tokenizer, train_on_prompt: bool, where: str,
           vocab_size: int | None = None, max_chars: int | None = None) -> tuple[list[int], list[int]]:
    """(input_ids, labels) of one sample; each string cut to max_chars characters first (see char_bound)."""
    if fmt == "input_ids":
        return _pretokenized(obj, where, vocab_size)
    if fmt == "text":
        ids = list(tokenizer(_string(obj, "text", where, max_chars))["input_ids"])
        eos = tokenizer.eos_token_id
        if isinstance(eos, int) and (not ids or ids[-1] != eos):
            ids.append(eos)
        return ids, list(ids)
    if fmt == "prompt/completion":
        prompt, completion = _string(obj, "prompt", where, max_chars), _string(obj, "completion", where, max_chars)
        if getattr(tokenizer, "chat_template", None):
            messages = [{"role": "user", "content": prompt}, {"role": "assistant", "content": completion}]
            ids, labels = _chat(tokenizer, messages, where)
        else:
            head = list(tokenizer(prompt)["input_ids"])
            tail = list(tokenizer(completion, add_special_tokens=False)["input_ids"])
            if isinstance(tokenizer.eos_token_id, int):
                tail.append(tokenizer.eos_token_id)
            ids, labels = head + tail, [IGNORE] * len(head) + tail
    else:
        ids, labels = _chat(tokenizer, _messages(obj, where, max_chars), where)
    return ids, (list(ids) if train_on_prompt else labels)


def _string(obj: dict, key: str, where: str, max_chars: int | None = None) -> str:
    v = obj[key]
    if not isinstance(v, str):
        raise MespError(f"{where}: field {key!r} must be a string, got {type(v).__name__}")
    return v if max_chars is None else v[:max_chars]


def _messages(obj: dict, where: str, max_chars: int | None = None) -> list[dict]:
    messages = obj["messages"]
    if not isinstance(messages, list) or not messages:
        raise MespError(f"{where}: field 'messages' must be a non-empty list")
    for i, m in enumerate(messages):
        if not isinstance(m, dict):
            raise MespError(f"{where}: messages[{i}] must be an object with 'role' and 'content'")
        for key in ("role", "content"):
            if key not in m:
                raise MespError(f"{where}: messages[{i}]: missing field {key!r}")
            if not isinstance(m[key], str):
                raise MespError(f"{where}: messages[{i}].{key} must be a string, got {type(m[key]).__name__}")
    if max_chars is not None:
        messages = [{**m, "content": m["content"][:max_chars]} for m in messages]
    return messages


def _pretokenized(obj: dict, where: str, vocab_size: int | None) -> tuple[list[int], list[int]]:
    ids = _int_list(obj, "input_ids", where)
    if not ids:
        raise MespError(f"{where}: field 'input_ids' is empty")
    bad = next((t for t in ids if t < 0 or (vocab_size is not None and t >= vocab_size)), None)
    if bad is not None:
        raise MespError(f"{where}: input_ids holds {bad}, outside the vocabulary [0, {vocab_size})")
    if "labels" not in obj:
        return ids, list(ids)
    labels = _int_list(obj, "labels", where)
    if len(labels) != len(ids):
        raise MespError(f"{where}: 'labels' has {len(labels)} entries, 'input_ids' {len(ids)}")
    bad = next((t for t in labels if t != IGNORE and (t < 0 or (vocab_size is not None and t >= vocab_size))), None)
    if bad is not None:
        raise MespError(f"{where}: labels holds {bad}, neither -100 nor in the vocabulary [0, {vocab_size})")
    return ids, labels


def _int_list(obj: dict, key: str, where: str) -> list[int]:
    v = obj[key]
    if not isinstance(v, list) or not all(isinstance(t, int) and not isinstance(t, bool) for t in v):
        raise MespError(f"{where}: field {key!r} must be a list of integers")
    return v


def _chat(tokenizer, messages: list[dict], where: str) -> tuple[list[int], list[int]]:
    """(input_ids, labels) of a conversation: the loss on the assistant's tokens only."""
    if not getattr(tokenizer, "chat_template", None):
        raise MespError(f"{where}: the 'messages' format needs a tokenizer with a chat template; this one has none")
    ids, assistant = assistant_tokens(tokenizer, messages, where)
    return ids, [t if mine else IGNORE for t, mine in zip(ids, assistant)]
