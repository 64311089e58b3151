"""Zero-shot retrieval on a synthetic labelled archive: self-supervised M3Ret vs baselines.

Steps, all in one run:

1. write a labelled archive with the demo's drawing helpers: ``--per-class`` series per
   structure class (sphere, cube, stripes) in each of three modalities -- CT volumes (DICOM
   24 x 64 x 64, torso phantom at random spacing and noise), chest radiographs (DICOM DX
   96 x 96) and endoscopy-like videos (MP4, 24 frames of 64 x 80) -- with, per series, one
   structure of the class (``--scene single``), 4 to 7 smaller ones (``--scene multi``,
   the default), 12 to 20 small ones spread over the whole view (``--scene dense``: every
   crop shows the class) or 1 or 2 large ones, several tokens across at the encoder's grid
   (``--scene large``), at random places and sizes (moving across the view in videos);
2. ingest it with the nightly flow's ingest (``flows.nightly.ingest_archive``, Prefect);
3. pretrain ``--encoder`` (default ``m3ret_tiny``; any registered M3Ret config, e.g.
   ``m3ret_tiny_p4`` with 4 x 4 in-plane patches) on it on the CPU, once per objective in
   ``--objectives`` (MAE, MAE plus the SimDINO-style term), each through ``flows.pretrain.pretrain`` (Prefect),
   which registers a version;
4. embed every series through the encode stage (``tasks.encode.encode_items``) with each
   pretrained version and with the same encoder at its random initialisation (the exact
   weights pretraining started from); and two baselines from the encoder's own preprocessing
   (same intensity normalisation, 16 x 64 x 64 grid, valid slices): raw pixels average-pooled
   to 4 x 16 x 16 and mean-centred, and, as a reference of what simple global statistics
   recover, a gradient-orientation histogram standardised over the archive;
5. score Recall@1/5/10 and mAP with ``medflow.evaluation.retrieval.evaluate_retrieval`` against the class
   labels: all series, within each modality, and across modalities.

Results go to ``--out`` (markdown). Example (about 15 minutes on 2 busy cores)::

    python -m benchmarks.retrieval --workdir /tmp/m3ret-bench --per-class 10 --steps 1000
"""

from __future__ import annotations

import argparse
import json
import shutil
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import numpy as np

from benchmarks.harness import command_line, machine_facts, results_path, utc_now, write_report
from medflow.flows.entry import apply_offline_defaults

LABELS = ("sphere", "cube", "stripes")
RAW_GRID = (4, 16, 16)


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--workdir", type=Path, default=Path("/tmp/m3ret-bench"))
    p.add_argument(
        "--encoder",
        default="m3ret_tiny",
        help="registered M3Ret encoder to pretrain and compare (e.g. m3ret_tiny_p4)",
    )
    p.add_argument("--per-class", type=int, default=10, help="series per class and modality")
    p.add_argument("--steps", type=int, default=1000, help="pretraining steps per objective")
    p.add_argument("--batch-size", type=int, default=12)
    p.add_argument("--lr", type=float, default=1.5e-3)
    p.add_argument(
        "--threads", type=int, default=1, help="torch CPU threads (1: fastest on a busy machine)"
    )
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--out", type=Path, default=results_path("retrieval"))
    p.add_argument(
        "--scene",
        choices=tuple(SCENES),
        default="multi",
        help="structures of the class per series (see the module docstring)",
    )
    p.add_argument(
        "--objectives",
        nargs="+",
        choices=("mae", "mae+simdino"),
        default=["mae", "mae+simdino"],
        help="one pretraining run per objective",
    )
    p.add_argument(
        "--augment",
        action=argparse.BooleanOptionalAction,
        default=True,
        help="photometric augmentation (contrast, brightness, gamma, blur or noise) for "
        "mae+simdino",
    )
    p.add_argument(
        "--local-crops", type=int, default=4, help="SimDINO local crops per sample (multi-crop)"
    )
    p.add_argument(
        "--mae-weight",
        type=float,
        default=1.0,
        help="weight of the MAE term for mae+simdino (0: the SimDINO term alone)",
    )
    p.add_argument("--fresh", action="store_true", help="delete the workdir first")
    return p.parse_args(argv)


