# GPU call 2 (carry .carry/data; .carry/runtime is still there from call 1): start the default-model
# candidates and the ablation as detached jobs (they outlive this call), then watch them.
set -u
source scripts/gpu/env.sh
mkdir -p .carry/out
setsid nohup python3 scripts/train_default_model.py --data .carry/data --backgrounds .carry/data/backgrounds \
  --out .carry/out/default --device cuda --synthetic "${SYNTHETIC:-3000}" --set optim.epochs="${EPOCHS_DEFAULT:-14}" > .carry/out/default.log 2>&1 < /dev/null &
setsid nohup python3 scripts/run_ablation.py --data .carry/data --out .carry/out/ablation --device cuda \
  --set optim.epochs="${EPOCHS_ABLATION:-30}" \
  > .carry/out/ablation.log 2>&1 < /dev/null &
for i in $(seq 1 "${WATCH_MIN:-9}"); do
  sleep 60
  echo "--- minute $i"; tail -n 2 .carry/out/default.log .carry/out/ablation.log
  for d in .carry/out/default/runs/* .carry/out/ablation/runs/*; do [ -f "$d/validation.csv" ] && echo "$d: $(tail -n 1 "$d/validation.csv" | cut -c1-200)"; done
done
nvidia-smi --query-gpu=utilization.gpu,memory.used --format=csv,noheader
