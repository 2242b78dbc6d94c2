"""``jobs.bench slide``: whole slides through the segment job against the bare forward pass.

On synthetic SVS slides (JPEG tiles, tissue pieces on glass): windows read
and decoded alone (``tiles_per_s_read``), the model's forward alone on the
same windows (``forward_images_per_s``), and the whole job from plan to last
commit (``pipeline_images_per_s``, their ``ratio``), with the units the field
reports (mm² of tissue and cells per second), the job's peak memory, and
the GeoJSON export's rate.
"""

from __future__ import annotations

import shutil
import tempfile
import time
from pathlib import Path

import numpy as np

from pipeline import segment, synth
from pipeline.bench import PeakMemory, bare_forward_images_per_s
from pipeline.export import write_geojson
from pipeline.inputs import InputReader
from pipeline.plan import Plan


def _window_rows(source: Path, pinned: segment.PinnedSettings) -> tuple[list[dict], list[dict]]:
    """(manifest rows of every window, slides rows) of the plan the job makes of ``source``."""
    plan = Plan(str(source), shard_size=1024, slide_settings=pinned.slide_settings())
    rows = [row for shard in plan for row in shard.rows.to_pylist()]
    return rows, plan.slides


def read_tiles_per_s(rows: list[dict]) -> float:
    """Windows per second read and decoded by one replica's reader, one after the other."""
    reader = InputReader(max_pixels=segment.DEFAULT_MAX_PIXELS)
    try:
        start = time.perf_counter()
        for row in rows:
            found = reader.read(row)
            if not hasattr(found, "raw"):
                raise RuntimeError(f"window not readable: {found}")
        return len(rows) / (time.perf_counter() - start)
    finally:
        reader.close()


def bench_slide(
    *,
    slides: int = 2,
    size: int = 4096,
    tile_size: int = 1024,
    model: str | None = None,
    device: str = "cpu",
    batch_size: int = 4,
    workdir: Path | None = None,
) -> dict[str, object]:
    """The benchmark's figures (see the module docstring) on ``slides`` synthetic slides of ``size`` px."""
    import ray

    own_tmp = workdir is None
    root = Path(tempfile.mkdtemp(prefix="segpipe-slide-bench-")) if own_tmp else Path(workdir)
    try:
        source = root / "slides"
        synth.write_slide_archive(source, slides=slides, size=size, seed=11)
        pinned = segment.PinnedSettings(source=str(source), model=model, tile_size=tile_size, tile_overlap=64)
        rows, slide_rows = _window_rows(source, pinned)
        read_rate = read_tiles_per_s(rows)
        segment.connect_ray("local")
        gpus = 1.0 if device == "cuda" else 0.0
        execution = segment.ExecutionSettings(
            replicas=1, gpus_per_replica=gpus, batch_size=batch_size, progress=False
        )
        threads = int(segment.replica_layout(execution)[2])
        forward = bare_forward_images_per_s(
            model, rows, batch_size=batch_size, device=device, threads=threads
        )
        with PeakMemory() as memory:
            start = time.perf_counter()
            report = segment.new_run(str(root / "run"), pinned, execution)
            wall = time.perf_counter() - start
        if report.failed or report.images_error:
            raise RuntimeError(f"benchmark run not clean: {segment.format_report(report)}")
        start = time.perf_counter()
        exported = 0
        for slide_row in slide_rows:
            with open(root / "export.geojson", "w") as stream:
                exported += write_geojson(str(root / "run"), stream, slide=slide_row["slide_id"])
        export_s = time.perf_counter() - start
        planned = sum(r["tiles_planned"] for r in slide_rows)
        total = sum(r["tiles_total"] for r in slide_rows)
        tissue_mm2 = float(np.nansum([r["tissue_area_mm2"] or np.nan for r in slide_rows]))
        pipeline_rate = len(rows) / wall
        return {
            "slides": slides,
            "slide_px": size,
            "tile_size": tile_size,
            "windows": len(rows),
            "device": device,
            "batch_size": batch_size,
            "threads": threads,
            "tiles_per_s_read": round(read_rate, 3),
            "forward_images_per_s": round(forward, 3),
            "read_over_forward": round(read_rate / forward, 2),
            "pipeline_images_per_s": round(pipeline_rate, 3),
            "ratio": round(pipeline_rate / forward, 3),
            "steady_ratio": round(len(rows) / (wall - report.replicas_ready_s) / forward, 3),
            "background_skipped": round(1 - planned / total, 3),
            "tissue_mm2": round(tissue_mm2, 3),
            "mm2_per_s": round(tissue_mm2 / wall, 4),
            "cells": report.instances,
            "cells_per_s": round(report.instances / wall, 2),
            "instances_cut": report.instances_cut,
            "geojson_features_per_s": round(exported / export_s, 1),
            "wall_s": round(wall, 2),
            "peak_rss_bytes": memory.peak_bytes,
            "peak_rss_by_role": memory.peak_by_role,
        }
    finally:
        if ray.is_initialized():
            ray.shutdown()
        if own_tmp:
            shutil.rmtree(root, ignore_errors=True)
