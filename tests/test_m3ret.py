"""M3Ret encoder: tokens of each kind, the 2D depth rule, positions, masking, preprocessing,
embeddings, checkpoints through the public factory, and the missing text tower."""

from __future__ import annotations

import importlib
from pathlib import Path
from typing import Any

import numpy as np
import pytest
import torch

from medflow.storage.images import ImageMeta


@pytest.fixture(scope="module")
def m3() -> Any:
    # imported here, not at collection: until encoders/__init__ imports it, registering the
    # m3ret names at collection would change the registry other test modules list
    return importlib.import_module("medflow.encoders.m3ret")


@pytest.fixture(scope="module")
def enc(m3: Any) -> Any:
    from medflow.encoders import create_encoder

    return create_encoder("m3ret_tiny", random_weights=True, device="cpu", seed=3)


def _meta(axes: tuple[str, ...], modality: str) -> ImageMeta:
    return ImageMeta(
        modality=modality,
        source_kind="test",
        axes=axes,
        spacing=tuple(1.0 for _ in axes),
        origin=tuple(0.0 for _ in axes),
        affine=tuple(tuple(r) for r in np.eye(4).tolist()),
    )


def test_registered_sizes_and_declaration(enc: Any, m3: Any) -> None:
    from medflow.encoders import list_encoders
    from medflow.encoders._registry import get_entry

    assert {"m3ret_tiny", "m3ret_s", "m3ret_b"} <= set(list_encoders())
    dims = {n: m3.parse_m3ret_config(get_entry(n).config).embed_dim for n in ("m3ret_s", "m3ret_b")}
    assert dims == {"m3ret_s": 384, "m3ret_b": 768}
    info = enc.info
    assert info.modalities == ("*",) and info.kinds == ("volume", "image", "video")
    assert dict(info.embedding_dims) == {"mean": 96, "cls": 96}
    assert info.contrastive_embedding == "mean"
    assert enc.has_text is False and info.extra["has_text_tower"] is False
    assert info.extra["input_shape"] == [2, 16, 64, 64]


def test_finer_patch_config_builds_with_four_times_the_tokens(m3: Any) -> None:
    from medflow.encoders import create_encoder, list_encoders

    assert "m3ret_tiny_p4" in list_encoders()
    fine: Any = create_encoder("m3ret_tiny_p4", random_weights=True, device="cpu", seed=3)
    assert fine.model.patch_size == (4, 4, 4)
    assert fine.info.extra["input_shape"] == [2, 16, 64, 64]
    assert dict(fine.info.embedding_dims) == {"mean": 96, "cls": 96}
    tokens, grid = fine.model.embed(torch.rand(1, 1, 16, 64, 64))
    assert grid == (4, 16, 16) and tokens.shape == (1, 4 * 16 * 16, 96)  # m3ret_tiny: 256
    _, grid_2d = fine.model.embed(torch.rand(1, 1, 1, 64, 64))
    assert grid_2d == (1, 16, 16)


def test_token_grids_for_volume_image_and_video(enc: Any) -> None:
    vit = enc.model
    volume = torch.rand(2, 1, 16, 64, 64)  # z as depth
    image = torch.rand(2, 1, 1, 64, 64)  # depth 1
    video = torch.rand(2, 1, 8, 48, 64)  # 8 frames as depth, another size
    for x, grid in ((volume, (4, 8, 8)), (image, (1, 8, 8)), (video, (2, 6, 8))):
        tokens, g = vit.embed(x)
        assert g == grid
        assert tokens.shape == (2, grid[0] * grid[1] * grid[2], 96)
        out = vit(x)
        assert out.shape == (2, 1 + tokens.shape[1], 96) and torch.isfinite(out).all()
    with pytest.raises(ValueError, match="multiple of the depth patch 4"):
        vit.embed(torch.rand(1, 1, 6, 64, 64))
    with pytest.raises(ValueError, match="multiples of the patch 8 x 8"):
        vit.embed(torch.rand(1, 1, 4, 60, 64))


def test_2d_depth_rule_is_the_image_repeated_over_the_depth_patch(enc: Any) -> None:
    image = torch.rand(3, 1, 1, 64, 64)
    repeated = image.expand(-1, -1, 4, -1, -1)  # depth patch of the tiny config: 4
    with torch.no_grad():
        a, grid_a = enc.model.embed(image)
        b, grid_b = enc.model.embed(repeated)
    assert grid_a == grid_b == (1, 8, 8)
    torch.testing.assert_close(a, b, rtol=1e-5, atol=1e-5)


