"""Encoders: registry and factory, versions, checkpoint errors, shapes, preprocessing, text."""

from __future__ import annotations

import json
from collections.abc import Callable
from pathlib import Path
from typing import Any

import numpy as np
import pytest
import torch

from medflow import encoders
from medflow.encoders import CheckpointError, Encoder, EncoderVersion, create_encoder, list_encoders
from medflow.encoders.clip2d import frame_indices, scale_intensity
from medflow.encoders.merlin import sanitize_report
from medflow.encoders.testing import (
    TINY_CLIP_CONFIG,
    deterministic_state_dict,
    synthetic_ct,
    write_random_checkpoint,
    write_tiny_text_model,
)
from medflow.storage.images import ImageMeta

CLIP_KW = {"arch_config": str(TINY_CLIP_CONFIG)}


def _meta(axes: tuple[str, ...], spacing: tuple[float, ...], modality: str = "CR") -> ImageMeta:
    return ImageMeta(
        modality=modality,
        source_kind="test",
        axes=axes,
        spacing=spacing,
        origin=tuple(0.0 for _ in axes),
        affine=np.eye(4),
    )


# ---------------------------------------------------------------------------------------------
# one built encoder per registered name (random weights from a file, as in production)

# how this package's encoders are built in tests, and a small batch each must encode; other
# registered encoders get the generic recipe: defaults, one sample of their declared input_shape
BUILDS: dict[str, tuple[dict, tuple[int, ...]]] = {
    "merlin": ({}, (1, 1, 32, 32, 16)),
    "merlin_tiny": ({}, (2, 1, 32, 32, 16)),
    "m3ret_tiny": ({}, (2, 1, 16, 64, 64)),
    "m3ret_s": ({}, (1, 1, 4, 32, 32)),
    "m3ret_b": ({}, (1, 1, 4, 32, 32)),
    "clip2d": (CLIP_KW, (2, 3, 32, 32)),
}
ALL_ENCODERS = sorted(set(BUILDS) | set(list_encoders()))


@pytest.fixture(scope="module")
def built(tmp_path_factory: pytest.TempPathFactory) -> Callable[[str], tuple[Encoder, Path]]:
    cache: dict[str, tuple[Encoder, Path]] = {}
    root = tmp_path_factory.mktemp("encoders")

    def get(name: str) -> tuple[Encoder, Path]:
        if name not in cache:
            kwargs = BUILDS.get(name, ({}, ()))[0]
            ckpt = write_random_checkpoint(name, root / f"{name}.pt", **kwargs)
            cache[name] = (create_encoder(name, ckpt, device="cpu", **kwargs), ckpt)
        return cache[name]

    return get


def test_this_packages_encoders_are_registered() -> None:
    assert set(BUILDS) <= set(list_encoders())


@pytest.mark.parametrize("name", ALL_ENCODERS)
def test_encode_images_shapes_and_finite(
    name: str, built: Callable[[str], tuple[Encoder, Path]]
) -> None:
    enc, _ = built(name)
    if name in BUILDS:
        shape = BUILDS[name][1]
    elif "input_shape" in enc.info.extra:
        shape = (1, *enc.info.extra["input_shape"])
    else:
        pytest.skip(f"{name} declares no input_shape in its info")
    batch = torch.from_numpy(np.random.default_rng(0).random(shape).astype(np.float32))
    out = enc.encode_images(batch)
    assert set(out) == set(enc.info.embedding_dims)
    for key, dim in enc.info.embedding_dims.items():
        assert out[key].shape == (shape[0], dim), key
        assert out[key].dtype == torch.float32 and out[key].device.type == "cpu"
        assert torch.isfinite(out[key]).all(), key
    contrastive = out[enc.info.contrastive_embedding]
    assert torch.allclose(contrastive.norm(dim=-1), torch.ones(shape[0]), atol=1e-5)
    assert enc.logit_scale > 0
    assert not enc.model.training


def test_merlin_embedding_declaration(built: Callable[[str], tuple[Encoder, Path]]) -> None:
    enc, _ = built("merlin")
    assert dict(enc.info.embedding_dims) == {"image": 2048, "contrastive": 512, "phenotype": 1692}
    assert enc.info.modalities == ("CT",) and enc.info.kinds == ("volume",)
    assert enc.info.extra["input_shape"] == [1, 224, 224, 160]
    out = enc.encode_images(torch.rand(1, 1, 32, 32, 16))
    assert ((out["phenotype"] > 0) & (out["phenotype"] < 1)).all()


