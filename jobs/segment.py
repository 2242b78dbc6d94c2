"""Segment every image of an archive with Mask R-CNN on Ray; one Parquet row per instance.

    python -m jobs.segment SOURCE --output DEST [options]
    python -m jobs.segment --resume DEST [--shards 3,17]

Exit codes: 0 all shards committed; 2 usage error; 3 some shards failed (the
resume command is printed).
"""

from __future__ import annotations

import argparse
import logging
import sys

from jobs._cli import ArgumentParser, fail_usage, run_main, scale_factor
from pipeline import lock, segment, storage
from pipeline.card import TTA_MODES, ModelLoadError
from pipeline.plan import PlanError
from pipeline.preprocess import parse_channel


def _parser() -> ArgumentParser:
    parser = ArgumentParser(prog="jobs.segment", description=__doc__.splitlines()[0])
    parser.add_argument("source", nargs="?", help="folder or URI (s3://, gs://, file://) of images")
    parser.add_argument("--output", help="run folder or URI (DEST) for a new run")
    parser.add_argument("--resume", metavar="DEST", help="finish the run at DEST: redo shards not committed")
    parser.add_argument("--shards", help="with --resume: redo exactly these shard ids (e.g. 3,17)")
    model = parser.add_argument_group("model (pinned in run.json)")
    model.add_argument("--model", help="checkpoint path/URI or torchvision:NAME (default: the bundled model)")
    model.add_argument("--weights", help="for torchvision:NAME: DEFAULT (local cache) or a state-dict path")
    model.add_argument(
        "--score-threshold",
        type=float,
        help="minimum detection score (default: the card's; bundled model 0.8)",
    )
    model.add_argument(
        "--mask-threshold",
        type=float,
        help="mask probability threshold (default: the card's; bundled model 0.5)",
    )
    model.add_argument(
        "--max-detections", type=int, help="instances per image cap (default: the card's; bundled model 500)"
    )
    model.add_argument(
        "--overlap-suppression",
        type=float,
        metavar="FRACTION",
        help="drop an instance whose mask overlaps a higher-scoring one by more than this fraction "
        f"of the smaller mask; 1 disables (default {segment.DEFAULT_OVERLAP_THRESHOLD})",
    )
    model.add_argument(
        "--exclusive-pixels",
        action=argparse.BooleanOptionalAction,
        help="give each pixel to the highest-scoring instance only "
        f"(default {'on' if segment.DEFAULT_EXCLUSIVE_PIXELS else 'off'})",
    )
    model.add_argument(
        "--channel",
        help="input channel the model sees: an index, a name (red, green, blue, gray, c0..., or an "
        "OME-TIFF channel name), max or rgb (default: the model card's; the bundled model's is max)",
    )
    model.add_argument(
        "--scale",
        type=scale_factor,
        help="resample plain images by this factor before the model (2: nuclei of 6 px are seen as "
        "12 px; masks and measurements stay in the image's pixels; slides: use --mpp), or auto: "
        "enlarge an image whose objects, found at native size, are under 1.5x the smallest the model "
        "was trained on (the card's object_diameter_px) (default auto)",
    )
    model.add_argument(
        "--tta",
        choices=TTA_MODES,
        help="test-time augmentation: the model also sees each image mirrored (flips: 4 views) or "
        "mirrored and transposed (dihedral: 8 views), and each object's detections are fused; one "
        "forward pass per view (default none)",
    )
    model.add_argument(
        "--pixel-size-um",
        type=float,
        help="µm per pixel of every image, for the *_um columns (default: each file's own metadata, "
        "OME-TIFF or TIFF resolution; else unknown)",
    )
    plan = parser.add_argument_group("plan (pinned in run.json)")
    plan.add_argument(
        "--shard-size",
        type=int,
        help="images per shard (default: chosen from the archive and the replicas, 16 to 1024)",
    )
    plan.add_argument("--slide-pattern", help="regex with a named group 'slide' (default: parent folder)")
    plan.add_argument(
        "--exclude",
        action="append",
        metavar="GLOB",
        help="leave out files whose path relative to SOURCE matches (repeat for several; '*' crosses "
        "folders): e.g. --exclude '*_labels.*' for label images kept beside their images",
    )
    plan.add_argument(
        "--max-pixels",
        type=int,
        help=f"larger images get status too_large (default {segment.DEFAULT_MAX_PIXELS})",
    )
    slides = parser.add_argument_group("whole slides (pinned in run.json; see README 'Whole slides')")
    slides.add_argument(
        "--tile-size",
        type=int,
        help=f"window side in px the model sees on slides and on larger plain images "
        f"(default {segment.DEFAULT_TILE_SIZE})",
    )
    slides.add_argument(
        "--tile-overlap",
        type=int,
        help="px shared by neighbouring windows, even (default: the model card's largest object, 64 for "
        "the bundled model)",
    )
    slides.add_argument(
        "--mpp",
        type=float,
        help="µm per px the model sees on slides (default: the model card's, 0.5 for the bundled model, for "
        "slides that state their pixel size; others at level 0)",
    )
    slides.add_argument(
        "--mpp-override", type=float, help="µm per level-0 px of every slide (replaces theirs)"
    )
    slides.add_argument(
        "--tissue",
        choices=("auto", "all"),
        help="auto: windows only where tissue is found on a low-resolution level (default); all: everywhere",
    )
    run = parser.add_argument_group("execution")
    run.add_argument(
        "--address", help="Ray cluster address (default: RAY_ADDRESS, else an embedded local Ray)"
    )
    run.add_argument("--replicas", type=int, help="model replicas (default: one per GPU, one without GPUs)")
    run.add_argument(
        "--gpus-per-replica", type=float, help="GPUs per replica; fractions pack several per GPU"
    )
    run.add_argument("--cpus-per-replica", type=float, help="CPUs reserved per replica (also torch threads)")
    run.add_argument(
        "--batch-size",
        type=int,
        help=f"images per forward pass (default {segment.DEFAULT_BATCH_SIZE}; on --resume, the run's)",
    )
    run.add_argument("--max-attempts", type=int, default=3, help="attempts per shard before it is failed")
    run.add_argument("--no-progress", action="store_true", help="no progress bar")
    return parser


