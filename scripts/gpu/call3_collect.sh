# GPU call 3: wait for the jobs of call 2, run the few-shot benchmark on the chosen model, and
# bring back results (text files in one tarball; the exported model in <=15 MiB pieces).
set -u
source scripts/gpu/env.sh
for i in $(seq 1 "${WAIT_MIN:-6}"); do
  grep -q "exported:" .carry/out/default.log && [ -f .carry/out/ablation/evaluation/evaluation.md ] && break
  sleep 60; echo "--- waiting $i"; tail -n 2 .carry/out/default.log .carry/out/ablation.log
done
if [ -d .carry/out/default/export/default ] && [ "${FINETUNE:-1}" = 1 ]; then
  python3 benchmarks/finetune.py --model .carry/out/default/export/default --device cuda --data .carry/data \
    --out .carry/out/finetune_gpu 2>&1 | tail -15
fi
cd .carry/out
tar czf "$OUT/results.tgz" --exclude='*.safetensors' --exclude='store' --exclude='synthetic' --exclude='events' \
  --exclude='checkpoints' --exclude='training_state*' . 2>/dev/null
if [ -d default/export/default ]; then tar cf - -C default/export default | split -b 15M - "$OUT/model.tar.part-"; fi
ls -la "$OUT"; cat default.log | tail -5; cat ablation/evaluation/evaluation.md 2>/dev/null | head -40