# ---------------------------------------------------------------------------------------------
# registry and factory


def test_unknown_encoder_names_the_bad_value_and_the_known_ones() -> None:
    with pytest.raises(ValueError, match="'merlinn'") as info:
        create_encoder("merlinn", "x.pt")
    for known in list_encoders():
        assert known in str(info.value)


def test_none_kwargs_are_dropped_and_unknown_kwargs_refused(tmp_path: Path) -> None:
    ckpt = write_random_checkpoint("merlin_tiny", tmp_path / "m.pt")
    enc = create_encoder("merlin_tiny", ckpt, device="cpu", text_model_dir=None, roi_size=None)
    assert enc.config.roi_size == (32, 32, 16)  # type: ignore[attr-defined]
    with pytest.raises(TypeError, match="colour"):
        create_encoder("merlin_tiny", ckpt, device="cpu", colour="red")


def test_device_parsing() -> None:
    assert encoders.parse_device("cpu") == torch.device("cpu")
    assert encoders.parse_device(None).type == ("cuda" if torch.cuda.is_available() else "cpu")
    with pytest.raises(ValueError, match="tpu"):
        encoders.parse_device("tpu")
    with pytest.raises(TypeError):
        encoders.parse_device(3)  # type: ignore[arg-type]
    if not torch.cuda.is_available():
        with pytest.raises(ValueError, match="CUDA is not available"):
            encoders.parse_device("cuda")


def test_version_is_name_weights_hash_and_config_hash(tmp_path: Path) -> None:
    a = write_random_checkpoint("merlin_tiny", tmp_path / "a.pt", seed=0)
    b = write_random_checkpoint("merlin_tiny", tmp_path / "b.pt", seed=1)
    va = create_encoder("merlin_tiny", a, device="cpu").version
    assert va == create_encoder("merlin_tiny", a, device="cpu").version
    vb = create_encoder("merlin_tiny", b, device="cpu").version
    assert va.name == vb.name == "merlin_tiny"
    assert va.config_sha256 == vb.config_sha256 and va.weights_sha256 != vb.weights_sha256
    vc = create_encoder("merlin_tiny", a, device="cpu", roi_size=(24, 24, 16)).version
    assert vc.weights_sha256 == va.weights_sha256 and vc.config_sha256 != va.config_sha256
    d = va.to_dict()
    assert d["name"] == "merlin_tiny" and d["id"] == va.id and va.id.startswith("merlin_tiny@")
    assert len(d["weights_sha256"]) == 64 and d["text_sha256"] is None
    with pytest.raises(AttributeError):
        va.name = "other"  # type: ignore[misc]
    assert EncoderVersion("x", "r", "c").id == "x@r.c"


def test_random_weights_need_saying_so() -> None:
    with pytest.raises(CheckpointError, match="random_weights=True"):
        create_encoder("merlin_tiny", None, device="cpu")
    enc = create_encoder("merlin_tiny", random_weights=True, seed=3, device="cpu")
    assert enc.version.weights_sha256 == "random:3"


# ---------------------------------------------------------------------------------------------
# checkpoint errors


def test_missing_checkpoint_file_is_named(tmp_path: Path) -> None:
    missing = tmp_path / "nope.pt"
    for name, kwargs in (("merlin_tiny", {}), ("clip2d", CLIP_KW)):
        with pytest.raises(CheckpointError, match=r"nope\.pt") as info:
            create_encoder(name, missing, device="cpu", **kwargs)
        assert isinstance(info.value, ValueError)
        assert info.value.path == str(missing)


def test_urls_are_refused(tmp_path: Path) -> None:
    with pytest.raises(CheckpointError, match="never downloaded"):
        create_encoder("merlin_tiny", "https://example.org/merlin.pt", device="cpu")


def _edited(tmp_path: Path, name: str, edit: Callable[[dict], None], **kwargs: object) -> Path:
    src = write_random_checkpoint(name, tmp_path / f"{name}-src.pt", **kwargs)
    state = torch.load(src, weights_only=True)
    edit(state)
    out = tmp_path / f"{name}-edited.pt"
    torch.save(state, out)
    return out