def _check(parser: ArgumentParser, args) -> None:
    if args.resume and (args.source or args.output):
        parser.error("--resume DEST takes no SOURCE or --output")
    if not args.resume and not (args.source and args.output):
        parser.error("give SOURCE and --output DEST, or --resume DEST")
    if args.shards and not args.resume:
        parser.error("--shards needs --resume DEST")
    positive = {
        "--batch-size": args.batch_size,
        "--max-attempts": args.max_attempts,
        "--shard-size": args.shard_size,
        "--replicas": args.replicas,
        "--max-detections": args.max_detections,
        "--max-pixels": args.max_pixels,
        "--tile-size": args.tile_size,
    }
    for flag, value in positive.items():
        if value is not None and value < 1:
            parser.error(f"{flag} must be at least 1, got {value}")
    fractions = {
        "--score-threshold": args.score_threshold,
        "--mask-threshold": args.mask_threshold,
        "--overlap-suppression": args.overlap_suppression,
    }
    for flag, value in fractions.items():
        if value is not None and not 0 <= value <= 1:
            parser.error(f"{flag} must be in [0, 1], got {value}")
    for flag, value in {
        "--pixel-size-um": args.pixel_size_um,
        "--mpp": args.mpp,
        "--mpp-override": args.mpp_override,
    }.items():
        if value is not None and not value > 0:
            parser.error(f"{flag} must be > 0, got {value}")
    if args.tile_overlap is not None:
        tile = args.tile_size or segment.DEFAULT_TILE_SIZE
        if args.tile_overlap < 0 or args.tile_overlap % 2 or args.tile_overlap >= tile:
            parser.error(f"--tile-overlap must be even and in [0, {tile}), got {args.tile_overlap}")
    if args.gpus_per_replica is not None and args.gpus_per_replica < 0:
        parser.error("--gpus-per-replica must be >= 0")


def _shard_list(parser: ArgumentParser, text: str | None) -> list[int] | None:
    if text is None:
        return None
    try:
        shards = [int(part) for part in text.split(",") if part.strip()]
    except ValueError:
        parser.error(f"--shards takes comma-separated shard ids, got {text!r}")
    if not shards or min(shards) < 0:
        parser.error(f"--shards takes comma-separated non-negative shard ids, got {text!r}")
    return shards


def main(argv: list[str] | None = None) -> int:
    parser = _parser()
    args = parser.parse_args(argv)
    _check(parser, args)
    shards = _shard_list(parser, args.shards)
    logging.basicConfig(level=logging.INFO, format="%(message)s", stream=sys.stderr)
    pinned_flags = {
        "model": args.model,
        "weights": args.weights,
        "shard_size": args.shard_size,
        "slide_pattern": args.slide_pattern,
        "exclude": tuple(args.exclude) if args.exclude else None,
        "score_threshold": args.score_threshold,
        "mask_threshold": args.mask_threshold,
        "max_detections": args.max_detections,
        "max_pixels": args.max_pixels,
        "overlap_threshold": args.overlap_suppression,
        "exclusive_pixels": args.exclusive_pixels,
        "channel": parse_channel(args.channel) if args.channel is not None else None,
        "pixel_size_um": args.pixel_size_um,
        "scale": args.scale,
        "tile_size": args.tile_size,
        "tile_overlap": args.tile_overlap,
        "mpp": args.mpp,
        "mpp_override": args.mpp_override,
        "tissue": args.tissue,
        "tta": args.tta,
    }
    execution = segment.ExecutionSettings(
        address=args.address,
        replicas=args.replicas,
        gpus_per_replica=args.gpus_per_replica,
        cpus_per_replica=args.cpus_per_replica,
        batch_size=args.batch_size,
        max_attempts=args.max_attempts,
        progress=False if args.no_progress else None,
    )
    dest = args.resume or args.output
    try:
        for uri in filter(None, (args.source, dest)):
            storage.resolve(uri)  # refuses URIs with credentials before anything is written
        with lock.acquire(dest):
            if args.resume:
                report = segment.resume(dest, pinned_flags, execution, shards=shards)
            else:
                given = {k: v for k, v in pinned_flags.items() if v is not None}
                report = segment.new_run(dest, segment.PinnedSettings(source=args.source, **given), execution)
    except (segment.RunError, lock.RunLocked, storage.UnsafeURIError, PlanError, ModelLoadError) as exc:
        return fail_usage(parser.prog, str(exc))
    except OSError as exc:
        return fail_usage(parser.prog, f"storage: {storage.redact(str(exc))}")
    print(segment.format_report(report))
    return report.exit_code


if __name__ == "__main__":
    run_main(main)
