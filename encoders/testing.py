"""Test support: deterministic random checkpoints, tiny text models, synthetic CT, golden outputs.

Useful beyond this package's tests: any pipeline test can build a registered encoder from a
file written by :func:`write_random_checkpoint` without downloading weights.

Golden outputs (``tests/data/encoders/golden/<case>/``) are regenerated with::

    python -m encoders.testing regenerate-golden [--out tests/data/encoders/golden]

which runs every case of :func:`golden_cases` on the CPU and writes its outputs as ``.npy``
files plus a ``manifest.json`` (inputs' recipe, checkpoint content hash, tolerances). Do this
only when a change of outputs is intended, and say why in the commit.
"""

from __future__ import annotations

import argparse
import hashlib
import json
import math
import os
import zlib
from collections.abc import Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import torch

from medflow.storage.images import ImageMeta

__all__ = [
    "GOLDEN_DIR",
    "TINY_CLIP_CONFIG",
    "GoldenCase",
    "deterministic_state_dict",
    "golden_cases",
    "regenerate_golden",
    "run_golden_case",
    "state_dict_sha256",
    "synthetic_ct",
    "write_random_checkpoint",
    "write_tiny_text_model",
]

_REPO = Path(__file__).resolve().parent.parent
GOLDEN_DIR = _REPO / "tests" / "data" / "encoders" / "golden"
TINY_CLIP_CONFIG = _REPO / "tests" / "data" / "encoders" / "tiny-clip.json"

# a small vocabulary covering the words of the shipped prompt banks and the tests
_TINY_WORDS = sorted(
    set(
        [
            "no",
            "there",
            "is",
            "are",
            "a",
            "an",
            "the",
            "of",
            "in",
            "and",
            "or",
            "with",
            "to",
            "from",
            "for",
            "at",
            "on",
            "not",
            "as",
            "by",
            "present",
            "absent",
            "normal",
            "size",
            "enlarged",
            "pleural",
            "effusion",
            "effusions",
            "pericardial",
            "cardiomegaly",
            "heart",
            "ascites",
            "free",
            "fluid",
            "air",
            "liver",
            "hepatic",
            "steatosis",
            "fatty",
            "spleen",
            "splenomegaly",
            "kidney",
            "renal",
            "cyst",
            "cysts",
            "hydronephrosis",
            "gallstones",
            "gallbladder",
            "fracture",
            "edema",
            "lung",
            "lungs",
            "opacity",
            "consolidation",
            "pneumonia",
            "atelectasis",
            "pneumothorax",
            "chest",
            "ct",
            "x",
            "ray",
            "scan",
            "abdomen",
            "pelvis",
            "small",
            "large",
            "bilateral",
            "mild",
            "moderate",
            "severe",
            "acute",
            "evidence",
        ]
    )
)


# ---------------------------------------------------------------------------------------------
# deterministic weights


def _key_rng(seed: int, key: str) -> np.random.Generator:
    # one stream per key, so adding a key elsewhere leaves the other tensors unchanged
    return np.random.default_rng([int(seed), zlib.crc32(key.encode("utf-8"))])


def deterministic_state_dict(
    state: Mapping[str, torch.Tensor], seed: int = 0
) -> dict[str, torch.Tensor]:
    """Fill every floating tensor of ``state`` with seeded uniform values, torch-independently.

    Matrices and kernels get U(-a, a) with a = sqrt(3 / fan_in) (unit-variance outputs);
    norm scales U(0.8, 1.2), except each residual block's last (``bn3``), U(0.05, 0.2), so deep
    networks keep activations of order one; biases and running means U(-0.1, 0.1); running
    variances U(0.5, 1.5). Scalars (``logit_scale``) and integer buffers are kept.
    """
    out: dict[str, torch.Tensor] = {}
    for key in sorted(state):
        t = state[key]
        if not t.is_floating_point() or t.ndim == 0:
            out[key] = t.clone()
            continue
        rng = _key_rng(seed, key)
        shape = tuple(t.shape)
        if key.endswith("running_var"):
            values = rng.uniform(0.5, 1.5, shape)
        elif key.endswith(("running_mean", "bias")):
            values = rng.uniform(-0.1, 0.1, shape)
        elif t.ndim == 1 and key.endswith("bn3.weight"):
            values = rng.uniform(0.05, 0.2, shape)
        elif t.ndim == 1 and key.endswith("weight"):
            values = rng.uniform(0.8, 1.2, shape)
        elif t.ndim == 1:
            values = rng.uniform(-0.1, 0.1, shape)
        else:
            fan_in = int(np.prod(shape[1:]))
            a = math.sqrt(3.0 / max(fan_in, 1))
            values = rng.uniform(-a, a, shape)
        out[key] = torch.from_numpy(values.astype(np.float32)).to(t.dtype)
    return out


