# GPU call (carry .carry/runtime/text, .carry/runtime/wheels, .carry/data/covid-cxr): the inference,
# volume and few-shot benchmarks with the shipped default model; results under $OUT.
set -u
source scripts/gpu/env.sh
nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv,noheader
python3 -c "import torch, transformers, monai; print('torch', torch.__version__, 'transformers', transformers.__version__, 'monai', monai.__version__)"
timeout 150 python3 benchmarks/engine.py --device cuda --json "$OUT/engine_gpu.json" 2>&1 | tail -8
for m in default resnet50; do
  timeout 90 python3 benchmarks/volume_localize.py --device cuda --model $m --prompts 1 3 --json "$OUT/volume_gpu_$m.json" 2>&1 | grep -v '^ \|^{\|^}\|^\]'
done
timeout "${FT_S:-300}" python3 benchmarks/finetune.py --model default --device cuda --data .carry/data \
  --ks 1 3 5 10 --draws 5 --out "$OUT/finetune_gpu" 2>&1 | tail -30
echo CALL4-DONE
