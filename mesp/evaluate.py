"""Score a base model, and an adapter beside it, on a test set: `mesp eval --model M [--adapter DIR] --data FILE`.

    report = run_eval(EvalSettings(model="smollm2-135m-instruct", adapter="run", data="test.jsonl", answers=True))

The loss is mesp.train.evaluate's: the mean per labelled token over the whole set, with the masks training uses
(mesp.data: completions, assistant turns, given labels), and its perplexity exp(loss). With an adapter the base is
scored first, then the same loaded model with the adapter on it, so both rows come from one load of the base
(streamed from its file as training streams it). With `answers`, every prompt/completion or messages record is also
answered greedily (through the chat template where the tokenizer has one, as `mesp generate --chat`; the last
assistant turn is the one answered) and counted correct when the answer contains the expected completion, ignoring
case: the demo's rule. The whole run is measured with mesp.memory.FootprintMeter.
"""

from __future__ import annotations

import logging
import math
import time
from dataclasses import dataclass, field

import torch

from .data import detect_format, load_data
from .errors import MespError
from .generate import generate_batch_ids, stop_token_ids
from .loaders import QUANTIZE_CHOICES, QUANTIZE_HELP, WEIGHTS, WEIGHTS_HELP, load_model
from .lora import load_adapter
from .memory import RUNTIME_FLOOR_LABEL, FootprintMeter, runtime_floor_bytes
from .precision import AUTO, resolve_dtype
from .settings import setting
from .tables import DataColumns, read_records
from .tokenizer import encode_prompt, load_tokenizer, render_chat
from .train import evaluate
from .train_config import MODEL_HELP

log = logging.getLogger(__name__)


@dataclass
class EvalSettings(DataColumns):
    """`mesp eval`: what to score and how (flags named as mesp train's)."""
    model: str | None = setting(None, MODEL_HELP, path="file_or_name")
    adapter: str | None = setting(None, "LoRA adapter directory (PEFT format, e.g. a mesp train --out): scored "
                                        "beside the base", metavar="DIR", path="file")
    data: str | None = setting(None, "test data, as mesp train's --data", metavar="FILE|DIR", path="file")
    batch_size: int = setting(4, "samples per forward pass")
    seq_len: int = setting(512, "longest sample in tokens; longer ones are truncated, as in training")
    train_on_prompt: bool = setting(False, "loss on prompt tokens too (as the adapter was trained)")
    answers: bool = setting(False, "also answer each prompt/completion or messages record greedily and count "
                                   "the answers that contain the expected completion")
    max_new_tokens: int = setting(32, "most tokens of each greedy answer")
    dtype: str = setting(AUTO, "compute dtype, as mesp train's", choices=(AUTO, "float32", "bfloat16"))
    device: str = setting("auto", "cpu, cuda, cuda:N, or auto: cuda if available")
    quantize: str | None = setting(None, QUANTIZE_HELP, choices=QUANTIZE_CHOICES)
    weights: str | None = setting(None, WEIGHTS_HELP, choices=WEIGHTS)
    json: bool = setting(False, "print one JSON object instead of the table")


@dataclass
class Score:
    loss: float
    perplexity: float
    answers_correct: int | None = None  # with answers
    answers_total: int | None = None


@dataclass
class EvalReport:
    data: str
    samples: int
    targets: int  # labelled tokens the loss averages over
    base: Score
    adapter: Score | None
    seconds: float
    memory: dict = field(default_factory=dict)  # FootprintMeter.summary() + the runtime floor


def contains_answer(text: str, expected: str) -> bool:
    """Whether `text` contains the expected key word(s), ignoring case: how the demo and `--answers` count an
    answer right."""
    return expected.casefold() in text.casefold()


