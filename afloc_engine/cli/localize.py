"""``afloc localize INPUT... (--prompt TEXT)... | --preset cxr --out DIR``."""

from __future__ import annotations

import argparse
import re
import shutil
import sys
from collections.abc import Callable
from pathlib import Path

from afloc_engine import protocol
from afloc_engine.cli.common import add_model_arguments, add_progress_argument, check_out_folder, parse_device, warn
from afloc_engine.errors import AFLocError, PromptError
from afloc_engine.locks import add_wait_argument
from afloc_engine.progress import Progress, emit


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument(
        "inputs", nargs="+", type=Path, help="images: DICOM file or series folder, PNG/JPEG, NRRD, NIfTI"
    )
    parser.add_argument("--prompt", action="append", default=[], help="a prompt (repeatable); free text is fine")
    parser.add_argument(
        "--preset",
        help="add a preset prompt list: cxr (13 findings + ground-glass opacity), fundus or histopathology "
        "(for 3-channel models trained on those images; the default model knows chest radiographs only)",
    )
    parser.add_argument("--out", type=Path, required=True, help="output folder (one sub-folder per input)")
    parser.add_argument(
        "--threshold", type=float, default=None, help="mask threshold on the [-1, 1] heatmap (default: the model's own)"
    )
    parser.add_argument(
        "--similarity",
        choices=("cosine", "dot"),
        default=None,
        help="patch-prompt similarity (default: the model's own; cosine for engine models, dot for converted ones)",
    )
    parser.add_argument("--no-overlay", action="store_true", help="skip the overlay PNG")
    parser.add_argument("--dicom-seg", action="store_true", help="for DICOM inputs, also write a DICOM SEG (highdicom)")
    parser.add_argument("--axis", type=int, default=0, help="for volumes: slice axis in (Z, Y, X) array order")
    parser.add_argument(
        "--volume-normalization",
        choices=("volume", "slice"),
        default="volume",
        help="for volumes: min-max the heatmaps over the whole volume (default) or slice by slice",
    )
    parser.add_argument(
        "--window",
        default="auto",
        help="for volumes: intensity window before normalisation: auto (file window, else HU [-1150, 350] for CT, "
        "else percentiles), ct, percentile, or LOW,HIGH (write --window=-200,300 when LOW is negative)",
    )
    parser.add_argument(
        "--adapter",
        type=Path,
        default=None,
        help="few-shot adapter to apply: an adapter folder, or a folder of adapters (e.g. afloc finetune's --out) "
        "from which the newest for the prompts' finding is taken",
    )
    add_model_arguments(parser)
    add_progress_argument(parser)
    parser.add_argument(
        "--overwrite", action="store_true", help="replace results an earlier run left in --out (default: refuse)"
    )
    add_wait_argument(parser)


def output_name(path: Path, taken: set[str]) -> str:
    base = path.name
    for suffix in (".nii.gz", ".seg.nrrd"):
        if base.lower().endswith(suffix):
            base = base[: -len(suffix)]
            break
    else:
        base = path.stem
    base = re.sub(r"[^A-Za-z0-9_.-]+", "_", base) or "image"
    name, n = base, 1
    while name in taken:
        n += 1
        name = f"{base}_{n}"
    taken.add(name)
    return name


def _window(text: str) -> str | tuple[float, float]:
    """``--window``: a name (auto, ct, percentile) or ``LOW,HIGH``; anything else is an error."""
    if text in ("auto", "ct", "percentile"):
        return text
    try:
        low, high = (float(v) for v in text.split(","))
    except ValueError:
        low = high = float("nan")
    if not low < high:
        raise AFLocError(f"--window must be auto, ct, percentile or LOW,HIGH with LOW < HIGH, not {text!r}")
    return low, high


def _prompts(args: argparse.Namespace) -> list[str]:
    """``--prompt``s then the ``--preset``'s, cleaned; a prompt naming a finding an earlier one names is
    dropped with one warning line (the README's ``--prompt "Findings suggesting pneumothorax" --preset cxr``)."""
    from afloc_engine.prompts import merge_duplicates, preset_prompts, validate_prompts

    prompts = list(args.prompt)
    if args.preset:
        prompts += preset_prompts(args.preset)
    if not prompts:
        raise PromptError("give at least one --prompt or a --preset")
    prompts, dropped = merge_duplicates(validate_prompts(prompts))
    if dropped:
        pairs = "; ".join(f"{d!r} (same finding as {k!r})" for d, k in dropped)
        warn(f"{len(dropped)} repeated prompt(s) ignored: {pairs}")
    return prompts  # a prompt the text model cannot read is flagged with the results (specificity.assess)


def _dicom_seg_source(path: Path, image: object) -> Path | None:
    """The DICOM file or series folder a DICOM SEG can reference, or None when the input is not DICOM."""
    meta = getattr(image, "meta", {}) or {}
    if meta.get("sop_instance_uid") or (path.is_dir() and getattr(image, "is_volume", False)):
        return path
    return None


def _phase(args: argparse.Namespace, step: int, message: str, phase: str, total: int = 0) -> None:
    """A JSON progress line naming the phase (reading, loading, running, writing), so a GUI moves from the start."""
    if args.progress == "json":
        emit(protocol.PROGRESS, step=step, total=total, message=message, eta_s=None, phase=phase)


def _slice_progress(path: Path):  # noqa: ANN202 (a callback)
    """JSON progress lines per batch of slices of a volume, so a GUI shows a long CT moving."""

    def report(done: int, total: int) -> None:
        emit("progress", step=done, total=total, message=f"{path.name}: slice {done}/{total}", unit="slices")

    return report


