"""``afloc models list [--json] | install URL_OR_PATH [--sha256 H] [--name N] | remove NAME | pack FOLDER ARCHIVE
| prompt-table FOLDER``."""

from __future__ import annotations

import argparse
import json

from afloc_engine.cli.common import add_progress_argument
from afloc_engine.locks import add_wait_argument


def add_arguments(parser: argparse.ArgumentParser) -> None:
    """Sub-actions ``list``, ``install``, ``remove``, ``pack`` and ``prompt-table`` of ``afloc models``."""
    actions = parser.add_subparsers(dest="models_action", metavar="ACTION")
    actions.required = True
    p_list = actions.add_parser("list", help="models shipped, installed and installable, with checksums")
    p_list.add_argument("--json", action="store_true", help="print as JSON")
    p_install = actions.add_parser(
        "install",
        help="install a model archive (.zip/.tar.gz) from a file, a folder, an https URL or a manifest name",
    )
    p_install.add_argument("source", metavar="URL_OR_PATH")
    p_install.add_argument("--sha256", help="expected SHA-256 of the archive; nothing is installed on mismatch")
    p_install.add_argument("--name", help="install under this name (default: the model's own name)")
    p_install.add_argument("--force", action="store_true", help="replace an installed model of the same name")
    p_install.add_argument("--timeout", type=float, default=60.0, help="network timeout in seconds (default 60)")
    add_progress_argument(p_install)
    add_wait_argument(p_install)
    p_remove = actions.add_parser("remove", help="delete an installed model from the user cache")
    p_remove.add_argument("name", metavar="NAME")
    add_wait_argument(p_remove)
    p_pack = actions.add_parser("pack", help="write a model folder as an installable .zip/.tar.gz; print its entry")
    p_pack.add_argument("folder", metavar="FOLDER")
    p_pack.add_argument("archive", metavar="ARCHIVE")
    p_table = actions.add_parser(
        "prompt-table",
        help="store the preset prompts' embeddings in a model folder, so runs on them skip the text model",
    )
    p_table.add_argument("folder", metavar="FOLDER", help="a model folder, or the name of a shipped or installed model")
    p_table.add_argument(
        "--prompt",
        action="append",
        default=[],
        help="also store this prompt and its negative (repeatable); prompts of the current table are kept",
    )


def _size(n: int) -> str:
    if not n:
        return "-"
    for unit in ("B", "kB", "MB", "GB"):
        if n < 1000 or unit == "GB":
            return f"{n:.0f} {unit}" if unit == "B" else f"{n:.1f} {unit}"
        n /= 1000
    return f"{n} B"  # pragma: no cover


def _weights_sha256(rows: list[dict], installed: list[dict]) -> None:
    """Give every row ``weights_sha256``: the SHA-256 of its ``model.safetensors`` (the hash in ``model_id``)
    for shipped and installed models, "" for a model not installed yet (only its archive's hash is known:
    ``archive_sha256``)."""
    files = {r["name"]: r.get("files", {}) for r in installed}
    for row in rows:
        row["archive_sha256"] = ""
        if row["source"] == "installed":
            row["weights_sha256"] = files.get(row["name"], {}).get("model.safetensors", "")
            row["archive_sha256"] = row["sha256"]
        elif row["source"] == "available":
            row["weights_sha256"], row["archive_sha256"] = "", row["sha256"]
        else:  # shipped in the package: the manifest's hash is that of model.safetensors
            row["weights_sha256"] = row["sha256"]


def model_id(record: dict) -> str:
    """``name@version:sha12`` of an install record, as ``load_model(name).model_id`` will say it."""
    from afloc_engine.checkpoint import ModelInfo

    weights = record.get("files", {}).get("model.safetensors", "")
    return ModelInfo(name=record["name"], version=str(record.get("version", "")), sha256=weights).model_id


def run(args: argparse.Namespace) -> int:
    """Run one ``afloc models`` action; returns the exit code."""
    from afloc_engine import registry
    from afloc_engine.progress import emit

    if args.models_action == "list":
        rows = registry.list_models()
        _weights_sha256(rows, registry.installed_models())
        if args.json:
            print(json.dumps({"home": str(registry.afloc_home()), "models": rows}, indent=2))
            return 0
        header = ("NAME", "VERSION", "SOURCE", "TRAINED", "SIZE", "WEIGHTS_SHA256", "DESCRIPTION")
        table = [
            (
                r["name"],
                r["version"] or "-",
                r["source"],
                {True: "yes", False: "NO", None: "?"}[r["trained"]],
                _size(r["size"]),
                (r["weights_sha256"] or "-")[:12],
                r["description"],
            )
            for r in rows
        ]
        widths = [max(len(str(row[i])) for row in [header, *table]) for i in range(len(header) - 1)]
        for row in [header, *table]:
            print("  ".join(f"{str(v):<{w}}" for v, w in zip(row, widths)) + "  " + str(row[-1]))
        print(
            "(WEIGHTS_SHA256: of model.safetensors, the hash in model_id; '-' until installed. "
            f"Installed models live in {registry.models_dir()}; --json also gives archive hashes)"
        )
        return 0
    if args.models_action == "install":
        record = registry.install(
            args.source,
            args.sha256,
            args.name,
            force=args.force,
            progress=args.progress,
            timeout=args.timeout,
            wait=args.wait,
        )
        if args.progress == "json":
            fields = {k: record[k] for k in ("name", "version", "sha256", "path", "cached", "trained")}
            emit("done", **fields, model_id=model_id(record))
        else:
            verb = "already installed" if record["cached"] else "installed"
            name, version, digest = record["name"], record["version"], record["sha256"]
            print(f"{verb}: {name} (version {version}, sha256 {digest}) in {record['path']}")
            print(f"model_id: {model_id(record)} (use it as --model {name})")
            if not record.get("trained"):
                print("warning: this model says it is not trained; its outputs mean nothing")
        return 0
    if args.models_action == "remove":
        folder = registry.remove(args.name, wait=args.wait)
        print(f"removed: {args.name} ({folder})")
        return 0
    if args.models_action == "pack":
        entry = registry.pack(args.folder, args.archive)
        print(json.dumps(entry, indent=2))
        return 0
    if args.models_action == "prompt-table":
        return _prompt_table(args.folder, args.prompt)
    raise AssertionError(args.models_action)  # pragma: no cover (argparse enforces the choices)


def _prompt_table(model: str, extra: list[str]) -> int:
    """Write the prompt table of ``model`` (a folder or a model name): every preset prompt, its negative,
    the ``--prompt`` ones and their negatives, and the prompts of its current table."""
    from afloc_engine.inference import load_model
    from afloc_engine.prompt_table import preset_table_prompts, write_prompt_table
    from afloc_engine.prompts import negative_prompt, validate_prompts

    added = validate_prompts(extra) if extra else []
    prompts = [*preset_table_prompts(), *added, *(negative_prompt(p) for p in added)]
    path, count = write_prompt_table(load_model(model, device="cpu"), prompts)
    print(f"wrote {path} ({count} prompts)")
    return 0
