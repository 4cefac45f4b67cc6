#!/usr/bin/env bash
# Which image encoder localises better? The default model's stage 1 (grounded pre-training on
# 1,500 synthetic-lesion radiographs, 224 px, 3 epochs) with EfficientNet-Lite0 (ImageNet) and
# with the MONAI ResNet-50 (random init), same data, seed and steps; then `afloc evaluate` of
# each on covid-cxr dev. Usage: scripts/compare_backbones.sh [DATA=../shared/data] [OUT=runs/backbones]
set -euo pipefail
cd "$(dirname "$0")/.."
DATA=${1:-../shared/data}
OUT=${2:-runs/backbones}
PY=.venv/bin/python
mkdir -p "$OUT"
[ -f "$OUT/syn1500/manifest.csv" ] || $PY -m training.synthetic --backgrounds "$DATA/unlabeled-cxr/images" \
    --n 1500 --out "$OUT/syn1500"
for name in effnet_lite0 resnet50; do
    if [ ! -f "$OUT/$name/model/config.json" ]; then
        start=$(date +%s)
        $PY -m training.grounded --manifest "$OUT/syn1500/manifest.csv" --out "$OUT/$name/model" \
            --model-config "configs/default_model/grounded_$name.yaml" --epochs 3 --progress none
        echo "$name: trained in $(( $(date +%s) - start )) s" | tee -a "$OUT/times.txt"
    fi
done
.venv/bin/afloc evaluate --model "$OUT/effnet_lite0/model" --model "$OUT/resnet50/model" \
    --data "$DATA/covid-cxr" --split dev --out "$OUT/eval" --progress none
