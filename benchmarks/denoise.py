"""Zero-shot low-dose CT denoising: plain FBP, ZS-N2N and sinogram flicking, side by side.

Simulated low-dose scans (Poisson photon noise at I0 incident photons per ray, 360-degree
parallel beam) of real CT slices and one phantom, each at the asked image sizes:

* ``ct-small``: pydicom's ``CT_small.dcm`` test slice (128 x 128, 0.66 mm pixels);
* ``ect``: frame 0 of ``eCT_Supplemental.dcm``, an enhanced CT (512 x 512, 0.39 mm);
* ``ct-693``: ``693_UNCR.dcm``, a CT slice (512 x 512, 0.48 mm);
* ``pancreas``: ``explicit_VR-UN.dcm``, an abdominal CT slice (512 x 512, 0.86 mm, JPEG 2000);
* ``neck``: ``bad_sequence.dcm``, a neck CT slice (512 x 512, 0.29 mm, JPEG lossless);
* ``shepp-logan``: ``skimage.data.shepp_logan_phantom``, intensity 1 taken as water, 2 mm
  pixels at 129 x 129.

The four 512-pixel files are pydicom-data's, shipped in ``benchmarks/data/ct/`` (MIT). Pixel
values are read by medflow's DICOM reader (Hounsfield units, clipped at -1024), resized
(anti-aliased) to each size with the pixel spacing scaled to keep the field of view, and go to
attenuation with water at 0.0193/mm.

Each method runs through :func:`medflow.denoise.denoise_sinogram`. ``flicking`` runs its
defaults (a network trained on the half-turn images of flicked copies); ``flicking-d2`` is
flicking in the form it first had (two convolutions of 48 maps on the sinogram), the baseline
for its time; ``flicking-sino`` (not run by default) is the network before the image domain (four
convolutions of 32 maps) on the sinogram. Scores
are against the FBP (ramp) of the noiseless sinogram, which removes the discretisation error
every method shares and leaves what noise did: PSNR with the data range of that reference (its
max minus min, 1/mm) over the body (the reference above half of water's attenuation, holes
filled) and over the whole square, and SSIM (``skimage.metrics``) over the whole square.
Every score is of the image returned, after the no-worse-than-FBP guard (the blend with FBP it
chooses), but "network", the method's own image before it. Seconds per slice are wall time of
the whole call (training, averaged inference, FBP and the guard).

Examples::

    python -m benchmarks.denoise --quick                           # CPU smoke run, ~1 minute
    python -m benchmarks.denoise --steps 2000 --out benchmarks/results/denoise.md
    python -m benchmarks.denoise --device cuda --out /tmp/denoise.md
"""

from __future__ import annotations

import argparse
import math
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch

from benchmarks.harness import command_line, machine_facts, timed, utc_now, write_report
from medflow.denoise import (
    WATER_MU_PER_MM,
    FlickingSettings,
    ParallelBeamGeometry,
    denoise_sinogram,
    hu_to_mu,
    simulate_low_dose,
)

METHODS = ("fbp", "zsn2n", "flicking-d2", "flicking-sino", "flicking")
DEFAULT_METHODS = ("fbp", "zsn2n", "flicking-d2", "flicking")
DOSES = (1e4, 5e4)
DATA = Path(__file__).parent / "data" / "ct"
REAL: dict[str, tuple[str | None, int]] = {
    # name: file in DATA (None: pydicom's CT_small.dcm), slice index in the reader's z order
    "ct-small": (None, 0),
    "ect": ("eCT_Supplemental.dcm", 1),  # frame 0 of the file: the reader sorts by position
    "ct-693": ("693_UNCR.dcm", 0),
    "pancreas": ("explicit_VR-UN.dcm", 0),
    "neck": ("bad_sequence.dcm", 0),
}
SLICES = ("shepp-logan", *REAL)
# Flicking's first form: ZS-N2N's network on the sinogram, the baseline for flicking's time.
BASELINE_NETWORK = {"depth": 2, "channels": 48, "domain": "sinogram", "patch_size": 64}
# Flicking variants run by name: the settings that differ from the defaults.
VARIANTS: dict[str, dict[str, Any]] = {
    "flicking-d2": BASELINE_NETWORK,
    # The defaults before the image domain: four convolutions of 32 maps on the sinogram.
    "flicking-sino": {"domain": "sinogram", "patch_size": 64, "depth": 4},
}