def _print_specificity(path: Path, specs: list, say: Callable[[str], None]) -> None:  # list[PromptSpecificity]
    """Per prompt, its specificity (``afloc_engine.specificity``; also in results.json) under one line naming
    the input, and its warning indented below it; ``say`` writes a line (above the progress bar)."""
    say(f"afloc localize: {path}: prompt specificity (0: the other prompts' map, 1: unrelated to it):")
    for spec in specs:
        alone = "n/a (one prompt)" if len(specs) == 1 else "n/a"
        score = alone if spec.specificity is None else f"{spec.specificity:.2f}"
        say(f'  "{spec.prompt}": specificity {score}')
        if spec.warning:
            say(f"    WARNING: {spec.warning}")


def run(args: argparse.Namespace) -> int:
    """One writer per output folder (its lock held throughout); earlier results kept unless ``--overwrite``."""
    from afloc_engine.checkpoint import clean_leftovers
    from afloc_engine.locks import LOCK_FILE, folder_lock

    check_out_folder(args.out)  # before the lock creates it: a file, or a folder that cannot be written
    parse_device(args.device)
    created = not args.out.exists()
    try:
        with folder_lock(args.out, "afloc localize", wait=args.wait):
            clean_leftovers(args.out)  # temporary folders of an interrupted run
            taken: set[str] = set()
            clash = [name for name in (output_name(p, taken) for p in args.inputs) if (args.out / name).exists()]
            if clash and not args.overwrite:
                raise AFLocError(
                    f"already holds results for {', '.join(clash[:3])}{' ...' if len(clash) > 3 else ''} "
                    "(an earlier run); pass --overwrite to replace them or choose another --out",
                    args.out,
                )
            return _run(args)
    except BaseException:
        if created and args.out.is_dir() and [p.name for p in args.out.iterdir()] == [LOCK_FILE]:
            shutil.rmtree(args.out, ignore_errors=True)  # a failed first run leaves no output folder
        raise


def _run(args: argparse.Namespace) -> int:
    import afloc_engine
    from afloc_engine.inference import resolve_device
    from afloc_engine.io import read_image
    from afloc_engine.outputs import write_results

    prompts = _prompts(args)
    window = _window(args.window)
    if args.axis not in (0, 1, 2):
        raise AFLocError(f"--axis must be 0, 1 or 2 (Z, Y, X array order), not {args.axis}")
    try:
        device = resolve_device(args.device)  # an absent GPU is refused before anything is read or loaded
    except ValueError as err:
        raise AFLocError(str(err)) from None
    # read every input first: a bad file stops the run before any output is written
    _phase(args, 0, "reading the images", protocol.PHASE_READING)
    images = [read_image(p) for p in args.inputs]
    dicom_seg = [_dicom_seg_source(path, image) if args.dicom_seg else None for path, image in zip(args.inputs, images)]
    for path, source in zip(args.inputs, dicom_seg):
        if args.dicom_seg and source is None:
            warn(f"--dicom-seg: {path} is not a DICOM file or series, so no masks.dcm is written for it")
    _phase(args, 0, f"loading model {args.model}", protocol.PHASE_LOADING)
    try:
        model = afloc_engine.load_model(args.model, device)
    except ValueError as err:
        raise AFLocError(str(err)) from None
    adapter = None
    if args.adapter is not None:
        from afloc_engine.finetune import load_adapter

        adapter = load_adapter(args.adapter, model, prompts)  # an adapter folder, or a folder of them
        for path, image in zip(args.inputs, images):
            if image.is_volume:
                raise AFLocError("adapters apply to 2D images only", path)
    args.out.mkdir(parents=True, exist_ok=True)
    taken: set[str] = set()
    written = []
    with Progress(len(images), args.progress, desc="localize") as progress:
        for path, image, seg_source in zip(args.inputs, images, dicom_seg):
            extra = None
            _phase(args, len(written), f"{path.name}: running the model", protocol.PHASE_RUNNING, len(images))
            if image.is_volume:
                result = model.localize_volume(
                    image,
                    prompts,
                    args.threshold,
                    axis=args.axis,
                    normalization=args.volume_normalization,
                    similarity=args.similarity,
                    window=window,
                    progress=_slice_progress(path) if args.progress == "json" else None,
                )
                extra = {
                    "volume": {"axis": result.axis, "normalization": result.normalization, "window": result.window}
                }
            else:
                result = model.localize(image, prompts, args.threshold, similarity=args.similarity, adapter=adapter)
            _phase(args, len(written), f"{path.name}: writing the results", protocol.PHASE_WRITING, len(images))
            out_dir = write_results(
                result,
                args.out / output_name(path, taken),
                extra,
                overlay=not args.no_overlay,
                dicom_seg_source=seg_source,
            )
            _print_specificity(path, result.specificity(), progress.say)
            written.append(str(out_dir))
            progress.update(1, message=str(path), output=str(out_dir))
    usage = None
    if adapter is not None:
        from afloc_engine.finetune.adapter import adapter_note, adapter_usage

        usage = adapter_usage(adapter, prompts)
        if args.progress != "json":
            print(f"afloc localize: {adapter_note(usage)}", file=sys.stderr)
    if args.progress == "json":
        emit("done", outputs=written, model_id=model.model_id, trained=model.info.trained, adapter=usage)
    else:
        for w in written:
            print(w)
    return 0
