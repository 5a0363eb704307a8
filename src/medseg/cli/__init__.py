"""The ``medseg`` command line. Each sub-command lives in its own module exposing
``register(subparsers)``; modules import heavy libraries only inside their run functions."""

from __future__ import annotations

import argparse
import importlib
import sys
from collections.abc import Sequence

from medseg import __version__
from medseg.errors import MedsegError

#: sub-command name -> module (in help order)
COMMANDS = {
    "info": "medseg.cli.info",
    "convert": "medseg.cli.convert",
    "evaluate": "medseg.cli.evaluate",
    "evaluate-interactive": "medseg.cli.interactive",
    "phantom": "medseg.cli.phantom",
    "segment": "medseg.cli.segment",
    "export": "medseg.cli.export",
    "train-unet": "medseg.cli.train_unet",
    "finetune": "medseg.cli.finetune",
    "batch": "medseg.cli.batch",
    "rank": "medseg.cli.rank",
    "pull": "medseg.cli.pull",
    "search": "medseg.cli.search",
    "push": "medseg.cli.push",
}


def build_parser() -> argparse.ArgumentParser:
    """The full argument parser (imports every command module; they are light)."""
    parser = argparse.ArgumentParser(
        prog="medseg", description="3D medical image segmentation (SAM-Med and MONAI U-Net)."
    )
    parser.add_argument("--version", action="version", version=f"medseg {__version__}")
    sub = parser.add_subparsers(dest="command", metavar="COMMAND")
    for module in COMMANDS.values():
        try:
            mod = importlib.import_module(module)
        except ModuleNotFoundError as exc:
            if exc.name == module:  # command not built yet
                continue
            raise
        mod.register(sub)
    return parser


def main(argv: Sequence[str] | None = None) -> int:
    """Entry point: returns the process exit code (0 ok, 2 bad input, 130 interrupted)."""
    parser = build_parser()
    args = parser.parse_args(argv)
    if not getattr(args, "func", None):
        parser.print_help()
        return 2
    try:
        rc = args.func(args)
    except MedsegError as exc:
        print(f"medseg {args.command}: error: {exc}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        print(f"medseg {args.command}: interrupted", file=sys.stderr)
        sys.stdout.flush()
        sys.stderr.flush()
        return 130
    return int(rc or 0)


def entry() -> None:
    """The ``medseg`` executable (and ``python -m medseg``): run :func:`main` and exit with it.

    After an interrupt (exit 130) the work is already cleaned up; the process leaves at once
    rather than through interpreter shutdown, where a late interrupt would end it by signal.
    """
    import os

    rc = main()
    if rc == 130:
        os._exit(rc)
    sys.exit(rc)


if __name__ == "__main__":  # pragma: no cover
    entry()