# ---------------------------------------------------------------------------------------------
# 1. the labelled archive


SCENES = {
    # scene: (structures per series, low, high), CT size share, CT centre spread (z, y, x),
    # DX size share, video size share
    "single": ((1, 2), (0.12, 0.2), (0.15, 0.12, 0.22), (0.08, 0.14), (0.09, 0.12)),
    "multi": ((4, 8), (0.07, 0.1), (0.3, 0.2, 0.3), (0.07, 0.1), (0.09, 0.12)),
    "dense": ((12, 21), (0.06, 0.1), (0.4, 0.3, 0.35), (0.06, 0.1), (0.07, 0.1)),
    "large": ((1, 3), (0.16, 0.26), (0.15, 0.12, 0.15), (0.14, 0.22), (0.16, 0.22)),
}


SCENE_TEXT = {
    "single": "one structure",
    "multi": "4 to 7 structures of the class",
    "dense": "12 to 20 small structures of the class over the whole view",
    "large": "1 or 2 large structures of the class (several tokens across at the encoder's grid)",
}


def _structure_counts(rng: np.random.Generator, scene: str) -> int:
    lo, hi = SCENES[scene][0]
    return lo if hi == lo + 1 else int(rng.integers(lo, hi))


def _moving_marks(
    base: Iterator[np.ndarray],
    label: str,
    count: int,
    rng: np.random.Generator,
    share: tuple[float, float] = (0.09, 0.12),
) -> Iterator[np.ndarray]:
    """Video frames with ``count`` structures of ``label`` drifting across (demo colours)."""
    from medflow.demo.archive import draw_label_2d

    frames = list(base)
    ny, nx = frames[0].shape[:2]
    start = rng.uniform((0.2 * ny, 0.1 * nx), (0.8 * ny, 0.6 * nx), size=(count, 2))
    drift = rng.uniform((-0.1 * ny, 0.2 * nx), (0.1 * ny, 0.4 * nx), size=(count, 2))
    radius = rng.uniform(*share, size=count) * min(ny, nx)
    colour = np.array([235, 175, 150], dtype=np.float32)
    for i, frame in enumerate(frames):
        t = i / max(len(frames) - 1, 1)
        mark = np.zeros((ny, nx), dtype=np.float32)
        for c, d, r in zip(start, drift, radius, strict=True):
            draw_label_2d(mark, label, tuple(c + t * d), float(r), 1.0)
        out = frame * (1 - 0.5 * mark[..., None]) + 0.5 * mark[..., None] * colour
        yield np.clip(out, 0, 255).astype(np.uint8)


