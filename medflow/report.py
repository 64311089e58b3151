"""The run report: a self-contained HTML page per nightly run, and a Prefect markdown artifact.

:func:`build_report` writes ``<root>/reports/<run_id>.html`` and replaces
``<root>/reports/latest.html`` with it, each atomically (a temporary name renamed into place on
a local root; one whole-object write on an object store). The page holds:

* the run's counts (discovered sources, series outcomes, modalities, denoising, encoders);
* every stage with its count and time (ingest, denoise, each encoder, findings, report);
* the series quarantined or failed in the run, grouped by reason code: a count, an example
  reason and a few example keys per code (the page's size does not grow with the archive);
* thumbnails of a sample of the run's new series: the middle slice of a volume, the first frame
  of a video, read from a coarse pyramid level; CT in a soft-tissue window, other grey images
  between their 1st and 99th percentiles, colour kept;
* the series denoised in the run: the middle slice of the noisy reconstruction and of the
  denoised image side by side, with the method and its settings;
* per encoder, the distribution of the finding probabilities scored in this run (the run's new
  series, and any series rescored after a prompt-bank change) as a strip plot with quartiles.

Everything is inline (PNG data URIs, CSS; a content security policy forbids any fetch), so the
file opens anywhere. Series appear by pseudonymous key only; reasons are built from
non-identifying facts (medflow.reasons), so nothing here needs scrubbing.

:func:`publish_report` is what the nightly flow calls: it builds the report and publishes the
markdown artifact, and a failure there is logged as a warning, never raised.
"""

from __future__ import annotations

import base64
import html
import io
import logging
import math
import re
import time
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any

import duckdb
import numpy as np

from medflow.reasons import MAX_EXAMPLE_KEYS, REASON_DESCRIPTIONS, ReasonCode, tally_groups
from medflow.storage.atomic import write_atomic
from medflow.storage.images import open_image
from medflow.storage.layout import OutputRoot
from medflow.storage.queries import denoised_in_run, findings_scores_of_run, ingested_in_run
from medflow.storage.tables import connect, utcnow

__all__ = [
    "DEFAULT_CT_WINDOW",
    "REPORT_ARTIFACT_KEY",
    "SHOWN_DENOISE_SETTINGS",
    "DenoisedPair",
    "RunReport",
    "StageRow",
    "Thumbnail",
    "build_report",
    "count_text",
    "report_markdown",
    "stage_table",
    "thumbnail",
]

REPORT_ARTIFACT_KEY = "nightly-report"
DEFAULT_CT_WINDOW = (40.0, 400.0)  # level, width in HU: soft tissue
_RUN_ID = re.compile(r"^[A-Za-z0-9][A-Za-z0-9_.-]{0,127}$")
_MAX_STRIP_POINTS = 2000  # points drawn per finding; quartiles use all scores


@dataclass(frozen=True, slots=True)
class Thumbnail:
    """One new series' thumbnail (PNG bytes), or why there is none."""

    series_key: str
    modality: str
    source_kind: str
    axes: str
    png: bytes | None = None
    error: str | None = None


@dataclass(frozen=True, slots=True)
class RunReport:
    """Where the report went and what it shows."""

    html_path: str
    latest_path: str
    markdown: str
    new_series: int
    thumbnails: int
    plots: int
    plot_encoders: tuple[str, ...] = field(default_factory=tuple)
    denoised_pairs: int = 0
    seconds: float = 0.0  # to make it (its row in the stage table, when the summary has one)


Log = logging.Logger | logging.LoggerAdapter[logging.Logger]


def _logger(log: Log | None = None) -> Log:
    return log if log is not None else logging.getLogger("medflow.report")


# ---------------------------------------------------------------------------------------------
# thumbnails


def _to_uint8(a: np.ndarray, lo: float, hi: float) -> np.ndarray:
    a = np.nan_to_num(a.astype(np.float32), nan=lo, posinf=hi, neginf=lo)
    if not hi > lo:
        return np.zeros(a.shape, dtype=np.uint8)
    return np.clip((a - lo) * (255.0 / (hi - lo)), 0, 255).round().astype(np.uint8)


def _percentile_window(a: np.ndarray) -> tuple[float, float]:
    finite = a[np.isfinite(a)] if np.issubdtype(a.dtype, np.floating) else a
    if finite.size == 0:
        return 0.0, 1.0
    lo, hi = np.percentile(finite, [1.0, 99.0])
    if hi <= lo:
        lo, hi = float(finite.min()), float(finite.max())
    return float(lo), float(hi)


