"""Benchmarks (ratios against a reference in the same process; figures go to BENCHMARKS.md).

python -m jobs.bench masks [--device cpu|cuda] [--repeats N] [--json]
python -m jobs.bench pipeline [--images N] [--size S] [--model M] [--device cpu|cuda] [--json]
python -m jobs.bench robustness [--model M] [--slides 4] [--tiles-per-slide 16] [--real DIR ...]
    [--cell-bodies F] [--scale auto|F] [--tta none|flips|dihedral] [--keep DIR] [--json]
python -m jobs.bench scale [--sizes 100000,1000000] [--markers 10000] [--json]
python -m jobs.bench slide [--slides 2] [--size 4096] [--tile-size 1024] [--model M] [--device D] [--json]
python -m jobs.bench train [--steps 20] [--size 256] [--batch-size 4] [--device cpu|cuda] [--json]
"""

from __future__ import annotations

import json
import platform
from pathlib import Path

from jobs._cli import ArgumentParser, run_main, scale_factor
from pipeline.card import TTA_MODES


def main(argv: list[str] | None = None) -> int:
    # Imports are inside, after the arguments are checked: a wrong flag is refused in a second, not
    # after torch's import (seconds); and `scale` plans in a fresh process that re-imports this
    # module and must not load torch (it measures the driver's memory; the driver never imports it).
    parser = ArgumentParser(prog="jobs.bench", description=__doc__.splitlines()[0])
    sub = parser.add_subparsers(dest="name", required=True)
    masks = sub.add_parser("masks", help="box-local encoding vs paste_masks_in_image + pycocotools + cv2")
    masks.add_argument("--device", choices=["cpu", "cuda"], default="cpu")
    masks.add_argument(
        "--repeats", type=int, default=3, help="timed repeats of the pipeline path (best kept)"
    )
    masks.add_argument("--cases", help="comma-separated SIZExCOUNT, e.g. 1024x200,2048x500")
    masks.add_argument("--json", action="store_true", help="one JSON object per case per line")
    pipe = sub.add_parser("pipeline", help="segment job vs the bare forward pass; first commit; memory")
    pipe.add_argument("--images", type=int, default=256, help="N: images in the ratio run (default 256)")
    pipe.add_argument("--size", type=int, default=256, help="tile side in px (default 256)")
    pipe.add_argument("--model", help="checkpoint or torchvision:NAME (default: the bundled model)")
    pipe.add_argument("--device", choices=["cpu", "cuda"], default="cpu")
    pipe.add_argument("--batch-size", type=int, default=4)
    pipe.add_argument("--shard-size", type=int, default=16)
    pipe.add_argument(
        "--memory-factor", type=int, default=10, help="the memory run uses this many times N images"
    )
    pipe.add_argument("--json", action="store_true", help="one JSON object")
    robust = sub.add_parser(
        "robustness", help="the model and an Otsu baseline on held-out, shifted and real archives"
    )
    robust.add_argument("--model", help="checkpoint or torchvision:NAME (default: the bundled model)")
    robust.add_argument("--slides", type=int, default=4)
    robust.add_argument("--tiles-per-slide", type=int, default=16)
    robust.add_argument("--size", type=int, default=256, help="tile side in px")
    robust.add_argument("--seed", type=int, default=0, help="archive seed (training used 100-135)")
    robust.add_argument(
        "--real",
        type=Path,
        action="append",
        default=[],
        help="folder of real images with *_labels.* label images beside, or with images/ and masks/ "
        "folders (label images at the images' relative paths); repeat for several, a row each",
    )
    robust.add_argument(
        "--cell-bodies",
        type=float,
        metavar="F",
        help="every archive with cell bodies in this fraction of its tiles (jobs.synth --cell-bodies)",
    )
    robust.add_argument(
        "--scale",
        type=scale_factor,
        default="auto",
        help="jobs.segment --scale for every archive (default auto; 1: native size, the reference)",
    )
    robust.add_argument(
        "--tta", choices=TTA_MODES, default="none", help="jobs.segment --tta for every archive (default none)"
    )
    robust.add_argument(
        "--keep",
        type=Path,
        metavar="DIR",
        help="keep the archives, the run (DIR/run) and each archive's truth (DIR/truth-NAME.json) in this "
        "new folder, e.g. to compare two models: jobs.evaluate DIR/run --annotations DIR/truth-noisy.json "
        "--compare OTHER_DIR/run (default: a temporary folder, deleted)",
    )
    robust.add_argument("--json", action="store_true", help="one JSON object per archive")
    scale = sub.add_parser("scale", help="plan generated listings; resume scan of markers on S3 (no model)")
    scale.add_argument("--sizes", default="100000,1000000", help="images per generated listing")
    scale.add_argument("--markers", type=int, default=10_000, help="markers in the resume scan")
    scale.add_argument("--per-folder", type=int, default=1000, help="images per slide folder")
    scale.add_argument("--json", action="store_true", help="one JSON object per line")
    slide = sub.add_parser("slide", help="whole slides: window reads, forward, the job; mm² and cells per s")
    slide.add_argument("--slides", type=int, default=2, help="synthetic SVS slides (default 2)")
    slide.add_argument("--size", type=int, default=4096, help="slide side in px (default 4096)")
    slide.add_argument("--tile-size", type=int, default=1024, help="window side in px (default 1024)")
    slide.add_argument("--model", help="checkpoint or torchvision:NAME (default: the bundled model)")
    slide.add_argument("--device", choices=["cpu", "cuda"], default="cpu")
    slide.add_argument("--batch-size", type=int, default=4)
    slide.add_argument("--json", action="store_true", help="one JSON object")
    training = sub.add_parser(
        "train", help="the training step against the one it replaced (batches ahead, RoIAlign backward)"
    )
    training.add_argument("--steps", type=int, default=20, help="training steps per run (default 20)")
    training.add_argument("--size", type=int, default=256, help="tile side in px (default 256)")
    training.add_argument("--batch-size", type=int, default=4)
    training.add_argument("--device", choices=["cpu", "cuda"], default="cpu")
    training.add_argument("--json", action="store_true", help="one JSON object")
    args = parser.parse_args(argv)
    if getattr(args, "device", "cpu") == "cuda":
        import torch

        if not torch.cuda.is_available():
            parser.error("--device cuda but CUDA is not available")
    if args.name == "pipeline":
        return _pipeline(parser, args)
    if args.name == "robustness":
        return _robustness(parser, args)
    if args.name == "scale":
        return _scale(parser, args)
    if args.name == "slide":
        return _slide(parser, args)
    if args.name == "train":
        return _train(parser, args)
    cases = None
    if args.cases:
        try:
            cases = tuple(tuple(int(v) for v in case.split("x")) for case in args.cases.split(","))
        except ValueError:
            parser.error(f"--cases takes SIZExCOUNT[,SIZExCOUNT...], got {args.cases!r}")
    parser.require_positive(args, "repeats")
    import torch

    from pipeline.bench import MASK_CASES, bench_masks

    results = bench_masks(cases or MASK_CASES, device=args.device, repeats=args.repeats)
    if args.json:
        for result in results:
            print(json.dumps(result))
        return 0
    print(
        f"machine: {platform.processor() or platform.machine()}, torch {torch.__version__}, "
        f"{torch.get_num_threads()} threads, device {args.device}"
    )
    print(
        f"{'image':>9} {'instances':>9} {'reference s':>12} {'pipeline s':>11} {'speedup':>8} "
        f"{'features s':>11} {'growth':>7} {'continuous s':>13} {'ratio':>6}"
    )
    for r in results:
        print(
            f"{r['size']:>7}^2 {r['instances']:>9} {r['reference_s']:>12.4f} {r['pipeline_s']:>11.4f} "
            f"{r['speedup']:>7.1f}x {r['features_s']:>11.4f} {r['feature_growth']:>6.0%} "
            f"{r['continuous_s']:>13.4f} {r['continuous_ratio']:>5.2f}x"
        )
    return 0


