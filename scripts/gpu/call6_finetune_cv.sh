# GPU call (carry as call4): the few-shot benchmark with the cross-validated correction weight.
# k = 5, 10 without the U-Net (its draws and seeds equal call5's, whose U-Net figures stand), then
# k = 1, 3 with it; results under $OUT, saved after every draw.
set -u
source scripts/gpu/env.sh
timeout 200 python3 benchmarks/finetune.py --model default --device cuda --data .carry/data \
  --ks 5 10 --draws 5 --unet-steps 0 --out "$OUT/finetune_cv_k5_10" 2>&1 | grep '^k='
timeout 340 python3 benchmarks/finetune.py --model default --device cuda --data .carry/data \
  --ks 1 3 --draws 5 --out "$OUT/finetune_cv_k1_3" 2>&1 | grep '^k='
echo CALL6-DONE