def state_dict_sha256(state: Mapping[str, torch.Tensor]) -> str:
    """sha256 over sorted keys, shapes, dtypes and bytes: the content, not the file format."""
    h = hashlib.sha256()
    for key in sorted(state):
        t = state[key].detach().cpu().contiguous()
        h.update(f"{key}|{tuple(t.shape)}|{t.dtype}\0".encode())
        h.update(t.reshape(-1).view(torch.uint8).numpy().tobytes() if t.numel() else b"")
    return h.hexdigest()


def write_random_checkpoint(
    name: str, path: str | os.PathLike[str], *, seed: int = 0, **kwargs: Any
) -> Path:
    """Write a deterministic random-weight checkpoint for registered encoder ``name``.

    ``kwargs`` go to :func:`encoders.create_encoder` (e.g. ``arch_config=`` for clip2d,
    ``text_model_dir=`` to include Merlin's text tower). Returns the path written.
    """
    from medflow.encoders import create_encoder

    enc = create_encoder(name, random_weights=True, device="cpu", **kwargs)
    state = deterministic_state_dict(enc.model.state_dict(), seed)
    out = Path(path)
    out.parent.mkdir(parents=True, exist_ok=True)
    torch.save(state, out)
    return out


# ---------------------------------------------------------------------------------------------
# tiny text tower


def write_tiny_text_model(
    directory: str | os.PathLike[str], *, hidden_size: int = 32, with_weights: bool = False
) -> Path:
    """A tiny Longformer (config + word-level tokenizer) in ``directory``, Merlin-compatible.

    The tokenizer knows the words of the shipped prompt banks; ``<s>`` (id 0) leads every
    sequence, as Merlin's CLS token. ``with_weights`` also saves seeded random weights.
    """
    from tokenizers import Tokenizer, models, normalizers, pre_tokenizers, processors
    from transformers import LongformerConfig, LongformerModel, PreTrainedTokenizerFast

    out = Path(directory)
    out.mkdir(parents=True, exist_ok=True)
    specials = ["<s>", "<pad>", "</s>", "<unk>"]
    vocab = {tok: i for i, tok in enumerate(specials + _TINY_WORDS + [".", ",", "-"])}
    tok = Tokenizer(models.WordLevel(vocab=vocab, unk_token="<unk>"))
    tok.normalizer = normalizers.Lowercase()
    tok.pre_tokenizer = pre_tokenizers.Whitespace()
    tok.post_processor = processors.TemplateProcessing(
        single="<s> $A </s>",
        pair="<s> $A </s> </s> $B </s>",
        special_tokens=[("<s>", 0), ("</s>", 2)],
    )
    fast = PreTrainedTokenizerFast(  # type: ignore[no-untyped-call]
        tokenizer_object=tok,
        bos_token="<s>",
        eos_token="</s>",
        unk_token="<unk>",
        pad_token="<pad>",
        cls_token="<s>",
        sep_token="</s>",
        model_max_length=64,
    )
    fast.save_pretrained(out)
    config = LongformerConfig(
        vocab_size=len(vocab),
        hidden_size=hidden_size,
        num_hidden_layers=1,
        num_attention_heads=2,
        intermediate_size=2 * hidden_size,
        max_position_embeddings=80,
        attention_window=[8],
        pad_token_id=1,
        bos_token_id=0,
        eos_token_id=2,
        type_vocab_size=1,
    )
    config.save_pretrained(out)
    if with_weights:
        with torch.random.fork_rng(devices=[]):
            torch.manual_seed(0)
            model = LongformerModel(config)
        model.load_state_dict(deterministic_state_dict(model.state_dict(), 1))
        model.save_pretrained(out)
    return out


