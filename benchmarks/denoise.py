"""Zero-shot low-dose CT denoising: plain FBP, ZS-N2N and sinogram flicking, side by side.

Simulated low-dose scans (Poisson photon noise at I0 incident photons per ray, 360-degree
parallel beam) of two slices:

* ``shepp-logan``: ``skimage.data.shepp_logan_phantom`` resized to 129 x 129 (anti-aliased),
  intensity 1 taken as water (0.0193/mm), pixels 2 mm (a 258 mm field of view);
* ``ct-small``: pydicom's ``CT_small.dcm`` test slice (128 x 128, 0.66 mm pixels), converted to
  Hounsfield units with RescaleSlope/Intercept and to attenuation with water at 0.0193/mm.

Each method runs through :func:`medflow.denoise.denoise_sinogram`. Scores are against the FBP
(ramp) of the noiseless sinogram, which removes the discretisation error every method shares and
leaves what noise did: PSNR and SSIM (``skimage.metrics``) with the data range of that reference
(its max minus min, in 1/mm), over the whole square image. "method" columns score the method's
own output; "returned" scores the image after the no-worse-than-FBP guard. Seconds per slice are
wall time of the whole call (training, averaged inference, FBP and the guard).

Examples::

    python -m benchmarks.denoise --quick                           # CPU smoke run, ~1 minute
    python -m benchmarks.denoise --device cpu --steps 2000 --out benchmarks/results/denoise.md
    python -m benchmarks.denoise --device cuda --out /tmp/denoise.md
"""

from __future__ import annotations

import argparse
import math
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch

from benchmarks.harness import command_line, machine_facts, timed, utc_now, write_report
from medflow.denoise import (
    WATER_MU_PER_MM,
    ParallelBeamGeometry,
    denoise_sinogram,
    hu_to_mu,
    simulate_low_dose,
)

METHODS = ("fbp", "zsn2n", "flicking")
DOSES = (1e4, 5e4)


@dataclass(frozen=True, slots=True)
class Slice:
    """A clean test slice: attenuation in 1/mm and its pixel spacing in mm."""

    name: str
    mu: np.ndarray
    pixel_spacing_mm: float


@dataclass(frozen=True, slots=True)
class Row:
    data: str
    incident_photons: float
    method: str
    psnr_db: float
    ssim: float
    delta_db: float
    returned_psnr_db: float
    kept: str
    seconds_per_slice: float


def shepp_logan(size: int) -> Slice:
    from skimage.data import shepp_logan_phantom
    from skimage.transform import resize

    phantom = resize(shepp_logan_phantom(), (size, size), anti_aliasing=True)
    mu = np.clip(phantom, 0.0, None) * WATER_MU_PER_MM
    return Slice("shepp-logan", mu.astype(np.float32), 2.0 * 129 / size)


def ct_small(size: int | None) -> Slice:
    import pydicom
    from pydicom.data import get_testdata_file

    path = get_testdata_file("CT_small.dcm")
    if path is None:
        raise FileNotFoundError("Expected pydicom's CT_small.dcm test file, found none.")
    ds = pydicom.dcmread(path)
    hu = ds.pixel_array.astype(np.float64) * float(ds.RescaleSlope) + float(ds.RescaleIntercept)
    spacing = float(ds.PixelSpacing[0])
    if size is not None and size != hu.shape[0]:
        from skimage.transform import resize

        spacing *= hu.shape[0] / size
        hu = resize(hu, (size, size), anti_aliasing=True)
    return Slice("ct-small", hu_to_mu(hu), spacing)


def score(reference: np.ndarray, image: np.ndarray) -> tuple[float, float]:
    """PSNR (dB) and SSIM of a 2-D ``image`` against ``reference``, data range of the reference."""
    from skimage.metrics import peak_signal_noise_ratio, structural_similarity

    data_range = float(reference.max() - reference.min())
    psnr = peak_signal_noise_ratio(reference, image, data_range=data_range)
    ssim = structural_similarity(reference, image, data_range=data_range)
    return float(psnr), float(ssim)


