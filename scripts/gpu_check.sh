#!/usr/bin/env bash
# The CUDA path, measured on one GPU in at most 10 minutes: one detector and one segmenter trained for an
# epoch through the real stage commands, then the engine benchmark (images/s, fraction of the GPU's matmul rate).
#
#   scripts/gpu_check.sh                 # from the repository root, with .venv (./bootstrap.sh) or $PYTHON
#   OUT=/some/folder scripts/gpu_check.sh
#   DEVICE=cpu STEPS=2 SIZE=64 BENCH_IMAGES=256 scripts/gpu_check.sh   # a dry run of the script itself on a CPU
#
# What it checks on the way: CUDA is visible; mixed precision picks bfloat16 where the GPU has it (else
# float16 with a GradScaler); convnets train channels-last; the stages run with train.device=cuda. The
# detector and segmenter start from random weights (no download, no pretrain stage needed): the figures
# are speed, not accuracy. Everything goes to $OUT (default: a temporary folder): the stage outputs,
# metrics/*.json, engine_cuda.json and gpu_check.log, whose last lines are the summary for the README.
set -euo pipefail

ROOT=$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)
PY=${PYTHON:-$ROOT/.venv/bin/python}
[ -x "$PY" ] || PY=$(command -v python3)
OUT=${OUT:-$(mktemp -d -t visionflow-gpu-XXXXXX)}
DEVICE=${DEVICE:-cuda}
STEPS=${STEPS:-null}            # train.max_steps_per_epoch (null: the whole epoch)
SIZE=${SIZE:-256}              # image size of the detector and the segmenter
BENCH_IMAGES=${BENCH_IMAGES:-16384}
mkdir -p "$OUT"
exec > >(tee "$OUT/gpu_check.log") 2>&1
export PYTHONPATH="$ROOT${PYTHONPATH:+:$PYTHONPATH}" TQDM_DISABLE=1 PYTHONUNBUFFERED=1
export MLFLOW_TRACKING_URI="sqlite:///$OUT/mlflow.db" MLFLOW_ENABLE_ARTIFACTS_PROGRESS_BAR=false
cd "$OUT"
start=$(date +%s)

echo "== device"
timeout 180 "$PY" - "$DEVICE" <<'PYEOF'
import sys
import torch
if sys.argv[1] == "cpu":
    print("dry run on the CPU: no CUDA figures")
    raise SystemExit(0)
if not torch.cuda.is_available():
    raise SystemExit("gpu_check: no CUDA device visible (torch %s, CUDA build %s)" % (torch.__version__, torch.version.cuda))
from components.training.runtime import amp_dtype, needs_grad_scaler, prefers_channels_last
from components.distributed import default_backend
from components.models.registry import get_model
dev = torch.device("cuda", 0)
dtype = amp_dtype(dev)
model = get_model("classification", "classifier", num_classes=10, backbone="convnet_small", weights=None)
print(f"{torch.cuda.get_device_name(dev)}, capability {torch.cuda.get_device_capability(dev)}, torch {torch.__version__}, CUDA {torch.version.cuda}")
print(f"autocast dtype {dtype}, GradScaler {needs_grad_scaler(dtype)}, channels-last {prefers_channels_last(model, dev, amp=True)}, DDP backend {default_backend(dev)}")
PYEOF

COMMON=(--params "$ROOT/params.yaml" --set data.out=data/shapes --set "tracking.uri=sqlite:///$OUT/mlflow.db" --set tracking.experiment=gpu-check)
train() {  # train(section) -> --set overrides for one epoch on $DEVICE at $SIZE px, batch 32, 4 loader workers
  echo --set "$1.image_size=$SIZE" --set "$1.backbone.arch=mobilenet_v2" --set "$1.backbone.weights=null" \
       --set "$1.train.epochs=1" --set "$1.train.batch_size=32" --set "$1.train.device=$DEVICE" --set "$1.train.amp=true" \
       --set "$1.train.workers=4" --set "$1.train.threads=null" --set "$1.train.max_steps_per_epoch=$STEPS"
}

echo "== ingest shapes (320/64/64 images)"
timeout 120 "$PY" -m flows.cli ingest "${COMMON[@]}" --source shapes --out data/shapes >/dev/null

echo "== detect faster_rcnn, 1 epoch on $DEVICE"
# shellcheck disable=SC2046  # train() prints separate words on purpose
timeout 200 "$PY" -m flows.cli detect "${COMMON[@]}" --arch faster_rcnn $(train detect.faster_rcnn) > detect.json
echo "== segment fcn, 1 epoch on $DEVICE"
# shellcheck disable=SC2046
timeout 200 "$PY" -m flows.cli segment "${COMMON[@]}" --arch fcn $(train segment.fcn) > segment.json

echo "== engine benchmark on $DEVICE"
timeout 150 "$PY" "$ROOT/benchmarks/bench_engine.py" --device "$DEVICE" --epochs 2 --images "$BENCH_IMAGES" --batch-size 512 --repeats 2 \
  --workers 4 --out "$OUT/engine_cuda.json" | tail -n 9

echo "== summary ($(( $(date +%s) - start )) s)"
"$PY" - "$OUT" <<'PYEOF'
import json, sys
from pathlib import Path
out = Path(sys.argv[1])
def show(name: str, path: Path) -> None:
    m = json.loads(path.read_text())
    keys = ("device", "train_time_s", "images_per_s", "ms_per_image", "map_50", "miou", "pixel_accuracy")
    flat = {k: v for k, v in m.items() if not isinstance(v, (dict, list))}
    for section in ("test", "train", "timing"):
        if isinstance(m.get(section), dict):
            flat.update({k: v for k, v in m[section].items() if not isinstance(v, (dict, list))})
    print(name, {k: flat[k] for k in keys if k in flat})
show("detect faster_rcnn", out / "metrics/detect/faster_rcnn.json")
show("segment fcn", out / "metrics/segment/fcn.json")
e = json.loads((out / "engine_cuda.json").read_text())
print(f"engine {e['engine_images_per_s']} img/s (plain loop {e['plain_images_per_s']}), {e['achieved_gflops_per_s']} GFLOP/s = "
      f"{e['fraction_of_matmul_rate']:.3f} of the {e['matmul_dtype']} matmul rate {e['matmul_gflops_per_s']} GFLOP/s on {e['machine']['device']}")
PYEOF
