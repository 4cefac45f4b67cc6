"""The prepared training store: images decoded once into one memory-mapped uint8 array.

``prepare`` reads every image (DICOM, PNG, JPEG, ...) once, normalises its intensities, letterboxes
it onto an S x S canvas (as inference does) and writes::

    <store>/images.u8     N x S x S uint8, row-major (numpy memmap)
    <store>/index.json    {"format": "afloc-store", "size": S, "count": N, "fingerprint": ...,
                           "records": [{id, text, patient_id, split, source, image}, ...],
                           "skipped": [[where, reason], ...]}

The folder is written under a temporary name and renamed into place, so a crash leaves no half
store. Images that cannot be read are skipped and listed in ``skipped``, never fatal one by one.
"""

from __future__ import annotations

import hashlib
import json
import logging
import shutil
from pathlib import Path

import numpy as np

from afloc_engine.checkpoint import atomic_folder, commit_folder
from afloc_engine.errors import AFLocError, DataError
from afloc_engine.progress import Progress
from training.data import PairRecord

log = logging.getLogger(__name__)

STORE_FORMAT = "afloc-store"
IMAGES_FILE = "images.u8"
INDEX_FILE = "index.json"


def fingerprint(records: list[PairRecord], size: int) -> str:
    """SHA-256 over the records and the store size: a store is reused only for the same input."""
    digest = hashlib.sha256(f"{STORE_FORMAT}:{size}".encode())
    for r in records:
        digest.update(json.dumps([r.id, r.image, r.text, r.patient_id, r.split]).encode())
    return digest.hexdigest()


def load_letterboxed(path: str, size: int) -> np.ndarray:
    """One image file -> (size, size) uint8: intensities to [0, 1] (window or percentiles), letterboxed."""
    import torch

    from afloc_engine.io import read_image
    from afloc_engine.transforms import Letterbox, normalize_intensity

    image = read_image(path)
    if image.is_volume:
        raise DataError(f"expected a 2D image, got a volume of shape {image.array.shape}", path)
    grey = torch.from_numpy(normalize_intensity(image.array, image.window))
    box = Letterbox.fit(grey.shape[0], grey.shape[1], size)
    canvas = box.apply(grey.unsqueeze(0))[0].clamp(0, 1)
    return (canvas.numpy() * 255.0 + 0.5).astype(np.uint8)


def _load_one(args: tuple[int, str, int]) -> tuple[int, np.ndarray | None, str]:
    index, path, size = args
    try:
        return index, load_letterboxed(path, size), ""
    except AFLocError as err:
        return index, None, err.problem
    except Exception as err:  # a broken file must not stop the whole preparation
        return index, None, f"{type(err).__name__}: {err}"


def prepare_store(
    records: list[PairRecord],
    folder: str | Path,
    size: int = 256,
    workers: int = 2,
    progress: str = "bar",
    overwrite: bool = False,
) -> Path:
    """Decode ``records`` into a store at ``folder`` (reused as is when its fingerprint matches)."""
    folder = Path(folder)
    records = [r for r in records if r.image]
    if not records:
        raise DataError("nothing to prepare: no record has an image", folder)
    fp = fingerprint(records, size)
    if (folder / INDEX_FILE).is_file() and not overwrite:
        try:
            if json.loads((folder / INDEX_FILE).read_text()).get("fingerprint") == fp:
                log.info("%s: store is up to date", folder)
                return folder
        except (OSError, json.JSONDecodeError):
            pass
        overwrite = True
    tmp = atomic_folder(folder)
    try:
        array = np.memmap(tmp / IMAGES_FILE, dtype=np.uint8, mode="w+", shape=(len(records), size, size))
        kept: list[int] = []
        skipped: list[tuple[str, str]] = []
        jobs = [(i, r.image, size) for i, r in enumerate(records)]
        with Progress(len(jobs), progress, desc="prepare") as bar:
            for index, pixels, problem in _map(jobs, workers):  # in input order: a deterministic store
                if pixels is None:
                    skipped.append((str(records[index].image), problem))
                else:
                    array[len(kept)] = pixels
                    kept.append(index)
                bar.update(1)
        array.flush()
        del array
        if not kept:
            raise DataError(f"no image could be read ({len(skipped)} skipped; first: {skipped[0][1]})", folder)
        with open(tmp / IMAGES_FILE, "r+b") as fh:  # drop the slots of skipped images
            fh.truncate(len(kept) * size * size)
        index = {
            "format": STORE_FORMAT,
            "version": 1,
            "size": size,
            "count": len(kept),
            "fingerprint": fp,
            "records": [records[i].to_dict() for i in kept],
            "skipped": skipped,
        }
        (tmp / INDEX_FILE).write_text(json.dumps(index))
        commit_folder(tmp, folder, overwrite=overwrite)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    if skipped:
        log.warning("%s: %d unreadable image(s) skipped (listed in %s)", folder, len(skipped), INDEX_FILE)
    return folder


def _map(jobs: list[tuple[int, str, int]], workers: int):  # noqa: ANN202 (iterator of _load_one results)
    if workers <= 1 or len(jobs) < 8:
        yield from map(_load_one, jobs)
        return
    import multiprocessing as mp

    with mp.get_context("spawn").Pool(workers) as pool:
        yield from pool.imap(_load_one, jobs, chunksize=8)


class Store:
    """A prepared store, opened read-only; the memmap is opened lazily (safe in DataLoader workers)."""

    def __init__(self, folder: str | Path) -> None:
        self.folder = Path(folder)
        path = self.folder / INDEX_FILE
        if not path.is_file():
            raise DataError("not a prepared store (no index.json); run `afloc train prepare` first", self.folder)
        try:
            index = json.loads(path.read_text())
        except (OSError, json.JSONDecodeError) as err:
            raise DataError(f"store index is not valid JSON: {err}", path) from None
        if index.get("format") != STORE_FORMAT:
            raise DataError(f'not an AFLoc store (expected "format": "{STORE_FORMAT}")', path)
        self.size = int(index["size"])
        self.records = [PairRecord(**r) for r in index["records"]]
        self.skipped = [tuple(s) for s in index.get("skipped", [])]
        self.fingerprint = index.get("fingerprint", "")
        expected = len(self.records) * self.size * self.size
        data = self.folder / IMAGES_FILE
        if not data.is_file() or data.stat().st_size != expected:
            raise DataError(f"store images file is missing or truncated (expected {expected} bytes)", data)
        self._array: np.memmap | None = None

    def __len__(self) -> int:
        return len(self.records)

    @property
    def array(self) -> np.memmap:
        """(N, S, S) uint8 memory map, opened on first use."""
        if self._array is None:
            self._array = np.memmap(
                self.folder / IMAGES_FILE, dtype=np.uint8, mode="r", shape=(len(self.records), self.size, self.size)
            )
        return self._array

    def image(self, index: int) -> np.ndarray:
        """(S, S) uint8 letterboxed image ``index``."""
        return np.array(self.array[index])  # a writable copy

    def __getstate__(self) -> dict:
        state = dict(self.__dict__)
        state["_array"] = None  # reopened in the worker
        return state