@pytest.mark.parametrize(("name", "kwargs"), [("merlin_tiny", {}), ("clip2d", CLIP_KW)])
def test_checkpoint_key_errors_name_the_keys(tmp_path: Path, name: str, kwargs: dict) -> None:
    key = (
        "encode_image.i3_resnet.layer2.0.conv2.weight"
        if name == "merlin_tiny"
        else ("visual.conv1.weight")
    )

    def drop(state: dict) -> None:
        del state[key]

    def extra(state: dict) -> None:
        state["encode_image.i3_resnet.fc.weight"] = torch.zeros(2, 2)

    def reshape(state: dict) -> None:
        state[key] = torch.zeros(3, 3)

    path = _edited(tmp_path, name, drop, **kwargs)
    with pytest.raises(CheckpointError, match="missing") as info:
        create_encoder(name, path, device="cpu", **kwargs)
    assert key in str(info.value) and str(path) in str(info.value)
    assert info.value.missing == (key,)

    path = _edited(tmp_path, name, extra, **kwargs)
    with pytest.raises(CheckpointError, match="unexpected") as info:
        create_encoder(name, path, device="cpu", **kwargs)
    assert "encode_image.i3_resnet.fc.weight" in str(info.value)

    path = _edited(tmp_path, name, reshape, **kwargs)
    with pytest.raises(CheckpointError, match="mis-shaped") as info:
        create_encoder(name, path, device="cpu", **kwargs)
    assert key in str(info.value) and "(3, 3)" in str(info.value)
    assert key in info.value.mismatched


def test_unreadable_checkpoints_are_clear_errors(tmp_path: Path) -> None:
    junk = tmp_path / "junk.pt"
    junk.write_bytes(b"not a checkpoint")
    with pytest.raises(CheckpointError, match=r"junk\.pt could not be read"):
        create_encoder("merlin_tiny", junk, device="cpu")
    listing = tmp_path / "list.pt"
    torch.save([1, 2, 3], listing)
    with pytest.raises(CheckpointError, match="state dict"):
        create_encoder("merlin_tiny", listing, device="cpu")


def test_state_dict_wrappers_are_unwrapped(tmp_path: Path) -> None:
    src = write_random_checkpoint("merlin_tiny", tmp_path / "m.pt")
    state = torch.load(src, weights_only=True)
    wrapped = tmp_path / "wrapped.pt"
    torch.save({"state_dict": {f"module.{k}": v for k, v in state.items()}}, wrapped)
    enc = create_encoder("merlin_tiny", wrapped, device="cpu")
    ref = create_encoder("merlin_tiny", src, device="cpu")
    x = torch.rand(1, 1, 32, 32, 16)
    assert torch.equal(enc.encode_images(x)["image"], ref.encode_images(x)["image"])


def test_deterministic_state_dict_is_stable() -> None:
    state = {"a.weight": torch.zeros(4, 3), "bn.running_var": torch.zeros(4), "n": torch.tensor(2)}
    one, two = deterministic_state_dict(state, 5), deterministic_state_dict(state, 5)
    assert all(torch.equal(one[k], two[k]) for k in state)
    assert (one["bn.running_var"] >= 0.5).all() and int(one["n"]) == 2
    assert not torch.equal(one["a.weight"], deterministic_state_dict(state, 6)["a.weight"])


# ---------------------------------------------------------------------------------------------
# Merlin preprocessing and text


def test_merlin_accepts_ct_volumes_only(built: Callable[[str], tuple[Encoder, Path]]) -> None:
    enc, _ = built("merlin_tiny")
    meta, _ = synthetic_ct((8, 16, 16))
    assert enc.accepts(meta)
    assert not enc.accepts(_meta(("z", "y", "x"), (1.0, 1.0, 1.0), modality="MR"))
    assert not enc.accepts(_meta(("y", "x"), (1.0, 1.0), modality="CT"))
    with pytest.raises(ValueError, match=r"axes \(z, y, x\)"):
        enc.preprocess(_meta(("y", "x"), (1.0, 1.0), modality="CT"), np.zeros((4, 4), np.int16))
    with pytest.raises(TypeError, match="dtype"):
        enc.preprocess(meta, np.zeros((8, 16, 16), dtype=bool))