@dataclass(frozen=True, slots=True)
class Slice:
    """A clean test slice: attenuation in 1/mm and its pixel spacing in mm."""

    name: str
    mu: np.ndarray
    pixel_spacing_mm: float


@dataclass(frozen=True, slots=True)
class Row:
    data: str
    size: int
    incident_photons: float
    method: str
    body_psnr_db: float  # the returned image (after the guard), as every column but one
    psnr_db: float
    ssim: float
    network_body_psnr_db: float  # the method's own image, before the guard
    guard: str
    seconds_per_slice: float


def shepp_logan(size: int) -> Slice:
    from skimage.data import shepp_logan_phantom
    from skimage.transform import resize

    phantom = resize(shepp_logan_phantom(), (size, size), anti_aliasing=True)
    mu = np.clip(phantom, 0.0, None) * WATER_MU_PER_MM
    return Slice("shepp-logan", mu.astype(np.float32), 2.0 * 129 / size)


def real_ct(name: str, size: int) -> Slice:
    """A real CT slice read by medflow's own DICOM reader (Hounsfield units, clipped at -1024),
    resized to ``size`` pixels with the field of view kept."""
    from skimage.transform import resize

    from medflow.readers.dicom import read_dicom_series

    file, index = REAL[name]
    if file is None:
        from pydicom.data import get_testdata_file

        found = get_testdata_file("CT_small.dcm")
        if found is None:
            raise FileNotFoundError("Expected pydicom's CT_small.dcm test file, found none.")
        path = str(found)
    else:
        path = str(DATA / file)
    image = read_dicom_series([path])
    if image.pixels is None:
        raise RuntimeError(f"Expected {Path(path).name} decoded whole, got slabs.")
    pixels = image.pixels if image.pixels.ndim == 2 else image.pixels[index]
    hu = np.clip(pixels.astype(np.float64), -1024.0, None)
    spacing = image.meta.spacing[-1]
    if size != hu.shape[0]:
        spacing *= hu.shape[0] / size
        hu = resize(hu, (size, size), anti_aliasing=True)
    return Slice(name, hu_to_mu(hu).astype(np.float32), spacing)


def load_slice(name: str, size: int) -> Slice:
    return shepp_logan(size) if name == "shepp-logan" else real_ct(name, size)


def body_mask(reference: np.ndarray) -> np.ndarray:
    """Where the reference is above half of water's attenuation, holes filled."""
    from scipy.ndimage import binary_fill_holes

    return np.asarray(binary_fill_holes(reference > 0.5 * WATER_MU_PER_MM))


def score(reference: np.ndarray, image: np.ndarray) -> tuple[float, float, float]:
    """Body PSNR, whole-image PSNR (dB) and whole-image SSIM of ``image`` against
    ``reference``, data range of the reference."""
    from skimage.metrics import peak_signal_noise_ratio, structural_similarity

    data_range = float(reference.max() - reference.min())
    mask = body_mask(reference)
    body_mse = float(np.mean((reference[mask] - image[mask]) ** 2))
    body = 10.0 * math.log10(data_range**2 / body_mse)
    psnr = peak_signal_noise_ratio(reference, image, data_range=data_range)
    ssim = structural_similarity(reference, image, data_range=data_range)
    return body, float(psnr), float(ssim)


