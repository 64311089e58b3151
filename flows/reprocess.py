"""Reprocess after a model or prompt bank update: recompute only the stale (series, encoder) pairs.

The plan (:func:`tasks.reprocess.plan_reprocess`) compares every stored output partition with
the configured encoders; this flow then runs the nightly flow's encode stage
(:func:`flows.nightly.run_encode`) for the encoders with stale pairs only. Series embedded at an
older version (or never) are embedded again; series whose embedding is current but whose
findings come from another prompt bank version are rescored from the stored embeddings, without
running the image tower. Old versions are not touched: they stay queryable until
``medflow prune``.
"""

from __future__ import annotations

import time
from collections.abc import Callable
from typing import Any

from prefect import flow, get_run_logger
from prefect.artifacts import create_table_artifact

from medflow.flows.locking import exclusive_run
from medflow.flows.nightly import (
    IngestSummary,
    new_run_id,
    record_run,
    resolve_specs,
    run_encode,
    task_runner,
)
from medflow.reasons import shielded, tally_groups
from medflow.storage.layout import OutputRoot
from medflow.storage.tables import utcnow
from medflow.tasks.reprocess import ReprocessPlan, plan_reprocess, select_specs

__all__ = ["plan_rows", "reprocess"]

# the CLI installs a progress callback here; flows take only serialisable parameters
PROGRESS: dict[str, Callable[[str, int, int], None]] = {}

_MAX_PAIR_ROWS = 1000  # stale pairs listed in the artifact (counts cover them all)


def plan_rows(plan: ReprocessPlan) -> list[dict[str, Any]]:
    """The plan as counts per encoder, action and reason (no paths, no identifiers)."""
    rows: list[dict[str, Any]] = []
    for ep in plan.encoders:
        rows.append({"encoder": ep.encoder, "what": "current version", "value": ep.version})
        if ep.bank_version:
            rows.append({"encoder": ep.encoder, "what": "current bank", "value": ep.bank_version})
        for what, n in sorted(ep.reasons().items()):
            rows.append({"encoder": ep.encoder, "what": what, "value": n})
        rows.append(
            {"encoder": ep.encoder, "what": "estimated seconds", "value": round(ep.est_seconds, 1)}
        )
    return rows


def _publish(plan: ReprocessPlan, summary: IngestSummary | None, dry_run: bool) -> None:
    rows = plan_rows(plan)
    if summary is not None:
        for label in sorted(set(summary.encoded) | set(summary.findings)):
            rows.append(
                {"encoder": label, "what": "embedded", "value": summary.encoded.get(label, 0)}
            )
            rows.append(
                {
                    "encoder": label,
                    "what": "finding scores written",
                    "value": summary.findings.get(label, 0),
                }
            )
    create_table_artifact(
        key="reprocess-plan" if dry_run else "reprocess-summary",
        table=rows,
        description=(
            f"medflow reprocess{' (dry run)' if dry_run else ''}: {plan.n_embed} pairs to embed, "
            f"{plan.n_findings_only} to rescore, about {plan.est_seconds:.0f} s"
        ),
    )
    pairs = [
        {"series_key": p.series_key, "encoder": p.encoder, "action": action, "reason": p.reason}
        for ep in plan.encoders
        for action, group in (("embed", ep.embed), ("rescore", ep.findings_only))
        for p in group
    ]
    if pairs:
        create_table_artifact(
            key="reprocess-pairs",
            table=pairs[:_MAX_PAIR_ROWS],
            description=f"stale (series, encoder) pairs: {len(pairs)}"
            + (f", first {_MAX_PAIR_ROWS} listed" if len(pairs) > _MAX_PAIR_ROWS else ""),
        )


@flow(name="reprocess", task_runner=task_runner())
@exclusive_run("reprocess", unless="dry_run")  # one writer per root; a dry run only reads
@shielded("reprocess")  # no exception text that may quote a path reaches Prefect
def reprocess(
    root: str,
    encoders: list[dict[str, Any]] | None = None,
    encoder_config: str | None = None,
    encoder: str | None = None,
    dry_run: bool = False,
) -> dict[str, Any]:
    """Recompute the stale (series, encoder) pairs under ``root``.

    ``encoders`` / ``encoder_config``: the current encoder specs, as for the nightly flow;
    ``encoder``: only this encoder label; ``dry_run``: plan and report only. Returns the plan
    and, unless a dry run, what was embedded and scored per encoder label; while another run
    writes under ``root`` it does nothing and returns ``skipped`` (storage.lock).
    """
    started = utcnow()
    t0 = time.perf_counter()
    logger = get_run_logger()
    configured = resolve_specs(encoders, encoder_config)
    specs = select_specs(configured, encoder)
    plan = plan_reprocess(OutputRoot(root), configured, encoder)
    for ep in plan.encoders:
        logger.info(
            "%s (%s): %d to embed, %d to rescore, about %.0f s",
            ep.encoder,
            ep.version,
            len(ep.embed),
            len(ep.findings_only),
            ep.est_seconds,
        )
    result: dict[str, Any] = {"dry_run": dry_run, "plan": plan.to_dict()}
    if dry_run:
        _publish(plan, None, dry_run=True)
        return result
    summary = IngestSummary(run_id=new_run_id())
    stale = [s for s, ep in zip(specs, plan.encoders, strict=True) if ep.stale]
    run_encode(root, stale, summary, progress=PROGRESS.get("cb"))
    summary.seconds = time.perf_counter() - t0
    for ep in plan.encoders:
        done = summary.encoded.get(ep.encoder, 0)
        failed = sum(
            int(g["count"])
            for g in summary.quarantined.values()
            if g["stage"] == f"encode {ep.encoder}"
        )
        if done + failed != len(ep.embed):
            logger.warning(
                "%s: planned %d to embed, embedded %d (%d failed)",
                ep.encoder,
                len(ep.embed),
                done,
                failed,
            )
    _publish(plan, summary, dry_run=False)
    record_run(root, "reprocess", summary, started)
    result.update(
        run_id=summary.run_id,
        encoded=summary.encoded,
        findings=summary.findings,
        failed=tally_groups(summary.quarantined),
        seconds=summary.seconds,
    )
    return result