# ---------------------------------------------------------------------------------------------
# synthetic CT


def _as_affine(a: np.ndarray) -> tuple[tuple[float, ...], ...]:
    return tuple(tuple(float(v) for v in row) for row in a)


def synthetic_ct(
    shape: tuple[int, int, int] = (40, 64, 64),
    spacing: tuple[float, float, float] = (3.0, 1.5, 1.5),
    *,
    seed: int = 0,
    modality: str = "CT",
) -> tuple[ImageMeta, np.ndarray]:
    """A torso-like int16 HU phantom ``(z, y, x)`` with a DICOM-style (LPS-derived) affine.

    Air outside (-1000), soft tissue (40), two lungs (-850), a spine (700), a liver (60), and
    Gaussian noise (sd 20 HU). ``spacing`` in mm along z, y, x. The affine flips x and y
    (``diag(-sx, -sy, sz)``), as volumes converted from DICOM do, so orientation matters.
    """
    nz, ny, nx = shape
    z, y, x = np.meshgrid(
        np.linspace(-1, 1, nz, dtype=np.float32),
        np.linspace(-1, 1, ny, dtype=np.float32),
        np.linspace(-1, 1, nx, dtype=np.float32),
        indexing="ij",
    )
    vol = np.full(shape, -1000.0, dtype=np.float32)
    body = (x / 0.9) ** 2 + (y / 0.7) ** 2 <= 1.0
    vol[body] = 40.0
    lungs = (((x - 0.4) / 0.3) ** 2 + (y / 0.4) ** 2 + ((z + 0.4) / 0.6) ** 2 <= 1.0) | (
        ((x + 0.4) / 0.3) ** 2 + (y / 0.4) ** 2 + ((z + 0.4) / 0.6) ** 2 <= 1.0
    )
    vol[lungs & body] = -850.0
    vol[((x + 0.3) / 0.35) ** 2 + (y / 0.3) ** 2 + ((z - 0.5) / 0.4) ** 2 <= 1.0] = 60.0
    vol[(x / 0.12) ** 2 + ((y - 0.5) / 0.12) ** 2 <= 1.0] = 700.0
    rng = np.random.default_rng(seed)
    vol += rng.normal(0.0, 20.0, shape).astype(np.float32)
    sz, sy, sx = spacing
    affine = np.diag([-sx, -sy, sz, 1.0])
    affine[:3, 3] = [sx * nx / 2, sy * ny / 2, -sz * nz / 2]
    meta = ImageMeta(
        modality=modality,
        source_kind="synthetic",
        axes=("z", "y", "x"),
        spacing=spacing,
        origin=(float(affine[2, 3]), float(affine[1, 3]), float(affine[0, 3])),
        affine=_as_affine(affine),
    )
    return meta, np.clip(np.rint(vol), -1024, 3071).astype(np.int16)


# ---------------------------------------------------------------------------------------------
# golden outputs


@dataclass(frozen=True, slots=True)
class GoldenCase:
    """One golden check: an encoder, its deterministic checkpoint, a fixed input, tolerances."""

    name: str
    encoder: str
    kwargs: Mapping[str, Any] = field(default_factory=dict)
    input_shape: tuple[int, ...] = ()
    input_seed: int = 1
    texts: tuple[str, ...] = ()
    ct_shape: tuple[int, int, int] | None = None  # also check preprocessing of a phantom
    image_shape: tuple[int, int] | None = None  # also check preprocessing of a uint16 image
    rtol: float = 1e-4
    atol: float = 1e-5


def golden_cases() -> list[GoldenCase]:
    """The golden cases, one or more per registered encoder that can run in tests."""
    texts = ("There is a small pleural effusion.", "No pleural effusion.")
    return [
        GoldenCase(
            name="merlin_tiny",
            encoder="merlin_tiny",
            input_shape=(2, 1, 32, 32, 16),
            texts=texts,
            ct_shape=(20, 40, 36),
        ),
        GoldenCase(
            name="clip2d_tiny",
            encoder="clip2d",
            kwargs={"arch_config": str(TINY_CLIP_CONFIG)},
            input_shape=(2, 3, 32, 32),
            texts=texts,
            image_shape=(40, 52),
        ),
    ]


