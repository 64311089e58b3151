"""Zero-shot low-dose CT denoising: geometry, projector, conjugate pairing, simulator, entry point.

Small sizes throughout (41 to 65 pixels, 96 to 180 views) so the set runs in well under a
minute and a half on two CPU cores.
"""

from __future__ import annotations

import math
from collections.abc import Iterator

import numpy as np
import pytest
import torch
from skimage.data import shepp_logan_phantom
from skimage.metrics import peak_signal_noise_ratio
from skimage.transform import iradon, resize
from skimage.transform import radon as sk_radon

from medflow.denoise import (
    WATER_MU_PER_MM,
    DenoiseResult,
    FlickingSettings,
    NoiseNet,
    NotRawProjectionsError,
    ParallelBeamGeometry,
    check_raw_projections,
    conjugate,
    conjugate_index,
    denoise_sinogram,
    estimate_noise_std,
    fbp,
    flick,
    flicked_pair,
    guard_estimate,
    half_turn_images,
    hu_to_mu,
    mu_to_hu,
    pair_downsample,
    pair_mask,
    radon,
    simulate_low_dose,
    swap_mask,
)
from medflow.denoise.flicking import orient, unorient
from medflow.denoise.networks import receptive_field


def phantom(size: int) -> np.ndarray:
    """Shepp-Logan, anti-aliased to ``size`` pixels, intensities 0..1."""
    return resize(shepp_logan_phantom(), (size, size), anti_aliasing=True)


def inside_circle(size: int, margin: float = 0.0) -> np.ndarray:
    """Pixels within the inscribed circle, shrunk by ``margin`` pixels."""
    yy, xx = np.mgrid[:size, :size] - (size - 1) / 2
    return xx**2 + yy**2 <= ((size - 1) / 2 - margin) ** 2


@pytest.fixture(scope="module", autouse=True)
def one_torch_thread() -> Iterator[None]:
    """Small convolutions gain little from a second thread and lose much when the cores are
    shared; one thread keeps the timing steady."""
    before = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(before)


@pytest.fixture(scope="module")
def low_dose() -> tuple[ParallelBeamGeometry, object]:
    """A 41-pixel phantom slice at I0 = 5e3, 96 views over 360 degrees (6.3 mm pixels)."""
    size = 41
    geometry = ParallelBeamGeometry.for_image(size, 258.0 / size, n_views=96)
    scan = simulate_low_dose(
        phantom(size) * WATER_MU_PER_MM, geometry, incident_photons=5e3, seed=0
    )
    return geometry, scan


# --- geometry -------------------------------------------------------------------------------


def test_geometry_round_trips_through_dict_and_covers_the_diagonal() -> None:
    geo = ParallelBeamGeometry.for_image(64, 0.5, n_views=90)
    assert ParallelBeamGeometry.from_dict(geo.to_dict()) == geo
    assert geo.n_bins % 2 == 1
    assert geo.n_bins * geo.bin_spacing_mm >= math.sqrt(2) * 64 * 0.5
    s = geo.bin_positions_mm()
    np.testing.assert_allclose(s, -s[::-1], atol=1e-12)
    assert geo.angles_deg()[-1] == pytest.approx(360.0 - 4.0)


@pytest.mark.parametrize(
    ("changes", "message"),
    [
        ({"n_views": 0}, "Expected n_views > 0, got 0 instead."),
        ({"pixel_spacing_mm": -1.0}, "Expected pixel_spacing_mm finite and > 0"),
        ({"angular_range_deg": 270.0}, "Expected angular_range_deg of 180 or 360"),
        ({"n_bins": 2.5}, "Expected n_bins as an int, got float instead."),
    ],
)
def test_geometry_rejects_bad_values_saying_what_came(
    changes: dict[str, object], message: str
) -> None:
    base = {
        "n_views": 8,
        "n_bins": 9,
        "bin_spacing_mm": 1.0,
        "image_size": 5,
        "pixel_spacing_mm": 1.0,
    }
    with pytest.raises((ValueError, TypeError), match=message.replace(".", r"\.")):
        ParallelBeamGeometry(**{**base, **changes})  # type: ignore[arg-type]


# --- projector ------------------------------------------------------------------------------


