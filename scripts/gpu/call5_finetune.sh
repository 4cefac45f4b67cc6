# GPU call (carry as call4): volume benchmarks (outputs' write time is CPU work: timed on the CPU) and
# the few-shot benchmark for the k values in $KS; results under $OUT, saved after every draw.
set -u
source scripts/gpu/env.sh
if [ "${VOLUME:-1}" = 1 ]; then
  for m in default resnet50; do
    timeout 120 python3 benchmarks/volume_localize.py --device cuda --model $m --prompts 1 3 --no-write \
      --json "$OUT/volume_gpu_$m.json" 2>&1 | grep -v '^ \|^{\|^}\|^\]'
  done
fi
timeout "${FT_S:-420}" python3 benchmarks/finetune.py --model default --device cuda --data .carry/data \
  --ks ${KS:-5 10} --draws 5 --out "$OUT/finetune_gpu_k${KS// /_}" 2>&1 | tail -12
echo CALL5-DONE
