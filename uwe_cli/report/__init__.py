"""`uwe report`: one self-contained HTML file showing what was picked and why.

The batch in pick order with embedded thumbnails (boxes, regions and heatmaps drawn over them), a
2-D map of the pool with labeled, picked and remaining units, uncertainty histograms of the pool
and the batch, the selection settings and the pool's metadata. Nothing is fetched when the page
is opened (no CDN, no external file), so it can be mailed or attached to a CI run. Everything is
computed and checked before the first byte is written; a missing image stops the report.
"""

from __future__ import annotations

import base64
import io
import json
import os
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import pyarrow as pa
import pyarrow.compute as pc

from uwe_cli import storage
from uwe_cli.data import load_thumbnail
from uwe_cli.embedding import check_selection_options, normalize_uncertainty, uwe_weights
from uwe_cli.errors import ExportError
from uwe_cli.ids import read_id_file, rows_of
from uwe_cli.outputs import Output, file_name_for_id, open_output
from uwe_cli.picks import Pick, Picks, load_picks, map_images
from uwe_cli.pool import DetectionPool, UnitPool
from uwe_cli.report.projection import (
    MAP_METHODS,
    classwise_operator,
    dense_operator,
    project,
    subsample,
)

Progress = Callable[[int, int], None]
SETTING_KEYS = ("strategy", "uncertainty", "tau", "normalize", "aggregate", "budget", "seed", "labeled")


@dataclass
class ReportOptions:
    labeled: Path | None = None
    heatmaps: Path | None = None  # folder of `uwe extract segmentation --heatmaps`
    images: Path | None = None  # read images from DIR / image ID instead of the pool's source
    settings: Path | None = None  # the JSON line of `uwe select --json`
    uncertainty: str | None = None
    tau: float | None = None
    normalize: str | None = None
    aggregate: str | None = None
    map: str = "pca"
    max_points: int = 20_000
    thumb_size: int = 224
    quality: int = 80
    seed: int = 0
    title: str | None = None
    class_names: list[str] | None = None


@dataclass
class Thumb:
    data: str  # base64 JPEG
    width: int  # thumbnail pixels
    height: int
    full: tuple[int, int]  # the image's (width, height): boxes and regions are in these pixels
    heat: str | None = None  # base64 JPEG of the heatmap at the thumbnail's size


@dataclass
class ReportData:
    """Everything the page shows; `render.page(data)` turns it into HTML."""

    title: str
    picks: Picks
    thumbs: list[Thumb]
    settings: dict[str, Any]
    metadata: dict[str, Any]
    pool_size: int
    labeled: int
    map_method: str
    map_xy: np.ndarray  # (m, 2) in [0, 1]
    map_category: np.ndarray  # (m,) 0 remaining, 1 labeled, 2 picked
    map_pick: np.ndarray  # (m,) index into picks, -1 for others
    pool_uncertainty: np.ndarray | None
    batch_uncertainty: np.ndarray | None
    uncertainty_label: str
    notes: list[str] = field(default_factory=list)
    summary: dict[str, Any] = field(default_factory=dict)


def _read_settings(path: Path | None) -> dict[str, Any]:
    if path is None:
        return {}
    try:
        text = path.read_text(encoding="utf-8")
    except (OSError, UnicodeDecodeError) as exc:
        raise ExportError(f"--settings file {path} cannot be read ({exc})") from None
    lines = [line for line in text.splitlines() if line.strip()]
    try:
        settings = json.loads(lines[-1]) if lines else None
    except ValueError:
        settings = None
    if not isinstance(settings, dict):
        raise ExportError(f"--settings {path}: expected the JSON line `uwe select --json` prints")
    return settings


