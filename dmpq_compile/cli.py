"""``dmpq-compile`` command line. Each subcommand lives in ``dmpq_compile/commands/<name>.py``
and exposes ``NAME``, ``HELP``, ``add_arguments(parser)`` and ``main(args) -> int``; this module
only dispatches, turns library errors into one-line messages, and sets up logging.
"""

from __future__ import annotations

import argparse
import importlib
import logging
import sys
from pathlib import Path

COMMANDS = ("compile", "inspect", "passes", "eval", "run", "bench", "cost", "check", "build", "baseline")


def _load(name: str):
    return importlib.import_module(f"dmpq_compile.commands.{name.replace('-', '_')}")


def build_parser(only: str | None = None) -> argparse.ArgumentParser:
    """The full parser, or with ``only`` one whose other subcommands lack their options.

    Options are added only for the command that runs because some ``add_arguments`` import heavy
    modules (``compile`` shows CompileConfig's defaults, which imports torch); commands that only
    load artifacts (run, inspect, check, eval, bench) must not pay for that or need torch.
    """
    parser = argparse.ArgumentParser(
        prog="dmpq-compile",
        description="Compile Mixture-of-Experts models into artifacts whose experts carry different bit-widths.")
    parser.add_argument("-v", "--verbose", action="count", default=0, help="more log output (-vv: debug)")
    parser.add_argument("--version", action="store_true", help="print the version and exit")
    parser.epilog = "A bare MODEL means compile: `dmpq-compile MODEL --target trt-a100` = `dmpq-compile compile MODEL ...`."
    sub = parser.add_subparsers(dest="command", metavar="COMMAND")
    for name in COMMANDS:
        mod = _load(name)  # every listed command exists; one that fails to import is an error, not hidden
        p = sub.add_parser(name, help=mod.HELP, description=getattr(mod, "DESCRIPTION", mod.HELP))
        if only is None or only == name:
            mod.add_arguments(p)
        p.set_defaults(_main=mod.main)
    return parser


def main(argv: list[str] | None = None) -> int:
    argv = sys.argv[1:] if argv is None else list(argv)
    first = next((i for i, a in enumerate(argv) if not a.startswith("-")), None)  # top-level options take no value
    if first is not None and argv[first] not in COMMANDS:  # `dmpq-compile MODEL ...` means compile
        token = argv[first]
        if "/" not in token and not Path(token).exists():
            print(f"dmpq-compile: {token!r} is neither a command ({', '.join(COMMANDS)}) nor a model folder; "
                  "see dmpq-compile --help", file=sys.stderr)
            return 2
        argv.insert(first, "compile")
    command = argv[first] if first is not None else None
    parser = build_parser(command if command in COMMANDS else None)
    args = parser.parse_args(argv)
    if args.version:
        from . import __version__

        print(f"dmpq-compile {__version__}")
        return 0
    if not getattr(args, "_main", None):
        parser.print_help()
        return 2
    level = logging.WARNING - 10 * min(args.verbose, 2)
    logging.basicConfig(level=level, format="%(levelname)s %(name)s: %(message)s")
    try:
        return int(args._main(args) or 0)
    except KeyboardInterrupt:
        if args.command == "compile" and not getattr(args, "no_cache", True):
            print("interrupted; no artifact was written. The pass cache keeps what the analysis and quantization "
                  "finished: rerun the same command to resume", file=sys.stderr)
        else:
            print("interrupted; nothing was written", file=sys.stderr)
        return 130
    except Exception as e:
        if args.verbose >= 2:
            raise
        print(f"dmpq-compile {args.command}: error: {e}", file=sys.stderr)
        return 1


if __name__ == "__main__":
    sys.exit(main())
