"""The demo: teach the shipped SmolLM2-135M-Instruct facts about a fictional person with MeSP, on a laptop CPU.

    report = run_demo(DemoSettings(steps=40), progress=print)

1. asks the held-out questions (paraphrases that never appear in the training data) before training;
2. fine-tunes LoRA with `mesp.train` on the bundled chat data (method mesp, per-layer updates);
3. asks them again with the trained adapter, and scores both rounds (answers containing the expected word);
4. measures the allocator-level peak memory of one MeSP step beside one MeBP step on the same first batch, and
   what a device would see: the whole-process private-footprint peak of a short MeSP and a short MeBP training
   run with the demo's settings. Each figure comes from its own fresh `mesp train` process (mesp.wholeprocess):
   the allocator peak needs the profiler, whose own records would inflate any process it runs in, and the demo's
   process stays as lean as the training it shows.

The bundled data lives in mesp/demo_data: demo_train.jsonl and demo_valid.jsonl (chat `messages`), and
demo_heldout.jsonl ({"question", "answer"}: the key word a correct answer contains). Another model can be
taught the same facts (DemoSettings.model, `mesp demo --model`); a base model whose tokenizer has no chat
template (Gemma 3 270M's GGUF) gets them as plain question/answer text (QA_PROMPT), asked the same way.
"""

from __future__ import annotations

import json
import logging
import tempfile
import time
from collections.abc import Callable
from dataclasses import dataclass, field, replace
from pathlib import Path

import torch

from .checkpoint import check_out_dir
from .data import MicroBatchStream, load_data, read_jsonl
from .errors import MespError
from .evaluate import contains_answer
from .generate import generate_batch
from .loaders import load_model
from .lora import load_adapter
from .memory import RUNTIME_FLOOR_LABEL, peak_rss_bytes, runtime_floor_bytes
from .tokenizer import load_tokenizer
from .train import train
from .train_config import TrainConfig, resolve
from .wholeprocess import shown, train_process_memory

log = logging.getLogger(__name__)

DATA_DIR = Path(__file__).parent / "demo_data"
TRAIN_FILE = DATA_DIR / "demo_train.jsonl"
VALID_FILE = DATA_DIR / "demo_valid.jsonl"
HELDOUT_FILE = DATA_DIR / "demo_heldout.jsonl"
MODEL = "smollm2-135m-instruct"
MEMORY_METHODS = ("mesp", "mebp")
DEFAULT_STEPS = 40
# The questions are answered by a resident copy of the base: every decoded token reads every weight, and a
# streamed base decodes each matrix from its file again for each token (10-30x slower on 2 cores). Training, the
# demo's point, streams as DemoSettings.weights says.
ASKING_WEIGHTS = "resident"
QA_PROMPT = "Question: {question}\nAnswer:"  # how a model without a chat template is taught and asked


@dataclass
class DemoSettings:
    """What the demo trains with: tuned so SmolLM2-135M learns the facts in a few minutes on 2 CPU cores.

    Held-out scores of tuning runs (lr 2e-3, cosine): batch 4 rank 16 for 30 steps 19/20, for 60 steps 20/20;
    batch 4 rank 8 for 24 steps 18/20; batch 8 rank 16 for 40 steps 19/20 (about twice the compute)."""
    model: str = MODEL
    steps: int = DEFAULT_STEPS
    batch_size: int = 4
    seq_len: int = 64  # the longest bundled sample is 57 tokens
    rank: int = 16
    alpha: float = 32.0
    lr: float = 2e-3
    warmup: int = 4
    seed: int = 0
    max_new_tokens: int = 16  # the answers are one short sentence
    train_file: str = str(TRAIN_FILE)
    valid_file: str | None = str(VALID_FILE)
    heldout_file: str = str(HELDOUT_FILE)
    process_steps: int = 2  # training steps of each whole-process measurement (0: leave it out)
    weights: str | None = None  # load_model's weights= (None: its default, stream for the shipped GGUF)
    dtype: str = "float32"  # not "auto": the demo's answers and figures are then the same on every CPU


@dataclass
class Answer:
    question: str
    expected: str
    before: str = ""
    after: str = ""

    @property
    def correct_before(self) -> bool:
        return contains_answer(self.before, self.expected)

    @property
    def correct_after(self) -> bool:
        return contains_answer(self.after, self.expected)


@dataclass
class StepMemory:
    method: str
    peak_bytes: int  # allocator-level peak of the first step above its start (`mesp train --measure-memory`)
    command: str