def run_case(
    slc: Slice,
    dose: float,
    methods: tuple[str, ...],
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
    for method in methods:
        if device == "cuda":
            torch.cuda.synchronize()
        settings = None
        if method in VARIANTS:
            settings = FlickingSettings(**VARIANTS[method])
        result = denoise_sinogram(
            scan.noisy_sinogram,
            geometry,
            method="flicking" if method in VARIANTS else method,
            seed=seed,
            steps=steps,
            n_average=n_average,
            device=device,
            settings=settings,
            return_unguarded=True,
        )
        if result.unguarded_image is None:
            raise RuntimeError("Expected the unguarded image, got none.")
        body, psnr, ssim = score(reference, result.image[0])
        network, _, _ = score(reference, result.unguarded_image[0])
        guard = result.params["guard"]
        if "fbp_share" in guard:
            ratio = guard["method_mse_estimate"][0] / guard["fbp_mse_estimate"][0]
            shown = f"{ratio:.2f}, {guard['fbp_share'][0]:.3f}"
        else:
            shown = "-"
        rows.append(
            Row(
                data=slc.name,
                size=size,
                incident_photons=dose,
                method=method,
                body_psnr_db=body,
                psnr_db=psnr,
                ssim=ssim,
                network_body_psnr_db=network,
                guard=shown,
                seconds_per_slice=result.seconds / result.image.shape[0],
            )
        )
        print(
            f"  {slc.name} {size}px I0={dose:.0e} {method}: body {body:.2f} dB "
            f"(network {network:.2f}), whole {psnr:.2f} dB, {result.seconds:.1f} s",
            flush=True,
        )
    return rows


def _find(rows: list[Row], r: Row, method: str) -> Row | None:
    for o in rows:
        key = (o.data, o.size, o.incident_photons, o.method)
        if key == (r.data, r.size, r.incident_photons, method):
            return o
    return None


def table(rows: list[Row]) -> str:
    lines = [
        "| data | size | I0 | method | body PSNR (dB) | vs FBP | vs ZS-N2N | whole PSNR (dB) "
        "| SSIM | guard: est. MSE / FBP, FBP share | network body PSNR (dB) | s / slice |",
        "|---|---|---|---|---|---|---|---|---|---|---|---|",
    ]
    for r in rows:
        fbp_row, zs = _find(rows, r, "fbp"), _find(rows, r, "zsn2n")
        vs_fbp = "-" if fbp_row is None else f"{r.body_psnr_db - fbp_row.body_psnr_db:+.2f}"
        vs_zs = "-" if zs is None else f"{r.body_psnr_db - zs.body_psnr_db:+.2f}"
        lines.append(
            f"| {r.data} | {r.size} | {r.incident_photons:.0e} | {r.method} | "
            f"{r.body_psnr_db:.2f} | {vs_fbp} | {vs_zs} | {r.psnr_db:.2f} | {r.ssim:.4f} | "
            f"{r.guard} | {r.network_body_psnr_db:.2f} | {r.seconds_per_slice:.1f} |"
        )
    return "\n".join(lines)


def summary(rows: list[Row]) -> list[str]:
    """The goals, case by case: flicking against ZS-N2N and FBP, and its time against
    flicking-d2's."""
    out: list[str] = []
    for r in rows:
        if r.method != "flicking":
            continue
        case = f"{r.data} {r.size}px I0={r.incident_photons:.0e}"
        zs, fb, d2 = _find(rows, r, "zsn2n"), _find(rows, r, "fbp"), _find(rows, r, "flicking-d2")
        parts = []
        if zs is not None:
            parts.append(f"{r.body_psnr_db - zs.body_psnr_db:+.2f} dB vs ZS-N2N")
        if fb is not None:
            parts.append(f"{r.body_psnr_db - fb.body_psnr_db:+.2f} dB vs FBP")
        if d2 is not None:
            parts.append(
                f"{r.body_psnr_db - d2.body_psnr_db:+.2f} dB and "
                f"{r.seconds_per_slice / d2.seconds_per_slice:.2f}x time vs flicking-d2"
            )
        out.append(f"- {case}: " + ", ".join(parts))
    return out


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


def _names(value: str, known: tuple[str, ...], what: str) -> tuple[str, ...]:
    names = tuple(v for v in value.split(",") if v)
    unknown = [n for n in names if n not in known]
    if unknown or not names:
        raise argparse.ArgumentTypeError(f"Expected {what} among {known}, got {value!r}.")
    return names


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--device", choices=("cpu", "cuda"), default="cpu")
    parser.add_argument("--steps", type=int, default=2000, help="training steps per network")
    parser.add_argument("--n-average", type=int, default=32, help="flicked copies averaged")
    parser.add_argument("--views", type=int, default=360, help="views over 360 degrees")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument(
        "--slices",
        type=lambda v: _names(v, SLICES, "slices"),
        default=SLICES,
        help="comma-separated, among " + ", ".join(SLICES),
    )
    parser.add_argument("--sizes", default="128,256", help="comma-separated image sizes in pixels")
    parser.add_argument(
        "--doses", default=",".join(f"{d:g}" for d in DOSES), help="comma-separated I0"
    )
    parser.add_argument(
        "--methods",
        type=lambda v: _names(v, METHODS, "methods"),
        default=DEFAULT_METHODS,
        help="comma-separated, among " + ", ".join(METHODS) + " (default: all but flicking-sino)",
    )
    parser.add_argument(
        "--threads", type=int, default=None, help="torch CPU threads (default: torch's choice)"
    )
    parser.add_argument(
        "--quick",
        action="store_true",
        help="smoke run: 64-pixel slices, 180 views, 100 steps, 4 flicked copies",
    )
    parser.add_argument("--out", type=Path, default=None, help="markdown file to write")
    args = parser.parse_args(argv)
    if args.device == "cuda" and not torch.cuda.is_available():
        parser.error("--device cuda asked for, but CUDA is not available")
    if args.threads is not None:
        torch.set_num_threads(args.threads)
    sizes = [int(v) for v in args.sizes.split(",") if v]
    doses = [float(v) for v in args.doses.split(",") if v]
    steps, n_average, n_views = args.steps, args.n_average, args.views
    if args.quick:
        sizes, steps, n_average, n_views = [64], 100, 4, 180
    rows: list[Row] = []
    with timed() as clock:
        for size in sizes:
            for name in args.slices:
                slc = load_slice(name, size)
                for dose in doses:
                    rows.extend(
                        run_case(
                            slc,
                            dose,
                            args.methods,
                            n_views=n_views,
                            steps=steps,
                            n_average=n_average,
                            device=args.device,
                            seed=args.seed,
                        )
                    )
    total = clock.wall_s
    command = command_line("denoise", argv)
    flicking = FlickingSettings()
    report = "\n".join(
        [
            f"## Low-dose CT denoising ({utc_now()})",
            "",
            f"- command: `{command.strip()}`",
            f"- machine: {machine(args.device)}; device {args.device}",
            f"- settings: {n_views} views over 360 degrees, parallel beam, detector over the "
            f"diagonal at one bin per pixel; {steps} training steps per network, {n_average} "
            f"flicked copies averaged; flicking: {flicking.depth} convolutions of "
            f"{flicking.channels} maps in the {flicking.domain} domain on "
            f"{flicking.train_pairs} pairs of half-turn images, each averaged image seen in "
            "another of eight orientations; flicking-sino: 4 convolutions of 32 maps "
            f"on the sinogram; flicking-d2 (the first form): {BASELINE_NETWORK['depth']} "
            f"convolutions of {BASELINE_NETWORK['channels']} maps on the sinogram; seed "
            f"{args.seed}",
            "- reference: FBP (ramp) of the noiseless sinogram; PSNR data range = its max - min "
            "(1/mm); body: reference above half of water, holes filled; scores of the returned "
            "image (after the guard), but the network column (the method's own image); guard "
            "column: the SURE estimate of the method's image MSE over FBP's, and FBP's share "
            "in the blend the guard returns (0: the method's image, 1: FBP)",
            f"- total wall time: {total:.0f} s",
            "",
            table(rows),
            "",
            *summary(rows),
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
