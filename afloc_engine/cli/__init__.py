"""The ``afloc`` command. Each subcommand lives in its own module with ``add_arguments`` and ``run``.

Errors a user can fix (:class:`afloc_engine.errors.AFLocError`) print one line naming the file
and the problem and exit with code 2; with ``--progress json`` they are also a JSON line.
"""

from __future__ import annotations

import argparse
import importlib
import importlib.util
import logging
import sys

from afloc_engine.errors import AFLocError

# name -> module; modules are imported only when their command runs (fast --help)
SUBCOMMANDS: dict[str, tuple[str, str]] = {
    "localize": ("afloc_engine.cli.localize", "heatmaps, masks and probabilities for text prompts"),
    "info": ("afloc_engine.cli.info", "the model, its card, checksum and the device"),
    "models": ("afloc_engine.cli.models", "list, install or remove models"),
    "evaluate": ("afloc_engine.cli.evaluate", "localisation metrics on a dataset with masks or boxes"),
    "finetune": ("afloc_engine.cli.finetune", "few-shot fine-tuning on user masks -> an adapter"),
    "train": ("training.cli", "contrastive (re)training of an AFLoc model"),
    "convert-reference": ("afloc_engine.cli.convert", "import a reference AFLoc Lightning checkpoint"),
}


def build_parser() -> argparse.ArgumentParser:
    from afloc_engine import __version__

    parser = argparse.ArgumentParser(prog="afloc", description="AFLoc: pathology localisation from text prompts.")
    parser.add_argument("--version", action="version", version=f"afloc {__version__}")
    parser.add_argument("-v", "--verbose", action="store_true", help="log more")
    sub = parser.add_subparsers(dest="command", metavar="COMMAND")
    for name, (module, help_text) in SUBCOMMANDS.items():
        if importlib.util.find_spec(module.rsplit(".", 1)[0]) is None or importlib.util.find_spec(module) is None:
            continue
        p = sub.add_parser(name, help=help_text, description=help_text)
        p.set_defaults(_module=module)
        importlib.import_module(module).add_arguments(p)
    return parser


def main(argv: list[str] | None = None) -> int:
    parser = build_parser()
    args = parser.parse_args(argv)
    logging.basicConfig(level=logging.INFO if args.verbose else logging.WARNING, format="%(levelname)s: %(message)s")
    if not getattr(args, "_module", None):
        parser.print_help()
        return 2
    try:
        return int(importlib.import_module(args._module).run(args) or 0)
    except AFLocError as err:
        if getattr(args, "progress", None) == "json":
            from afloc_engine.progress import emit

            emit("error", message=err.problem, path=None if err.path is None else str(err.path))
        print(f"afloc {args.command}: error: {err}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        print(f"afloc {args.command}: cancelled", file=sys.stderr)
        return 130


if __name__ == "__main__":  # pragma: no cover
    sys.exit(main())