@dataclass
class ProcessMemory:
    method: str
    private_peak_bytes: int | None  # the fresh `mesp train` process's private-footprint peak (None off Linux)
    rss_peak_bytes: int | None
    stage_private_peaks: dict[str, int]
    command: str


@dataclass
class DemoReport:
    settings: dict
    answers: list[Answer]
    train: dict  # mesp.train.TrainResult as a dict
    memory: list[StepMemory]
    memory_batch: tuple[int, int]  # (samples, tokens per sample) of the measured step
    peak_rss_bytes: int
    seconds: float
    adapter_dir: str | None  # None when the run went to a temporary directory that is gone now
    device: str = "cpu"
    score: dict = field(default_factory=dict)  # {"before": n, "after": n, "total": n}
    process_memory: list[ProcessMemory] = field(default_factory=list)
    runtime_floor_bytes: int | None = None
    runtime_floor_label: str = RUNTIME_FLOOR_LABEL


def load_heldout(path) -> list[Answer]:
    """The held-out questions: one {"question": ..., "answer": ...} per line, both non-empty strings."""
    out = []
    for _, where, obj in read_jsonl(path):
        for key in ("question", "answer"):
            if not isinstance(obj.get(key), str) or not obj[key].strip():
                raise MespError(f"{where}: {key!r} must be a non-empty string")
        out.append(Answer(obj["question"], obj["answer"]))
    if not out:
        raise MespError(f"{path}: no questions")
    return out


def has_chat_template(tokenizer) -> bool:
    return bool(getattr(tokenizer, "chat_template", None))


def ask(model, tokenizer, questions: list[str], max_new_tokens: int) -> list[str]:
    """Greedy answers, as `mesp generate --chat` gives them (QA_PROMPT text without a chat template; the answer
    ends at its first line then), all questions decoded as one batch (a decoding step reads the weights once)."""
    if has_chat_template(tokenizer):
        return [a.strip() for a in generate_batch(model, tokenizer, questions, chat=True,
                                                  max_new_tokens=max_new_tokens)]
    return [a.strip().split("\n")[0] for a in generate_batch(model, tokenizer, [QA_PROMPT.format(question=q)
                                                                                 for q in questions],
                                                              max_new_tokens=max_new_tokens)]


def as_question_answer_text(src, dst: Path) -> str:
    """The chat `messages` file `src` as prompt/completion pairs in QA_PROMPT form, written to `dst`."""
    with open(dst, "w", encoding="utf-8") as f:
        for _, where, obj in read_jsonl(src):
            turns = obj.get("messages") or []
            user = [m["content"] for m in turns if m.get("role") == "user"]
            reply = [m["content"] for m in turns if m.get("role") == "assistant"]
            if len(user) != 1 or len(reply) != 1:
                raise MespError(f"{where}: expected one user and one assistant turn")
            f.write(json.dumps({"prompt": QA_PROMPT.format(question=user[0]), "completion": " " + reply[0]}) + "\n")
    return str(dst)


def train_args(s: DemoSettings, method: str, steps: int, device: str) -> list[str]:
    """`mesp train` arguments of a measured run: the demo's own training settings, `steps` steps of `method`."""
    return ["--model", s.model, "--data", s.train_file, "--method", method, "--rank", str(s.rank),
            "--alpha", f"{s.alpha:g}", "--steps", str(steps), "--batch-size", str(s.batch_size),
            "--seq-len", str(s.seq_len), "--lr", f"{s.lr:g}", "--optimizer", "adamw", "--seed", str(s.seed),
            "--dtype", s.dtype, "--device", device] + (["--weights", s.weights] if s.weights else [])


def step_memory(s: DemoSettings, device: str) -> list[StepMemory]:
    """The allocator-level peak of the first step of MeSP and of MeBP (the same batch: same data, order and
    seed), each measured in its own fresh `mesp train --measure-memory` process."""
    out = []
    with tempfile.TemporaryDirectory(prefix="mesp-demo-step-") as tmp:
        for method in MEMORY_METHODS:
            args = train_args(s, method, 1, device) + ["--measure-memory"]
            m = train_process_memory(args, Path(tmp) / method)
            out.append(StepMemory(method, m["step_allocator_peak_bytes"], shown(args)))
    return out


def process_memory(s: DemoSettings, device: str) -> list[ProcessMemory]:
    """The whole-process private-footprint peak of `s.process_steps` training steps with the demo's settings,
    MeSP and MeBP each in its own fresh `mesp train` process (the model is loaded there, not here)."""
    out = []
    with tempfile.TemporaryDirectory(prefix="mesp-demo-process-") as tmp:
        for method in MEMORY_METHODS:
            args = train_args(s, method, s.process_steps, device)
            m = train_process_memory(args, Path(tmp) / method)
            out.append(ProcessMemory(method, m["private_peak_bytes"], m["rss_peak_bytes"],
                                     m["stage_private_peaks"], shown(args)))
    return out


