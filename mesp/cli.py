"""`mesp` command line: a thin layer over the library. Only this module prints.

Each subcommand is a pair: `<name>_args(parser)` declares its flags, and `<name>_run(args)`, registered with
@command, runs it. Bad input raises MespError deeper down; main() turns it into one line on stderr and exit
status 2, never a traceback.
"""

from __future__ import annotations

import argparse
import logging
import sys

from .errors import MespError

COMMANDS: dict[str, tuple] = {}  # name -> (help, args_fn, run_fn), in registration order


def command(name: str, args_fn, help: str):
    def register(run_fn):
        COMMANDS[name] = (help, args_fn, run_fn)
        return run_fn
    return register


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="mesp", description="Exact-gradient LoRA fine-tuning under tight memory.")
    parser.add_argument("-v", "--verbose", action="store_true", help="log progress details")
    sub = parser.add_subparsers(dest="command", required=True)
    for name, (help_text, args_fn, _) in COMMANDS.items():
        args_fn(sub.add_parser(name, help=help_text, description=help_text))
    return parser


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    logging.basicConfig(level=logging.INFO if args.verbose else logging.WARNING, format="%(message)s")
    try:
        return COMMANDS[args.command][2](args) or 0
    except MespError as e:
        print(f"mesp {args.command}: error: {e}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        print(f"mesp {args.command}: interrupted", file=sys.stderr)
        return 130


# ---- subcommands (each: NAME_args, then @command NAME_run) --------------------------------------------


# ---- generate ------------------------------------------------------------------------------------------

def generate_args(p: argparse.ArgumentParser) -> None:
    p.add_argument("--model", required=True, help="HF model directory, .gguf file or preset name")
    p.add_argument("--adapter", help="LoRA adapter directory (PEFT format) to apply")
    p.add_argument("--prompt", required=True, help="the prompt text")
    p.add_argument("--chat", action="store_true", help="wrap the prompt as a user turn with the chat template")
    p.add_argument("--max-new-tokens", type=int, default=64, help="most tokens to generate (default 64)")
    p.add_argument("--temperature", type=float, default=0.0, help="0 = greedy (default); > 0 samples")
    p.add_argument("--top-p", type=float, default=1.0, help="nucleus sampling mass (default 1.0)")
    p.add_argument("--seed", type=int, default=0, help="sampling seed (default 0)")
    p.add_argument("--dtype", choices=["float32", "bfloat16"], default="float32", help="compute dtype")


@command("generate", generate_args, "Generate text from a prompt with a model (and optional LoRA adapter).")
def generate_run(args) -> int:
    from .generate import _check, generate_stream
    from .loaders import PRESETS, load_model, load_tokenizer

    _check(args.max_new_tokens, args.temperature, args.top_p)
    if args.model in PRESETS:
        load_tokenizer(args.model)  # a random preset has none: fail before building its weights
    model = load_model(args.model, dtype=args.dtype)
    tokenizer = load_tokenizer(model)
    if args.adapter:
        from .lora import load_adapter
        load_adapter(model, args.adapter)
    for piece in generate_stream(model, tokenizer, args.prompt, chat=args.chat, max_new_tokens=args.max_new_tokens,
                                 temperature=args.temperature, seed=args.seed, top_p=args.top_p):
        print(piece, end="", flush=True)
    print()
    return 0


if __name__ == "__main__":
    sys.exit(main())
