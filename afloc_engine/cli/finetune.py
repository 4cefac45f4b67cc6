"""``afloc finetune --images IMG... --masks MASK... --finding NAME --out DIR``: few-shot fine-tuning -> an adapter.

Writes ``DIR/<finding>-<timestamp>/`` (adapter.safetensors, adapter.json, metrics.json) and
prints its path (``--progress json``: a final ``{"event": "done", "adapter": PATH, ...}`` line).
``DIR`` defaults to the adapter store shared with the Slicer module, ``$AFLOC_HOME/adapters``
(:func:`afloc_engine.finetune.adapter.default_adapter_store`); ``afloc localize --adapter DIR``
takes either the printed folder or ``DIR`` itself (then the newest adapter for the prompt's finding).
Made to run as a child process of a GUI: ``--progress json`` gives one JSON line per step
(``step, total, loss, eta_s``, the held-out Dice when there is one); SIGTERM or Ctrl-C cancel
cleanly (exit 143 / 130) and leave no adapter folder.
"""

from __future__ import annotations

import argparse
import contextlib
import shlex
import signal
import sys
from pathlib import Path
from typing import Any

from afloc_engine.cli.common import add_model_arguments, add_progress_argument
from afloc_engine.errors import AFLocError, DataError
from afloc_engine.locks import add_wait_argument, sibling_lock
from afloc_engine.progress import Progress, emit


class _Terminated(BaseException):
    """Raised in the main thread by the SIGTERM handler."""


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--images", nargs="+", type=Path, required=True, help="training images (2D, any sizes)")
    parser.add_argument(
        "--masks", nargs="+", type=Path, required=True, help="binary masks, one per image, in the same order"
    )
    parser.add_argument("--finding", required=True, help='the finding the masks show, e.g. "ground glass opacity"')
    parser.add_argument("--prompt", help="zero-shot prompt to start from (default: 'Findings suggesting FINDING')")
    parser.add_argument(
        "--out",
        type=Path,
        default=None,
        help="folder to put the adapter in, as OUT/<finding>-<timestamp>/ (default: the store shared with "
        "Slicer, $AFLOC_HOME/adapters, i.e. ~/.cache/afloc/adapters)",
    )
    parser.add_argument("--epochs", type=int, default=None, help="epochs over the cached views (default: auto)")
    parser.add_argument("--views", type=int, default=None, help="encoded views per image (default: auto)")
    parser.add_argument("--seed", type=int, default=0, help="random seed (same seed, same adapter)")
    parser.add_argument("--unfreeze-last-stage", action="store_true", help="also tune the encoder's last stage")
    parser.add_argument(
        "--cv-folds",
        type=int,
        default=3,
        help="leave-one-out fits that choose the correction's weight (0: none; needs >= 2 images; default 3)",
    )
    parser.add_argument("--threads", type=int, default=None, help="CPU threads for torch (default: torch's)")
    add_model_arguments(parser)
    add_progress_argument(parser)
    add_wait_argument(parser)


def _on_sigterm(_signum: int, _frame: Any) -> None:  # noqa: ANN401
    raise _Terminated()


def run(args: argparse.Namespace) -> int:
    import afloc_engine
    from afloc_engine.finetune import parse_examples
    from afloc_engine.finetune.adapter import default_adapter_store, fallback_reason

    previous = signal.signal(signal.SIGTERM, _on_sigterm)
    # Ctrl-C cancels even where SIGINT was inherited as ignored (a job started in the background by a
    # script, or by a GUI): Python keeps an inherited SIG_IGN instead of raising KeyboardInterrupt
    previous_int = signal.signal(signal.SIGINT, signal.default_int_handler)
    progress: Progress | None = None
    held = contextlib.ExitStack()
    try:
        if len(args.images) != len(args.masks):
            raise DataError(f"{len(args.images)} images but {len(args.masks)} masks: give one mask per image")
        if args.epochs is not None and args.epochs < 0:
            raise DataError(f"--epochs must be >= 0, not {args.epochs}")
        if args.threads:
            import torch

            torch.set_num_threads(max(1, args.threads))
        # check every file before loading the model: bad input fails fast and writes nothing
        examples = parse_examples(list(zip(args.images, args.masks)), [args.finding.strip()])
        store = args.out if args.out is not None else default_adapter_store()
        # one writer per adapter store; the lock file sits beside the store, which holds only adapters
        store = held.enter_context(sibling_lock(Path(store), "afloc finetune", args.wait))
        from afloc_engine.checkpoint import clean_leftovers

        clean_leftovers(store)  # temporary folders of an interrupted fine-tune
        try:
            model = afloc_engine.load_model(args.model, args.device)
        except ValueError as err:
            raise AFLocError(str(err)) from None

        def report(event: dict[str, Any]) -> None:
            nonlocal progress
            if progress is None:
                progress = Progress(event["total"], args.progress, desc="finetune")
            keys = ("epoch", "loss", "heldout_dice", "fold", "fold_step", "fold_total")  # fold_*: inside validation
            fields = {k: event[k] for k in keys if event.get(k) is not None}
            progress.update(event["step"] - progress.step, message=event["phase"], **fields)

        adapter = afloc_engine.finetune(
            model,
            examples,
            args.finding.strip(),
            prompts=[args.prompt] if args.prompt else None,
            epochs=args.epochs,
            views=args.views,
            seed=args.seed,
            unfreeze_last_stage=args.unfreeze_last_stage,
            cv_folds=args.cv_folds,
            progress=report,
        )
        path = adapter.save(store)
        if progress is not None:
            if progress.step < progress.total:  # early stopping ends before the planned total
                progress.update(progress.total - progress.step, message="saved")
            progress.close()
    except _Terminated:
        return _cancelled(args, progress, 143, "terminated")
    except KeyboardInterrupt:
        return _cancelled(args, progress, 130, "interrupted")
    finally:
        held.close()
        signal.signal(signal.SIGTERM, previous)
        signal.signal(signal.SIGINT, previous_int)
    m = adapter.metrics
    if args.progress == "json":
        emit(
            "done",
            adapter=str(path),
            finding=args.finding.strip(),
            model_id=model.model_id,
            trained=model.info.trained,
            heldout_dice=m.get("heldout_dice"),
            heldout_dice_zero_shot=m.get("heldout_dice_zero_shot"),
            blend=m.get("blend"),
            zero_shot_fallback=fallback_reason(adapter) is not None,
            fallback_reason=fallback_reason(adapter),
            validation=m.get("validation"),
            warnings=m.get("warnings", []),
            seconds=m.get("seconds", {}).get("total"),
        )
    else:
        for warning in m.get("warnings", []):
            print(f"afloc finetune: warning: {warning}", file=sys.stderr)
        apply = f"afloc localize IMAGE --prompt {shlex.quote(adapter.prompts[0])} --adapter {shlex.quote(str(path))}"
        reason = fallback_reason(adapter)
        if reason is None:
            note = f"adapter written (correction weight {adapter.config.blend:g}); apply it with {apply}"
        else:
            note = f"adapter written with weight 0: it keeps the zero-shot map, as {reason}"
        print(f"afloc finetune: {note}", file=sys.stderr)
        print(path)
    return 0


def _cancelled(args: argparse.Namespace, progress: Progress | None, code: int, why: str) -> int:
    if progress is not None:
        progress.close()
    if args.progress == "json":
        emit("cancelled", reason=why, exit_code=code)
    print(f"afloc finetune: cancelled ({why}); nothing written", file=sys.stderr)
    return code
