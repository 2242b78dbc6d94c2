"""QC pictures: one tile or a slide's contact sheet with instances drawn; a per-class area histogram.

python -m jobs.render DEST (--image URI | --slide S) --output qc.png [--labels]
    [--histogram hist.png [--feature area|solidity|intensity_mean[DAPI]|...]]
python -m jobs.render DEST --slide S --output S.png [--region X,Y,W,H]   # a whole-slide file
"""

from __future__ import annotations

import cv2

from jobs._cli import ArgumentParser, fail_usage, run_main
from pipeline import storage
from pipeline.render import (
    contact_sheet,
    feature_histogram,
    is_slide_file,
    render_image,
    slide_heatmap,
    slide_region,
)


def main(argv: list[str] | None = None) -> int:
    parser = ArgumentParser(prog="jobs.render", description=__doc__.splitlines()[0])
    parser.add_argument("dest", help="run folder or URI")
    which = parser.add_mutually_exclusive_group(required=True)
    which.add_argument("--image", help="URI of one tile, as in the images table")
    which.add_argument(
        "--slide",
        help="a slide: contact sheet of its tiles; for a whole-slide file, its thumbnail with a cell-density "
        "heatmap",
    )
    parser.add_argument(
        "--region", help="--slide of a whole-slide file: X,Y,W,H in level-0 px, drawn at full resolution"
    )
    parser.add_argument("--output", required=True, help="PNG to write")
    parser.add_argument(
        "--labels", action="store_true", help="write class initial and score on each instance"
    )
    parser.add_argument("--max-tiles", type=int, default=64, help="--slide: tiles in the sheet (default 64)")
    parser.add_argument("--histogram", help="--slide: also write a per-class histogram PNG here")
    parser.add_argument(
        "--feature",
        default="area",
        help="--histogram: the instance feature to plot (default area; e.g. solidity, intensity_mean[0])",
    )
    args = parser.parse_args(argv)
    if not args.output.lower().endswith(".png"):
        parser.error("--output must end in .png")
    if args.histogram and not args.slide:
        parser.error("--histogram needs --slide")
    if args.max_tiles < 1:
        parser.error("--max-tiles must be at least 1")
    region = None
    if args.region is not None:
        try:
            region = [int(part) for part in args.region.split(",")]
        except ValueError:
            region = []
        if len(region) != 4 or not args.slide:
            parser.error(f"--region takes X,Y,W,H (integers) with --slide, got {args.region!r}")
    if not storage.exists(storage.join(args.dest, "run.json")):
        return fail_usage(parser.prog, f"no run at {storage.redact(args.dest)} (run.json not found)")
    try:
        slide_file = args.slide is not None and is_slide_file(args.dest, args.slide)
        if region is not None and not slide_file:
            raise ValueError(f"--region is for whole-slide files; {args.slide!r} is not one in this run")
        if slide_file:
            picture = (
                slide_region(args.dest, args.slide, *region)
                if region
                else slide_heatmap(args.dest, args.slide)
            )
            if args.histogram:
                feature_histogram(args.dest, args.slide, args.histogram, feature=args.feature)
        elif args.image:
            picture = render_image(args.dest, args.image, labels=args.labels)
        else:
            picture = contact_sheet(args.dest, args.slide, labels=args.labels, max_tiles=args.max_tiles)
            if args.histogram:
                feature_histogram(args.dest, args.slide, args.histogram, feature=args.feature)
    except (OSError, ValueError) as exc:
        return fail_usage(parser.prog, str(exc))
    if not cv2.imwrite(args.output, cv2.cvtColor(picture, cv2.COLOR_RGB2BGR)):
        return fail_usage(parser.prog, f"could not write {args.output}")
    print(f"wrote {args.output} ({picture.shape[1]}x{picture.shape[0]} px)")
    return 0


if __name__ == "__main__":
    run_main(main)