def make_labelled_archive(
    archive: Path, per_class: int, seed: int, scene: str = "multi"
) -> dict[str, str]:
    """Write the archive; returns the class label of each source, by relative path.

    ``scene``: ``"single"``, one structure per series (as the demo archive draws them, larger
    and at a random place), ``"multi"``, 4 to 7 smaller ones of the same class, or ``"dense"``,
    12 to 20 small ones over the whole view (see :data:`SCENES`). A CT series is labelled by
    its folder (``.../series``), any other source by its file.
    """
    from pydicom.uid import generate_uid

    from medflow.demo.archive import (
        chest_radiograph,
        demo_patients,
        draw_label_2d,
        draw_label_3d,
        endoscopy_frames,
        write_mp4,
    )
    from medflow.demo.dicom import ct_phantom, write_2d, write_ct_series

    rng = np.random.default_rng(seed)
    patients = demo_patients(8)
    labels: dict[str, str] = {}
    single = scene == "single"
    for i in range(per_class * len(LABELS)):
        label = LABELS[i % len(LABELS)]
        patient = patients[i % len(patients)]
        # CT: 24 x 64 x 64, random spacing and noise, the structures in the body
        spacing = (rng.uniform(1.5, 3.0), *(2 * [rng.uniform(0.6, 1.0)]))
        vol = ct_phantom(
            (24, 64, 64), seed=int(rng.integers(1 << 31)), noise_hu=float(rng.uniform(5, 30))
        ).astype(np.float32)
        value = float(rng.uniform(150, 400))
        for _ in range(_structure_counts(rng, scene)):
            spread = SCENES[scene][2]
            centre = tuple(
                n * (0.5 + rng.uniform(-s, s)) for n, s in zip((24, 64, 64), spread, strict=True)
            )
            share = rng.uniform(*SCENES[scene][1])
            draw_label_3d(vol, spacing, label, centre, share * 64 * spacing[2], value=value)
        folder = f"ct/case{i:03d}/series"
        write_ct_series(
            archive / folder,
            np.clip(np.rint(vol), -1024, 3071).astype(np.int16),
            spacing,
            patient=patient,
            study_uid=generate_uid(entropy_srcs=[f"bench-{seed}-{i}-study"]),
            series_uid=generate_uid(entropy_srcs=[f"bench-{seed}-{i}-ct"]),
            seed=int(rng.integers(1 << 31)),
        )
        labels[folder] = label
        # radiograph: 96 x 96 DX, the structures at random places and sizes
        img = chest_radiograph((96, 96), seed=int(rng.integers(1 << 31))).astype(np.float32)
        value = float(rng.uniform(2300, 3300))
        for _ in range(_structure_counts(rng, scene)):
            centre = (96 * rng.uniform(0.2, 0.8), 96 * rng.uniform(0.15, 0.85))
            share = rng.uniform(*SCENES[scene][3])
            draw_label_2d(img, label, centre, 96 * share, value)
        rel = f"dx/case{i:03d}/DX000001.dcm"
        write_2d(archive / rel, np.clip(img, 0, 4095).astype(np.uint16), "DX", patient=patient)
        labels[rel] = label
        # endoscopy-like video: 24 frames of 64 x 80, the structures moving across
        rel = f"es/clip{i:03d}.mp4"
        frame_seed = int(rng.integers(1 << 31))
        if single:
            frames = endoscopy_frames(24, (64, 80), seed=frame_seed, label=label)
        else:
            base = endoscopy_frames(24, (64, 80), seed=frame_seed)
            frames = _moving_marks(
                base, label, _structure_counts(rng, scene), rng, SCENES[scene][4]
            )
        write_mp4(archive / rel, frames, 12, "synthetic colonoscopy clip")
        labels[rel] = label
    return labels


def series_labels(root: str, by_source: dict[str, str]) -> dict[str, str]:
    """Class labels by series key, through the restricted sources table."""
    from medflow.storage.layout import OutputRoot
    from medflow.storage.tables import SOURCES_SCHEMA, read_table

    t = read_table(OutputRoot(root).sources_dir(), SOURCES_SCHEMA)
    out: dict[str, str] = {}
    for rel, key in zip(t["relpath"].to_pylist(), t["series_key"].to_pylist(), strict=True):
        if key is None:
            continue
        label = by_source.get(rel) or by_source.get(rel.rsplit("/", 1)[0])
        if label is not None:
            out[key] = label
    return out


# ---------------------------------------------------------------------------------------------
# 4. embeddings


def encode_with(root: str, spec: Any) -> tuple[int, float]:
    """Embed every pending series with ``spec`` (the encode stage, no Prefect); count, seconds."""
    from medflow.storage.layout import OutputRoot
    from medflow.tasks.encode import encode_items, get_encoder, pending_items

    out = OutputRoot(root)
    t0 = time.perf_counter()
    items = pending_items(out, get_encoder(spec, "cpu"), spec)
    manifest = encode_items(out, spec, items, run_id="benchmark", device="cpu")
    if manifest.failures:
        raise RuntimeError(f"{spec.output_name}: failures {manifest.failures[:3]}")
    return manifest.embedded, time.perf_counter() - t0


def _raw_pixels(vol: np.ndarray) -> np.ndarray:
    """Average-pooled to the raw grid (a 2D image repeated along depth first)."""
    import torch
    import torch.nn.functional as F

    x = torch.from_numpy(vol)
    if x.shape[0] == 1:
        x = x.expand(16, -1, -1)
    v = F.adaptive_avg_pool3d(x[None, None], RAW_GRID).flatten().numpy()
    return v - v.mean()


