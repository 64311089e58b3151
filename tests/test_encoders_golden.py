"""Golden outputs: each encoder on a fixed input with fixed weights, against stored numbers.

The stored numbers live in ``tests/data/encoders/golden/<case>/``; regenerate them (only when
a change of outputs is intended) with ``python -m encoders.testing regenerate-golden``.
"""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
import torch

from medflow.encoders.testing import GOLDEN_DIR, GoldenCase, golden_cases, run_golden_case


@pytest.mark.parametrize("case", golden_cases(), ids=lambda c: c.name)
def test_golden_outputs(case: GoldenCase, tmp_path: Path) -> None:
    case_dir = GOLDEN_DIR / case.name
    manifest = json.loads((case_dir / "manifest.json").read_text(encoding="utf-8"))
    threads = torch.get_num_threads()
    try:
        outputs, checkpoint_sha = run_golden_case(case, tmp_path)  # CPU forced inside
    finally:
        torch.set_num_threads(threads)
    assert checkpoint_sha == manifest["checkpoint_content_sha256"], (
        "the deterministic test checkpoint changed; regenerate the golden outputs on purpose"
    )
    assert sorted(outputs) == manifest["outputs"]
    for key, value in outputs.items():
        expected = np.load(case_dir / f"{key}.npy")
        assert value.shape == expected.shape, key
        np.testing.assert_allclose(
            value, expected, rtol=manifest["rtol"], atol=manifest["atol"], err_msg=key
        )


def test_this_packages_architectures_have_golden_cases() -> None:
    covered = {c.encoder for c in golden_cases()}
    # the full-size merlin shares merlin_tiny's code; its numbers are checked against merlin-vlm
    assert {"merlin_tiny", "clip2d"} <= covered