def _display_plane(
    plane: np.ndarray, has_channels: bool, modality: str, ct_window: tuple[float, float]
) -> np.ndarray:
    """A ``(y, x)`` grey or ``(y, x, 3)`` colour uint8 picture of one plane."""
    if has_channels:
        n = plane.shape[0]
        if n >= 3:
            rgb = np.moveaxis(plane[:3], 0, -1)
            if rgb.dtype == np.uint8:
                return np.ascontiguousarray(rgb)
            return _to_uint8(rgb, *_percentile_window(rgb))
        plane = plane[0]
    if modality.upper() == "CT":
        level, width = ct_window
        return _to_uint8(plane, level - width / 2.0, level + width / 2.0)
    if plane.dtype == np.uint8:
        return plane
    return _to_uint8(plane, *_percentile_window(plane))


def thumbnail(
    path: str, *, size: int = 128, ct_window: tuple[float, float] = DEFAULT_CT_WINDOW
) -> bytes:
    """A PNG thumbnail of the OME-Zarr image at ``path``, at most ``size`` pixels a side.

    Reads one plane of the coarsest pyramid level still at least ``size`` pixels across (the
    finest when none is): the middle ``z`` slice, the first ``t`` frame. The picture keeps the
    physical aspect ratio (pixel spacing).
    """
    from PIL import Image

    if size < 8:
        raise ValueError(f"Expected a thumbnail size of at least 8 pixels, got {size} instead.")
    img = open_image(path)
    axes = img.meta.axes
    iy, ix = axes.index("y"), axes.index("x")
    level = 0
    for i, arr in enumerate(img.levels):
        if max(arr.shape[iy], arr.shape[ix]) >= size:
            level = i
    arr = img.levels[level]
    index: list[int | slice] = []
    for k, a in enumerate(axes):
        if a == "t":
            index.append(0)
        elif a == "z":
            index.append(arr.shape[k] // 2)
        else:
            index.append(slice(None))
    plane = np.asarray(arr[tuple(index)])
    pic = _display_plane(plane, "c" in axes, img.meta.modality, ct_window)
    base = img.levels[0].shape
    sy = img.meta.spacing[iy] * base[iy] / arr.shape[iy]
    sx = img.meta.spacing[ix] * base[ix] / arr.shape[ix]
    h, w = pic.shape[0] * sy, pic.shape[1] * sx
    scale = size / max(h, w)
    out_size = (max(1, round(w * scale)), max(1, round(h * scale)))
    picture = Image.fromarray(pic).resize(out_size, Image.Resampling.BILINEAR)
    buf = io.BytesIO()
    picture.save(buf, format="PNG", optimize=True)
    return buf.getvalue()


def _new_series(
    con: duckdb.DuckDBPyConnection, run_id: str, limit: int
) -> tuple[int, list[tuple[str, str, str, str]]]:
    """How many series this run ingested, and up to ``limit`` of them (by pseudonymous key, so
    an arbitrary sample unrelated to the archive's order)."""
    return ingested_in_run(con, run_id, limit)


def _thumbnails(
    root: OutputRoot,
    series: Sequence[tuple[str, str, str, str]],
    size: int,
    ct_window: tuple[float, float],
    log: Log | None = None,
) -> list[Thumbnail]:
    log = _logger(log)
    out: list[Thumbnail] = []
    for key, modality, kind, axes in series:
        try:
            png = thumbnail(root.image_path(key), size=size, ct_window=ct_window)
            out.append(Thumbnail(key, modality, kind, axes, png=png))
        except Exception as e:  # one unreadable image costs its thumbnail only
            reason = type(e).__name__  # its text may quote the image's path
            log.warning("report: no thumbnail for series %s (%s)", key, reason)
            out.append(Thumbnail(key, modality, kind, axes, error=reason))
    return out


# ---------------------------------------------------------------------------------------------
# denoised low-dose CT: before and after


SHOWN_DENOISE_SETTINGS = ("steps", "n_average", "channels", "depth", "patch_size", "domain")
"""The denoising settings shown beside a denoised image (and by the demo), in this order."""


@dataclass(frozen=True, slots=True)
class DenoisedPair:
    """A series denoised in the run: the middle slice before (the noisy reconstruction) and
    after (PNG bytes, the same window), and how it was made."""

    series_key: str
    method: str
    settings: dict[str, Any]  # the method's shown settings and the seed
    defaults: dict[str, Any]  # the method's defaults where the settings differ from them
    slices_kept: int  # slices that hold the method's output (alone or blended by the guard)
    n_slices: int
    noisy_png: bytes | None = None
    denoised_png: bytes | None = None
    error: str | None = None


def _method_defaults(method: str) -> dict[str, Any]:
    try:
        from medflow.denoise import FlickingSettings
        from medflow.denoise.zsn2n import ZSN2NSettings
    except ImportError:  # pragma: no cover - torch is a dependency
        return {}
    if method == "flicking":
        return FlickingSettings().to_dict()
    if method == "zsn2n":
        return ZSN2NSettings().to_dict()
    return {}


def _denoised_of_run(
    con: duckdb.DuckDBPyConnection, run_id: str, limit: int
) -> list[tuple[str, str, str | None]]:
    """Series denoised in this run: key, denoised image, noisy image (paths under the root)."""
    return denoised_in_run(con, run_id, limit)


def _denoised_pairs(
    root: OutputRoot,
    rows: Sequence[tuple[str, str, str | None]],
    size: int,
    ct_window: tuple[float, float],
    log: Log | None = None,
) -> list[DenoisedPair]:
    log = _logger(log)
    out: list[DenoisedPair] = []
    for key, denoised_path, noisy_path in rows:
        try:
            img = open_image(root.join(denoised_path))
            prov = dict(img.attrs.get("medflow", {}).get("denoise", {}))
            method = str(prov.get("method", "?"))
            chosen = dict((prov.get("params") or {}).get("settings") or {})
            defaults = _method_defaults(method)
            shown = {k: chosen[k] for k in SHOWN_DENOISE_SETTINGS if k in chosen}
            shown["seed"] = prov.get("seed")
            differ = {k: defaults[k] for k in shown if k in defaults and defaults[k] != shown[k]}
            per_slice = list(prov.get("slice_methods") or [])
            after = thumbnail(root.join(denoised_path), size=size, ct_window=ct_window)
            before = (
                thumbnail(root.join(noisy_path), size=size, ct_window=ct_window)
                if noisy_path
                else None
            )
            out.append(
                DenoisedPair(
                    key,
                    method,
                    shown,
                    differ,
                    sum(m == method for m in per_slice),
                    len(per_slice),
                    noisy_png=before,
                    denoised_png=after,
                )
            )
        except Exception as e:  # one unreadable image costs its pair only
            reason = type(e).__name__  # its text may quote the image's path
            log.warning("report: no before/after pair for series %s (%s)", key, reason)
            out.append(DenoisedPair(key, "?", {}, {}, 0, 0, error=reason))
    return out


def _settings_text(values: Mapping[str, Any]) -> str:
    return ", ".join(f"{k.replace('_', ' ')} {v}" for k, v in values.items())


# ---------------------------------------------------------------------------------------------
# findings plots


@dataclass(frozen=True, slots=True)
class _FindingsGroup:
    encoder: str
    version: str
    bank: str
    n_series: int
    scores: dict[str, np.ndarray]


def _findings_of_run(con: duckdb.DuckDBPyConnection, run_id: str) -> list[_FindingsGroup]:
    rows, n_series = findings_scores_of_run(con, run_id)
    groups: dict[tuple[str, str, str], dict[str, np.ndarray]] = {}
    for enc, ver, bank, finding, scores in rows:
        groups.setdefault((str(enc), str(ver), str(bank)), {})[str(finding)] = np.asarray(
            scores, dtype=np.float64
        )
    return [
        _FindingsGroup(e, v, b, n_series.get((e, v, b), 0), s)
        for (e, v, b), s in sorted(groups.items())
    ]


def _findings_plot(group: _FindingsGroup) -> bytes:
    """Strip plot of each finding's scores with its interquartile range and median, findings
    sorted by median score (highest on top)."""
    from matplotlib.backends.backend_agg import FigureCanvasAgg
    from matplotlib.figure import Figure

    items = sorted(group.scores.items(), key=lambda kv: (-float(np.median(kv[1])), kv[0]))
    n = len(items)
    fig = Figure(figsize=(7.5, 1.1 + 0.26 * n), dpi=96)
    FigureCanvasAgg(fig)
    ax = fig.add_subplot()
    rng = np.random.default_rng(0)
    for row, (_, s) in enumerate(items):
        y = n - 1 - row
        shown = s if s.size <= _MAX_STRIP_POINTS else rng.choice(s, _MAX_STRIP_POINTS, False)
        jitter = rng.uniform(-0.22, 0.22, shown.size)
        ax.scatter(shown, y + jitter, s=9, alpha=0.45, color="#3b6ea8", linewidths=0)
        q1, med, q3 = np.percentile(s, [25.0, 50.0, 75.0])
        ax.hlines(y, q1, q3, color="#1b2a3a", linewidth=3.0)
        ax.plot([med], [y], marker="|", markersize=14, color="#c0392b", markeredgewidth=2.5)
    ax.set_yticks(range(n))
    ax.set_yticklabels([name.replace("_", " ") for name, _ in reversed(items)], fontsize=8)
    ax.set_xlim(-0.02, 1.02)
    ax.set_ylim(-0.7, n - 0.3)
    ax.set_xlabel("probability (finding score)")
    ax.grid(axis="x", alpha=0.3)
    ax.set_title(
        f"{group.encoder}: {group.n_series} series, bank {group.bank}, version {group.version}",
        fontsize=9,
    )
    fig.tight_layout()
    buf = io.BytesIO()
    fig.savefig(buf, format="png")
    return buf.getvalue()


# ---------------------------------------------------------------------------------------------
# text: counts, stages, quarantined


def _int_map(summary: Mapping[str, Any], name: str) -> dict[str, int]:
    value = summary.get(name) or {}
    if not isinstance(value, Mapping):
        raise ValueError(f"Expected summary[{name!r}] to be a mapping, got {value!r} instead.")
    return {str(k): int(v) for k, v in value.items()}


def _count_rows(summary: Mapping[str, Any]) -> list[tuple[str, int]]:
    rows = [(f"discovered {k}", v) for k, v in _int_map(summary, "discovered").items()]
    rows.append(("series planned", int(summary.get("series_planned") or 0)))
    rows.append(("series already recorded", int(summary.get("series_skipped") or 0)))
    rows += [(f"series {k}", v) for k, v in sorted(_int_map(summary, "status").items())]
    rows += [(f"ingested {k}", v) for k, v in sorted(_int_map(summary, "modality").items())]
    if summary.get("raw_projections"):
        rows.append(("raw projections stored", int(summary["raw_projections"])))
    rows += [(f"denoise {k}", v) for k, v in sorted(_int_map(summary, "denoised").items())]
    rows += [(f"embedded by {k}", v) for k, v in sorted(_int_map(summary, "encoded").items())]
    rows += [
        (f"finding scores by {k}", v) for k, v in sorted(_int_map(summary, "findings").items())
    ]
    return rows


@dataclass(frozen=True, slots=True)
class StageRow:
    """One stage of a run: what it handled (``count`` of ``unit``) and its time in seconds."""

    stage: str
    count: int
    unit: str
    seconds: float


def stage_table(summary: Mapping[str, Any]) -> list[StageRow]:
    """Every stage of a nightly run in order, with its count and time, then the total.

    ingest (series recorded), denoise (series with raw projections handled), one row per
    encoder (series embedded), findings (finding scores written), report (pages written). A
    stage that had nothing to do is listed with 0; one that did not run (no encoder
    configured, denoising turned off) is not.
    """
    stages = summary.get("stage_seconds") or {}
    if not isinstance(stages, Mapping):
        raise ValueError(f"Expected summary['stage_seconds'] to be a mapping, got {stages!r}.")
    seconds = {str(k): float(v) for k, v in stages.items()}
    status = _int_map(summary, "status")
    encoded = _int_map(summary, "encoded")
    rows: list[StageRow] = []
    if "ingest" in seconds:
        rows.append(StageRow("ingest", sum(status.values()), "series", seconds.pop("ingest")))
    if "denoise" in seconds:
        n = sum(_int_map(summary, "denoised").values())
        rows.append(StageRow("denoise", n, "series", seconds.pop("denoise")))
    for name in [k for k in seconds if k.startswith("encode ")]:
        label = name.removeprefix("encode ")
        rows.append(StageRow(name, encoded.get(label, 0), "series", seconds.pop(name)))
    if "findings" in seconds:
        n = sum(_int_map(summary, "findings").values())
        rows.append(StageRow("findings", n, "scores", seconds.pop("findings")))
    if "report" in seconds:
        pages = int(summary.get("report_pages") or 0)
        rows.append(StageRow("report", pages, "pages", seconds.pop("report")))
    rows += [StageRow(k, 0, "", v) for k, v in seconds.items()]  # any other, as recorded
    rows.append(StageRow("total", 0, "", float(summary.get("seconds") or 0.0)))
    return rows


def _stage_rows(summary: Mapping[str, Any]) -> list[tuple[str, float]]:
    return [(r.stage, r.seconds) for r in stage_table(summary)]


def count_text(row: StageRow) -> str:
    if not row.unit:
        return ""
    singular = {"pages": "page", "scores": "score"}  # "series" is both
    return f"{row.count} {singular.get(row.unit, row.unit) if row.count == 1 else row.unit}"


def _quarantined(summary: Mapping[str, Any]) -> list[dict[str, Any]]:
    """The run's quarantined and failed series grouped by stage, status and reason code."""
    return tally_groups(summary.get("quarantined"))


def _describe(code: str) -> str:
    try:
        return REASON_DESCRIPTIONS[ReasonCode(code)]
    except ValueError:
        return ""


def _md(text: str) -> str:
    return text.replace("\\", "\\\\").replace("|", "\\|").replace("\n", " ")


def report_markdown(
    summary: Mapping[str, Any],
    quarantined: Sequence[Mapping[str, Any]],
    *,
    html_path: str,
    new_series: int,
    thumbnails: int,
    plots: int,
    pairs: Sequence[DenoisedPair] = (),
) -> str:
    """The Prefect artifact: counts, time per stage, quarantined with reasons, and the page."""
    run_id = str(summary.get("run_id"))
    lines = [
        f"# medflow nightly run `{run_id}`",
        "",
        f"HTML report: `{html_path}` ({new_series} new series, {thumbnails} thumbnails, "
        f"{plots} findings plots)",
        "",
        "## Counts",
        "",
        "| what | count |",
        "|---|---:|",
        *(f"| {_md(k)} | {v} |" for k, v in _count_rows(summary)),
        "",
        "## Time per stage",
        "",
        "| stage | count | seconds |",
        "|---|---:|---:|",
        *(
            f"| {_md(r.stage)} | {_md(count_text(r))} | {r.seconds:.1f} |"
            for r in stage_table(summary)
        ),
        "",
        f"## Quarantined or failed ({sum(g['count'] for g in quarantined)} series)",
        "",
    ]
    if quarantined:
        lines += [
            "| stage | status | reason code | series | example reason | example keys |",
            "|---|---|---|---:|---|---|",
        ]
        lines += [
            f"| {_md(g['stage'])} | {_md(g['status'])} | `{_md(g['reason_code'])}` | "
            f"{g['count']} | {_md(g['example_reason'])} | "
            + " ".join(f"`{_md(k)}`" for k in g["example_keys"])
            + " |"
            for g in quarantined
        ]
        lines.append("\nThe files at fault are listed for the operator only: `medflow quarantine`.")
    else:
        lines.append("None.")
    lines += _pairs_markdown(pairs)
    return "\n".join(lines) + "\n"


# ---------------------------------------------------------------------------------------------
# html

_CSS = """
body{font:14px/1.45 system-ui,-apple-system,"Segoe UI",Roboto,sans-serif;margin:24px;
color:#1b2a3a;background:#fff}
h1{font-size:20px;margin:0 0 4px}h2{font-size:16px;margin:28px 0 8px;
border-bottom:1px solid #d8dee6;padding-bottom:4px}
.meta{color:#5a6b7d;font-size:12px}
table{border-collapse:collapse;font-size:13px}td,th{padding:3px 10px;border-bottom:1px solid #eef1f4;
text-align:left;vertical-align:top}th{background:#f4f6f8}td.n{text-align:right;
font-variant-numeric:tabular-nums}
.bar{display:inline-block;height:10px;background:#3b6ea8;border-radius:2px;vertical-align:middle}
code{font:12px ui-monospace,Menlo,Consolas,monospace}
.grid{display:flex;flex-wrap:wrap;gap:12px}
figure{margin:0;width:150px;text-align:center}
figure img.thumb{background:#000;max-width:140px;max-height:140px;image-rendering:auto}
figcaption{font-size:11px;color:#5a6b7d;word-break:break-all}
.missing{width:128px;height:128px;display:flex;align-items:center;justify-content:center;
background:#f4f6f8;color:#8a97a5;font-size:11px;margin:auto}
img.plot{max-width:100%;border:1px solid #eef1f4;margin-bottom:12px}
.note{color:#5a6b7d;font-size:12px}
figure.pair{width:auto;max-width:360px}
.sidebyside{display:flex;gap:6px;justify-content:center;font-size:11px;color:#5a6b7d}
"""

# marks every picture that decoded (naturalWidth > 0): a browser test reads it from the DOM
_SCRIPT = """
window.addEventListener("load", function () {
  var ok = 0, bad = 0, imgs = document.images;
  for (var i = 0; i < imgs.length; i++) {
    var good = imgs[i].complete && imgs[i].naturalWidth > 0;
    imgs[i].setAttribute("data-decoded", good ? "1" : "0");
    if (good) { ok++; } else { bad++; }
  }
  document.body.setAttribute("data-images-decoded", String(ok));
  document.body.setAttribute("data-images-broken", String(bad));
});
"""

_CSP = "default-src 'none'; img-src data:; style-src 'unsafe-inline'; script-src 'unsafe-inline'"


def _e(value: Any) -> str:
    return html.escape(str(value), quote=True)


def _data_uri(png: bytes) -> str:
    return "data:image/png;base64," + base64.b64encode(png).decode("ascii")


def _render_html(
    summary: Mapping[str, Any],
    quarantined: Sequence[Mapping[str, Any]],
    new_series: int,
    thumbs: Sequence[Thumbnail],
    plots: Sequence[tuple[_FindingsGroup, bytes]],
    *,
    generated: str,
    version: str,
    pairs: Sequence[DenoisedPair] = (),
) -> str:
    run_id = str(summary.get("run_id"))
    counts = _count_rows(summary)
    stages = stage_table(summary)
    longest = max([r.seconds for r in stages if r.stage != "total"] + [1e-9])
    n_thumbs = sum(t.png is not None for t in thumbs)
    out: list[str] = [
        "<!DOCTYPE html>",
        '<html lang="en"><head><meta charset="utf-8">',
        f'<meta http-equiv="Content-Security-Policy" content="{_CSP}">',
        '<meta name="viewport" content="width=device-width, initial-scale=1">',
        f"<title>medflow nightly run {_e(run_id)}</title>",
        f"<style>{_CSS}</style>",
        f"<script>{_SCRIPT}</script>",
        "</head>",
        f'<body data-run-id="{_e(run_id)}" data-thumbnails="{n_thumbs}" data-plots="{len(plots)}">',
        f"<h1>medflow nightly run <code>{_e(run_id)}</code></h1>",
        f'<div class="meta">generated {_e(generated)} · medflow {_e(version)} · '
        f"{float(summary.get('seconds') or 0.0):.1f} s</div>",
        '<h2 id="counts">Counts</h2>',
        '<table class="counts"><tr><th>what</th><th>count</th></tr>',
        *(f'<tr><td>{_e(k)}</td><td class="n">{v}</td></tr>' for k, v in counts),
        "</table>",
        '<h2 id="stages">Time per stage</h2>',
        '<table class="stages"><tr><th>stage</th><th>seconds</th><th>count</th><th></th></tr>',
    ]
    for row in stages:
        secs = row.seconds
        width = min(240, max(1, round(240 * secs / longest))) if secs > 0 else 0
        out.append(
            f'<tr data-stage="{_e(row.stage)}"><td>{_e(row.stage)}</td>'
            f'<td class="n">{secs:.2f}</td><td class="n">{_e(count_text(row))}</td>'
            f'<td><span class="bar" style="width:{width}px"></span></td></tr>'
        )
    n_bad = sum(g["count"] for g in quarantined)
    out += ["</table>", f'<h2 id="quarantined">Quarantined or failed ({n_bad} series)</h2>']
    if quarantined:
        out.append(
            '<table class="quarantined"><tr><th>stage</th><th>status</th><th>reason code</th>'
            "<th>series</th><th>example reason</th><th>example keys</th></tr>"
        )
        out += [
            f'<tr data-reason-code="{_e(g["reason_code"])}"><td>{_e(g["stage"])}</td>'
            f"<td>{_e(g['status'])}</td>"
            f'<td><code title="{_e(_describe(g["reason_code"]))}">{_e(g["reason_code"])}</code>'
            f'</td><td class="n">{g["count"]}</td><td>{_e(g["example_reason"])}</td><td>'
            + " ".join(f"<code>{_e(k)}</code>" for k in g["example_keys"])
            + "</td></tr>"
            for g in quarantined
        ]
        out.append("</table>")
        out.append(
            f'<p class="note">Up to {MAX_EXAMPLE_KEYS} example series keys per reason code; '
            "every series is in the catalog (<code>reason_code</code>, <code>reason</code>) "
            "for this run id, and the files at fault are listed for the operator only by "
            "<code>medflow quarantine</code>.</p>"
        )
    else:
        out.append('<p class="note">None.</p>')
    out.append(f'<h2 id="series">New series ({new_series})</h2>')
    if thumbs:
        out.append(
            f'<p class="note">{len(thumbs)} of the {new_series} series ingested in this run, '
            "in order of their pseudonymous keys: the middle slice of a volume, the first frame "
            "of a video; CT in a soft-tissue window, other grey images between their 1st and "
            "99th percentiles.</p>"
        )
        out.append('<div class="grid">')
        for t in thumbs:
            label = f"{t.modality} · {t.source_kind} · {t.axes}"
            if t.png is not None:
                pic = (
                    f'<img class="thumb" alt="series {_e(t.series_key)}" '
                    f'data-series-key="{_e(t.series_key)}" src="{_data_uri(t.png)}">'
                )
            else:
                pic = f'<div class="missing" title="{_e(t.error)}">no thumbnail</div>'
            out.append(
                f"<figure>{pic}<figcaption><code>{_e(t.series_key)}</code><br>{_e(label)}"
                "</figcaption></figure>"
            )
        out.append("</div>")
    else:
        out.append('<p class="note">No new series in this run.</p>')
    out += _pairs_html(pairs, summary)
    out.append('<h2 id="findings">Findings</h2>')
    if plots:
        out.append(
            '<p class="note">Distribution of the finding probabilities scored in this run '
            "(its new series, and any series rescored after a prompt-bank change), per encoder: "
            "one dot per series, the bar spans the quartiles, the red tick is the median.</p>"
        )
        out += [
            f'<img class="plot" alt="findings of {_e(g.encoder)}" '
            f'data-encoder="{_e(g.encoder)}" src="{_data_uri(png)}">'
            for g, png in plots
        ]
    else:
        out.append('<p class="note">No findings were scored in this run.</p>')
    out.append("</body></html>")
    return "\n".join(out) + "\n"


def _pairs_html(pairs: Sequence[DenoisedPair], summary: Mapping[str, Any]) -> list[str]:
    n = sum(_int_map(summary, "denoised").values())
    out = [f'<h2 id="denoised">Denoised low-dose CT ({len(pairs)})</h2>']
    if not pairs:
        what = "no low-dose series with raw projections was pending" if not n else "none shown"
        return [*out, f'<p class="note">Nothing denoised in this run ({what}).</p>']
    out.append(
        '<p class="note">Low-dose series denoised from their raw projections in this run: the '
        "middle slice of the noisy reconstruction and of the denoised image, side by side, in "
        "the same soft-tissue window. Per slice the guard returns the blend of the denoised "
        "image and plain filtered back-projection that its error estimate prefers: plain "
        "filtered back-projection where the denoiser would not help.</p>"
    )
    out.append('<div class="grid">')
    for p in pairs:
        if p.error is not None:
            out.append(
                f'<figure class="pair" data-series-key="{_e(p.series_key)}">'
                f'<div class="missing" title="{_e(p.error)}">no pictures</div>'
                f"<figcaption><code>{_e(p.series_key)}</code></figcaption></figure>"
            )
            continue
        pics = []
        for role, png in (("noisy", p.noisy_png), ("denoised", p.denoised_png)):
            if png is None:
                pics.append(f'<div class="missing">no {role} image</div>')
            else:
                pics.append(
                    f'<div><img class="thumb" alt="{role} series {_e(p.series_key)}" '
                    f'data-role="{role}" src="{_data_uri(png)}"><br>{role}</div>'
                )
        reduced = (
            f"<br>reduced from the defaults ({_e(_settings_text(p.defaults))})"
            if p.defaults
            else ""
        )
        out.append(
            f'<figure class="pair" data-series-key="{_e(p.series_key)}" '
            f'data-method="{_e(p.method)}"><div class="sidebyside">{"".join(pics)}</div>'
            f"<figcaption><code>{_e(p.series_key)}</code><br>method <b>{_e(p.method)}</b>: "
            f"{_e(_settings_text(p.settings))}{reduced}<br>{p.slices_kept} of {p.n_slices} "
            "slices denoised, the others plain FBP</figcaption></figure>"
        )
    out.append("</div>")
    return out


def _pairs_markdown(pairs: Sequence[DenoisedPair]) -> list[str]:
    if not pairs:
        return []
    lines = ["", f"## Denoised low-dose CT ({len(pairs)})", ""]
    lines += [
        f"- `{_md(p.series_key)}`: {_md(p.method)} ({_md(_settings_text(p.settings))}), "
        f"{p.slices_kept} of {p.n_slices} slices denoised; before and after in the HTML report"
        for p in pairs
        if p.error is None
    ]
    return lines


def _write_atomic(root: OutputRoot, name: str, data: bytes) -> str:
    final = root.report_path(name)
    write_atomic(final, data)  # readers (a browser, a sync) never see part of a page
    return final


def build_report(
    root: str,
    summary: Mapping[str, Any],
    *,
    max_thumbnails: int = 12,
    thumbnail_px: int = 128,
    ct_window: tuple[float, float] = DEFAULT_CT_WINDOW,
    log: Log | None = None,
) -> RunReport:
    """Write the HTML report of the run ``summary`` (``IngestSummary.to_dict()``) under
    ``<root>/reports/`` and return where it is, with the markdown for the Prefect artifact.
    ``log``: where warnings go (a Prefect run's logger, say); default the module's logger."""
    run_id = summary.get("run_id") if isinstance(summary, Mapping) else None
    if not isinstance(run_id, str) or not _RUN_ID.match(run_id):
        raise ValueError(
            f"Expected a run summary with a run_id of letters, digits, '.', '_' or '-' (it "
            f"names the report file), got {run_id!r} instead."
        )
    if max_thumbnails < 0:
        raise ValueError(f"Expected max_thumbnails >= 0, got {max_thumbnails} instead.")
    if not (len(ct_window) == 2 and ct_window[1] > 0 and all(map(math.isfinite, ct_window))):
        raise ValueError(f"Expected a CT window (level, width > 0), got {ct_window!r} instead.")
    from medflow import __version__ as medflow_version

    t0 = time.perf_counter()
    out = OutputRoot(root)
    quarantined = _quarantined(summary)
    con = connect(out)
    try:
        new_series, sample = _new_series(con, run_id, max_thumbnails)
        groups = _findings_of_run(con, run_id)
        denoised = _denoised_of_run(con, run_id, max_thumbnails)
    finally:
        con.close()
    thumbs = _thumbnails(out, sample, thumbnail_px, ct_window, log) if sample else []
    plots = [(g, _findings_plot(g)) for g in groups if g.scores]
    pairs = _denoised_pairs(out, denoised, 2 * thumbnail_px, ct_window, log) if denoised else []
    stages = summary.get("stage_seconds")
    # this page's own row: the time to make it, up to here (the pictures are most of it)
    seconds = time.perf_counter() - t0
    if isinstance(stages, Mapping) and "report" in stages:
        summary = {
            **summary,
            "report_pages": 1,
            "stage_seconds": {**stages, "report": seconds},
            "seconds": float(summary.get("seconds") or 0.0) + seconds,
        }
    page = _render_html(
        summary,
        quarantined,
        new_series,
        thumbs,
        plots,
        generated=utcnow().strftime("%Y-%m-%d %H:%M:%S UTC"),
        version=medflow_version,
        pairs=pairs,
    ).encode("utf-8")
    html_path = _write_atomic(out, f"{run_id}.html", page)
    latest = _write_atomic(out, "latest.html", page)
    n_thumbs = sum(t.png is not None for t in thumbs)
    markdown = report_markdown(
        summary,
        quarantined,
        html_path=html_path,
        new_series=new_series,
        thumbnails=n_thumbs,
        plots=len(plots),
        pairs=pairs,
    )
    return RunReport(
        html_path=html_path,
        latest_path=latest,
        markdown=markdown,
        new_series=new_series,
        thumbnails=n_thumbs,
        plots=len(plots),
        plot_encoders=tuple(g.encoder for g, _ in plots),
        denoised_pairs=sum(p.error is None for p in pairs),
        seconds=seconds,
    )
