"""Image-text pairs for teaching the model to follow the prompt (issue 19, item 2), with the held-out data left out.

    python scripts/prompt_following_manifest.py --data ../shared/data --out runs/pf_manifest.csv

- NIH sample: each image's labels as report-like sentences (``training.data.nih_report``), only the
  ``train`` part of the patients (``heldout_part(patient_id)``) and never a patient of ``chestx-det-nih``.
- TBX11K: an image-level tuberculosis sentence per image (active / old healed by its box classes),
  only the ``train`` part (``heldout_part(image_id)``).
No box, outline or mask is used. Writes a trainer manifest (``id, image, text, patient_id, split``)
and prints how many rows each source gave and how many were left out. With ``--backgrounds-out FILE``
it also lists the NIH images of those patients labelled "No Finding" (adult radiographs for
``python -m training.synthetic --backgrounds FILE``).
"""

from __future__ import annotations

import argparse
import csv
import json
import sys
from pathlib import Path

from afloc_engine.evaluation.datasets import heldout_part
from training.data import nih_report

TB_SENTENCES = {
    "ActiveTuberculosis": "Findings suggesting active pulmonary tuberculosis.",
    "ObsoletePulmonaryTuberculosis": "Findings suggesting old healed pulmonary tuberculosis.",
}


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--data", type=Path, default=Path("../shared/data"))
    parser.add_argument("--out", type=Path, required=True)
    parser.add_argument("--backgrounds-out", type=Path, help="also list the No-Finding NIH images (one per line)")
    parser.add_argument("--summary", type=Path, help="also write the counts (pairs per source, left out) as JSON")
    args = parser.parse_args(argv)
    normal: list[str] = []
    rows: list[list[str]] = []
    with (args.data / "chestx-det-nih" / "labels.csv").open(newline="") as fh:
        excluded_patients = {r["patient_id"].lstrip("0") for r in csv.DictReader(fh)}
    left = {"nih heldout": 0, "nih chestx-det patient": 0, "tbx11k heldout": 0}
    with (args.data / "nih-cxr14-sample" / "labels.csv").open(newline="") as fh:
        for r in csv.DictReader(fh):
            pid = r["patient_id"].lstrip("0")
            if pid in excluded_patients:
                left["nih chestx-det patient"] += 1
                continue
            if heldout_part(r["patient_id"]) == "dev":
                left["nih heldout"] += 1
                continue
            image = (args.data / "nih-cxr14-sample" / r["image"]).resolve()
            rows.append([image.stem, str(image), nih_report(r["findings"]), f"nih-{pid}", "train"])
            if r["findings"].strip() == "No Finding":
                normal.append(str(image))
    n_nih = len(rows)
    with (args.data / "tbx11k-tb" / "labels.csv").open(newline="") as fh:
        for r in csv.DictReader(fh):
            if heldout_part(r["image_id"]) == "dev":
                left["tbx11k heldout"] += 1
                continue
            classes = [c for c in r["labels"].split("|") if c in TB_SENTENCES]
            if not classes:
                continue
            text = " ".join(dict.fromkeys(TB_SENTENCES[c] for c in classes))
            image = (args.data / "tbx11k-tb" / r["image"]).resolve()
            rows.append([r["image_id"], str(image), text, f"tb-{r['image_id']}", "train"])
    args.out.parent.mkdir(parents=True, exist_ok=True)
    with args.out.open("w", newline="") as fh:
        w = csv.writer(fh)
        w.writerow(["id", "image", "text", "patient_id", "split"])
        w.writerows(rows)
    print(f"{args.out}: {n_nih} NIH + {len(rows) - n_nih} TBX11K pairs; left out: {left}")
    if args.summary is not None:
        counts = {"nih_pairs": n_nih, "tbx11k_pairs": len(rows) - n_nih, "pairs": len(rows), "left_out": left}
        counts["nih_no_finding_backgrounds"] = len(normal)
        args.summary.parent.mkdir(parents=True, exist_ok=True)
        args.summary.write_text(json.dumps({"command": " ".join(["python", *sys.argv]), **counts}, indent=1) + "\n")
    if args.backgrounds_out is not None:
        args.backgrounds_out.parent.mkdir(parents=True, exist_ok=True)
        args.backgrounds_out.write_text("".join(f"{path}\n" for path in normal))
        print(f"{args.backgrounds_out}: {len(normal)} 'No Finding' NIH images")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