def train_config(s: DemoSettings, run_dir, overwrite: bool = False, device: str = "cpu") -> TrainConfig:
    """The demo's own training run (MeSP, AdamW, cosine schedule) writing its adapter to `run_dir`."""
    return TrainConfig(model=s.model, data=s.train_file, valid=s.valid_file, out=str(run_dir), method="mesp",
                       rank=s.rank, alpha=s.alpha, steps=s.steps, batch_size=s.batch_size, seq_len=s.seq_len,
                       lr=s.lr, optimizer="adamw", schedule="cosine", warmup=s.warmup, seed=s.seed,
                       overwrite=overwrite, device=device, eval_every=max(1, s.steps // 4), save_every=s.steps,
                       weights=s.weights, dtype=s.dtype)


def run_demo(settings: DemoSettings | None = None, out: str | None = None, overwrite: bool = False,
             progress: Callable[[dict], None] | None = None) -> DemoReport:
    """Run the demo (see the module docstring). The adapter is kept in `out` when given, else trained in a
    temporary directory that is removed at the end. progress(event) receives {"event": "answers", "phase":
    "before"|"after", "answers": [...]}, mesp.train's own events, {"event": "memory", ...} as the two measured steps begin
    and {"event": "process_memory", ...} as the two measured processes start."""

    s = settings or DemoSettings()
    emit = progress or (lambda event: None)
    started = time.perf_counter()
    device = "cuda" if torch.cuda.is_available() else "cpu"
    answers = load_heldout(s.heldout_file)
    questions = [a.question for a in answers]
    # scratch: the run when `out` is not given, and the question/answer text of a model without a chat template
    with tempfile.TemporaryDirectory(prefix="mesp-demo-") as scratch:
        run_dir = Path(out) if out else Path(scratch) / "run"
        check_out_dir(resolve(train_config(s, run_dir, overwrite, device)))  # fails now, not after the answers

        model = load_model(s.model, dtype=s.dtype, device=device, weights=ASKING_WEIGHTS)
        tokenizer = load_tokenizer(model)
        for a, text in zip(answers, ask(model, tokenizer, questions, s.max_new_tokens)):
            a.before = text
        emit({"event": "answers", "phase": "before", "answers": answers})
        del model  # train() loads its own copy; holding this one too would only add to the process's peak

        taught = s
        if not has_chat_template(tokenizer):
            taught = replace(s, train_file=as_question_answer_text(s.train_file, Path(scratch) / "train.jsonl"),
                             valid_file=s.valid_file and as_question_answer_text(s.valid_file,
                                                                                 Path(scratch) / "valid.jsonl"))
        result = train(train_config(taught, run_dir, overwrite, device), progress=emit)
        model = load_model(s.model, dtype=s.dtype, device=device, weights=ASKING_WEIGHTS)
        load_adapter(model, run_dir)
        for a, text in zip(answers, ask(model, tokenizer, questions, s.max_new_tokens)):
            a.after = text
        emit({"event": "answers", "phase": "after", "answers": answers})
        del model  # the measured children load their own copies

        # the measured batch: the first training micro-batch of the run (same samples for both methods)
        data = load_data(taught.train_file, get_tokenizer=lambda: tokenizer, seq_len=s.seq_len)
        batch_shape = tuple(data.collate(MicroBatchStream(len(data), s.batch_size, s.seed).indices(0))
                            .input_ids.shape)
        emit({"event": "memory", "methods": MEMORY_METHODS, "batch": batch_shape})
        memory = step_memory(taught, device)
        whole = []
        if s.process_steps > 0:
            emit({"event": "process_memory", "methods": MEMORY_METHODS, "steps": s.process_steps})
            whole = process_memory(taught, device)

    score = {"before": sum(a.correct_before for a in answers), "after": sum(a.correct_after for a in answers),
             "total": len(answers)}
    log.info("demo: %d/%d held-out answers correct before training, %d/%d after",
             score["before"], score["total"], score["after"], score["total"])
    return DemoReport(settings=vars(s).copy(), answers=answers, train=vars(result).copy(), memory=memory,
                      memory_batch=batch_shape, peak_rss_bytes=peak_rss_bytes(),
                      seconds=time.perf_counter() - started, adapter_dir=str(run_dir) if out else None,
                      device=device, score=score, process_memory=whole,
                      runtime_floor_bytes=runtime_floor_bytes())
