"""Encoders on a GPU (skipped without CUDA): bf16 autocast results, device preprocessing."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
import torch

from medflow.encoders import create_encoder
from medflow.encoders._streaming import stream_encode
from medflow.encoders.testing import TINY_CLIP_CONFIG, synthetic_ct, write_random_checkpoint
from medflow.storage.images import DecodedImage, write_image

pytestmark = pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")


def _cosine(a: np.ndarray, b: np.ndarray) -> np.ndarray:
    a = a / np.linalg.norm(a, axis=-1, keepdims=True)
    b = b / np.linalg.norm(b, axis=-1, keepdims=True)
    return (a * b).sum(-1)


def test_default_device_is_cuda_with_bf16_autocast(tmp_path: Path) -> None:
    ckpt = write_random_checkpoint("merlin_tiny", tmp_path / "m.pt")
    gpu = create_encoder("merlin_tiny", ckpt)
    cpu = create_encoder("merlin_tiny", ckpt, device="cpu")
    assert gpu.device.type == "cuda" and gpu.input_dtype == torch.bfloat16
    x = torch.rand(4, 1, 32, 32, 16, generator=torch.Generator().manual_seed(0))
    out_gpu, out_cpu = gpu.encode_images(x), cpu.encode_images(x)
    assert out_gpu["image"].device.type == "cpu" and out_gpu["image"].dtype == torch.float32
    assert (_cosine(out_gpu["image"].numpy(), out_cpu["image"].numpy()) > 0.99).all()
    assert (_cosine(out_gpu["contrastive"].numpy(), out_cpu["contrastive"].numpy()) > 0.99).all()
    np.testing.assert_allclose(out_gpu["phenotype"], out_cpu["phenotype"], atol=3e-2)
    # a bf16 batch (what the stream sends) gives the same numbers as a float32 one
    same = gpu.encode_images(x.to(torch.bfloat16))
    np.testing.assert_allclose(same["image"], out_gpu["image"], rtol=1e-5, atol=1e-6)


def test_preprocessing_on_the_gpu_matches_the_cpu() -> None:
    enc = create_encoder("merlin", random_weights=True)
    meta, ct = synthetic_ct((60, 160, 150), (2.5, 0.9, 0.9), seed=2)
    cpu = enc.preprocess(meta, ct)
    gpu = enc.preprocess_on_device(meta, torch.from_numpy(ct).cuda())  # type: ignore[attr-defined]
    assert gpu.is_cuda and gpu.shape == cpu.shape == (1, 1, 224, 224, 160)
    torch.testing.assert_close(gpu.cpu(), cpu, rtol=0, atol=1e-4)


@pytest.mark.parametrize("mode", ["workers", "device"])
def test_stream_on_cuda(tmp_path: Path, mode: str) -> None:
    ckpt = write_random_checkpoint("merlin_tiny", tmp_path / "m.pt")
    gpu = create_encoder("merlin_tiny", ckpt)
    cpu = create_encoder("merlin_tiny", ckpt, device="cpu")
    paths = []
    for i in range(5):
        meta, ct = synthetic_ct((14, 40, 36), (4.0, 2.0, 2.2), seed=i)
        paths.append(str(tmp_path / f"ct{i}.zarr"))
        write_image(DecodedImage(meta, pixels=ct), paths[-1], name=f"ct{i}")
    got = list(stream_encode(gpu, paths, batch_size=2, num_workers=2, preprocess_on=mode))
    ref = list(stream_encode(cpu, paths, batch_size=2, num_workers=0))
    assert [r.item for r in got] == paths and all(r.ok for r in got)
    for g, r in zip(got, ref, strict=True):
        assert g.embeddings is not None and r.embeddings is not None
        assert _cosine(g.embeddings["image"], r.embeddings["image"]) > 0.99


def test_clip2d_on_cuda(tmp_path: Path) -> None:
    kw = {"arch_config": str(TINY_CLIP_CONFIG)}
    ckpt = write_random_checkpoint("clip2d", tmp_path / "c.pt", **kw)
    gpu = create_encoder("clip2d", ckpt, **kw)
    cpu = create_encoder("clip2d", ckpt, device="cpu", **kw)
    x = torch.rand(3, 3, 32, 32, generator=torch.Generator().manual_seed(0))
    assert (
        _cosine(gpu.encode_images(x)["image"].numpy(), cpu.encode_images(x)["image"].numpy()) > 0.99
    ).all()
    texts = ["a chest x-ray", "no pleural effusion"]
    assert (_cosine(gpu.encode_text(texts).numpy(), cpu.encode_text(texts).numpy()) > 0.99).all()