def test_merlin_preprocess_window_shape_and_orientation(
    built: Callable[[str], tuple[Encoder, Path]],
) -> None:
    enc, _ = built("merlin_tiny")
    meta, ct = synthetic_ct((20, 40, 36), (4.0, 2.0, 2.2))
    x = enc.preprocess(meta, ct)
    assert x.shape == (1, 1, 32, 32, 16) and x.dtype == torch.float32
    assert float(x.min()) >= 0.0 and float(x.max()) <= 1.0
    # the same scan stored RAS-ordered (x and y flipped back) gives the same input
    aff = meta.affine_array.copy()
    _, ny, nx = ct.shape
    aff[0, 3] += aff[0, 0] * (nx - 1)
    aff[1, 3] += aff[1, 1] * (ny - 1)
    aff[0, 0], aff[1, 1] = -aff[0, 0], -aff[1, 1]
    ras = ImageMeta("CT", "test", ("z", "y", "x"), meta.spacing, meta.origin, aff)
    y = enc.preprocess(ras, np.ascontiguousarray(ct[:, ::-1, ::-1]))
    assert torch.allclose(x, y, atol=1e-6)
    # a tensor (here on the CPU) goes through the same transforms where it is
    z = enc.preprocess_on_device(meta, torch.from_numpy(ct))  # type: ignore[attr-defined]
    assert torch.allclose(x, z, atol=1e-6)


def test_merlin_preprocess_keeps_x_y_z_order(built: Callable[[str], tuple[Encoder, Path]]) -> None:
    enc, _ = built("merlin_tiny")
    # RAS affine, 1.5 x 1.5 x 3 mm already: only the pad/crop acts; a bright top slab (high z)
    ct = np.full((16, 32, 32), -1000, np.int16)
    ct[12:] = 1000
    aff = np.diag([1.5, 1.5, 3.0, 1.0])
    meta = ImageMeta("CT", "test", ("z", "y", "x"), (3.0, 1.5, 1.5), (0.0, 0.0, 0.0), aff)
    x = enc.preprocess(meta, ct)[0, 0]
    assert x.shape == (32, 32, 16)
    assert torch.allclose(x[..., 12:], torch.ones(32, 32, 4))
    assert torch.allclose(x[..., :12], torch.zeros(32, 32, 12))


def test_merlin_series_encoding(built: Callable[[str], tuple[Encoder, Path]]) -> None:
    enc, _ = built("merlin_tiny")
    meta, ct = synthetic_ct((20, 40, 36))
    out = enc.encode_series(meta, ct)
    assert {k: v.shape for k, v in out.items()} == {
        "image": (128,),
        "contrastive": (16,),
        "phenotype": (8,),
    }


def test_sanitize_report_matches_merlin_rule() -> None:
    assert sanitize_report("No Pleural-Effusion.  Mild  ascites!") == (
        "no pleural - effusion . mild ascites !"
    )


def test_merlin_text_tower(tmp_path: Path) -> None:
    text_dir = write_tiny_text_model(tmp_path / "text")
    ckpt = write_random_checkpoint("merlin_tiny", tmp_path / "m.pt", text_model_dir=text_dir)
    enc = create_encoder("merlin_tiny", ckpt, device="cpu", text_model_dir=text_dir)
    emb = enc.encode_text(["No  Pleural Effusion.", "There is ascites.", "no pleural effusion ."])
    assert emb.shape == (3, 16)
    assert torch.allclose(emb.norm(dim=-1), torch.ones(3), atol=1e-5)
    assert torch.allclose(emb[0], emb[2], atol=1e-6)  # same after Merlin's normalisation
    assert enc.version.text_sha256 is not None and "+" in enc.version.id
    # image-only from the same file: text keys skipped, image outputs and version unchanged
    image_only = create_encoder("merlin_tiny", ckpt, device="cpu")
    assert any(k.startswith("encode_text.") for k in image_only.skipped_keys)  # type: ignore[attr-defined]
    assert image_only.version.weights_sha256 == enc.version.weights_sha256
    x = torch.rand(1, 1, 32, 32, 16)
    assert torch.equal(enc.encode_images(x)["image"], image_only.encode_images(x)["image"])
    with pytest.raises(RuntimeError, match="text_model_dir"):
        image_only.encode_text(["no ascites"])
    with pytest.raises(TypeError):
        enc.encode_text("no ascites")  # type: ignore[arg-type]


