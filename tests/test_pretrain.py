"""MAE pretraining: the sampler, a falling loss, checkpoints that resume (in process and after a
SIGKILL), registration as an encoder version the encode stage picks up, and the Prefect flow."""

from __future__ import annotations

import importlib
import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

import numpy as np
import pytest
import torch

from medflow.storage.images import DecodedImage, ImageMeta, write_image
from medflow.storage.layout import OutputRoot
from medflow.storage.tables import CATALOG_SCHEMA, utcnow, write_part

REPO = Path(__file__).resolve().parent.parent
# small and quick: 1 thread keeps runs repeatable and leaves the other core to the rest
FAST = {"batch_size": 3, "warmup_steps": 2, "device": "cpu", "num_threads": 1, "lr": 2e-3}


@pytest.fixture(scope="module")
def pt() -> Any:
    # imported here, not at collection (importing it registers the m3ret encoders)
    return importlib.import_module("medflow.training.pretrain")


def make_root(path: Path) -> OutputRoot:
    """An output root with one ingested series of each kind the encoder takes (and a 4-D one)."""
    root = OutputRoot(str(path))
    root.ensure()
    rng = np.random.default_rng(0)
    zz, yy, xx = np.mgrid[0:24, 0:40, 0:40]
    ball = ((zz - 12) ** 2 + (yy - 20) ** 2 + (xx - 20) ** 2 < 64) * 900 - 500
    items = [
        ("ct1", "CT", ("z", "y", "x"), (ball + rng.normal(0, 30, ball.shape)).astype(np.int16)),
        ("ct2", "CT", ("z", "y", "x"), rng.normal(0, 300, (20, 48, 40)).astype(np.int16)),
        (
            "dx1",
            "DX",
            ("y", "x"),
            (np.add.outer(np.arange(48), np.arange(56)) * 30).astype(np.uint16),
        ),
        ("xc1", "XC", ("c", "y", "x"), rng.integers(0, 255, (3, 40, 48)).astype(np.uint8)),
        ("es1", "ES", ("t", "c", "y", "x"), rng.integers(0, 255, (12, 3, 32, 40)).astype(np.uint8)),
        ("mr4", "MR", ("t", "z", "y", "x"), rng.integers(0, 99, (2, 8, 16, 16)).astype(np.int16)),
    ]
    rows = []
    for key, modality, axes, pixels in items:
        meta = ImageMeta(
            modality=modality,
            source_kind="test",
            axes=axes,
            spacing=tuple(1.0 for _ in axes),
            origin=tuple(0.0 for _ in axes),
            affine=tuple(tuple(r) for r in np.eye(4).tolist()),
        )
        write_image(DecodedImage(meta, pixels), root.image_path(key), name=key)
        rows.append(
            {
                "series_key": key,
                "study_key": "study",
                "stage": "ingest",
                "status": "ingested",
                "modality": modality,
                "axes": "".join(axes),
                "zarr_path": root.image_relpath(key),
                "source_fingerprint": f"fp-{key}",
                "run_id": "test",
                "created_at": utcnow(),
            }
        )
    write_part(root.table_dir("catalog"), rows, CATALOG_SCHEMA, "test")
    return root


@pytest.fixture(scope="module")
def root(tmp_path_factory: pytest.TempPathFactory) -> OutputRoot:
    return make_root(tmp_path_factory.mktemp("pretrain-root"))


def _sampler(pt: Any, root: OutputRoot, cfg: Any) -> Any:
    _, mcfg = pt.encoder_config(cfg)
    return pt.ArchiveSampler(
        pt.ingested_series(root),
        mcfg,
        crop_scale=cfg.crop_scale,
        augment=cfg.augment,
        local_crop_scale=cfg.local_crop_scale,
    )


