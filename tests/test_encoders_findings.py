"""Zero-shot findings: prompt banks, their versions, the score rule, text embeddings."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
import torch

from medflow.encoders import create_encoder
from medflow.encoders.findings import (
    bank_text_embeddings,
    list_prompt_banks,
    load_prompt_bank,
    parse_prompt_bank,
    score_findings,
    text_embedding_key,
)
from medflow.encoders.testing import (
    TINY_CLIP_CONFIG,
    write_random_checkpoint,
    write_tiny_text_model,
)

MERLIN_FINDINGS = {
    "pleural effusion",
    "cardiomegaly",
    "ascites",
    "hepatic steatosis",
    "splenomegaly",
    "hydronephrosis",
    "gallstones",
    "coronary calcification",
    "atelectasis",
}


def test_shipped_banks() -> None:
    assert {"merlin_ct_findings", "cxr_chexpert_findings"} <= set(list_prompt_banks())
    merlin = load_prompt_bank("merlin_ct_findings")
    assert len(merlin.findings) == 30
    assert set(merlin.finding_names) >= MERLIN_FINDINGS
    assert all(len(f.positive) >= 2 and len(f.negative) >= 2 for f in merlin.findings)
    cxr = load_prompt_bank("cxr_chexpert_findings")
    assert {"cardiomegaly", "pneumothorax", "pleural effusion"} <= set(cxr.finding_names)
    with pytest.raises(ValueError, match="shipped banks"):
        load_prompt_bank("no_such_bank")


def test_bank_version_is_declared_version_plus_content_hash(tmp_path: Path) -> None:
    data = load_prompt_bank("merlin_ct_findings").to_dict()
    bank = parse_prompt_bank(data)
    assert bank.version.startswith("1.0.0+") and len(bank.version) == len("1.0.0+") + 12
    data["description"] = "edited description only"
    assert parse_prompt_bank(data).version == bank.version
    data["findings"][0]["positive"].append("an extra phrasing.")
    assert parse_prompt_bank(data).version != bank.version
    path = tmp_path / "bank.json"
    path.write_text(json.dumps(data), encoding="utf-8")
    assert load_prompt_bank(path).version == parse_prompt_bank(data).version


@pytest.mark.parametrize(
    ("data", "match"),
    [
        ({"version": "1", "findings": []}, "name"),
        (
            {"name": "b", "findings": [{"name": "x", "positive": ["a"], "negative": ["b"]}]},
            "version",
        ),
        ({"name": "b", "version": "1", "findings": []}, "findings"),
        (
            {
                "name": "b",
                "version": "1",
                "findings": [{"name": "x", "positive": [], "negative": ["n"]}],
            },
            "positive",
        ),
        (
            {
                "name": "b",
                "version": "1",
                "findings": [{"name": "x", "positive": ["p"], "negative": [""]}],
            },
            "negative",
        ),
        (
            {
                "name": "b",
                "version": "1",
                "findings": [{"name": "x", "positive": ["p"], "negative": ["n"]}] * 2,
            },
            "unique",
        ),
    ],
)
def test_bad_banks_are_refused(data: dict, match: str) -> None:
    with pytest.raises(ValueError, match=match):
        parse_prompt_bank(data)


def test_score_rule_on_hand_made_embeddings() -> None:
    # finding 0: positive prompts along e0 and e1 (mean (0.5, 0.5, 0)), negatives along e2
    # finding 1: the reverse
    text = np.array(
        [
            [[0.5, 0.5, 0.0], [0.0, 0.0, 1.0]],
            [[0.0, 0.0, 1.0], [0.5, 0.5, 0.0]],
        ]
    )
    image = np.array([[2.0, 0.0, 0.0], [0.0, 0.0, 3.0], [1.0, 1.0, 1.0]])  # any length
    p = score_findings(image, text, logit_scale=10.0)
    assert p.shape == (3, 2)
    # image 0 = e0: cos_pos = 0.5, cos_neg = 0 -> softmax(10 * [0.5, 0])[0]
    expected = np.exp(5.0) / (np.exp(5.0) + np.exp(0.0))
    assert p[0, 0] == pytest.approx(expected)
    assert p[0, 1] == pytest.approx(1 - expected)
    assert p[1, 0] == pytest.approx(1 / (1 + np.exp(10.0)))
    # image 2 = (1,1,1)/sqrt3: cos_pos = 1/sqrt3, cos_neg = 1/sqrt3 -> 0.5
    assert p[2, 0] == pytest.approx(0.5)
    one = score_findings(image[0], text, logit_scale=10.0)
    assert one.shape == (2,) and np.allclose(one, p[0])
    big = score_findings(image, text, logit_scale=1e4)
    assert np.all(np.isfinite(big)) and big[0, 0] == pytest.approx(1.0)


def test_score_findings_validates_inputs() -> None:
    text = np.zeros((2, 2, 3))
    with pytest.raises(ValueError, match="length 3"):
        score_findings(np.ones((1, 4)), text, 10.0)
    with pytest.raises(ValueError, match=r"\[n_findings, 2, dim\]"):
        score_findings(np.ones((1, 3)), np.zeros((2, 3)), 10.0)
    with pytest.raises(ValueError, match="logit_scale"):
        score_findings(np.ones((1, 3)), text, 0.0)
    with pytest.raises(ValueError, match="finite"):
        score_findings(np.array([[np.nan, 1.0, 1.0]]), text, 1.0)


def test_bank_text_embeddings_are_mean_unit_prompt_embeddings(tmp_path: Path) -> None:
    kw = {"arch_config": str(TINY_CLIP_CONFIG)}
    ckpt = write_random_checkpoint("clip2d", tmp_path / "c.pt", **kw)
    enc = create_encoder("clip2d", ckpt, device="cpu", **kw)
    bank = load_prompt_bank("cxr_chexpert_findings")
    emb = bank_text_embeddings(enc, bank)
    assert emb.shape == (len(bank.findings), 2, 16) and emb.dtype == np.float32
    first = bank.findings[0]
    pos = enc.encode_text(list(first.positive)).numpy()
    assert np.allclose(emb[0, 0], pos.mean(axis=0), atol=1e-6)
    assert text_embedding_key(enc, bank) == (enc.version.id, bank.version)
    # scoring from stored embeddings equals the direct mean of cosines
    image = np.random.default_rng(0).normal(size=(3, 16))
    p = score_findings(image, emb, enc.logit_scale)
    unit = image / np.linalg.norm(image, axis=1, keepdims=True)
    neg = enc.encode_text(list(first.negative)).numpy()
    z = enc.logit_scale * ((unit @ pos.T).mean(axis=1) - (unit @ neg.T).mean(axis=1))
    assert np.allclose(p[:, 0], 1 / (1 + np.exp(-z)), atol=1e-5)


def test_merlin_bank_embeddings(tmp_path: Path) -> None:
    text_dir = write_tiny_text_model(tmp_path / "text")
    ckpt = write_random_checkpoint("merlin_tiny", tmp_path / "m.pt", text_model_dir=text_dir)
    enc = create_encoder("merlin_tiny", ckpt, device="cpu", text_model_dir=text_dir)
    bank = load_prompt_bank("merlin_ct_findings")
    emb = bank_text_embeddings(enc, bank)
    assert emb.shape == (30, 2, 16) and np.all(np.isfinite(emb))
    key = text_embedding_key(enc, bank)
    assert key[0] == enc.version.id and key[1] == bank.version
    image = enc.encode_images(torch.zeros(1, 1, 32, 32, 16))
    p = score_findings(image["contrastive"].numpy(), emb, enc.logit_scale)
    assert p.shape == (1, 30) and np.all((p > 0) & (p < 1))
