"""Arguments several subcommands share."""

from __future__ import annotations

import argparse


def add_model_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--model", default="default", help="model name or folder (default: the embedded model)")
    parser.add_argument("--device", default="auto", help="auto (GPU if present), cpu, cuda or cuda:N")


def add_progress_argument(parser: argparse.ArgumentParser) -> None:
    parser.add_argument(
        "--progress",
        choices=("bar", "json", "none"),
        default="bar",
        help="progress as a bar on stderr, as JSON lines on stdout (for a GUI), or none",
    )