def resolve_settings(opts: ReportOptions) -> dict[str, Any]:
    """The settings the map and histograms use: explicit options, then --settings, then select's defaults."""
    given = _read_settings(opts.settings)
    chosen = {
        "uncertainty": opts.uncertainty or given.get("uncertainty") or "auto",
        "tau": opts.tau if opts.tau is not None else float(given.get("tau", 1.0)),
        "normalize": opts.normalize or given.get("normalize") or "minmax",
        "aggregate": opts.aggregate or given.get("aggregate") or "max",
    }
    check_selection_options(chosen["tau"], chosen["normalize"], chosen["aggregate"])
    if opts.map not in MAP_METHODS:
        raise ExportError(f"unknown --map '{opts.map}' (choose from {', '.join(MAP_METHODS)})")
    if opts.heatmaps is not None and not opts.heatmaps.is_dir():
        raise ExportError(f"--heatmaps {opts.heatmaps}: no such folder")
    if opts.max_points < 1:
        raise ExportError(f"--max-points must be at least 1, got {opts.max_points}")
    if not 16 <= opts.thumb_size <= 2048:
        raise ExportError(f"--thumb-size must be within [16, 2048], got {opts.thumb_size}")
    return {**given, **chosen}


def _encode_jpeg(img: Any, quality: int) -> str:
    buffer = io.BytesIO()
    img.save(buffer, format="JPEG", quality=quality, optimize=False)
    return base64.b64encode(buffer.getvalue()).decode("ascii")


def make_thumbnails(
    picks: Picks,
    opts: ReportOptions,
    progress: Progress | None = None,
    workers: int | None = None,
    out: Output | None = None,
) -> tuple[list[Thumb], int]:
    """One thumbnail per pick (each image decoded once, in parallel threads), and how many picks had
    no heatmap in --heatmaps. Unreadable images raise a DataError naming the file."""

    def one(image_id: str, path: str | Path) -> Thumb:
        img, full = load_thumbnail(path, opts.thumb_size)
        thumb = Thumb(_encode_jpeg(img, opts.quality), img.width, img.height, full)
        if opts.heatmaps is not None:
            heat_file = opts.heatmaps / file_name_for_id(image_id, ".png")
            if heat_file.is_file():
                heat, _ = load_thumbnail(heat_file, opts.thumb_size)
                heat = heat.resize((img.width, img.height))
                thumb.heat = _encode_jpeg(heat, opts.quality)
        return thumb

    workers = workers or min(8, os.cpu_count() or 1)
    by_image = map_images(picks, opts.images, one, progress, workers, out)
    picks.clip_boxes({image_id: thumb.full for image_id, thumb in by_image.items()})
    thumbs = [by_image[p.image_id] for p in picks.picks]
    missing_heat = sum(1 for t in thumbs if t.heat is None) if opts.heatmaps is not None else 0
    return thumbs, missing_heat


def _picked_rows(pool_ids: pa.Array, picks: Picks) -> np.ndarray:
    idx = pc.index_in(pa.array([p.id for p in picks.picks], pa.string()), value_set=pool_ids)
    return idx.to_numpy(zero_copy_only=False).astype(np.int64)  # every ID was found by load_picks


def _unit_map(
    pool: UnitPool, rows: np.ndarray, settings: dict[str, Any], method: str, seed: int
) -> tuple[np.ndarray, np.ndarray | None]:
    u = None
    features = pool.features[rows]
    if pool.uncertainty is not None:
        u = normalize_uncertainty(pool.uncertainty, None, settings["normalize"])
        weights = uwe_weights(u[rows], settings["tau"]).astype(np.float32)
        features = features * weights[:, None]
    return project(dense_operator(np.ascontiguousarray(features, dtype=np.float32)), method, seed), u


def _detection_map(
    pool: DetectionPool, rows: np.ndarray, settings: dict[str, Any], method: str, seed: int
) -> tuple[np.ndarray, np.ndarray]:
    from uwe_cli.selection.classwise import build_classwise, image_uncertainty

    everything = np.ones(pool.num_images, dtype=bool)
    emb = build_classwise(pool, everything, settings["tau"], settings["normalize"], settings["aggregate"])
    u = image_uncertainty(pool, everything, settings["normalize"])
    return project(classwise_operator(emb, rows), method, seed), u


