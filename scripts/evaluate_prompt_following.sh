#!/usr/bin/env bash
# Issue 19 measurements for one model (default: the shipped one), all on held-out data, zero-shot,
# with the constant, prior and lung-field baselines in the same run. CPU, 2 cores: about 10 minutes.
#   scripts/evaluate_prompt_following.sh [MODEL] [OUT]      (OUT default: docs/results/prompt_following_<MODEL>)
set -euo pipefail
MODEL=${1:-default}
OUT=${2:-docs/results/prompt_following_$(basename "$MODEL")}
DATA=${AFLOC_SHARED_DATA:-../shared/data}
run() { afloc evaluate --model "$MODEL" --progress none --cases 0 "$@" > /dev/null; }
# covid-cxr dev: ground-glass opacity and consolidation
run --data "$DATA/covid-cxr" --split dev --out "$OUT/covid_dev"
# chestx-det-nih: prompt specificity over the 13 findings' prompts, invariance; consolidation and effusion localisation
run --data "$DATA/chestx-det-nih" --finding consolidation --finding effusion --specificity --out "$OUT/chestx_det"
# tbx11k-tb: the fixed held-out third (heldout_part(image_id) == dev)
run --data "$DATA/tbx11k-tb" --split dev --out "$OUT/tbx11k_dev"
# NIH sample: zero-shot AUROC (image-level labels; a model trained on NIH must use --split dev)
run --data "$DATA/nih-cxr14-sample" ${NIH_SPLIT:+--split "$NIH_SPLIT"} --finding effusion --finding atelectasis \
    --finding edema --out "$OUT/nih_auroc"
echo "written: $OUT"
