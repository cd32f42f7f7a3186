"""Before resolving an issue: does the committed dvc.lock (and so metrics/) come from the checkout's code and params?

Prints every stage whose recorded code, params or command differs from the checkout (missing outputs,
as in a fresh clone, are not drift) and exits 1 if there is one. Fix: `./bootstrap.sh dvc repro` (or
`./bootstrap.sh run`), then commit dvc.lock and metrics/.

    python scripts/check_lock.py
"""

from __future__ import annotations

import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from components.pipeline import lock_drift  # noqa: E402


def main() -> int:
    root = Path(__file__).resolve().parents[1]
    drift = lock_drift(root)
    for line in drift:
        print(f"stale in dvc.lock: {line}")
    if drift:
        print(f"{len(drift)} stage(s) recorded from other code or params: run `./bootstrap.sh dvc repro` and commit dvc.lock and metrics/")
        return 1
    print("dvc.lock matches the checkout's code and params")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