def _gradient_histogram(vol: np.ndarray) -> np.ndarray:
    """In-plane gradient-orientation histogram (8 bins, magnitude-weighted, normalised), mean
    absolute second derivatives along x and y, and mean gradient magnitude."""
    gy, gx = np.gradient(vol, axis=(1, 2))
    mag = np.hypot(gx, gy)
    angle = np.mod(np.arctan2(gy, gx), np.pi)
    hist = np.histogram(angle, bins=8, range=(0, np.pi), weights=mag)[0]
    second = [np.abs(np.gradient(gx, axis=2)).mean(), np.abs(np.gradient(gy, axis=1)).mean()]
    return np.concatenate([hist / (hist.sum() + 1e-9), second, [mag.mean()]])


def baseline_embeddings(root: str, encoder: str = "m3ret_tiny") -> dict[str, str]:
    """Write the two baselines to the embeddings table; returns their labels by name.

    Both start from the encoder's preprocessing (same normalisation and grid, valid slices
    only). Raw pixels: mean-centred; gradient histogram: each feature standardised over the
    archive (a reference of what simple global statistics recover, fitted on the archive).
    """
    from medflow.encoders import create_encoder
    from medflow.storage.images import open_image
    from medflow.storage.layout import OutputRoot
    from medflow.storage.tables import connect, embeddings_schema, utcnow, write_part

    out = OutputRoot(root)
    prep = create_encoder(encoder, random_weights=True, device="cpu").preprocessor()
    rows = (
        connect(out)
        .execute(
            "SELECT series_key, study_key, modality, zarr_path, source_fingerprint FROM catalog "
            "WHERE status = 'ingested' ORDER BY series_key"
        )
        .fetchall()
    )
    raw, grad = [], []
    for _, _, _, path, _ in rows:
        opened = open_image(out.join(path))
        array = opened.levels[0] if opened.meta.axes[0] == "t" else opened.read(0)
        x = prep(opened.meta, array)[0]
        vol = x[0, : int(x[1, :, 0, 0].sum())].numpy()
        raw.append(_raw_pixels(vol))
        grad.append(_gradient_histogram(vol))
    g = np.asarray(grad)
    features = {
        "raw-pixels": np.asarray(raw),
        "gradient-histogram": (g - g.mean(axis=0)) / (g.std(axis=0) + 1e-9),
    }
    for label, values in features.items():
        parts = [
            {
                "series_key": key,
                "study_key": study,
                "modality": modality,
                "image_kind": "original",
                "embedding": (v / max(float(np.linalg.norm(v)), 1e-12)).astype(np.float32).tolist(),
                "weights_sha256": "none",
                "config_hash": label,
                "source_fingerprint": fp,
                "medflow_version": None,
                "run_id": "benchmark",
                "created_at": utcnow(),
            }
            for (key, study, modality, _, fp), v in zip(rows, values, strict=True)
        ]
        schema = embeddings_schema(values.shape[1])
        schema = schema.remove(schema.get_field_index("encoder"))
        schema = schema.remove(schema.get_field_index("version"))
        write_part(out.table_dir("embeddings", encoder=label, version="v1"), parts, schema, label)
    return {
        f"raw pixels ({'x'.join(map(str, RAW_GRID))})": "raw-pixels",
        "gradient histogram (reference)": "gradient-histogram",
    }


# ---------------------------------------------------------------------------------------------
# report


def _table(reports: dict[str, Any]) -> str:
    scopes = [s.scope for s in next(iter(reports.values())).scopes]
    lines = [
        "| scope | queries | encoder | R@1 | R@5 | R@10 | mAP |",
        "|---|---:|---|---:|---:|---:|---:|",
    ]
    for scope in scopes:
        for name, report in reports.items():
            s = report.scope(scope)
            lines.append(
                f"| {scope} | {s.n_queries} | {name} | {s.recall[1]:.3f} | {s.recall[5]:.3f} | "
                f"{s.recall[10]:.3f} | {s.map:.3f} |"
            )
    return "\n".join(lines)