def _pipeline(parser, args) -> int:
    parser.require_positive(args, "images", "size", "batch_size", "shard_size", "memory_factor")
    from pipeline.bench import bench_pipeline

    result = bench_pipeline(
        images=args.images,
        size=args.size,
        model=args.model,
        device=args.device,
        batch_size=args.batch_size,
        shard_size=args.shard_size,
        memory_factor=args.memory_factor,
    )
    return _print_result(result, args)


def _robustness(parser, args) -> int:
    parser.require_positive(args, "slides", "tiles_per_slide", "size")
    from pipeline.evaluate import labelled_images

    for folder in args.real:
        if not folder.is_dir():
            parser.error(f"--real {folder} is not a folder")
        if not labelled_images(folder):
            parser.error(
                f"--real {folder} has no image with a NAME_labels label image beside it, "
                "nor images/ and masks/ folders of them"
            )
    if len({folder.name for folder in args.real}) < len(args.real):
        parser.error("--real folders must have different names (each names its row)")
    parser.require_fraction(args, "cell_bodies")
    if args.keep is not None and args.keep.exists() and (not args.keep.is_dir() or any(args.keep.iterdir())):
        parser.error(f"--keep {args.keep} is not an empty folder; give a new one")
    import pandas as pd

    from pipeline.bench import bench_robustness

    rows = bench_robustness(
        model=args.model,
        slides=args.slides,
        tiles_per_slide=args.tiles_per_slide,
        size=args.size,
        seed=args.seed,
        real=args.real,
        cell_bodies=args.cell_bodies,
        scale=args.scale,
        tta=args.tta,
        workdir=args.keep,
    )
    if args.json:
        for row in rows:
            print(json.dumps(row))
        return 0
    print(_machine())
    print(pd.DataFrame(rows).to_string(index=False))
    return 0


