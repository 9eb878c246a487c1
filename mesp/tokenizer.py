"""Tokenizers and chat templates: which tokenizer a model has, and how a conversation becomes tokens.

    load_tokenizer(model_or_source)          the transformers tokenizer of a HF dir / .gguf / preset (cached)
    encode_prompt(tok, prompt, chat=True)    a prompt as one user turn, ready for generation
    assistant_tokens(tok, messages, where)   a conversation's ids and which of them the assistant wrote

The training data formats (mesp.data) and generation (mesp.generate) both go through here, so a chat sample
is rendered exactly as `mesp generate --chat` prompts the model.
"""

from __future__ import annotations

import hashlib
import logging
import os
import shutil
from pathlib import Path

from .errors import MespError, one_line
from .fileio import fsync_dir, temp_dir
from .model import Model
from .presets import PRESETS, cache_dir, preset_gguf_path

log = logging.getLogger(__name__)

TOKENIZER_FILES = ("tokenizer.json", "tokenizer_config.json", "tokenizer.model", "vocab.json")
_TOKENIZERS: dict[tuple[str, str], object] = {}  # (kind, path) -> tokenizer: loading one takes seconds


# ---- which tokenizer ------------------------------------------------------------------------------------

def tokenizer_source(source_or_model) -> tuple[str, str]:
    """("hf" | "gguf" | "none", path or preset name) of a model, or of a HF dir / .gguf / preset name."""
    if isinstance(source_or_model, Model):
        ts = source_or_model.tokenizer_source
        if ts is None:
            raise MespError("this model has no tokenizer source (it was not built by mesp.load_model)")
        return tuple(ts)
    src = os.fspath(source_or_model)
    if src in PRESETS:
        if PRESETS[src]["kind"] == "gguf":
            return ("gguf", str(preset_gguf_path(src)))
        return ("none", src)
    path = Path(src).expanduser()
    if not path.exists():
        raise MespError(f"{src}: no such file, directory or preset")
    if path.is_dir():
        return ("hf", str(path))
    if path.suffix.lower() == ".gguf":
        return ("gguf", str(path))
    raise MespError(f"{path}: not a model directory or .gguf file")


def load_tokenizer(source_or_model):
    """The transformers tokenizer for a model (or for a HF dir / .gguf / preset name); cached per source."""
    kind, where = tokenizer_source(source_or_model)
    if kind == "none":
        raise MespError(f"model {where!r} has random weights and no tokenizer; "
                        f"train it on pre-tokenized data or load a real checkpoint")
    key = (kind, where)
    if key in _TOKENIZERS:
        return _TOKENIZERS[key]
    from transformers import AutoTokenizer
    from transformers.utils import logging as hf_logging

    verbosity = hf_logging.get_verbosity()
    hf_logging.set_verbosity_error()
    try:
        if kind == "hf":
            if not has_tokenizer_files(where):
                raise MespError(f"{where}: no tokenizer files ({', '.join(TOKENIZER_FILES[:2])}, ...)")
            tok = AutoTokenizer.from_pretrained(where, local_files_only=True)
        else:
            tok = gguf_tokenizer(Path(where))
    except MespError:
        raise
    except Exception as e:
        raise MespError(f"{where}: cannot load a tokenizer ({one_line(e)})") from e
    finally:
        hf_logging.set_verbosity(verbosity)
    if len(tok) < 2:  # transformers builds an empty tokenizer rather than failing on some inputs
        raise MespError(f"{where}: no usable tokenizer (vocabulary of {len(tok)})")
    _TOKENIZERS[key] = tok
    return tok


def gguf_tokenizer(path: Path):
    """The transformers tokenizer of a GGUF file. Building it from the file's vocabulary takes minutes for a
    large one (Gemma's 262k tokens), so the result is saved once under the cache directory, keyed by the file's
    path, size and modification time, and later calls load that copy."""
    from transformers import AutoTokenizer

    st = path.stat()
    key = hashlib.sha256(f"{path.resolve()}\0{st.st_size}\0{st.st_mtime_ns}".encode()).hexdigest()[:24]
    saved = cache_dir() / "tokenizers" / key
    if (saved / "tokenizer_config.json").is_file():
        return AutoTokenizer.from_pretrained(str(saved), local_files_only=True)
    tok = AutoTokenizer.from_pretrained(str(path.parent), gguf_file=path.name, local_files_only=True)
    tmp = None
    try:  # a cache only: failing to write it (or losing a race to write it) costs the next call time, nothing else
        saved.parent.mkdir(parents=True, exist_ok=True)
        tmp = temp_dir(saved.parent, key)
        tok.save_pretrained(str(tmp))
        os.replace(tmp, saved)
        fsync_dir(saved.parent)
    except OSError as e:
        log.info("tokenizer of %s not cached (%s)", path, e)
    finally:
        if tmp is not None and tmp.exists():
            shutil.rmtree(tmp, ignore_errors=True)
    return tok


