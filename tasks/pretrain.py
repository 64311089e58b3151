"""The Prefect tasks of M3Ret pretraining: train (or resume) and register.

The training itself is :mod:`medflow.training.pretrain`; the ``pretrain`` flow
(:mod:`medflow.flows.pretrain`) runs these two tasks.
"""

from __future__ import annotations

import torch
from prefect import task

from medflow.encoders.m3ret import M3RetViT
from medflow.reasons import shielded
from medflow.storage.layout import OutputRoot
from medflow.tasks.options import task_options
from medflow.training.pretrain import (
    ModelRecord,
    PretrainConfig,
    TrainResult,
    archive_sampler,
    encoder_config,
    plot_loss,
    register_model,
    run_dir,
    train_mae,
)

__all__ = ["register_task", "train_task"]


# a retry resumes from the run's last checkpoint, whatever stopped it
@task(**task_options("m3ret-train", retries=1, retry_delays_s=(5,), transient_only=False))
@shielded("m3ret-train")
def train_task(root: str, config: PretrainConfig) -> TrainResult:
    """Train to ``config.steps`` (a retry resumes from the run's last checkpoint) and plot."""
    from prefect import get_run_logger

    logger = get_run_logger()
    out = OutputRoot(root)
    directory = run_dir(out, config)
    sampler = archive_sampler(out, config)
    logger.info("training on %s (kind/modality: series)", sampler.group_sizes())
    every = max(1, config.steps // 20)

    def progress(step: int, loss: float) -> None:
        if step % every == 0 or step == config.steps:
            logger.info("step %d/%d: loss %.4f", step, config.steps, loss)

    result, _ = train_mae(config, sampler, directory, on_step=progress)
    plot_loss(
        result.losses,
        directory / "loss.png",
        f"{config.encoder} {config.objective} ({directory.name})",
    )
    return result


@task(**task_options("m3ret-register"))
@shielded("m3ret-register")
def register_task(root: str, config: PretrainConfig, result: TrainResult) -> ModelRecord:
    """Register the run's final checkpoint as a new encoder version."""
    _, mcfg = encoder_config(config)
    state = torch.load(result.checkpoint, map_location="cpu", weights_only=True)["state_dict"]
    encoder = M3RetViT(mcfg)
    encoder.load_state_dict(state)
    return register_model(OutputRoot(root), config, encoder, result)