def _fixed_input(shape: tuple[int, ...], seed: int) -> torch.Tensor:
    return torch.from_numpy(np.random.default_rng(seed).random(shape).astype(np.float32))


def run_golden_case(case: GoldenCase, work_dir: Path) -> tuple[dict[str, np.ndarray], str]:
    """Outputs of ``case`` on the CPU by name, and the content hash of its checkpoint."""
    from medflow.encoders import create_encoder

    kwargs = dict(case.kwargs)
    if case.encoder.startswith("merlin"):
        kwargs["text_model_dir"] = str(write_tiny_text_model(work_dir / f"{case.name}-text"))
    ckpt = write_random_checkpoint(case.encoder, work_dir / f"{case.name}.pt", seed=0, **kwargs)
    enc = create_encoder(case.encoder, ckpt, device="cpu", **kwargs)
    outputs = {
        f"embeddings_{k}": v.numpy()
        for k, v in enc.encode_images(_fixed_input(case.input_shape, case.input_seed)).items()
    }
    if case.texts:
        outputs["text"] = enc.encode_text(list(case.texts)).numpy()
    if case.ct_shape is not None:
        meta, ct = synthetic_ct(case.ct_shape, (4.0, 2.0, 2.2), seed=case.input_seed)
        outputs["preprocess_ct"] = enc.preprocess(meta, ct).numpy()
    if case.image_shape is not None:
        rng = np.random.default_rng(case.input_seed)
        pixels = rng.integers(0, 4096, case.image_shape).astype(np.uint16)
        meta2 = ImageMeta(
            modality="CR",
            source_kind="synthetic",
            axes=("y", "x"),
            spacing=(0.2, 0.2),
            origin=(0.0, 0.0),
            affine=_as_affine(np.eye(4)),
        )
        outputs["preprocess_image"] = enc.preprocess(meta2, pixels).numpy()
    return outputs, state_dict_sha256(torch.load(ckpt, weights_only=True))


def regenerate_golden(out_dir: Path = GOLDEN_DIR, work_dir: Path | None = None) -> list[Path]:
    """Recompute and write every golden case under ``out_dir``; returns the manifests."""
    import tempfile

    written = []
    with tempfile.TemporaryDirectory() as tmp:
        work = Path(work_dir) if work_dir is not None else Path(tmp)
        for case in golden_cases():
            outputs, sha = run_golden_case(case, work)
            case_dir = out_dir / case.name
            case_dir.mkdir(parents=True, exist_ok=True)
            for old in case_dir.glob("*.npy"):
                old.unlink()
            for key, value in outputs.items():
                np.save(case_dir / f"{key}.npy", value.astype(np.float32))
            manifest = {
                "case": case.name,
                "encoder": case.encoder,
                "kwargs": {
                    k: (Path(v).name if k.endswith("config") else v) for k, v in case.kwargs.items()
                },
                "input": {
                    "shape": list(case.input_shape),
                    "seed": case.input_seed,
                    "rng": "numpy default_rng().random, float32",
                },
                "texts": list(case.texts),
                "checkpoint_content_sha256": sha,
                "rtol": case.rtol,
                "atol": case.atol,
                "outputs": sorted(outputs),
                "torch": torch.__version__,
            }
            path = case_dir / "manifest.json"
            path.write_text(json.dumps(manifest, indent=2) + "\n", encoding="utf-8")
            written.append(path)
    return written


def _main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m encoders.testing")
    sub = parser.add_subparsers(dest="command", required=True)
    regen = sub.add_parser("regenerate-golden", help="rewrite the golden outputs (CPU)")
    regen.add_argument("--out", type=Path, default=GOLDEN_DIR)
    args = parser.parse_args(argv)
    for path in regenerate_golden(args.out):
        print(path)
    return 0


if __name__ == "__main__":
    raise SystemExit(_main())