@pytest.mark.parametrize("angular_range", [180.0, 360.0])
def test_radon_and_fbp_match_skimage(angular_range: float) -> None:
    """Odd sizes share skimage's detector centre; tolerance 1e-9 of the sinogram's peak and
    1e-9 (1/mm, the image peak is 1) inside the reconstruction circle."""
    size = 41
    # skimage's circle mode integrates only within the inscribed circle: keep clear of its rim.
    img = phantom(size) * inside_circle(size, margin=2.0)
    geo = ParallelBeamGeometry(
        n_views=60,
        n_bins=size,
        bin_spacing_mm=1.0,
        image_size=size,
        pixel_spacing_mm=1.0,
        angular_range_deg=angular_range,
    )
    ours = radon(torch.from_numpy(img)[None], geo)[0].numpy()
    theirs = sk_radon(img, theta=geo.angles_deg(), circle=True).T
    assert np.abs(ours - theirs).max() < 1e-9 * np.abs(theirs).max()
    mask = inside_circle(size)
    for name in ("ramp", "shepp-logan", "cosine"):
        rec = fbp(torch.from_numpy(theirs)[None], geo, filter_name=name)[0].numpy()  # type: ignore[arg-type]
        ref = iradon(theirs.T, theta=geo.angles_deg(), circle=True, filter_name=name)
        assert np.abs(rec - ref)[mask].max() < 1e-9, name


def test_fbp_reconstructs_a_phantom_in_physical_units() -> None:
    """Attenuation 0.0193/mm at 2 mm pixels: RMSE inside the circle under 5% of the peak (most
    of it at the phantom's sharp edges), and the mean within 1%."""
    size = 65
    mu = phantom(size) * WATER_MU_PER_MM
    geo = ParallelBeamGeometry.for_image(size, 2.0, n_views=180)
    rec = fbp(radon(torch.from_numpy(mu)[None], geo), geo)[0].numpy()
    mask = inside_circle(size)
    rmse = float(np.sqrt(np.mean((rec - mu)[mask] ** 2)))
    assert rmse < 0.05 * WATER_MU_PER_MM
    assert abs(rec[mask].mean() - mu[mask].mean()) < 0.01 * mu[mask].mean()


def test_projector_is_batched_and_keeps_dtype() -> None:
    size = 33
    geo = ParallelBeamGeometry.for_image(size, 1.0, n_views=40)
    a, b = phantom(size), phantom(size)[::-1].copy()
    stack = torch.from_numpy(np.stack([a, b])).float()
    sino = radon(stack, geo)
    assert sino.dtype == torch.float32 and sino.shape == (2, 40, geo.n_bins)
    one = radon(torch.from_numpy(b)[None].float(), geo)
    torch.testing.assert_close(sino[1:], one, rtol=1e-5, atol=1e-5)
    rec = fbp(sino, geo)
    torch.testing.assert_close(rec[1:], fbp(one, geo), rtol=1e-4, atol=1e-5)
    with pytest.raises(ValueError, match=r"Expected sinogram of shape \(slices, 40, "):
        fbp(sino[:, :39], geo)


# --- conjugate rays and flicking ------------------------------------------------------------


def test_conjugate_pairing_is_an_involution_without_fixed_points() -> None:
    geo = ParallelBeamGeometry.for_image(21, 1.0, n_views=36)
    k, j = conjugate_index(geo)
    kk, jj = k[k, j], j[k, j]
    views, bins = np.meshgrid(np.arange(36), np.arange(geo.n_bins), indexing="ij")
    assert np.array_equal(kk, views) and np.array_equal(jj, bins)
    assert not np.any((k == views) & (j == bins))
    x = torch.randn(2, 36, geo.n_bins)
    assert torch.equal(conjugate(conjugate(x)), x)
    assert torch.equal(conjugate(x)[0], x[0, k, j])


def test_conjugate_rays_of_a_noiseless_scan_are_equal() -> None:
    size = 41
    geo = ParallelBeamGeometry.for_image(size, 1.5, n_views=72)
    sino = radon(torch.from_numpy(phantom(size) * WATER_MU_PER_MM)[None], geo)
    assert float(sino.abs().max()) > 0.1
    assert float((sino - conjugate(sino)).abs().max()) < 1e-12