def run_case(
    slc: Slice,
    dose: float,
    *,
    n_views: int,
    steps: int,
    n_average: int,
    device: str,
    seed: int,
) -> list[Row]:
    size = slc.mu.shape[0]
    geometry = ParallelBeamGeometry.for_image(size, slc.pixel_spacing_mm, n_views=n_views)
    scan = simulate_low_dose(slc.mu, geometry, incident_photons=dose, seed=seed)
    reference = scan.clean_fbp()[0]
    rows: list[Row] = []
    fbp_psnr = math.nan
    for method in METHODS:
        if device == "cuda":
            torch.cuda.synchronize()
        result = denoise_sinogram(
            scan.noisy_sinogram,
            geometry,
            method=method,
            seed=seed,
            steps=steps,
            n_average=n_average,
            device=device,
            return_unguarded=True,
        )
        if result.unguarded_image is None:
            raise RuntimeError("Expected the unguarded image, got none.")
        psnr, ssim = score(reference, result.unguarded_image[0])
        returned, _ = score(reference, result.image[0])
        if method == "fbp":
            fbp_psnr = psnr
        guard = result.params["guard"]
        if "kept" in guard:
            ratio = guard["method_mse_estimate"][0] / guard["fbp_mse_estimate"][0]
            kept = f"{'kept' if guard['kept'][0] else 'FBP'} ({ratio:.2f})"
        else:
            kept = "-"
        rows.append(
            Row(
                data=slc.name,
                incident_photons=dose,
                method=method,
                psnr_db=psnr,
                ssim=ssim,
                delta_db=psnr - fbp_psnr,
                returned_psnr_db=returned,
                kept=kept,
                seconds_per_slice=result.seconds / result.image.shape[0],
            )
        )
        print(f"  {slc.name} I0={dose:.0e} {method}: {psnr:.2f} dB, {result.seconds:.1f} s")
    return rows


def table(rows: list[Row]) -> str:
    lines = [
        "| data | I0 | method | PSNR (dB) | SSIM | ΔPSNR vs FBP (dB) | guard (est. MSE / FBP) "
        "| returned PSNR (dB) | s / slice |",
        "|---|---|---|---|---|---|---|---|---|",
    ]
    for r in rows:
        lines.append(
            f"| {r.data} | {r.incident_photons:.0e} | {r.method} | {r.psnr_db:.2f} | "
            f"{r.ssim:.4f} | {r.delta_db:+.2f} | {r.kept} | {r.returned_psnr_db:.2f} | "
            f"{r.seconds_per_slice:.1f} |"
        )
    return "\n".join(lines)


def machine(device: str) -> str:
    facts = machine_facts(device=device)
    torch_ = facts["torch"]
    text = (
        f"{facts['system']}, {facts['cpu']} ({facts['cores']} cores), "
        f"{torch_['threads']} torch threads"
    )
    if torch_["cuda"]:
        text += f", {torch_['cuda']}"
    return text + f"; torch {torch_['version']}, Python {facts['python']}"


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--device", choices=("cpu", "cuda"), default="cpu")
    parser.add_argument("--steps", type=int, default=2000, help="training steps per network")
    parser.add_argument("--n-average", type=int, default=32, help="flicked copies averaged")
    parser.add_argument("--views", type=int, default=360, help="views over 360 degrees")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument(
        "--threads", type=int, default=None, help="torch CPU threads (default: torch's choice)"
    )
    parser.add_argument(
        "--quick",
        action="store_true",
        help="smoke run: 65-pixel slices, 180 views, 100 steps, 4 flicked copies",
    )
    parser.add_argument("--out", type=Path, default=None, help="markdown file to write")
    args = parser.parse_args(argv)
    if args.device == "cuda" and not torch.cuda.is_available():
        parser.error("--device cuda asked for, but CUDA is not available")
    if args.threads is not None:
        torch.set_num_threads(args.threads)
    size_phantom, size_ct = 129, None
    steps, n_average, n_views = args.steps, args.n_average, args.views
    if args.quick:
        size_phantom, size_ct, steps, n_average, n_views = 65, 64, 100, 4, 180
    slices = [shepp_logan(size_phantom), ct_small(size_ct)]
    rows: list[Row] = []
    with timed() as clock:
        for slc in slices:
            for dose in DOSES:
                rows.extend(
                    run_case(
                        slc,
                        dose,
                        n_views=n_views,
                        steps=steps,
                        n_average=n_average,
                        device=args.device,
                        seed=args.seed,
                    )
                )
    total = clock.wall_s
    command = command_line("denoise", argv)
    report = "\n".join(
        [
            f"## Low-dose CT denoising ({utc_now()})",
            "",
            f"- command: `{command.strip()}`",
            f"- machine: {machine(args.device)}; device {args.device}",
            f"- settings: {n_views} views over 360 degrees, parallel beam, detector over the "
            f"diagonal at one bin per pixel; {steps} training steps per network, {n_average} "
            f"flicked copies averaged; seed {args.seed}; slices "
            + ", ".join(
                f"{s.name} {s.mu.shape[0]}px at {s.pixel_spacing_mm:.3g} mm" for s in slices
            ),
            "- reference: FBP (ramp) of the noiseless sinogram; PSNR/SSIM data range = its max - "
            "min (1/mm); guard column: the SURE estimate of the method's image MSE over FBP's "
            "(< 1 keeps the method, else the slice falls back to FBP)",
            f"- total wall time: {total:.0f} s",
            "",
            table(rows),
            "",
        ]
    )
    print()
    print(report)
    if args.out is not None:
        write_report(args.out, report)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
