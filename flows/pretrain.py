"""Pretrain an M3Ret encoder on the archive itself (MAE, optionally with SimDINO), and register
it as an encoder version.

The flow only wires tasks (training logic: ``medflow.training.pretrain``): train or resume, register
the weights under ``<root>/models/m3ret/<version>/``, publish the loss curve as Prefect
artifacts (a markdown summary and a table of steps and losses; no paths or identifiers).
Run it again with the same config after a crash and it resumes from the last checkpoint.

Use the result in the nightly job with an encoder spec such as
``{"name": "m3ret_tiny", "checkpoint": "<root>/models/m3ret/<version>/weights.safetensors"}``.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Annotated, Any

import typer
from prefect import flow, get_run_logger
from prefect.artifacts import create_markdown_artifact, create_table_artifact

__all__ = ["loss_table", "pretrain", "pretrain_cmd"]

_TABLE_ROWS = 50  # loss rows in the artifact table: enough to see the curve's shape


def loss_table(losses: list[tuple[int, float]] | tuple[tuple[int, float], ...]) -> list[dict]:
    """At most 50 evenly spaced (step, loss) rows, the last step always included."""
    if not losses:
        return []
    n = len(losses)
    idx = sorted({round(i * (n - 1) / max(1, _TABLE_ROWS - 1)) for i in range(_TABLE_ROWS)})
    return [{"step": losses[i][0], "loss": round(losses[i][1], 5)} for i in idx if i < n]


@flow(name="pretrain-m3ret")
def pretrain(root: str, config: str | dict[str, Any]) -> dict[str, Any]:
    """Pretrain the M3Ret encoder ``config`` names on ``root``'s ingested series.

    ``config``: pretraining settings (see ``medflow.training.pretrain.PretrainConfig``) as a dict or a
    JSON file path. Returns the registered version's record (name, version, weights, steps,
    final loss).
    """
    from medflow.tasks.pretrain import register_task, train_task
    from medflow.training.pretrain import load_pretrain_config

    logger = get_run_logger()
    cfg = load_pretrain_config(config)  # a bad config fails before any work
    result = train_task(root, cfg)
    record = register_task(root, cfg, result)
    logger.info(
        "registered %s version %s after %d steps", record.name, record.version, record.steps
    )
    create_markdown_artifact(
        key="m3ret-pretrain",
        markdown=(
            f"# {record.name} pretraining ({cfg.objective})\n\n"
            f"- version: `{record.version}`\n"
            f"- steps: {result.steps} (this run started at step {result.resumed_from})\n"
            f"- final loss (mean of the last 10 steps): {result.final_loss:.4f}\n"
            f"- first loss: {result.losses[0][1]:.4f}\n"
            f"- training series by kind/modality: {dict(result.groups)}\n"
            f"- loss curve: `models/m3ret/{record.version}/loss.png` under the output root\n"
        ),
        description=f"{record.name} pretraining: version and loss",
    )
    create_table_artifact(
        key="m3ret-pretrain-loss",
        table=loss_table(result.losses),
        description=f"{record.name} {cfg.objective} loss by step (version {record.version})",
    )
    return record.to_dict()


RootOpt = Annotated[str, typer.Option("--root", "-r", help="Output root (local folder).")]


def pretrain_cmd(
    config: Annotated[Path, typer.Argument(help="Pretraining config (JSON).")],
    root: RootOpt = "medflow-out",
) -> None:
    """Pretrain an M3Ret encoder (MAE) on the ingested archive and register it as a version."""
    record = pretrain(root=root, config=str(config))
    typer.echo(json.dumps(record, indent=2))
    typer.echo(
        "Use it in the nightly job with an encoder spec: "
        + json.dumps({"name": record["name"], "checkpoint": record["weights"]})
    )
