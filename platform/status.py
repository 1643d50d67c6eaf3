"""A run's progress, read from storage: partition sizes, each training's latest step, each expert's
island and state (the manifest reconciled with checkpoints and leases, `manifest.reconcile`),
assembled or not, its distilled students, and who writes the run and each training now (their leases).

Only complete checkpoints count (LATEST moves after their files), so this is safe while a fit
writes the run directory from anywhere.
"""

from __future__ import annotations

import json
from typing import Any

from archipelago.experts import storage
from archipelago.experts.lease import Holder, holder
from archipelago.platform import distill, manifest, steps, versions
from archipelago.platform.config import RunConfig


def _progress(folder: str, configured: int, lease: Holder | None) -> dict[str, Any]:
    """A training's step and state, and its writer (`lease`: the folder's lease as read by the caller)."""
    step = steps.latest_step(folder)
    state = "not started" if step is None else "done" if step >= configured else "in progress"
    return {"step": step, "steps": configured, "state": state, "writer": lease.describe() if lease else None}


def _router_progress(folder: str, configured: int) -> dict[str, Any]:
    return _progress(folder, configured, holder(folder))


def _expert(run_dir: str, config: RunConfig, summary: dict[str, Any], k: int, record: dict[str, Any] | None
            ) -> dict[str, Any]:
    """Expert k's progress, with its island and state from the manifest reconciled with its
    checkpoints and lease (`manifest.reconcile`); a failed expert's error."""
    folder = steps.expert_dir(run_dir, k)
    lease = holder(folder)
    progress = _progress(folder, steps.steps_of(summary, config, k), lease)
    state = manifest.reconcile(record, progress["step"], progress["steps"], lease)
    record = record or {}
    return {"expert": k, "island": record.get("island") or config.placement_of(k).island, **progress,
            "state": state, "error": record.get("error") if state == "failed" else None}


def _writer(folder: str) -> str | None:
    lease = holder(folder)
    return lease.describe() if lease else None


def run_status(run_dir: str) -> dict[str, Any]:
    """What storage says about a run (see the module docstring), as a JSON-ready dict."""
    config = steps.load_config(run_dir)
    partitioned = storage.exists(storage.join(run_dir, steps.PARTITION_FILE))
    # Before partitioning, the summary's defaults: experts 0..K-1 at the run's steps, generation 0.
    summary = steps.read_summary(run_dir) if partitioned else {"sizes": [0] * config.experts}
    records = manifest.read_all(run_dir)
    return {
        "run_dir": run_dir,
        "domain": config.domain,
        "partition_sizes": summary["sizes"] if partitioned else None,
        "experts": [_expert(run_dir, config, summary, k, records.get(k)) for k in steps.ids_of(summary)],
        "router": _router_progress(steps.router_dir(run_dir, steps.generation_of(summary)), config.router.steps),
        "versions": [{key: v.get(key) for key in ("version", "expert_ids", "change", "at", "withdrawn")}
                     for v in versions.history(run_dir)],
        "assembled": storage.exists(storage.join(run_dir, steps.ENSEMBLE_FILE)),
        "students": _students(run_dir),
        "writer": _writer(run_dir),
    }


def _students(run_dir: str) -> dict[str, Any] | None:
    """The distilled students sampled now (`model=student` / `dense`): their version and checkpoints."""
    uri = storage.join(run_dir, distill.STUDENTS, distill.STUDENTS_FILE)
    if not storage.exists(uri):
        return None
    saved = storage.read_json(uri)
    return {"ensemble_version": saved["ensemble_version"],
            **{key: "/".join(saved[key]) for key in distill.MODELS.values()}}


def status_text(status: dict[str, Any], as_json: bool = False) -> str:
    """A run status as a table (or as JSON)."""
    if as_json:
        return json.dumps(status, indent=2)
    sizes = status["partition_sizes"]

    def row(name: str, p: dict[str, Any], size: Any = "") -> str:
        step, island = p["step"] if p["step"] is not None else "-", p.get("island") or "-"
        return f"{name:<10} {step:>6} / {p['steps']:<6} {p['state']:<12} {size!s:<8} {island}"

    lines = [f"run {status['run_dir']} ({status['domain']})",
             f"{'':<10} {'step':>6} / {'steps':<6} {'state':<12} {'size':<8} island"]
    lines += [row(f"expert {e['expert']}", e, sizes[e["expert"]] if sizes else "-") for e in status["experts"]]
    lines += [row("router", status["router"], sum(sizes) if sizes else "-")]
    lines += [
        f"partition: {'sizes ' + ', '.join(map(str, sizes)) if sizes else 'not yet'}",
        f"assembled: {'yes' if status['assembled'] else 'no'}",
        *([f"students of version {st['ensemble_version']}: dense {st['dense']}, few-step {st['reflow']}"]
          if (st := status["students"]) else []),
        *(f"version {v['version']}: experts {v['expert_ids']}, {v['change']} ({v['at']})"
          + (f", withdrawn: {v['withdrawn']}" if v["withdrawn"] else "") for v in status["versions"]),
        f"writer: {status['writer'] or 'none'}",
        *(f"  expert {e['expert']}: {e['writer']}" for e in status["experts"] if e["writer"]),
        *([f"  router: {status['router']['writer']}"] if status["router"]["writer"] else []),
        *(f"expert {e['expert']} failed: {e['error']}" for e in status["experts"] if e.get("error")),
    ]
    return "\n".join(lines)