def test_positions_interpolate_the_reference_table(m3: Any) -> None:
    ref = (4, 8, 8)
    full = m3.sincos_pos_embed(96, ref, ref)
    assert full.shape == (256, 96) and torch.isfinite(full).all() and full.abs().max() <= 1
    # the reference grid sits at integer positions: token (0, 0, 1) is one step along width
    one = m3.sincos_pos_embed(96, (1, 1, 2), (1, 1, 2))[1]
    torch.testing.assert_close(full[1], one)
    # a half-resolution grid's first token sits at 0.5 on every reference axis
    half = m3.sincos_pos_embed(96, (2, 4, 4), ref)[0]
    torch.testing.assert_close(half, m3.sincos_pos_embed(96, (1, 1, 1), (2, 2, 2))[0])
    # one token layer (2D) sits at mid-depth 1.5 of the 4 reference layers
    layer = m3.sincos_pos_embed(96, (1, 8, 8), ref).reshape(8, 8, 96)
    torch.testing.assert_close(layer[0, 0], m3.sincos_pos_embed(96, (1, 1, 1), (4, 1, 1))[0])


def test_masking_ratio_and_visible_tokens(m3: Any) -> None:
    gen = torch.Generator().manual_seed(0)
    keep, restore, mask = m3.random_masking(4, 256, 0.75, gen)
    assert keep.shape == (4, 64) and mask.shape == (4, 256)
    assert torch.equal(mask.sum(dim=1), torch.full((4,), 192.0))
    for b in range(4):
        assert set(keep[b].tolist()) == set(torch.nonzero(mask[b] == 0).flatten().tolist())
    assert torch.equal(restore.sort(dim=1).values, torch.arange(256).expand(4, -1))
    with pytest.raises(ValueError, match="between 0 and 1"):
        m3.random_masking(1, 16, 1.0)


def test_mae_forward_shapes_and_loss(enc: Any, m3: Any) -> None:
    mae = m3.M3RetMAE(enc.config, m3.M3RetViT(enc.config))
    gen = torch.Generator().manual_seed(1)
    for x, n in ((torch.rand(2, 1, 16, 64, 64), 256), (torch.rand(2, 1, 1, 64, 64), 64)):
        out = mae(x, 0.75, gen)
        assert out.pred.shape == out.target.shape == (2, n, 4 * 8 * 8)
        assert out.mask.mean().item() == pytest.approx(0.75)
        assert torch.isfinite(out.loss) and out.loss.item() > 0
        out.loss.backward()
        assert mae.encoder.patch_embed.weight.grad is not None
        mae.zero_grad()
    # targets are normalised per patch
    torch.testing.assert_close(out.target.mean(-1), torch.zeros(2, 64), atol=1e-4, rtol=0)


def test_simdino_pieces(m3: Any) -> None:
    head = m3.ProjectionHead(96, 128, 16)
    z = head(torch.randn(8, 96))
    assert z.shape == (8, 16)
    torch.testing.assert_close(z.norm(dim=1), torch.ones(8))
    collapsed = torch.nn.functional.normalize(torch.ones(8, 16), dim=1)
    spread = torch.nn.functional.normalize(torch.eye(16)[:8], dim=1)
    assert m3.coding_rate(spread) > m3.coding_rate(collapsed) > 0


def test_preprocess_each_kind_to_one_input_shape(enc: Any) -> None:
    rng = np.random.default_rng(0)
    cases = [
        (
            _meta(("z", "y", "x"), "CT"),
            rng.integers(-1200, 2000, (20, 40, 50)).astype(np.int16),
            16,
        ),
        (_meta(("y", "x"), "DX"), rng.integers(0, 4096, (60, 40)).astype(np.uint16), 1),
        (_meta(("c", "y", "x"), "XC"), rng.integers(0, 255, (3, 30, 40)).astype(np.uint8), 1),
        (_meta(("t", "y", "x"), "US"), rng.random((7, 30, 30)).astype(np.float32), 16),
        (
            _meta(("t", "c", "y", "x"), "ES"),
            rng.integers(0, 255, (40, 3, 24, 32)).astype(np.uint8),
            16,
        ),
    ]
    batch = []
    for meta, pixels, valid in cases:
        x = enc.preprocess(meta, pixels)
        assert x.shape == (1, 2, 16, 64, 64) and x.dtype == torch.float32
        assert torch.isfinite(x).all() and x.min() >= 0 and x.max() <= 1
        assert x[0, 1, :, 0, 0].sum().item() == valid
        batch.append(x)
    out = enc.encode_images(torch.cat(batch))  # kinds mixed in one batch
    for key, dim in enc.info.embedding_dims.items():
        assert out[key].shape == (5, dim) and torch.isfinite(out[key]).all()
        torch.testing.assert_close(out[key].norm(dim=1), torch.ones(5))
    # a sample's embedding does not depend on its batch
    alone = enc.encode_images(batch[1])["mean"][0]
    torch.testing.assert_close(alone, out["mean"][1], rtol=1e-4, atol=1e-5)


