"""The `anyformer` command: a thin dispatcher over the subcommands in anyformer.commands.

Each module in anyformer/commands defines `register(subparsers)`, which adds its subcommand
and sets `func` (a function of the parsed arguments returning an exit code).
"""

from __future__ import annotations

import argparse
import importlib
import pkgutil
import sys

from . import commands
from .config import ConfigError
from .plugins import ENV_VAR


def build_parser() -> argparse.ArgumentParser:
    """The argument parser with every subcommand found in anyformer.commands."""
    parser = argparse.ArgumentParser(prog="anyformer", description="Build, train, run and compare Transformers.")
    sub = parser.add_subparsers(dest="command", metavar="COMMAND")
    for info in sorted(pkgutil.iter_modules(commands.__path__), key=lambda i: i.name):
        if info.name.startswith("_"):  # shared helpers of the commands, not commands
            continue
        module = importlib.import_module(f"{commands.__name__}.{info.name}")
        module.register(sub)
    for command in sub.choices.values():
        _add_import_option(command)
    return parser


def _add_import_option(parser: argparse.ArgumentParser) -> None:
    """`--import MODULE` on `parser`, or on each leaf of its own subcommands (`bench attention`)."""
    nested = [a for a in parser._actions if isinstance(a, argparse._SubParsersAction)]
    if nested:
        for action in nested:
            for child in action.choices.values():
                _add_import_option(child)
        return
    parser.add_argument("--import", dest="imports", action="append", default=[], metavar="MODULE",
                        help="import MODULE (a module name or a .py file) first, so the variants it registers "
                        f"can be named (repeatable; also ${ENV_VAR}, comma-separated)")


def _not_utf8(arg: str) -> str | None:
    """How to show `arg` when it holds bytes that were not UTF-8 (Python keeps them as lone
    surrogates, which no tokenizer or file name can use); None when it is valid text."""
    try:
        arg.encode("utf-8")
        return None
    except UnicodeEncodeError as e:
        byte = ord(arg[e.start]) - 0xDC00 if 0xDC80 <= ord(arg[e.start]) <= 0xDCFF else None
        shown = arg.encode("utf-8", "surrogateescape").decode("utf-8", "replace") if byte is not None else arg.encode("utf-8", "replace").decode()
        where = f" (byte 0x{byte:02x} at character {e.start + 1})" if byte is not None else ""
        return f"{shown!r}{where}"


def main(argv: list[str] | None = None) -> int:
    """Parse `argv` and run the chosen subcommand; user errors print one clear line."""
    argv = sys.argv[1:] if argv is None else list(argv)
    for arg in argv:
        bad = _not_utf8(arg)
        if bad is not None:
            print(f"anyformer: error: the command-line argument {bad} is not valid UTF-8 text; give it in UTF-8 "
                  "(or, for a file in another encoding, convert it first: iconv -f LATIN1 -t UTF-8 FILE)", file=sys.stderr)
            return 2
    parser = build_parser()
    args, extra = parser.parse_known_args(argv)
    if args.command is None:
        parser.print_help()
        return 2
    if extra and not getattr(args, "accepts_overrides", False):
        parser.error(f"unrecognized arguments: {' '.join(extra)}")
    args.overrides = extra
    try:
        from .plugins import from_environment, import_plugins

        from_environment()
        import_plugins(getattr(args, "imports", []), named_by="--import")
        return int(args.func(args) or 0)
    except (ConfigError, FileNotFoundError, ValueError) as e:
        print(f"anyformer {args.command}: error: {e}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        print(f"anyformer {args.command}: interrupted", file=sys.stderr)
        return 130
    except BrokenPipeError:  # the reader of our output left (`| head`): stop quietly, as other tools do
        import os

        devnull = os.open(os.devnull, os.O_WRONLY)
        os.dup2(devnull, sys.stdout.fileno())  # the interpreter's final flush then writes nowhere
        return 141


if __name__ == "__main__":
    sys.exit(main())