def test_flicked_pairs_hold_both_measurements_of_every_line() -> None:
    geo = ParallelBeamGeometry.for_image(21, 1.0, n_views=36)
    sino = torch.randn(3, 36, geo.n_bins, dtype=torch.float64)
    gen = torch.Generator().manual_seed(3)
    a, b = flicked_pair(sino, geo, generator=gen)
    other = conjugate(sino)
    # At every ray the two copies hold the ray's own value and its conjugate's, one each.
    assert torch.equal(torch.minimum(a, b), torch.minimum(sino, other))
    assert torch.equal(torch.maximum(a, b), torch.maximum(sino, other))
    assert not torch.equal(a, sino) and not torch.equal(b, sino)
    # Flicking permutes values: the same multiset per slice.
    assert torch.equal(a.flatten(1).sort().values, sino.flatten(1).sort().values)
    mask = swap_mask(pair_mask(1, geo, generator=gen))
    assert torch.equal(mask, conjugate(mask))
    share = pair_mask(4, geo, swap_share=0.5, generator=gen).float().mean().item()
    assert 0.45 < share < 0.55


def test_pairing_needs_a_full_scan_with_even_views() -> None:
    odd = ParallelBeamGeometry.for_image(21, 1.0, n_views=359)
    with pytest.raises(
        ValueError, match=r"Expected n_views even for 360-degree pairing, got 359 instead\."
    ):
        conjugate_index(odd)
    half = ParallelBeamGeometry.for_image(21, 1.0, n_views=180, angular_range_deg=180.0)
    sino = np.zeros((1, 180, half.n_bins), dtype=np.float32)
    with pytest.raises(ValueError, match="Expected a 360-degree scan"):
        denoise_sinogram(sino, half, method="flicking", steps=1)


def test_reprojected_images_are_refused_with_a_clear_error(low_dose: tuple) -> None:
    geo, scan = low_dose
    with pytest.raises(NotRawProjectionsError) as info:
        denoise_sinogram(scan.clean_sinogram, geo, method="flicking", steps=1)
    assert isinstance(info.value, ValueError)
    text = str(info.value)
    assert "projected again" in text and "raw projections" in text
    # The same data with photon noise passes: conjugates differ by the noise.
    rel = check_raw_projections(scan.noisy_sinogram, geo)
    assert rel.shape == (1,) and rel[0] > 1e-3


# --- low-dose simulator ---------------------------------------------------------------------


def test_simulator_is_seeded_and_its_noise_follows_photon_statistics() -> None:
    size = 33
    geo = ParallelBeamGeometry.for_image(size, 4.0, n_views=180)
    mu = phantom(size) * WATER_MU_PER_MM
    one = simulate_low_dose(mu, geo, incident_photons=2e4, seed=7)
    two = simulate_low_dose(mu, geo, incident_photons=2e4, seed=7)
    other = simulate_low_dose(mu, geo, incident_photons=2e4, seed=8)
    assert np.array_equal(one.noisy_sinogram, two.noisy_sinogram)
    assert not np.array_equal(one.noisy_sinogram, other.noisy_sinogram)
    assert one.noisy_sinogram.dtype == np.float32
    # Var(-log(N / I0)) ~ exp(p) / I0 for Poisson N with mean I0 exp(-p), to first order.
    noise = (one.noisy_sinogram - one.clean_sinogram).astype(np.float64)
    expected = np.exp(one.clean_sinogram.astype(np.float64)) / 2e4
    ratio = float(np.mean(noise**2) / np.mean(expected))
    assert 0.9 < ratio < 1.1
    assert abs(float(np.mean(noise / np.sqrt(expected)))) < 0.05
    # Electronic noise (in photons) adds its variance to the counts': (N + s^2) / N^2.
    noisier = simulate_low_dose(mu, geo, incident_photons=2e4, electronic_noise_std=80.0, seed=7)
    counts = 2e4 * np.exp(-noisier.clean_sinogram.astype(np.float64))
    predicted = float(np.mean((counts + 80.0**2) / counts**2))
    measured = float(np.mean((noisier.noisy_sinogram - noisier.clean_sinogram) ** 2))
    assert 0.9 < measured / predicted < 1.1
    assert measured > 1.3 * float(np.mean(noise**2))
    with pytest.raises(ValueError, match="Expected incident_photons finite and > 0"):
        simulate_low_dose(mu, geo, incident_photons=0.0)