def _goals(reports: dict[str, Any], pretrained: list[str], random_name: str) -> str:
    """Goal lines: each pretrained encoder's R@1 against random init and raw pixels, per scope.

    "Clearly above" means by more than two standard errors of the baseline's R@1 (a share of
    n queries: sqrt(p (1 - p) / n)).
    """
    random_init = reports[random_name]
    raw = next(v for k, v in reports.items() if k.startswith("raw pixels"))
    lines = [
        "| scope | encoder | R@1 | random init | raw pixels | clearly above both |",
        "|---|---|---:|---:|---:|---|",
    ]
    for scope in [s.scope for s in random_init.scopes]:
        for name in pretrained:
            mine = reports[name].scope(scope)
            base = [random_init.scope(scope), raw.scope(scope)]
            above = all(
                mine.recall[1] - b.recall[1]
                > 2 * np.sqrt(b.recall[1] * (1 - b.recall[1]) / max(b.n_queries, 1))
                for b in base
            )
            lines.append(
                f"| {scope} | {name} | {mine.recall[1]:.3f} | {base[0].recall[1]:.3f} | "
                f"{base[1].recall[1]:.3f} | {'**met**' if above else '**missed**'} |"
            )
    return "\n".join(lines)


def _describe(name: str) -> str:
    """The encoder's architecture in a few words, from its registered config."""
    from medflow.encoders._registry import get_entry, thaw

    c = thaw(get_entry(name).config)
    v, d = c["vit"], c["decoder"]
    x = "x".join
    return (
        f"ViT {v['embed_dim']}-d, {v['depth']} blocks, patch {x(map(str, v['patch_size']))}, "
        f"input {x(map(str, c['input_size']))}; MAE decoder {d['embed_dim']}-d, "
        f"{d['depth']} block{'s' if d['depth'] != 1 else ''}"
    )


