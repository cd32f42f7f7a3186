"""The retrain run's report: what each stage did, the registry decisions, the orchestration overhead, as markdown.

Plain functions over the report dict the flow (``flows/retrain.py``) fills; the flow publishes the
markdown and the registry rows as Prefect artifacts. No Prefect, no MLflow here.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

from components.config import METRICS_DIR
from components.io import read_json

#: the columns of a registry row (``metrics/register.json``'s ``models``, written by the register stage)
REGISTRY_COLUMNS = ("status", "version", "decision", "metric", "candidate_value", "champion_version_before", "champion_value",
                    "comparison", "test_data_hash", "reason")


def union_seconds(spans: list[tuple[float, float]]) -> float:
    """Seconds covered by at least one of the ``(start, end)`` spans: the time spent inside stage processes."""
    total, end = 0.0, float("-inf")
    for a, b in sorted(spans):
        if b > end:
            total += b - max(a, end)
            end = b
    return total


def timing(stages: dict[str, dict[str, Any]], wall: float) -> dict[str, float]:
    """``wall_s``, ``stages_s`` (the union of the stages' spans) and ``overhead_s`` (the rest: orchestration)."""
    spans = [(e["started"], e["started"] + e["seconds"]) for e in stages.values() if e.get("started") is not None]
    inside = union_seconds(spans)
    return {"wall_s": round(wall, 2), "stages_s": round(inside, 2), "overhead_s": round(wall - inside, 2)}


def outcome(stages: dict[str, dict[str, Any]]) -> str:
    """``failed`` if a stage failed, ``trained`` if one ran (or skipped itself), else ``up to date``."""
    states = {e["state"] for e in stages.values()}
    return "failed" if "failed" in states else ("trained" if states & {"ran", "skipped"} else "up to date")


def read_registry(root: Path) -> dict[str, Any]:
    """The register stage's ``metrics/register.json`` (empty when it is missing or unreadable)."""
    try:
        report = read_json(root / METRICS_DIR / "register.json")
    except (OSError, ValueError):
        return {}
    return report if isinstance(report, dict) else {}


def registry_rows(register: dict[str, Any]) -> list[dict[str, Any]]:
    """One row per model of ``register.json``'s ``models``: status, version, decision, both gate numbers."""
    return [{"model": name, **{k: row.get(k, "") for k in REGISTRY_COLUMNS}} for name, row in (register.get("models") or {}).items()]


def summary_markdown(report: dict[str, Any]) -> str:
    """The run's summary: one row per stage (state, seconds, why skipped), the registry decisions, the timing."""
    lines = [f"# visionflow retrain: {report['outcome']}", ""]
    lines.append(f"- Prefect flow run `{report['flow_run_id']}` · MLflow parent run `{report.get('mlflow_run_id') or '-'}` · git `{report.get('git_commit', '-')}`")
    if report.get("timing"):
        t = report["timing"]
        lines.append(f"- wall {t['wall_s']:.1f} s · in stages {t['stages_s']:.1f} s · orchestration overhead {t['overhead_s']:.1f} s")
    if report.get("reason"):
        lines += ["", f"**{report['reason']}**"]
    if report.get("changes"):
        lines += ["", "What DVC found changed:", *(f"- {c}" for c in report["changes"])]
    if report.get("stages"):
        lines += ["", "## Stages", "", "| stage | state | seconds | note |", "| --- | --- | --- | --- |"]
        lines += [f"| {name} | {e['state']} | {e.get('seconds') or 0:.1f} | {e.get('reason') or ''} |" for name, e in report["stages"].items()]
    rows = registry_rows(report.get("register") or {})
    if rows:
        keys = list(rows[0])
        lines += ["", "## Registry", "", "| " + " | ".join(keys) + " |", "|" + " --- |" * len(keys)]
        lines += ["| " + " | ".join("" if r[k] is None else str(r[k]) for k in keys) + " |" for r in rows]
    return "\n".join(lines)