def questions(path, columns: dict[str, str], tokenizer) -> list[tuple[list[int], str]]:
    """(prompt ids, expected answer) of every prompt/completion or messages record, prompted as training renders
    them: through the chat template when the tokenizer has one (the conversation up to its last assistant turn
    for messages), else the prompt text itself."""
    out = []
    chat = bool(getattr(tokenizer, "chat_template", None))
    for _, where, obj in read_records(path, columns):
        fmt = detect_format(obj, where)
        if fmt == "prompt/completion":
            out.append((encode_prompt(tokenizer, obj["prompt"], chat), obj["completion"]))
        elif fmt == "messages":
            turns = obj["messages"]
            last = max((i for i, m in enumerate(turns) if m.get("role") == "assistant"), default=None)
            if last is None:
                raise MespError(f"{where}: --answers: no assistant turn to answer")
            text = render_chat(tokenizer, turns[:last], where, generation_prompt=True)
            out.append((list(tokenizer(text, add_special_tokens=False)["input_ids"]), turns[last]["content"]))
    if not out:
        raise MespError(f"{path}: --answers needs prompt/completion or messages records; this data has none")
    return out


def count_answers(model, tokenizer, asked: list[tuple[list[int], str]], max_new_tokens: int,
                  batch_size: int) -> int:
    """How many greedy answers contain their expected completion, `batch_size` questions decoded at a time."""
    stops = stop_token_ids(model, tokenizer)
    correct = 0
    for start in range(0, len(asked), batch_size):
        group = asked[start:start + batch_size]
        answers = generate_batch_ids(model, [ids for ids, _ in group], max_new_tokens, stops)
        correct += sum(contains_answer(tokenizer.decode(new, skip_special_tokens=True), expected.strip())
                       for new, (_, expected) in zip(answers, group))
    return correct


def score(model, data, batch_size: int, tokenizer=None, asked=None, max_new_tokens: int = 0) -> Score:
    with torch.no_grad():
        loss = evaluate(model, data, batch_size)
    s = Score(loss, math.exp(loss) if loss < 700 else math.inf)
    if asked is not None:
        s.answers_correct, s.answers_total = count_answers(model, tokenizer, asked, max_new_tokens, batch_size), len(asked)
    return s


def run_eval(s: EvalSettings) -> EvalReport:
    """Score s.model, and s.adapter on it when given, on s.data (see the module docstring)."""
    for name in ("model", "data"):
        if not getattr(s, name):
            raise MespError(f"--{name}: required")
    for name in ("batch_size", "seq_len", "max_new_tokens"):
        v = getattr(s, name)
        if isinstance(v, bool) or not isinstance(v, int) or v < 1:
            raise MespError(f"{name}: must be a positive integer, got {v!r}")
    device = s.device if s.device != "auto" else ("cuda" if torch.cuda.is_available() else "cpu")
    started = time.perf_counter()
    with FootprintMeter() as meter:
        model = load_model(s.model, dtype=resolve_dtype(s.dtype, device), device=device, quantize=s.quantize,
                           weights=s.weights)
        tokenizer = None

        def get_tokenizer():
            nonlocal tokenizer
            tokenizer = tokenizer or load_tokenizer(model)
            return tokenizer

        data = load_data(s.data, get_tokenizer=get_tokenizer, seq_len=s.seq_len, train_on_prompt=s.train_on_prompt,
                         vocab_size=model.config.vocab_size, columns=s.columns())
        asked = questions(s.data, s.columns(), get_tokenizer()) if s.answers else None
        base = score(model, data, s.batch_size, tokenizer, asked, s.max_new_tokens)
        adapted = None
        if s.adapter:
            load_adapter(model, s.adapter)
            adapted = score(model, data, s.batch_size, tokenizer, asked, s.max_new_tokens)
    memory = {**meter.summary(), "runtime_floor_bytes": runtime_floor_bytes(), "runtime_floor_label": RUNTIME_FLOOR_LABEL}
    return EvalReport(data=str(s.data), samples=len(data), targets=data.n_targets, base=base, adapter=adapted,
                      seconds=time.perf_counter() - started, memory=memory)