def test_hounsfield_units_convert_with_water_and_air() -> None:
    hu = np.array([-1000.0, 0.0, 1000.0, -1100.0])
    mu = hu_to_mu(hu)
    np.testing.assert_allclose(mu, [0.0, WATER_MU_PER_MM, 2 * WATER_MU_PER_MM, 0.0], rtol=1e-6)
    np.testing.assert_allclose(mu_to_hu(mu[:3]), hu[:3], atol=1e-3)


def test_noise_estimate_from_conjugates_matches_the_simulation(low_dose: tuple) -> None:
    geo, scan = low_dose
    std = estimate_noise_std(torch.from_numpy(scan.noisy_sinogram).double(), geo).numpy()
    expected = np.sqrt(np.exp(scan.clean_sinogram.astype(np.float64)) / 5e3)
    assert 0.9 < float(np.mean(std**2) / np.mean(expected**2)) < 1.1


# --- ZS-N2N pieces --------------------------------------------------------------------------


def test_pair_downsampling_averages_the_two_diagonals() -> None:
    img = torch.arange(16, dtype=torch.float32).reshape(1, 1, 4, 4)
    d1, d2 = pair_downsample(img)
    assert torch.equal(d1[0, 0], torch.tensor([[2.5, 4.5], [10.5, 12.5]]))
    assert torch.equal(d2[0, 0], torch.tensor([[2.5, 4.5], [10.5, 12.5]]))
    img = torch.tensor([[[[1.0, 0.0], [0.0, 1.0]]]])
    d1, d2 = pair_downsample(img)
    assert float(d1) == 1.0 and float(d2) == 0.0


# --- the entry point ------------------------------------------------------------------------


def psnr(reference: np.ndarray, image: np.ndarray) -> float:
    return float(
        peak_signal_noise_ratio(
            reference, image, data_range=float(reference.max() - reference.min())
        )
    )


@pytest.fixture(scope="module")
def lower_dose() -> tuple[ParallelBeamGeometry, object]:
    """A 64-pixel phantom slice at I0 = 2e3, 128 views over 360 degrees (4 mm pixels): an image
    network needs a little more image than ``low_dose`` to learn from in a test's few steps."""
    size = 64
    geometry = ParallelBeamGeometry.for_image(size, 258.0 / size, n_views=128)
    scan = simulate_low_dose(
        phantom(size) * WATER_MU_PER_MM, geometry, incident_photons=2e3, seed=0
    )
    return geometry, scan


def flicking_with_network_image(
    scan: object, geo: ParallelBeamGeometry, settings: FlickingSettings
) -> DenoiseResult:
    """Flicking on the CPU, with the network's image before the guard returned as well."""
    return denoise_sinogram(
        scan.noisy_sinogram,  # type: ignore[attr-defined]
        geo,
        method="flicking",
        settings=settings,
        device="cpu",
        return_unguarded=True,
    )


@pytest.mark.parametrize("domain", ["image", "sinogram"])
def test_flicking_beats_fbp_on_a_low_dose_slice(
    low_dose: tuple, lower_dose: tuple, domain: str
) -> None:
    geo, scan = lower_dose if domain == "image" else low_dose
    reference = scan.clean_fbp()
    plain = denoise_sinogram(scan.noisy_sinogram, geo, method="fbp", device="cpu")
    settings = FlickingSettings(
        steps=200, n_average=8, patch_size=32, patches_per_step=4, domain=domain
    )
    result = flicking_with_network_image(scan, geo, settings)
    assert isinstance(result, DenoiseResult)
    size = geo.image_size
    assert result.image.shape == (1, size, size) and result.image.dtype == np.float32
    if domain == "sinogram":
        assert result.sinogram is not None
        assert result.sinogram.shape == scan.noisy_sinogram.shape
    else:  # the network denoises images: no denoised sinogram to return
        assert result.sinogram is None
    gain = psnr(reference, result.image) - psnr(reference, plain.image)
    assert gain > 0.3, f"flicking ({domain}) gained {gain:.2f} dB over FBP"
    assert result.slice_methods == ("flicking",)
    guard = result.params["guard"]
    assert guard["kept"] == [True]
    assert guard["method_mse_estimate"][0] < guard["fbp_mse_estimate"][0]
    share = guard["fbp_share"][0]
    assert 0.0 <= share < 1.0
    assert guard["blend_mse_estimate"][0] <= guard["method_mse_estimate"][0]
    # The guard's estimates are close to the true errors: of FBP, of the network's image and of
    # the blend returned.
    true_fbp_mse = float(np.mean((plain.image - reference) ** 2))
    assert 0.8 < guard["fbp_mse_estimate"][0] / true_fbp_mse < 1.25
    assert result.unguarded_image is not None
    true_mse = float(np.mean((result.unguarded_image - reference) ** 2))
    assert 0.8 < guard["method_mse_estimate"][0] / true_mse < 1.25
    true_blend_mse = float(np.mean((result.image - reference) ** 2))
    assert 0.8 < guard["blend_mse_estimate"][0] / true_blend_mse < 1.25
    blended = (1 - share) * result.unguarded_image.astype(np.float64) + share * plain.image
    np.testing.assert_allclose(result.image, blended, rtol=1e-5, atol=1e-7)
    assert result.params["settings"]["steps"] == 200
    assert result.params["settings"]["domain"] == domain
    assert ParallelBeamGeometry.from_dict(result.params["geometry"]) == geo
    np.testing.assert_allclose(result.to_hu(), mu_to_hu(result.image), rtol=1e-6)