def build_report(
    batch: str | Path,
    pools: Sequence[str | Path],
    opts: ReportOptions,
    progress: Progress | None = None,
    out: Output | None = None,
) -> ReportData:
    """Read, check and compute everything the page needs. Raises UweError for every bad input (also
    when `out` is one of the images)."""
    from uwe_cli.selection.request import check_memory

    started = time.perf_counter()
    settings = resolve_settings(opts)
    picks = load_picks(batch, pools, opts.class_names, settings["uncertainty"])
    source = picks.source
    check_memory(source, None)
    names = source.parquet[0].schema_arrow.names
    has_u = source.kind == "detection" or settings["uncertainty"] != "auto"
    has_u = has_u or any(c in names for c in ("entropy", "bvsb", "least_confidence"))
    pool = source.read(settings["uncertainty"], need_uncertainty=has_u)
    notes = []
    labeled_rows = np.zeros(0, dtype=np.int64)
    if opts.labeled is not None:
        labeled_rows, missing = rows_of(read_id_file(opts.labeled, "--labeled"), pool.ids)
        if missing:
            notes.append(f"{missing} labeled IDs are not in the pool (not shown)")
    picked = _picked_rows(pool.ids, picks)
    rng = np.random.default_rng(opts.seed)
    rows = subsample(pool.size, np.concatenate([picked, labeled_rows]), opts.max_points, rng)
    if rows.size < pool.size:
        notes.append(
            f"map: {rows.size:,} of {pool.size:,} units (every picked and labeled unit, the rest sampled)"
        )
    if isinstance(pool, DetectionPool):
        xy, u = _detection_map(pool, rows, settings, opts.map, opts.seed)
        u_label = f"image uncertainty: max normalised {pool.uncertainty_column} of its boxes"
    else:
        xy, u = _unit_map(pool, rows, settings, opts.map, opts.seed)
        u_label = f"{pool.uncertainty_column} ({settings['normalize']}-normalised)"
        if u is None:
            u_label = "no uncertainty column"
    lo, hi = xy.min(axis=0), xy.max(axis=0)
    xy = (xy - lo) / np.where(hi > lo, hi - lo, 1.0)
    category = np.zeros(rows.size, dtype=np.int8)
    category[np.isin(rows, labeled_rows)] = 1
    position = {int(r): k for k, r in enumerate(picked)}
    map_pick = np.array([position.get(int(r), -1) for r in rows], dtype=np.int64)
    category[map_pick >= 0] = 2

    thumbs, missing_heat = make_thumbnails(picks, opts, progress, out=out)
    if missing_heat:
        notes.append(f"{missing_heat} picks have no heatmap in {opts.heatmaps}")
    shown_settings = {k: settings[k] for k in SETTING_KEYS if k in settings}
    shown_settings["map"] = opts.map
    if opts.labeled is not None:
        shown_settings["labeled"] = f"{opts.labeled} ({labeled_rows.size:,} in the pool)"
    title = opts.title or f"uwe batch: {storage.name(batch)}"
    data = ReportData(
        title=title,
        picks=picks,
        thumbs=thumbs,
        settings=shown_settings,
        metadata=dict(picks.metadata),
        pool_size=pool.size,
        labeled=int(labeled_rows.size),
        map_method=opts.map,
        map_xy=xy,
        map_category=category,
        map_pick=map_pick,
        pool_uncertainty=u,
        batch_uncertainty=None if u is None else u[picked],
        uncertainty_label=u_label,
        notes=notes,
    )
    data.summary = {
        "picks": len(picks),
        "pool_size": pool.size,
        "labeled": int(labeled_rows.size),
        "map_points": int(rows.size),
        "map": opts.map,
        "seconds": round(time.perf_counter() - started, 3),
    }
    return data


def run_report(
    batch: str | Path,
    pools: Sequence[str | Path],
    out: Output,
    opts: ReportOptions,
    progress: Progress | None = None,
) -> dict[str, Any]:
    """Build the report and write the HTML file (atomically; nothing on any error). Returns a summary."""
    from uwe_cli.report.render import write_page

    data = build_report(batch, pools, opts, progress, out)
    with open_output(out) as stream:
        size = write_page(data, stream)
    return {**data.summary, "bytes": size, "out": str(out), "notes": data.notes}


__all__ = ["Pick", "ReportData", "ReportOptions", "build_report", "run_report"]