def has_tokenizer_files(directory) -> bool:
    """Whether a HF directory holds any tokenizer file."""
    return any((Path(directory) / f).is_file() for f in TOKENIZER_FILES)


def source_tokenizer(model: Model):
    """The tokenizer that came with the model, or None when it has none (random preset, bare HF directory)."""
    kind, where = model.tokenizer_source or ("none", "")
    if kind == "none" or (kind == "hf" and not has_tokenizer_files(where)):
        return None
    return load_tokenizer(model)


# ---- prompts and chat templates -------------------------------------------------------------------------

def encode_prompt(tokenizer, prompt: str, chat: bool = False) -> list[int]:
    """Token ids of `prompt`; with chat, as one user turn through the tokenizer's chat template."""
    if chat:
        if not getattr(tokenizer, "chat_template", None):
            raise MespError("--chat: this tokenizer has no chat template")
        text = tokenizer.apply_chat_template([{"role": "user", "content": prompt}], tokenize=False,
                                             add_generation_prompt=True)
        ids = tokenizer(text, add_special_tokens=False)["input_ids"]
    else:
        ids = tokenizer(prompt)["input_ids"]
    if not ids:
        raise MespError("the prompt is empty (no tokens)")
    return list(ids)


def render_chat(tokenizer, messages, where: str, generation_prompt: bool = False) -> str:
    """The conversation as text through the tokenizer's chat template (with the assistant's opening after it
    when generation_prompt); a template's rejection becomes a MespError naming `where`."""
    try:
        return tokenizer.apply_chat_template(messages, tokenize=False, add_generation_prompt=generation_prompt)
    except Exception as e:  # jinja errors: templates raise on role orders they do not support
        raise MespError(f"{where}: the chat template rejects these messages ({one_line(e)})") from e


def assistant_spans(tokenizer, messages: list[dict], where: str) -> tuple[str, list[tuple[int, int]]]:
    """The rendered conversation and the character spans [start, end) of each assistant turn.

    A turn ends where the conversation rendered up to and including it ends (so its end-of-turn marker is
    learned); it starts where the conversation before it, rendered with the generation prompt, ends (what
    `generate --chat` feeds the model). Where a template does not render prefixes that way, the turn's
    content is looked up in its own rendering instead."""
    full = render_chat(tokenizer, messages, where)
    spans = []
    for i, m in enumerate(messages):
        if m["role"] != "assistant":
            continue
        upto = render_chat(tokenizer, messages[:i + 1], where)
        if not full.startswith(upto):
            raise MespError(f"{where}: the chat template renders messages[{i}] differently in the whole "
                            f"conversation than in its prefix; cannot locate the assistant turns")
        start = -1
        if i > 0:
            before = render_chat(tokenizer, messages[:i], where, generation_prompt=True)
            if upto.startswith(before):
                start = len(before)
        if start < 0 and m["content"]:
            start = upto.rfind(m["content"])
        if start < 0:
            raise MespError(f"{where}: cannot locate assistant messages[{i}] in the chat template's rendering")
        spans.append((start, len(upto)))
    return full, spans


def assistant_tokens(tokenizer, messages: list[dict], where: str) -> tuple[list[int], list[bool]]:
    """The conversation's token ids, and for each whether the assistant wrote it (it starts inside an
    assistant span of assistant_spans)."""
    text, spans = assistant_spans(tokenizer, messages, where)
    enc = tokenizer(text, add_special_tokens=False, return_offsets_mapping=True)
    ids, offsets = list(enc["input_ids"]), enc["offset_mapping"]
    return ids, [any(s <= start < e for s, e in spans) for start, _ in offsets]
