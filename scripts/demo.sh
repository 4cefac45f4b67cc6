#!/usr/bin/env bash
# Set up (first run), then localise the 13 chest findings + ground-glass opacity with the embedded
# default model on the real radiograph RG1_UNCR.dcm (pydicom-data) and, when ../shared/data is
# present, on a covid-cxr dev image. Writes heatmaps (.nrrd), masks (.seg.nrrd), results.json and
# overlay.png per image under out/demo/.
set -euo pipefail
cd "$(dirname "$0")/.."
./scripts/setup.sh
PY=.venv/bin/python
inputs=("$($PY -c 'from pydicom.data import get_testdata_file as g; print(g("RG1_UNCR.dcm"))')")
dev_image="${AFLOC_SHARED_DATA:-../shared/data}/covid-cxr/images/037ba76e1c4f.jpg"
[ -f "$dev_image" ] && inputs+=("$dev_image")
.venv/bin/afloc info
.venv/bin/afloc localize "${inputs[@]}" --preset cxr --out out/demo --overwrite "$@"  # a re-run replaces its own demo output
echo "overlays: $(ls out/demo/*/overlay.png | tr '\n' ' ')"
