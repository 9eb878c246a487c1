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


if __name__ == "__main__":
    sys.exit(main())