def _scale(parser, args) -> int:
    try:
        sizes = [int(v) for v in args.sizes.split(",")]
    except ValueError:
        parser.error(f"--sizes takes comma-separated image counts, got {args.sizes!r}")
    if min(sizes) < 1 or args.markers < 1 or args.per_folder < 1:
        parser.error("--sizes, --markers and --per-folder must be at least 1")
    from pipeline.bench_scale import bench_scale

    for row in bench_scale(sizes, markers=args.markers, per_folder=args.per_folder):
        print(json.dumps(row) if args.json else "  ".join(f"{k}={v}" for k, v in row.items()))
    return 0


def _slide(parser, args) -> int:
    parser.require_positive(args, "slides", "size", "tile_size", "batch_size")
    if args.tile_size <= 64:
        parser.error("--tile-size must be larger than the 64 px overlap")
    from pipeline.bench_slide import bench_slide

    result = bench_slide(
        slides=args.slides,
        size=args.size,
        tile_size=args.tile_size,
        model=args.model,
        device=args.device,
        batch_size=args.batch_size,
    )
    return _print_result(result, args)


def _train(parser, args) -> int:
    parser.require_positive(args, "steps", "size", "batch_size")
    from pipeline.bench_train import bench_train

    result = bench_train(steps=args.steps, size=args.size, batch_size=args.batch_size, device=args.device)
    return _print_result(result, args)


def _print_result(result: dict, args) -> int:
    """One benchmark's figures: one JSON object (``--json``), or a line per figure after the machine."""
    if args.json:
        print(json.dumps(result))
        return 0
    print(f"{_machine()}, {args.device}")
    for key, value in result.items():
        print(f"{key:>24}: {value}")
    return 0


def _machine() -> str:
    import torch

    return f"machine: {platform.processor() or platform.machine()}, torch {torch.__version__}"


if __name__ == "__main__":
    run_main(main)