def test_merlin_text_weights_from_the_directory(tmp_path: Path) -> None:
    text_dir = write_tiny_text_model(tmp_path / "text", with_weights=True)
    full = write_random_checkpoint("merlin_tiny", tmp_path / "m.pt", text_model_dir=text_dir)
    state = torch.load(full, weights_only=True)
    lean = tmp_path / "lean.pt"
    torch.save({k: v for k, v in state.items() if "text_encoder." not in k}, lean)
    enc = create_encoder("merlin_tiny", lean, device="cpu", text_model_dir=text_dir)
    assert enc.encode_text(["no ascites"]).shape == (1, 16)
    bare = write_tiny_text_model(tmp_path / "bare")
    with pytest.raises(CheckpointError, match="no text encoder weights"):
        create_encoder("merlin_tiny", lean, device="cpu", text_model_dir=bare)
    with pytest.raises(ValueError, match=r"config\.json"):
        create_encoder("merlin_tiny", lean, device="cpu", text_model_dir=tmp_path / "none")


# ---------------------------------------------------------------------------------------------
# clip2d preprocessing and video


def test_clip_accepts_images_and_video(built: Callable[[str], tuple[Encoder, Path]]) -> None:
    enc, _ = built("clip2d")
    assert enc.accepts(_meta(("y", "x"), (1.0, 1.0)))
    assert enc.accepts(_meta(("c", "y", "x"), (1.0, 1.0, 1.0), modality="XC"))
    assert enc.accepts(_meta(("t", "c", "y", "x"), (0.04, 1.0, 1.0, 1.0), modality="US"))
    assert not enc.accepts(_meta(("z", "y", "x"), (1.0, 1.0, 1.0), modality="CT"))


def test_clip_preprocess_channels_and_intensity(
    built: Callable[[str], tuple[Encoder, Path]],
) -> None:
    enc, _ = built("clip2d")
    grey = enc.preprocess(_meta(("y", "x"), (1.0, 1.0)), np.full((40, 60), 128, np.uint8))
    assert grey.shape == (1, 3, 32, 32)
    mean = torch.tensor(enc.preprocess_cfg["mean"]).view(1, 3, 1, 1)  # type: ignore[attr-defined]
    std = torch.tensor(enc.preprocess_cfg["std"]).view(1, 3, 1, 1)  # type: ignore[attr-defined]
    assert torch.allclose(grey * std + mean, torch.full((1, 3, 32, 32), 128 / 255), atol=1e-5)
    rgba = np.zeros((4, 20, 20), np.uint8)
    rgba[0] = 255
    red = enc.preprocess(_meta(("c", "y", "x"), (1.0, 1.0, 1.0)), rgba) * std + mean
    assert torch.allclose(red[0, 0], torch.ones(32, 32), atol=1e-5)
    assert torch.allclose(red[0, 1:], torch.zeros(2, 32, 32), atol=1e-5)
    with pytest.raises(ValueError, match="1, 3 or 4 channels"):
        enc.preprocess(_meta(("c", "y", "x"), (1.0, 1.0, 1.0)), np.zeros((2, 8, 8), np.uint8))
    # uint16: the 0.5..99.5 percentile range maps to 0..1, clipped outside
    ramp = np.arange(1001, dtype=np.uint16)[None]
    scaled = scale_intensity(ramp, "CR", enc.settings)  # type: ignore[attr-defined]
    assert float(scaled[0, 5]) == pytest.approx(0.0, abs=1e-6)
    assert float(scaled[0, 995]) == pytest.approx(1.0, abs=1e-6)
    assert float(scaled[0, 500]) == pytest.approx(0.5, abs=1e-6)
    assert float(scaled.min()) == 0.0 and float(scaled.max()) == 1.0
    assert float(scale_intensity(np.full((4, 4), 7.0), "MR", enc.settings).max()) == 0.0  # type: ignore[attr-defined]
    # CT: the fixed HU window -1000..1000
    ct = np.full((32, 32), 0, np.int16)
    x = enc.preprocess(_meta(("y", "x"), (1.0, 1.0), modality="CT"), ct) * std + mean
    assert torch.allclose(x, torch.full_like(x, 0.5), atol=1e-5)


