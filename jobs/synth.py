"""Write a synthetic nuclei archive with COCO ground truth: tiles, or whole slides (SVS).

python -m jobs.synth DEST --slides 4 --tiles-per-slide 16 --size 256 --seed 0 \
    [--shift NAME] [--empty-fraction F] [--cell-bodies F] [--workers N]
python -m jobs.synth DEST --whole-slides --slides 2 [--size 3072] [--seed 0]
"""

from __future__ import annotations

import os
from dataclasses import replace

from jobs._cli import ArgumentParser, run_main
from pipeline.synth import SHIFTS, SLIDE_MPP, TRAINING, write_archive, write_slide_archive


def main(argv: list[str] | None = None) -> int:
    parser = ArgumentParser(prog="jobs.synth", description=__doc__.splitlines()[0])
    parser.add_argument("dest", help="output folder: DEST/<slide>/<tile>.png, DEST/annotations.json")
    parser.add_argument("--slides", type=int, default=4)
    parser.add_argument("--tiles-per-slide", type=int, default=16)
    parser.add_argument("--size", type=int, help="tile side in pixels (default 256; --whole-slides: 3072)")
    parser.add_argument(
        "--whole-slides",
        action="store_true",
        help="write pyramidal SVS slides (DEST/slide-NNN.svs, tissue with nuclei on glass, JPEG tiles, "
        f"{SLIDE_MPP} µm/px) with COCO ground truth in level-0 slide coordinates",
    )
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument(
        "--shift",
        choices=sorted(SHIFTS),
        help="draw tiles from ranges outside the training ones (robustness archives; default: training)",
    )
    parser.add_argument(
        "--empty-fraction",
        type=float,
        help=f"fraction of tiles with no nucleus, background only (default {TRAINING.empty_fraction})",
    )
    parser.add_argument(
        "--cell-bodies",
        type=float,
        metavar="F",
        help="fraction of tiles whose nuclei sit in a faint cell body, a dim crescent beside each "
        f"(default {TRAINING.cytoplasm_fraction}: the bundled model was chosen without them)",
    )
    parser.add_argument(
        "--workers",
        type=int,
        default=os.cpu_count() or 1,
        help="processes rendering tiles (default: this machine's cores; the archive is the same for any)",
    )
    args = parser.parse_args(argv)
    args.size = args.size or (3072 if args.whole_slides else 256)
    parser.require_positive(args, "slides", "tiles_per_slide", "size", "workers")
    if args.whole_slides:
        if args.shift or args.empty_fraction is not None or args.cell_bodies is not None:
            parser.error("--shift, --empty-fraction and --cell-bodies are for tile archives")
        path = write_slide_archive(args.dest, slides=args.slides, size=args.size, seed=args.seed)
        print(f"wrote {args.slides} slides of {args.size}x{args.size} px and {path}")
        return 0
    parser.require_fraction(args, "empty_fraction", "cell_bodies")
    fractions = {"empty_fraction": args.empty_fraction, "cytoplasm_fraction": args.cell_bodies}
    look = replace(
        SHIFTS[args.shift] if args.shift else TRAINING,
        **{name: value for name, value in fractions.items() if value is not None},
    )
    path = write_archive(
        args.dest,
        slides=args.slides,
        tiles_per_slide=args.tiles_per_slide,
        size=args.size,
        seed=args.seed,
        look=look,
        workers=args.workers,
    )
    print(f"wrote {args.slides * args.tiles_per_slide} tiles and {path}")
    return 0


if __name__ == "__main__":
    run_main(main)