@pytest.mark.parametrize("strength", [0.6, 1.5])
def test_guard_blend_share_matches_the_best_one_for_a_linear_smoother(
    low_dose: tuple, strength: float
) -> None:
    """For a linear reconstruction (FBP, then a Gaussian blur) SURE is unbiased: the share of FBP
    the guard picks is close to the one the clean image says is best, and its blend beats both."""
    from scipy.ndimage import gaussian_filter

    geo, scan = low_dose
    y = torch.from_numpy(scan.noisy_sinogram).double()
    reference = scan.clean_fbp()[0].astype(np.float64)

    def smooth(s: torch.Tensor) -> torch.Tensor:
        image = fbp(s, geo).numpy()
        return torch.from_numpy(gaussian_filter(image, sigma=(0, strength, strength)))

    method = smooth(y)
    estimate = guard_estimate(
        smooth,
        y,
        geo,
        reconstruction=method,
        generator=torch.Generator().manual_seed(3),
        probes=8,
    )
    g, a = method[0].numpy(), fbp(y, geo)[0].numpy()
    # The best share for this noise draw, from the clean image: least squares along a - g.
    oracle = float(np.sum((a - g) * (reference - g)) / np.sum((a - g) ** 2))
    share = float(estimate.fbp_share[0])
    assert abs(share - float(np.clip(oracle, 0, 1))) < 0.1, (share, oracle)
    blend = (1 - share) * g + share * a

    def mse(image: np.ndarray) -> float:
        return float(np.mean((image - reference) ** 2))

    assert mse(blend) < min(mse(g), mse(a))
    assert 0.8 < estimate.blend_mse[0] / mse(blend) < 1.25
    assert estimate.keep.tolist() == [share < 1]


@pytest.mark.parametrize("domain", ["image", "sinogram"])
def test_guard_falls_back_to_fbp_when_the_network_makes_things_worse(
    low_dose: tuple, domain: str
) -> None:
    geo, scan = low_dose
    # One step leaves the network near its random start: its output is far worse than FBP.
    settings = FlickingSettings(steps=1, n_average=2, train_pairs=2, domain=domain)
    result = flicking_with_network_image(scan, geo, settings)
    plain = denoise_sinogram(scan.noisy_sinogram, geo, method="fbp", device="cpu")
    reference = scan.clean_fbp()
    assert result.unguarded_image is not None
    assert psnr(reference, result.unguarded_image) < psnr(reference, plain.image)
    assert result.slice_methods == ("fbp",)
    np.testing.assert_array_equal(result.image, plain.image)
    if domain == "sinogram":
        # The sinogram returned is the one the image was reconstructed from: the input.
        np.testing.assert_array_equal(result.sinogram, scan.noisy_sinogram)
    else:
        assert result.sinogram is None