def test_ct_window_and_grey_conversion(m3: Any, enc: Any) -> None:
    ct = np.full((4, 8, 8), -1000, np.int16)
    ct[:, :, 4:] = 1000
    x = enc.preprocess(_meta(("z", "y", "x"), "CT"), ct)[0, 0]
    assert x[:, :, :16].max() == 0 and x[:, :, 48:].min() == 1  # -1000 -> 0, +1000 -> 1
    rgb = np.zeros((1, 3, 2, 2), np.uint8)
    rgb[0, 1] = 200  # pure green
    assert m3.to_grey(rgb, True)[0, 0, 0] == pytest.approx(0.587 * 200)
    assert list(m3.video_frame_indices(5, 3)) == [0, 2, 4]
    with pytest.raises(ValueError, match="axes of a volume"):
        enc.preprocess(_meta(("t", "z", "y", "x"), "MR"), np.zeros((2, 4, 8, 8)))
    assert not enc.accepts(_meta(("t", "z", "y", "x"), "MR"))
    assert enc.accepts(_meta(("y", "x"), "US")) and enc.accepts(_meta(("z", "y", "x"), "MR"))


def test_bad_valid_slice_channel_is_refused(enc: Any) -> None:
    x = torch.zeros(1, 2, 16, 64, 64)
    x[0, 1, 2:] = 1  # padding first
    with pytest.raises(ValueError, match="valid slices"):
        enc.encode_images(x)
    x = torch.zeros(1, 2, 16, 64, 64)
    x[0, 1, :3] = 1  # neither 1 nor a multiple of 4
    with pytest.raises(ValueError, match="multiple of 4"):
        enc.encode_images(x)


def test_checkpoint_round_trip_through_the_factory(tmp_path: Path, enc: Any) -> None:
    from safetensors.torch import save_file

    from medflow.encoders import CheckpointError, create_encoder

    path = tmp_path / "m3ret.safetensors"
    save_file({k: v.contiguous() for k, v in enc.model.state_dict().items()}, str(path))
    loaded = create_encoder("m3ret_tiny", path, device="cpu")
    assert loaded.version.weights_sha256 != enc.version.weights_sha256
    assert loaded.version.config_sha256 == enc.version.config_sha256
    x = torch.rand(2, 1, 16, 64, 64)
    a, b = enc.encode_images(x), loaded.encode_images(x)
    for key in a:
        assert torch.equal(a[key], b[key])
    state = dict(enc.model.state_dict())
    state.pop("cls_token")
    state["patch_embed.weight"] = torch.zeros(8, 1, 4, 8, 8)
    torch.save(state, tmp_path / "bad.pt")
    with pytest.raises(CheckpointError, match="cls_token") as info:
        create_encoder("m3ret_tiny", tmp_path / "bad.pt", device="cpu")
    assert "patch_embed.weight" in str(info.value)
    with pytest.raises(CheckpointError, match="not found"):
        create_encoder("m3ret_tiny", tmp_path / "missing.pt", device="cpu")
    with pytest.raises(CheckpointError, match="does not fit"):
        create_encoder("m3ret_s", path, device="cpu")


def test_no_text_tower(enc: Any) -> None:
    with pytest.raises(RuntimeError, match="no text tower"):
        enc.encode_text(["a pleural effusion"])
    assert enc.logit_scale == 1.0


def test_config_errors_say_what_was_expected(m3: Any) -> None:
    from medflow.encoders._registry import get_entry, thaw

    good = thaw(get_entry("m3ret_tiny").config)
    bad = thaw(good)
    bad["input_size"] = [16, 60, 64]
    with pytest.raises(ValueError, match="multiple of patch_size"):
        m3.parse_m3ret_config(bad)
    bad = thaw(good)
    bad["vit"]["num_heads"] = 5
    with pytest.raises(ValueError, match="divisible by num_heads 5"):
        m3.parse_m3ret_config(bad)
    bad = thaw(good)
    del bad["decoder"]
    with pytest.raises(ValueError, match="'decoder'"):
        m3.parse_m3ret_config(bad)
    bad = thaw(good)
    bad["retrieval_embedding"] = "max"
    with pytest.raises(ValueError, match="'mean' or 'cls'"):
        m3.parse_m3ret_config(bad)