def test_sampler_balances_groups_and_shapes(pt: Any, root: OutputRoot) -> None:
    cfg = pt.parse_pretrain_config(FAST)
    sampler = _sampler(pt, root, cfg)
    assert sampler.group_sizes() == {
        "image/DX": 1,
        "image/XC": 1,
        "video/ES": 1,
        "volume/CT": 2,
    }
    rng = np.random.default_rng(0)
    drawn = sampler.batch(rng, 40)
    kinds = [k for k, _ in drawn]
    assert {"image", "video", "volume"} == set(kinds)
    assert kinds.count("image") > kinds.count("volume")  # 2 image groups vs 1 volume group
    for kind, x in drawn:
        depth = 1 if kind == "image" else 16
        assert x.shape == (1, depth, 64, 64) and torch.isfinite(x).all()
        assert x.min() >= 0 and x.max() <= 1
    jitter = pt.ArchiveSampler(pt.ingested_series(root), sampler.config, augment=True)
    _, a = jitter.sample(np.random.default_rng(5))
    _, b = jitter.sample(np.random.default_rng(5))
    assert torch.equal(a, b) and a.min() >= 0 and a.max() <= 1
    kind, pair = sampler.sample(np.random.default_rng(1), views=2)
    assert pair.shape[0] == 2 and not torch.equal(pair[0], pair[1])  # two crops, one series
    again = sampler.batch(np.random.default_rng(0), 3)
    for (_, a), (_, b) in zip(drawn[:3], again, strict=True):
        assert torch.equal(a, b)


def test_local_crops_are_smaller_views_of_the_same_series(pt: Any, root: OutputRoot) -> None:
    cfg = pt.parse_pretrain_config(FAST)
    _, mcfg = pt.encoder_config(cfg)
    sampler = pt.ArchiveSampler(
        pt.ingested_series(root), mcfg, augment=True, local_crop_scale=(0.1, 0.3)
    )
    assert sampler.local_size == (8, 32, 32)  # half of 16 x 64 x 64, whole patches
    rng = np.random.default_rng(3)
    drawn = sampler.draw_batch(rng, 12, 2, 3)
    assert {d.kind for d in drawn} == {"image", "video", "volume"}
    for d in drawn:
        depth = 1 if d.kind == "image" else 16
        assert d.views.shape == (2, depth, 64, 64)
        assert d.local is not None and d.local.shape == (3, 1 if depth == 1 else 8, 32, 32)
        assert d.local.min() >= 0 and d.local.max() <= 1 and torch.isfinite(d.local).all()
    again = sampler.draw_batch(np.random.default_rng(3), 12, 2, 3)
    assert all(
        torch.equal(a.views, b.views) and torch.equal(a.local, b.local)
        for a, b in zip(drawn, again, strict=True)
    )
    # no local crops: the same draws as sample() makes, so MAE runs are unchanged
    plain = sampler.draw(np.random.default_rng(4), 1)
    kind, views = sampler.sample(np.random.default_rng(4), 1)
    assert plain.local is None and plain.kind == kind and torch.equal(plain.views, views)


def test_config_validation(pt: Any) -> None:
    with pytest.raises(ValueError, match=r"Unknown pretraining setting\(s\) \['stpes'\]"):
        pt.parse_pretrain_config({"stpes": 3})
    with pytest.raises(ValueError, match="mask_ratio as a number"):
        pt.parse_pretrain_config({"mask_ratio": 1.5})
    with pytest.raises(ValueError, match="M3Ret encoder"):
        pt.parse_pretrain_config({"encoder": "merlin_tiny"})
    with pytest.raises(ValueError, match="Unknown encoder 'nope'"):
        pt.parse_pretrain_config({"encoder": "nope"})
    with pytest.raises(ValueError, match="not found"):
        pt.load_pretrain_config("/no/such/config.json")
    with pytest.raises(ValueError, match="objective in"):
        pt.parse_pretrain_config({"objective": "dino"})
    with pytest.raises(ValueError, match="local_crops 0 and mae_weight 1 with objective 'mae'"):
        pt.parse_pretrain_config({"local_crops": 2})
    with pytest.raises(ValueError, match="local_crop_scale low <= high"):
        pt.parse_pretrain_config({"objective": "mae+simdino", "local_crop_scale": [0.5, 0.2]})
    cfg = pt.parse_pretrain_config(
        {"objective": "mae+simdino", "local_crops": 2, "mae_weight": 0.0}
    )
    assert cfg.to_dict()["local_crop_scale"] == [0.05, 0.4] and cfg.mae_weight == 0.0