def test_half_turns_of_a_flicked_copy_have_independent_noise() -> None:
    size = 48
    geo = ParallelBeamGeometry.for_image(size, 250.0 / size, n_views=120)
    scan = simulate_low_dose(phantom(size) * WATER_MU_PER_MM, geo, incident_photons=2e3, seed=3)
    g = torch.Generator().manual_seed(0)
    swap = swap_mask(pair_mask(1, geo, generator=g))
    noisy = flick(torch.from_numpy(scan.noisy_sinogram).double(), swap)
    clean = torch.from_numpy(scan.clean_sinogram).double()
    first, second = half_turn_images(noisy, geo)
    clean_first, clean_second = half_turn_images(clean, geo)
    # The same content: without noise both half-turns give the full turn's FBP.
    full = fbp(clean, geo)
    inside = torch.from_numpy(inside_circle(size, margin=2))
    peak = float(full.abs().max())
    for image in (clean_first, clean_second):
        assert float((image - full)[0][inside].abs().max()) < 0.02 * peak
    # Independent noise: each half-turn holds one measurement of every line, the other one the
    # other measurement.
    noise_1 = (first - clean_first)[0][inside].flatten()
    noise_2 = (second - clean_second)[0][inside].flatten()
    assert abs(float(torch.corrcoef(torch.stack((noise_1, noise_2)))[0, 1])) < 0.1
    # Whereas the full turns of two complementary copies hold the same measurements, moved: their
    # noises are nearly the same.
    other = flick(torch.from_numpy(scan.noisy_sinogram).double(), ~swap)
    noise_a = (fbp(noisy, geo) - full)[0][inside].flatten()
    noise_b = (fbp(other, geo) - full)[0][inside].flatten()
    assert float(torch.corrcoef(torch.stack((noise_a, noise_b)))[0, 1]) > 0.8


def test_orientations_are_eight_distinct_and_undone() -> None:
    image = torch.arange(30.0).reshape(1, 5, 6)[:, :, :5]  # no symmetry
    seen = [orient(image, k) for k in range(8)]
    assert len({tuple(v.flatten().tolist()) for v in seen}) == 8
    for k, v in enumerate(seen):
        assert torch.equal(unorient(v, k), image)


def test_oriented_inference_turns_every_image_back() -> None:
    from medflow.denoise.flicking import _denoise_image, _denoise_oriented

    images = torch.randn(10, 12, 12, generator=torch.Generator().manual_seed(1))
    silent = NoiseNet(8, depth=3)
    for param in silent.parameters():
        torch.nn.init.zeros_(param)
    # A network predicting no noise returns every image as it came, in place.
    assert torch.equal(_denoise_oriented(silent, images, 3), images)
    net = NoiseNet(8, depth=3, generator=torch.Generator().manual_seed(2))
    out = _denoise_oriented(net, images, 3)
    for i in range(10):
        expected = unorient(_denoise_image(net, orient(images[i : i + 1], 3 + i)), 3 + i)
        torch.testing.assert_close(out[i : i + 1], expected)
    # A network is not equivariant to turns: the orientations change what it computes.
    assert not torch.allclose(out[1:], _denoise_image(net, images)[1:], atol=1e-4)


def test_same_seed_same_image_on_cpu(low_dose: tuple) -> None:
    geo, scan = low_dose
    settings = FlickingSettings(steps=5, n_average=2, patch_size=16, patches_per_step=2)
    runs = [
        denoise_sinogram(
            scan.noisy_sinogram,
            geo,
            method="flicking",
            seed=s,
            settings=settings,
            device="cpu",
            return_unguarded=True,
        )
        for s in (1, 1, 2)
    ]
    assert np.array_equal(runs[0].image, runs[1].image)
    assert np.array_equal(runs[0].unguarded_image, runs[1].unguarded_image)
    assert runs[0].params == runs[1].params
    # Another seed draws other weights, masks and patches (compared before the guard, which may
    # return plain FBP for both after so few steps).
    assert not np.array_equal(runs[0].unguarded_image, runs[2].unguarded_image)
    zs = [
        denoise_sinogram(scan.noisy_sinogram, geo, method="zsn2n", steps=5, seed=4, device="cpu")
        for _ in range(2)
    ]
    assert np.array_equal(zs[0].image, zs[1].image)
    assert zs[0].params["settings"]["steps"] == 5


