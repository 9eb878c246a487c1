"""`mesp` command line: a thin layer over the library. Only this module prints.

Each subcommand is a pair: `<name>_args(parser)` declares its flags, and `<name>_run(args)`, registered with
@command, runs it. Bad input raises MespError deeper down; main() turns it, an OS refusal (a path that cannot be
written, a full disk) and running out of memory into one line on stderr and exit status 2, never a traceback.
Anything else is a bug: one line saying so, exit 2, and `mesp -v` shows the traceback.
"""

from __future__ import annotations

import argparse
import dataclasses
import importlib.metadata
import json
import logging
import os
import shlex
import signal
import sys
import traceback

from tqdm import tqdm

from . import __version__
from .bench.cli import bench_args, bench_run
from .federated.cli import federated_args, federated_run
from .checkpoint import load_run_config
from .demo import DEFAULT_STEPS, MODEL, DemoSettings, run_demo
from .errors import MespError, one_line
from .evaluate import EvalSettings, run_eval
from .export import export_arguments, export_gguf_lora, merge_format_arguments, merge_gguf
from .generate import check_sampling, generate_stream
from .loaders import QUANTIZE_CHOICES, QUANTIZE_HELP, WEIGHTS, WEIGHTS_HELP, load_model
from .lora import load_adapter
from .memory import format_mib, return_freed_memory_to_os
from .merge import merge_adapter
from .plot import plot_run
from .planner import EstimateSettings, apply_plan, estimate_text, plan_train, run_estimate
from .methods import METHODS
from .presets import PRESETS
from .quantize import quantize_model
from .settings import add_arguments, given, read_toml
from .tokenizer import load_tokenizer
from .interrupt import exit_status
from .train import TrainingInterrupted, train
from .train_config import MODEL_HELP, TrainConfig, resolve

COMMANDS: dict[str, tuple] = {}  # name -> (help, args_fn, run_fn), in registration order


def command(name: str, args_fn, help: str):
    def register(run_fn):
        COMMANDS[name] = (help, args_fn, run_fn)
        return run_fn
    return register


