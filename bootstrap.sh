#!/usr/bin/env bash
# Set up .venv/ at the repository root (reused when present) and run a command in it.
#   ./bootstrap.sh run [visionflow run options]   the whole pipeline on the built-in dataset
#   ./bootstrap.sh test [pytest options]          the test suite
#   ./bootstrap.sh dvc repro | visionflow CMD ...   any dvc or visionflow command in the environment
set -euo pipefail
cd "$(dirname "$0")"

PY=${PYTHON:-}
if [ -z "$PY" ]; then
  for cand in python3.11 python3.12 python3; do
    if command -v "$cand" >/dev/null 2>&1; then PY=$cand; break; fi
  done
fi
[ -x .venv/bin/python ] || "$PY" -m venv .venv

stamp=.venv/.visionflow-install
want=$(cat pyproject.toml | "$PY" -c 'import hashlib,sys; print(hashlib.sha256(sys.stdin.buffer.read()).hexdigest())')
if [ ! -f "$stamp" ] || [ "$(cat "$stamp")" != "$want" ]; then
  echo "bootstrap: installing visionflow and its dependencies into .venv (first run takes a few minutes)"
  .venv/bin/python -m pip install -q --disable-pip-version-check --upgrade pip >/dev/null 2>&1 || true
  .venv/bin/python -m pip install -q --disable-pip-version-check -e '.[dev]'
  echo "$want" > "$stamp"
fi
bash scripts/seed_weights.sh .venv/bin/python

# No network here: keep Prefect and MLflow from phoning home. dvc.yaml's commands find `visionflow` on PATH.
export PREFECT_SERVER_ANALYTICS_ENABLED=false DO_NOT_TRACK=1 MLFLOW_ENABLE_ARTIFACTS_PROGRESS_BAR=false
# a busy 2-core machine can take longer than the default 20 s to start the temporary Prefect server
export PREFECT_SERVER_EPHEMERAL_STARTUP_TIMEOUT_SECONDS=${PREFECT_SERVER_EPHEMERAL_STARTUP_TIMEOUT_SECONDS:-120}
export PATH="$PWD/.venv/bin:$PATH"
cmd=${1:-run}
shift || true
case "$cmd" in
  run) exec .venv/bin/visionflow run "$@" ;;
  test) exec .venv/bin/python -m pytest "$@" ;;
  dvc) exec .venv/bin/dvc "$@" ;;
  *) exec .venv/bin/visionflow "$cmd" "$@" ;;
esac
