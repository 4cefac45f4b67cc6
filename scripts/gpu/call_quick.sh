# One short GPU call (carry .carry/runtime and a compact .carry/data): default-model training only,
# exported model copied to $OUT as soon as it exists.
set -u
source scripts/gpu/env.sh
mkdir -p .carry/out
timeout "${TRAIN_S:-200}" python3 scripts/train_default_model.py --data .carry/data --backgrounds .carry/data/backgrounds \
  --out .carry/out/default --device cuda --synthetic "${SYNTHETIC:-1500}" --candidates effnet_lite0 \
  --set optim.epochs="${EPOCHS:-8}" --skip-evaluate 2>&1 | tail -n 15
cp .carry/out/default/summary.json "$OUT/" 2>/dev/null
[ -f .carry/out/default/export/default/model.safetensors ] && cp -r .carry/out/default/export/default "$OUT/default"
tail -n 3 .carry/out/default/runs/effnet_lite0/metrics.csv .carry/out/default/runs/effnet_lite0/validation.csv 2>/dev/null
ls -la "$OUT" "$OUT/default" 2>/dev/null
