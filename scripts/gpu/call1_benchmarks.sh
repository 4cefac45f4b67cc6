# GPU call 1 (carry .carry/runtime): every GPU benchmark, results under $OUT.
set -u
source scripts/gpu/env.sh
nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv,noheader
python3 -c "import torch, transformers, monai; print('torch', torch.__version__, 'transformers', transformers.__version__, 'monai', monai.__version__)"
python3 benchmarks/engine.py --device cuda --json "$OUT/engine_gpu.json" 2>&1 | tail -8
python3 benchmarks/train_throughput.py --device cuda --json "$OUT/train_gpu.json" 2>&1 | tail -30
[ -f benchmarks/volume_localize.py ] && python3 benchmarks/volume_localize.py --device cuda --json "$OUT/volume_gpu.json" 2>&1 | tail -12
echo CALL1-DONE
