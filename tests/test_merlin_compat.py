"""Compatibility with the published Merlin (PyPI merlin-vlm 0.0.7), offline and on the CPU.

The reference image tower is built by merlin-vlm's own code (torchvision's ResNet152 without
weights, inflated by ``merlin.models.i3res``), given deterministic random weights, saved under
Merlin's checkpoint key layout and loaded into ours through the public factory, strictly. The
reference preprocessing is merlin-vlm's MONAI pipeline run on the same volume as a NIfTI file.

merlin-vlm is a dev dependency installed without its dependencies: its package ``__init__``
imports the text/report modules (nltk, peft, ...), so the two modules needed here are loaded
from their files under the package name, without running that ``__init__``.
"""

from __future__ import annotations

import copy
import importlib.util
import sys
import types
from pathlib import Path

import numpy as np
import pytest
import torch

from medflow.encoders import create_encoder
from medflow.encoders.testing import deterministic_state_dict, synthetic_ct

_SPEC = importlib.util.find_spec("merlin")
pytestmark = [
    pytest.mark.skipif(_SPEC is None, reason="merlin-vlm==0.0.7 is not installed"),
    # merlin-vlm's forward uses activation checkpointing, which warns when not training
    pytest.mark.filterwarnings("ignore::UserWarning:torch.utils.checkpoint"),
    pytest.mark.filterwarnings("ignore::UserWarning:torch._dynamo"),
    pytest.mark.filterwarnings("ignore::FutureWarning:monai.utils.deprecate_utils"),
    pytest.mark.filterwarnings("ignore:NvImgCodecPydicomReader"),
]


def _merlin_module(relative: str) -> types.ModuleType:
    """Import ``merlin.<relative>`` from its file without running ``merlin/__init__.py``."""
    assert _SPEC is not None and _SPEC.submodule_search_locations
    root = Path(next(iter(_SPEC.submodule_search_locations)))
    saved = {k: sys.modules.get(k) for k in ("merlin", "merlin.models", "merlin.data")}
    try:
        for name, sub in (
            ("merlin", root),
            ("merlin.models", root / "models"),
            ("merlin.data", root / "data"),
        ):
            pkg = types.ModuleType(name)
            pkg.__path__ = [str(sub)]
            sys.modules[name] = pkg
        full = f"merlin.{relative}"
        sys.modules.pop(full, None)
        return importlib.import_module(full)
    finally:
        for name, module in saved.items():
            if module is None:
                sys.modules.pop(name, None)
            else:
                sys.modules[name] = module
        for name in [k for k in sys.modules if k.startswith("merlin.")]:
            sys.modules.pop(name, None)


@pytest.fixture(scope="module")
def reference(tmp_path_factory: pytest.TempPathFactory) -> tuple[torch.nn.Module, Path]:
    import torchvision

    i3res = _merlin_module("models.i3res")
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(0)
        resnet = torchvision.models.resnet152(weights=None)
    tower = i3res.I3ResNet(copy.deepcopy(resnet), class_nb=1692, conv_class=True).eval()
    tower.load_state_dict(deterministic_state_dict(tower.state_dict(), seed=7))
    state = {f"encode_image.i3_resnet.{k}": v for k, v in tower.state_dict().items()}
    state["logit_scale"] = torch.tensor(1.0)  # MerlinArchitecture's init_logit_scale
    path = tmp_path_factory.mktemp("merlin") / "merlin_image_tower.pt"
    torch.save(state, path)
    return tower, path


@pytest.mark.slow
def test_reference_image_tower_loads_strictly_and_matches(
    reference: tuple[torch.nn.Module, Path],
) -> None:
    tower, path = reference
    enc = create_encoder("merlin", path, device="cpu")
    saved = torch.load(path, weights_only=True)
    assert set(enc.model.state_dict()) == set(saved)
    assert enc.skipped_keys == ()  # type: ignore[attr-defined]

    x = torch.from_numpy(np.random.default_rng(3).random((2, 1, 32, 32, 24), dtype=np.float32))
    with torch.inference_mode():
        ref_contrastive, ref_logits = tower(x)
        tower.ImageEmbedding = True
        try:
            ref_pooled = tower(x)[0]  # merlin returns [1, B, 2048] in this mode
        finally:
            tower.ImageEmbedding = False
        pooled, contrastive, logits = enc.model.image_tower(x)  # type: ignore[attr-defined]
    assert float(ref_pooled.abs().max()) > 1e-3  # the comparison is not between zeros
    for ours, ref in ((pooled, ref_pooled), (contrastive, ref_contrastive), (logits, ref_logits)):
        torch.testing.assert_close(ours, ref, rtol=1e-4, atol=1e-4)
    out = enc.encode_images(x)
    ref_unit = ref_contrastive / ref_contrastive.norm(dim=-1, keepdim=True)
    torch.testing.assert_close(out["image"], ref_pooled, rtol=1e-4, atol=1e-4)
    torch.testing.assert_close(out["contrastive"], ref_unit, rtol=1e-4, atol=1e-4)
    torch.testing.assert_close(out["phenotype"], torch.sigmoid(ref_logits), rtol=1e-4, atol=1e-4)


def test_preprocessing_matches_merlin_monai_pipeline(tmp_path: Path) -> None:
    import nibabel as nib

    transforms = _merlin_module("data.monai_transforms").ImageTransforms
    # spacings and offsets exact in float32, as NIfTI stores the affine in float32
    meta, ct = synthetic_ct((40, 80, 72), (5.0, 2.5, 2.5), seed=4)
    path = tmp_path / "ct.nii.gz"
    nib.save(nib.Nifti1Image(np.ascontiguousarray(ct.transpose(2, 1, 0)), meta.affine_array), path)
    ref = transforms({"image": str(path)})["image"]
    enc = create_encoder("merlin", random_weights=True, device="cpu")
    ours = enc.preprocess(meta, ct)
    assert tuple(ref.shape) == (1, 224, 224, 160)
    assert tuple(ours.shape) == (1, 1, 224, 224, 160)
    torch.testing.assert_close(ours[0], torch.as_tensor(ref).float(), rtol=0, atol=1e-5)