def test_video_frame_sampling() -> None:
    meta = _meta(("t", "c", "y", "x"), (1 / 30, 1.0, 1.0, 1.0), modality="US")
    assert frame_indices(meta, 95, fps=1.0, max_frames=32).tolist() == [0, 30, 60, 90]
    assert frame_indices(meta, 95, fps=2.0, max_frames=32).tolist() == list(range(0, 95, 15))
    assert frame_indices(meta, 95, fps=60.0, max_frames=32).size == 32
    assert frame_indices(meta, 1, fps=1.0, max_frames=32).tolist() == [0]
    slow = _meta(("t", "y", "x"), (2.0, 1.0, 1.0), modality="US")  # a frame every 2 s
    assert frame_indices(slow, 5, fps=1.0, max_frames=32).tolist() == [0, 1, 2, 3, 4]


def test_video_is_mean_pooled(tmp_path: Path) -> None:
    ckpt = write_random_checkpoint("clip2d", tmp_path / "c.pt", **CLIP_KW)
    enc = create_encoder(
        "clip2d", ckpt, device="cpu", video_fps=1.0, return_frame_embeddings=True, **CLIP_KW
    )
    meta = _meta(("t", "c", "y", "x"), (1 / 10, 1.0, 1.0, 1.0), modality="US")
    video = np.random.default_rng(0).integers(0, 255, (35, 3, 24, 30)).astype(np.uint8)
    x = enc.preprocess(meta, video)
    assert x.shape == (4, 3, 32, 32)
    out = enc.encode_series(meta, video)
    frames = out["frames"]
    assert frames.shape == (4, 16)
    pooled = frames.mean(axis=0)
    assert np.allclose(out["image"], pooled / np.linalg.norm(pooled), atol=1e-6)
    assert enc.version != create_encoder("clip2d", ckpt, device="cpu", **CLIP_KW).version


def test_clip_text_and_unknown_arch(built: Callable[[str], tuple[Encoder, Path]]) -> None:
    enc, ckpt = built("clip2d")
    emb = enc.encode_text(["a chest x-ray", "pleural effusion"])
    assert emb.shape == (2, 16)
    assert torch.allclose(emb.norm(dim=-1), torch.ones(2), atol=1e-5)
    with pytest.raises(ValueError, match="arch="):
        create_encoder("clip2d", ckpt, device="cpu")
    with pytest.raises(ValueError, match="Unknown open_clip architecture"):
        create_encoder("clip2d", ckpt, device="cpu", arch="No-Such-Arch")
    with pytest.raises(ValueError, match="architecture name"):
        create_encoder("clip2d", ckpt, device="cpu", arch="hf-hub:org/model")


def test_every_encoder_config_names_its_architecture_under_one_key() -> None:
    from medflow.encoders._registry import get_entry

    families = {get_entry(name).config["architecture"] for name in encoders.list_encoders()}
    assert families == {"clip2d", "m3ret", "merlin"}
    for name in encoders.list_encoders():
        assert "arch" not in get_entry(name).config, name


@pytest.mark.parametrize(
    ("change", "key"),
    [
        ({"architecture": None}, "architecture"),
        ({"architecture": "merlin"}, "architecture"),  # not the builder's family
        ({"modalities": "CT"}, "modalities"),
        ({"modalities": []}, "modalities"),
        ({"kinds": ["volume", "hologram"]}, "kinds"),
        ({"description": 3}, "description"),
    ],
)
def test_an_encoder_config_error_names_the_file_and_the_key(
    change: dict[str, Any], key: str
) -> None:
    from medflow.encoders._registry import check_config

    cfg = {"architecture": "m3ret", "modalities": ["*"], "kinds": ["volume"], "description": "x"}
    cfg.update(change)
    cfg = {k: v for k, v in cfg.items() if v is not None}
    with pytest.raises(ValueError, match=rf"^mine\.json: key '{key}' "):
        check_config(cfg, "mine.json", "m3ret")


def test_m3ret_versions_keep_their_ids_across_the_config_key_rename() -> None:
    from medflow.encoders._base import config_sha256

    enc = encoders.create_encoder("m3ret_tiny", random_weights=True, device="cpu")
    with open(Path(encoders.__file__).parent / "configs" / "m3ret_tiny.json") as f:
        as_first_written = json.load(f)
    as_first_written["arch"] = as_first_written.pop("architecture")
    assert enc.version.config_sha256 == config_sha256(as_first_written)