@pytest.mark.parametrize(
    ("objective", "extra"),
    [
        ("mae", {}),
        ("mae+simdino", {}),
        ("mae+simdino", {"local_crops": 2, "augment": True, "mae_weight": 0.5}),
    ],
)
def test_interrupted_run_resumes_to_identical_weights(
    pt: Any, root: OutputRoot, tmp_path: Path, objective: str, extra: dict[str, Any]
) -> None:
    cfg = pt.parse_pretrain_config(
        {**FAST, "steps": 8, "checkpoint_every": 3, "objective": objective, **extra}
    )
    whole, model_a = pt.train_mae(cfg, _sampler(pt, root, cfg), tmp_path / "a")

    class Crash(Exception):
        pass

    def crash_at_5(step: int, loss: float) -> None:
        if step == 5:  # between the checkpoints of steps 3 and 6
            raise Crash

    with pytest.raises(Crash):
        pt.train_mae(cfg, _sampler(pt, root, cfg), tmp_path / "b", on_step=crash_at_5)
    resumed, model_b = pt.train_mae(cfg, _sampler(pt, root, cfg), tmp_path / "b")
    assert resumed.resumed_from == 3 and resumed.steps == whole.steps == 8
    assert [s for s, _ in resumed.losses] == list(range(1, 9))
    assert resumed.losses == whole.losses
    a, b = model_a.state_dict(), model_b.state_dict()
    assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)
    # other settings in the same run folder are refused, not mixed
    other = pt.parse_pretrain_config(
        {**FAST, "steps": 8, "checkpoint_every": 3, "objective": objective, **extra, "lr": 1e-4}
    )
    with pytest.raises(ValueError, match="lr differ"):
        pt.train_mae(other, _sampler(pt, root, other), tmp_path / "b")


def test_killed_process_resumes_from_its_last_checkpoint(
    pt: Any, root: OutputRoot, tmp_path: Path
) -> None:
    settings = {**FAST, "steps": 60, "checkpoint_every": 2, "batch_size": 2, "run_name": "kill"}
    config = tmp_path / "pretrain.json"
    config.write_text(json.dumps(settings))
    ckpt = Path(root.url) / "models" / "m3ret" / "runs" / "kill" / "checkpoint.pt"
    env = {**os.environ, "PYTHONPATH": str(REPO)}
    proc = subprocess.Popen(
        [
            sys.executable,
            "-m",
            "medflow.training.pretrain",
            "--root",
            root.url,
            "--config",
            str(config),
        ],
        cwd=REPO,
        env=env,
        stdout=subprocess.DEVNULL,
        stderr=subprocess.PIPE,
    )
    try:
        deadline = time.monotonic() + 120
        while not ckpt.exists():
            assert proc.poll() is None, proc.stderr.read().decode() if proc.stderr else ""
            assert time.monotonic() < deadline, "no checkpoint within 120 s"
            time.sleep(0.01)
        proc.send_signal(signal.SIGKILL)
    finally:
        proc.wait(timeout=60)
    assert proc.returncode == -signal.SIGKILL
    saved = torch.load(ckpt, map_location="cpu", weights_only=True)["step"]
    assert 2 <= saved < 60
    result, record = pt.run_pretraining(root.url, config)
    assert result.resumed_from == saved and result.steps == 60
    assert [s for s, _ in result.losses] == list(range(1, 61))
    assert Path(record.weights).is_file()


def test_loss_falls_and_the_registered_version_encodes(
    pt: Any, root: OutputRoot, prefect_api: None
) -> None:
    from medflow.flows.pretrain import pretrain
    from medflow.tasks.encode import EncoderSpec, get_encoder, pending_items, version_tag

    settings = {**FAST, "steps": 40, "checkpoint_every": 20, "run_name": "flow"}
    record = pretrain(root=root.url, config=settings)
    directory = Path(record["directory"])
    doc = json.loads((directory / "record.json").read_text())
    assert doc["version"] == record["version"] and doc["steps"] == 40
    assert doc["weights"] == f"models/m3ret/{record['version']}/weights.safetensors"
    assert (directory / "loss.png").stat().st_size > 1000
    losses = np.loadtxt(directory / "loss.csv", delimiter=",", skiprows=1)
    assert losses.shape == (40, 2)
    assert losses[-8:, 1].mean() < 0.85 * losses[:8, 1].mean()

    spec = EncoderSpec(name="m3ret_tiny", checkpoint=record["weights"], label="m3ret")
    encoder = get_encoder(spec, device="cpu")
    assert version_tag(encoder) == record["version"]
    assert getattr(encoder, "has_text", True) is False
    pending = pending_items(root, encoder, spec)
    assert sorted(i.series_key for i in pending) == ["ct1", "ct2", "dx1", "es1", "xc1"]