def package_version() -> str:
    """The installed distribution's version; the package's own when it runs from a source tree."""
    try:
        return importlib.metadata.version("mesp")
    except importlib.metadata.PackageNotFoundError:
        return __version__


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="mesp", description="Exact-gradient LoRA fine-tuning under tight memory.")
    parser.add_argument("-v", "--verbose", action="store_true", help="log progress details")
    parser.add_argument("--version", action="version", version=f"mesp {package_version()}")
    sub = parser.add_subparsers(dest="command", required=True)
    for name, (help_text, args_fn, _) in COMMANDS.items():
        args_fn(sub.add_parser(name, help=help_text, description=help_text))
    return parser


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    logging.basicConfig(level=logging.INFO if args.verbose else logging.WARNING, format="%(message)s")

    return_freed_memory_to_os()  # peak RSS then tracks live tensors, not glibc's heap
    try:
        return COMMANDS[args.command][2](args) or 0
    except MespError as e:
        print(f"mesp {args.command}: error: {e}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        print(f"mesp {args.command}: interrupted", file=sys.stderr)
        return 130
    except OSError as e:  # the system refused: a path that cannot be written, a full disk. The user's to fix.
        where = f"{e.filename}: " if e.filename else ""
        print(f"mesp {args.command}: error: {where}{e.strerror or one_line(e)}", file=sys.stderr)
        if args.verbose:
            traceback.print_exc()
        return 2
    except MemoryError:
        print(f"mesp {args.command}: error: out of memory (a shorter --seq-len, a smaller --batch-size or --rank, or "
              f"a quantized model needs less)", file=sys.stderr)
        return 2
    except Exception as e:  # the last resort: anything else is a bug in mesp, never a traceback the user must read
        print(f"mesp {args.command}: internal error: {type(e).__name__}: {one_line(e)}. This is a bug in mesp; "
              f"please report it with the command and the output of `mesp -v {args.command} ...` (-v shows the "
              f"traceback)", file=sys.stderr)
        if args.verbose:
            traceback.print_exc()
        return 2


# ---- subcommands (each: NAME_args, then @command NAME_run) --------------------------------------------

def add_quantize_args(p: argparse.ArgumentParser) -> None:
    """--quantize, --weights and --lazy for a command that loads a base model; see mesp.loaders.load_model.
    (mesp train's --quantize and --weights come from TrainConfig, with the same choices and help.)"""

    p.add_argument("--quantize", choices=QUANTIZE_CHOICES, default="none", help=f"{QUANTIZE_HELP} (default none)")
    add_weights_arg(p)
    p.add_argument("--lazy", action="store_true", help="leave a Hugging Face directory's weights on disk, read at "
                                                       "each use")


def add_weights_arg(p: argparse.ArgumentParser) -> None:
    p.add_argument("--weights", choices=WEIGHTS, default=None, help=WEIGHTS_HELP)


# ---- generate ------------------------------------------------------------------------------------------

def generate_args(p: argparse.ArgumentParser) -> None:
    p.add_argument("--model", required=True, help=MODEL_HELP)
    p.add_argument("--adapter", help="LoRA adapter directory (PEFT format) to apply")
    p.add_argument("--prompt", required=True, help="the prompt text")
    p.add_argument("--chat", action="store_true", help="wrap the prompt as a user turn with the chat template")
    p.add_argument("--max-new-tokens", type=int, default=64, help="most tokens to generate (default 64)")
    p.add_argument("--temperature", type=float, default=0.0, help="0 = greedy (default); > 0 samples")
    p.add_argument("--top-p", type=float, default=1.0, help="nucleus sampling mass (default 1.0)")
    p.add_argument("--seed", type=int, default=0, help="sampling seed (default 0)")
    p.add_argument("--dtype", choices=["float32", "bfloat16"], default="float32", help="compute dtype")
    add_quantize_args(p)


@command("generate", generate_args, "Generate text from a prompt with a model (and optional LoRA adapter).")
def generate_run(args) -> int:
    check_sampling(args.max_new_tokens, args.temperature, args.top_p)
    if args.model in PRESETS:
        load_tokenizer(args.model)  # a random preset has none: fail before building its weights
    model = load_model(args.model, dtype=args.dtype, quantize=args.quantize, weights=args.weights, lazy=args.lazy)
    tokenizer = load_tokenizer(model)
    if args.adapter:
        load_adapter(model, args.adapter)
    for piece in generate_stream(model, tokenizer, args.prompt, chat=args.chat, max_new_tokens=args.max_new_tokens,
                                 temperature=args.temperature, seed=args.seed, top_p=args.top_p):
        print(piece, end="", flush=True)
    print()
    return 0


# ---- train ---------------------------------------------------------------------------------------------

def train_args(p: argparse.ArgumentParser) -> None:
    p.add_argument("--config", metavar="FILE.toml", help="settings file: keys are these flags' names (dashes or "
                   "underscores); flags given here override it")
    p.add_argument("--dry-run", action="store_true", help="print the resolved settings as JSON (after the memory "
                   "plan, with --memory-budget) and exit")
    # every flag defaults to None, so a --config file (or a resumed run) can fill what the command line leaves
    # out; the real defaults are TrainConfig's (see --dry-run)
    add_arguments(p, TrainConfig, defaults_to_none=True)


PROGRESS_EVERY = 10  # steps between plain progress lines when the output is not a terminal


def resolve_train_args(args):
    """TrainConfig from, lowest first: its defaults, the resumed run's saved settings, --config, the flags."""
    settings = {**(read_toml(TrainConfig, args.config) if args.config else {}), **given(TrainConfig, args)}
    if settings.get("resume") and settings.get("out"):
        settings = {**(load_run_config(settings["out"]) or {}), **settings}
    return resolve(TrainConfig(**settings))


@command("train", train_args, "Fine-tune a LoRA adapter on a JSONL file.")
def train_run(args) -> int:
    config = resolve_train_args(args)
    if config.memory_budget is not None:  # before any work: a budget nothing fits is one line here
        plan = plan_train(config)
        config = apply_plan(config, plan)
        print(plan.describe(), flush=True)
    if args.dry_run:
        print(json.dumps(config.to_dict(), indent=2))
        return 0
    bar = None

    def progress(event):
        nonlocal bar
        if event["event"] == "start":
            bar = tqdm(total=event["total_steps"], initial=event["start_step"], desc="train", unit="step",
                       disable=None, dynamic_ncols=True)
        elif event["event"] == "step" and bar is not None:
            memory = event.get("peak_bytes", event["peak_rss_bytes"])
            post = {"loss": f"{event['loss']:.4f}", "tok/s": f"{event['tokens_per_s'] or 0:.0f}",
                    "mem": f"{format_mib(memory, 0)}MiB" + ("" if "peak_bytes" in event else " rss")}
            if "valid_loss" in event:
                post["valid"] = f"{event['valid_loss']:.4f}"
            if bar.disable:  # not a terminal (a log file, a pipe): a plain line now and then instead of the bar
                step, total = event["step"], event["total_steps"]
                if step == 1 or step % PROGRESS_EVERY == 0 or step == total:
                    print(f"step {step}/{total}: " + ", ".join(f"{k} {v}" for k, v in post.items()), flush=True)
            bar.set_postfix(post, refresh=False)
            bar.update(1)

    try:
        result = train(config, progress=progress)
    except TrainingInterrupted as e:
        if bar is not None:
            bar.close()
            bar = None
        resume = shlex.join(["mesp", "train", "--out", os.path.abspath(e.out), "--resume"])
        print(f"mesp train: {signal.Signals(e.signum).name} at step {e.step}/{e.total_steps}; "
              f"checkpoint {e.checkpoint}\nresume with: {resume}", file=sys.stderr)
        return exit_status(e.signum)
    finally:
        if bar is not None:
            bar.close()
    parts = [f"trained {result.steps}/{result.total_steps} steps in {result.seconds:.1f}s"]
    if result.loss is not None:
        parts.append(f"loss {result.loss:.4f}")
    if result.valid_loss is not None:
        parts.append(f"valid loss {result.valid_loss:.4f}")
    print("; ".join(parts))
    if result.n_truncated:
        print(f"{result.n_truncated} of {result.n_samples} samples were truncated to {config.seq_len} tokens")
    if result.n_skipped:
        print(f"{result.n_skipped} samples longer than {config.seq_len} tokens were skipped")
    print(memory_line(result.memory))
    print(f"adapter: {result.out}")
    use = shlex.join(["mesp", "generate", "--model", result.config["model"], "--adapter",
                      os.path.abspath(result.out), "--prompt"])
    print(f"try it: {use} 'your prompt'")
    return 0


def memory_line(m: dict) -> str:
    """One labelled line of a run's memory summary (mesp.train's TrainResult.memory)."""
    floor = m.get("runtime_floor_bytes")
    floor_text = "" if floor is None else f" ({m['runtime_floor_label']}: {format_mib(floor)} MiB)"
    step = m.get("step_allocator_peak_bytes")
    step_text = ("step allocator peak not measured (--measure-memory)" if step is None else
                 f"step allocator peak {format_mib(step)} MiB above the step's start")
    stages = m.get("stage_private_peaks") or {}
    by_stage = ", ".join(f"{k} {format_mib(v)}" for k, v in stages.items())
    return (f"memory: private footprint peak {format_mib(m.get('private_peak_bytes'))} MiB{floor_text}, "
            f"RSS peak {format_mib(m.get('rss_peak_bytes'))} MiB, {step_text}"
            + (f"\nprivate footprint peak by stage (MiB): {by_stage}" if by_stage else ""))


# ---- eval ----------------------------------------------------------------------------------------------

@command("eval", lambda p: add_arguments(p, EvalSettings), "Score a model, and an adapter beside it, on test data: "
         "mean loss and perplexity over the labelled tokens (training's masks), and with --answers the share of "
         "greedy answers that contain the expected completion.")
def eval_run(args) -> int:
    settings = EvalSettings(**given(EvalSettings, args))
    r = run_eval(settings)
    rows = {"base": r.base, **({"adapter": r.adapter} if r.adapter else {})}
    if settings.json:
        print(json.dumps({"data": r.data, "samples": r.samples, "targets": r.targets, "seconds": round(r.seconds, 3),
                          **{k: dataclasses.asdict(v) for k, v in rows.items()}, "memory": r.memory}))
        return 0
    print(f"{r.data}: {r.samples} samples, {r.targets} labelled tokens")
    answers = r.base.answers_total is not None
    print(f"{'':8s} {'loss':>9s} {'perplexity':>11s}" + (f" {'answers':>9s}" if answers else ""))
    for name, sc in rows.items():
        print(f"{name:8s} {sc.loss:9.4f} {sc.perplexity:11.3f}"
              + (f" {f'{sc.answers_correct}/{sc.answers_total}':>9s}" if answers else ""))
    print(memory_line(r.memory))
    return 0


# ---- plot ----------------------------------------------------------------------------------------------

def plot_args(p: argparse.ArgumentParser) -> None:
    p.add_argument("run", metavar="RUN", help="a mesp train --out directory")
    p.add_argument("--out", help="the PNG to write (default RUN/curves.png)")


@command("plot", plot_args, "Draw a training run's loss (train and validation) and memory curves to a PNG.")
def plot_run_command(args) -> int:
    print(plot_run(args.run, args.out))
    return 0


# ---- estimate ------------------------------------------------------------------------------------------

@command("estimate", lambda p: add_arguments(p, EstimateSettings), "Predict a training step's peak memory and "
         "the process's private peak from the model's config alone, split into terms, before loading a weight.")
def estimate_run(args) -> int:
    s = EstimateSettings(**given(EstimateSettings, args))
    e, longest = run_estimate(s)
    print(json.dumps({**e.as_json(), "longest_seq_len": longest} if s.budget is not None else e.as_json())
          if s.json else estimate_text(e, longest, s.budget))
    return 0


# ---- merge ---------------------------------------------------------------------------------------------

def merge_args(p: argparse.ArgumentParser) -> None:
    p.add_argument("--model", required=True, help=f"the base model: {MODEL_HELP}")
    p.add_argument("--adapter", required=True, help="LoRA adapter directory (PEFT format), e.g. a mesp train --out")
    p.add_argument("--out", required=True, help="directory for the merged Hugging Face model")
    p.add_argument("--dtype", choices=["float32", "bfloat16"], default="float32",
                   help="dtype of the written weights (the merge itself is computed in fp32; default float32)")
    p.add_argument("--overwrite", action="store_true", help="replace a non-empty --out")
    merge_format_arguments(p)


@command("merge", merge_args, "Fold a LoRA adapter into the base weights and write a Hugging Face model directory "
                              "(or, with --format gguf, one GGUF file).")
def merge_run(args) -> int:
    if args.format == "gguf":
        g = merge_gguf(args.model, args.adapter, args.out, quantize=args.quantize, overwrite=args.overwrite)
        print(f"merged {g.lora_modules} LoRA projections into {g.out}: {g.tensors} tensors, matrices in "
              f"{g.outtype} ({format_mib(g.bytes)} MiB)")
        return 0
    r = merge_adapter(args.model, args.adapter, args.out, dtype=args.dtype, overwrite=args.overwrite)
    files = ", ".join(r.shards) + (" + tokenizer" if r.tokenizer else "")
    print(f"merged {r.merged_modules} LoRA projections into {r.tensors} {r.dtype} tensors "
          f"({format_mib(r.total_bytes)} MiB: {files})")
    print(f"model: {r.out_dir}")
    return 0


@command("export", export_arguments, "Write a LoRA adapter as llama.cpp's LoRA GGUF file (llama-cli --lora, "
                                    "Ollama's ADAPTER), or MeSP's training step as an ExecuTorch program.")
def export_run(args) -> int:
    if args.format == "executorch":
        from .export_executorch import export_executorch_cli

        r = export_executorch_cli(args)
        print(f"wrote {r['program']} and {r['weights']}: one MeSP {args.optimizer} step (lr {r['lr']:g}, "
              f"B={args.batch_size}, T={args.seq_len}, {len(r['lora'])} LoRA tensors)")
        if "tokens" in r:
            print(f"wrote {r['tokens']}: the data for mesp-runner --data")
        return 0
    if args.adapter is None:
        raise MespError("--adapter: required with --format gguf-lora")
    r = export_gguf_lora(args.model, args.adapter, args.out, outtype=args.outtype, overwrite=args.overwrite)
    print(f"wrote {r.out}: LoRA of {r.lora_modules} projections, {r.tensors} {r.outtype} tensors "
          f"({format_mib(r.bytes)} MiB)")
    return 0


# ---- quantize ------------------------------------------------------------------------------------------

def quantize_args(p: argparse.ArgumentParser) -> None:
    p.add_argument("source", help="the model: HF directory, .gguf file or preset name")
    p.add_argument("--to", required=True, metavar="q4_0|q4_1|q8_0|f16|f32",
                   help="block type of the matrices (norms, biases and matrices of other widths stay F32)")
    p.add_argument("--out", required=True, metavar="FILE.gguf", help="the GGUF file to write")
    p.add_argument("--overwrite", action="store_true", help="replace an existing --out")


@command("quantize", quantize_args, "Write a model as a GGUF file with Q4_0, Q4_1 or Q8_0 matrices, one block of "
                                    "rows at a time (loads streamed by default).")
def quantize_run(args) -> int:
    r = quantize_model(args.source, args.to, args.out, overwrite=args.overwrite)
    print(f"wrote {r.out}: {r.tensors} tensors, {r.quantized} in {r.target}, {r.tensors - r.quantized} F32 "
          f"({format_mib(r.bytes)} MiB)")
    return 0


# ---- demo ----------------------------------------------------------------------------------------------

def demo_args(p: argparse.ArgumentParser) -> None:
    p.add_argument("--steps", type=int, help=f"training steps (default {DEFAULT_STEPS})")
    p.add_argument("--model", help=f"the model taught the facts: a preset, HF directory or .gguf (default "
                   f"{MODEL}; without a chat template it is taught plain question/answer text)")
    p.add_argument("--out", metavar="DIR", help="keep the trained adapter in DIR (default: a temporary directory)")
    p.add_argument("--overwrite", action="store_true", help="replace a run already in --out")
    add_weights_arg(p)


def print_answers(title: str, answers, phase: str) -> None:
    print(f"\n{title}")
    for a in answers:
        text = getattr(a, phase)
        mark = "x" if getattr(a, f"correct_{phase}") else " "
        print(f"  [{mark}] {a.question}\n        -> {text!r}   (expects {a.expected!r})")


@command("demo", demo_args, "Teach the shipped SmolLM2-135M-Instruct facts about a fictional person with MeSP "
                            "and show its answers before and after, with the memory of a MeSP and a MeBP step.")
def demo_run(args) -> int:
    if args.steps is not None and args.steps < 1:
        raise MespError(f"--steps: must be a positive integer, got {args.steps}")
    given = {"model": args.model, "steps": args.steps}
    settings = DemoSettings(weights=args.weights, **{k: v for k, v in given.items() if v is not None})
    every = max(1, settings.steps // 10)
    print(f"mesp demo: LoRA r={settings.rank} on {settings.model}, {settings.steps} MeSP steps of "
          f"{settings.batch_size} samples; answering the held-out questions first...")

    def progress(event):
        kind = event["event"]
        if kind == "answers":
            title = ("Before training" if event["phase"] == "before" else "After training") + \
                    " (held-out paraphrases, greedy):"
            print_answers(title, event["answers"], event["phase"])
            if event["phase"] == "before":
                print(f"\ntraining on {settings.train_file} ...")
        elif kind == "step" and (event["step"] % every == 0 or event["step"] == event["total_steps"]):
            valid = f", valid loss {event['valid_loss']:.3f}" if "valid_loss" in event else ""
            print(f"  step {event['step']:>4}/{event['total_steps']}: loss {event['loss']:.3f}{valid} "
                  f"({event['seconds']:.1f} s/step)", flush=True)
        elif kind == "memory":
            samples, tokens = event["batch"]
            print(f"\nmeasuring the first step of {' and of '.join(event['methods'])} on the same batch "
                  f"({samples} samples x {tokens} tokens), each in a fresh `mesp train --measure-memory` process ...",
                  flush=True)
        elif kind == "process_memory":
            print(f"measuring the whole process: {event['steps']} training steps of "
                  f"{' and of '.join(event['methods'])}, each in a fresh `mesp train` process ...", flush=True)

    r = run_demo(settings, out=args.out, overwrite=args.overwrite, progress=progress)
    s = r.score
    print(f"\nscore: {s['before']}/{s['total']} held-out answers correct before training, "
          f"{s['after']}/{s['total']} after ({r.train['steps']} steps, {r.train['seconds']:.0f} s of training)")
    samples, tokens = r.memory_batch
    print(f"peak memory of one gradient step ({samples} samples x {tokens} tokens, allocator level, {r.device}):")
    peaks = {m.method: m.peak_bytes for m in r.memory}
    for m in r.memory:
        print(f"  {m.method:5s} {format_mib(m.peak_bytes) + ' MiB':>12}")
    if peaks.get("mebp"):
        print(f"  MeSP needs {100 * (1 - peaks['mesp'] / peaks['mebp']):.0f}% less than MeBP")
    print(f"this demo's own process peak RSS: {format_mib(r.peak_rss_bytes)} MiB (loading, answering and training "
          "included; the measured runs are separate processes)")
    if r.process_memory:
        print(f"whole-process peak of a fresh `mesp train` process ({r.settings['process_steps']} steps; private "
              "footprint = RssAnon + VmSwap + RssShmem, what a device counts):")
        for p in r.process_memory:
            print(f"  {p.method:5s} {format_mib(p.private_peak_bytes) + ' MiB':>12} private   "
                  f"(RSS peak {format_mib(p.rss_peak_bytes)} MiB)")
        print(f"  each includes the {r.runtime_floor_label}: {format_mib(r.runtime_floor_bytes)} MiB")
    print(f"adapter: {r.adapter_dir}" if r.adapter_dir else "(pass --out DIR to keep the trained adapter)")
    print(f"done in {r.seconds:.0f} s")
    return 0


# ---- federated (mesp.federated.cli) ------------------------------------------------------------------------

command("federated", federated_args, "Federated LoRA on Flower, on this machine: one SuperNode per client file "
                                     "trains with mesp on its own data; the server averages the adapters "
                                     "(FedAvg).")(federated_run)


# ---- bench (mesp.bench.cli) ------------------------------------------------------------------------------

command("bench", bench_args, "Benchmarks: memory/time per step, gradient fidelity, convergence, the report.")(bench_run)


if __name__ == "__main__":
    sys.exit(main())