def test_entry_point_validates_its_input(low_dose: tuple) -> None:
    geo, scan = low_dose
    with pytest.raises(ValueError, match=r"Expected method in \("):
        denoise_sinogram(scan.noisy_sinogram, geo, method="bm3d")
    with pytest.raises(ValueError, match=r"Expected a sinogram of shape \(slices, 96, "):
        denoise_sinogram(scan.noisy_sinogram[0], geo, method="fbp")
    with pytest.raises(TypeError, match="Expected a floating-point sinogram"):
        denoise_sinogram(scan.noisy_sinogram.astype(np.int32), geo, method="fbp")
    bad = scan.noisy_sinogram.copy()
    bad[0, 0, 0] = np.nan
    with pytest.raises(ValueError, match="Expected finite line integrals"):
        denoise_sinogram(bad, geo, method="fbp")
    with pytest.raises(TypeError, match="Expected FlickingSettings for method 'flicking'"):
        denoise_sinogram(scan.noisy_sinogram, geo, settings=object())  # type: ignore[arg-type]


# --- the network -----------------------------------------------------------------------------


@pytest.mark.parametrize("depth", [2, 4])
def test_network_reads_only_its_receptive_field(depth: int) -> None:
    torch.manual_seed(0)
    net = NoiseNet(8, depth=depth, circular_rows=True)
    assert net.margin == depth and receptive_field(depth) == 2 * depth + 1
    x = torch.randn(1, 1, 40, 30, requires_grad=True)
    net(x)[0, 0, 20, 15].backward()
    assert x.grad is not None
    rows, cols = torch.nonzero(x.grad[0, 0], as_tuple=True)
    assert (int(rows.min()), int(rows.max())) == (20 - depth, 20 + depth)
    assert (int(cols.min()), int(cols.max())) == (15 - depth, 15 + depth)


def test_network_on_a_patch_with_its_margin_matches_the_whole_sinogram() -> None:
    torch.manual_seed(0)
    net = NoiseNet(8, depth=4, circular_rows=True)
    x = torch.randn(1, 1, 36, 30)
    whole = net(x)
    # Rows wrap around (views of a full turn), here across the first view.
    rows = torch.arange(-4, 14) % 36
    patch = net(x[:, :, rows][..., 0:18], pad=False)
    torch.testing.assert_close(patch, whole[:, :, 0:10, 4:14])


def test_network_depth_domain_and_views_are_checked() -> None:
    with pytest.raises(ValueError, match="depth >= 2"):
        FlickingSettings(depth=1)
    with pytest.raises(ValueError, match="depth >= 2"):
        NoiseNet(8, depth=1)
    with pytest.raises(ValueError, match=r"Expected domain in \('image', 'sinogram'\), got 'k'"):
        FlickingSettings(domain="k")  # type: ignore[arg-type]
    with pytest.raises(ValueError, match="Expected train_pairs > 0, got 0"):
        FlickingSettings(train_pairs=0)
    defaults = FlickingSettings()
    assert (defaults.depth, defaults.channels, defaults.domain) == (5, 32, "image")
    # On the sinogram the default network is one convolution shallower.
    assert FlickingSettings(domain="sinogram").depth == 4
    assert FlickingSettings(domain="sinogram", depth=3).depth == 3
    geo = ParallelBeamGeometry.for_image(17, 1.0, n_views=18)
    scan = simulate_low_dose(phantom(17) * WATER_MU_PER_MM, geo, incident_photons=1e4, seed=0)
    # 18 views: a depth-4 sinogram network (field 9) would come within reach of conjugate rays.
    on_sinogram = FlickingSettings(domain="sinogram", steps=1, n_average=2)
    with pytest.raises(ValueError, match=r"more than 19 views .* depth 4, got 18"):
        denoise_sinogram(
            scan.noisy_sinogram, geo, method="flicking", settings=on_sinogram, device="cpu"
        )
    shallow = FlickingSettings(domain="sinogram", depth=2, steps=1, n_average=2, patch_size=8)
    result = denoise_sinogram(
        scan.noisy_sinogram, geo, method="flicking", settings=shallow, device="cpu"
    )
    assert result.params["settings"]["depth"] == 2
    # An image network never sees a sinogram: any depth goes.
    on_images = FlickingSettings(steps=1, n_average=2, train_pairs=2, patch_size=8)
    result = denoise_sinogram(
        scan.noisy_sinogram, geo, method="flicking", settings=on_images, device="cpu"
    )
    assert result.params["settings"]["depth"] == 5
