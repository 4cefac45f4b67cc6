# Source on the GPU machine (repo root): the carried runtime on the path, no network.
export PYTHONPATH="$PWD/.carry/site:$PWD" PYTHONUNBUFFERED=1 HF_HUB_OFFLINE=1 TRANSFORMERS_OFFLINE=1
export AFLOC_TEXT_MODEL_DIR="$PWD/.carry/runtime/text" AFLOC_BACKBONE_WEIGHTS_DIR="$PWD/.carry/runtime/backbones"
if [ ! -d .carry/site/monai ]; then
  python3 -m pip install -q --no-index --no-deps --no-compile --target .carry/site .carry/runtime/wheels/*.whl
fi