def main(argv: list[str] | None = None) -> int:
    apply_offline_defaults()  # before Prefect is imported
    args = parse_args(argv)
    import torch

    torch.set_num_threads(args.threads)
    from medflow.evaluation.retrieval import evaluate_retrieval
    from medflow.flows.nightly import ingest_archive
    from medflow.flows.pretrain import pretrain
    from medflow.tasks.encode import EncoderSpec

    t_start = time.perf_counter()
    work = args.workdir
    if args.fresh and work.exists():
        shutil.rmtree(work)
    archive, root = work / "archive", str(work / "out")
    timings: dict[str, float] = {}

    t0 = time.perf_counter()
    labels_path = work / "labels_by_source.json"
    if not labels_path.exists():
        by_source = make_labelled_archive(archive, args.per_class, args.seed, args.scene)
        labels_path.write_text(json.dumps(by_source))
    by_source = json.loads(labels_path.read_text())
    timings["write archive"] = time.perf_counter() - t0

    t0 = time.perf_counter()
    ingest_archive(archive=str(archive), root=root, batch_size=8)
    timings["ingest"] = time.perf_counter() - t0
    labels = series_labels(root, by_source)

    records: dict[str, dict[str, Any]] = {}
    for objective in args.objectives:
        t0 = time.perf_counter()
        settings = {
            "encoder": args.encoder,
            "steps": args.steps,
            "batch_size": args.batch_size,
            "lr": args.lr,
            "objective": objective,
            "augment": args.augment and objective != "mae",
            "local_crops": args.local_crops if objective != "mae" else 0,
            "mae_weight": args.mae_weight if objective != "mae" else 1.0,
            "warmup_steps": max(1, args.steps // 20),
            "mask_ratio": 0.75,
            "checkpoint_every": max(1, args.steps // 4),
            "seed": args.seed,
            "device": "cpu",
            "num_threads": args.threads,
        }
        records[objective] = pretrain(root=root, config=settings)
        timings[f"pretrain {objective}"] = time.perf_counter() - t0

    enc = args.encoder
    # embeddings-table labels: unchanged for m3ret_tiny, the encoder name for any other
    prefix = "m3ret" if enc == "m3ret_tiny" else enc.replace("_", "-")
    specs = {
        f"{enc} {objective}": EncoderSpec(
            name=enc,
            checkpoint=record["weights"],
            label=f"{prefix}-{objective.replace('+', '-')}",
            batch_size=8,
            num_workers=0,
        )
        for objective, record in records.items()
    }
    random_name = f"{enc} random init"
    specs[random_name] = EncoderSpec(
        name=enc,
        random_weights=True,
        options={"seed": args.seed},
        label=f"{prefix}-random",
        batch_size=8,
        num_workers=0,
    )
    for name, spec in specs.items():
        n, seconds = encode_with(root, spec)
        timings[f"encode {name}"] = seconds
        print(f"{name}: {n} series embedded in {seconds:.1f} s")
    t0 = time.perf_counter()
    baselines = baseline_embeddings(root, enc)
    timings["baselines"] = time.perf_counter() - t0

    reports = {
        name: evaluate_retrieval(root, spec.output_name, labels) for name, spec in specs.items()
    }
    for name, label in baselines.items():
        reports[name] = evaluate_retrieval(root, label, labels)
    table = _table(reports)
    print(table)

    trained = []
    for objective, record in records.items():
        losses = np.loadtxt(Path(record["directory"]) / "loss.csv", delimiter=",", skiprows=1)
        trained.append(
            f"  - {objective}: loss {losses[:10, 1].mean():.3f} (first 10 steps) -> "
            f"{losses[-10:, 1].mean():.3f} (last 10); version `{record['version']}`, loss "
            f"curve `models/m3ret/{record['version']}/loss.png` under the output root"
        )
    total = time.perf_counter() - t_start
    cmd = command_line("retrieval", argv)
    counts = next(iter(reports.values()))
    facts = machine_facts(device="cpu")
    text = f"""# M3Ret retrieval benchmark (synthetic labelled archive, CPU)

- Command: `{cmd}`
- Run {utc_now()}; whole benchmark {total:.0f} s
- Machine: {facts["cores"]} cores (shared with other jobs), {facts["arch"]}, Python {facts["python"]}, torch {facts["torch"]["version"]} ({args.threads} thread(s)), no GPU
- Archive (scene `{args.scene}`: {SCENE_TEXT[args.scene]} per series): {args.per_class} series per class (sphere, cube, stripes) in each of CT (DICOM volumes 24x64x64), DX (DICOM 96x96) and ES (MP4, 24 frames 64x80): {counts.n_labelled} labelled series ingested ({dict(counts.labels)})
- Pretraining: {enc} ({_describe(enc)}; mask ratio 0.75), {args.steps} steps of batch {args.batch_size}, AdamW lr {args.lr} (warm-up {max(1, args.steps // 20)} steps, cosine), seed {args.seed}, crops of 0.4..1 of the area and flips; `mae+simdino` adds the SimDINO-style term (weight 1, MAE term weight {args.mae_weight:g}, coding-rate gamma 0.1, 64-d projection, EMA 0.99; two global crops, each student crop against the teacher's other crop, plus {args.local_crops} local crops of 0.05..0.4 of the area at half the grid){" with photometric augmentation (contrast, brightness, gamma, blur or noise)" if args.augment else ""}, one objective per run:
{chr(10).join(trained)}
- Random init: the same encoder at the weights pretraining started from (seed {args.seed}).
- Raw pixels: the encoder's preprocessing (same normalisation and grid; 2D repeated along depth), average-pooled to {"x".join(map(str, RAW_GRID))}, mean-centred, L2-normalised.
- Gradient histogram (a reference, not a contender): from the same preprocessed grid, an 8-bin in-plane gradient-orientation histogram (magnitude-weighted, normalised) plus mean absolute second derivatives and mean gradient magnitude, each feature standardised over the archive: it shows how much of the class signal simple global statistics recover.
- Retrieval: cosine similarity, relevant = same class; Recall@k = share of queries with a relevant series in the top k; mAP over the full ranking. Scopes: all series; within one modality; cross-modality (only series of other modalities retrievable). Chance R@1 is about 1/3.
- Times (s): {", ".join(f"{k} {v:.0f}" for k, v in timings.items())}

{table}

Goal: pretrained clearly above random init and above raw pixels (R@1 higher by more than two
standard errors of the baseline's R@1):

{_goals(reports, list(specs)[: len(records)], random_name)}

Research notes on these figures (hypotheses, diagnostics, other settings and objectives tried):
[`docs/research/retrieval.md`](../../docs/research/retrieval.md).
"""
    write_report(args.out, text)
    print(f"wrote {args.out}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
