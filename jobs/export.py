"""Export a run's instances as COCO results JSON or QuPath-compatible GeoJSON.

python -m jobs.export DEST --format coco --output results.json [--annotations coco.json]
python -m jobs.export DEST --format geojson (--slide S | --image URI) --output S.geojson
"""

from __future__ import annotations

import json
from pathlib import Path

from jobs._cli import ArgumentParser, fail_usage, run_main
from pipeline import storage
from pipeline.export import coco_results, write_geojson


def main(argv: list[str] | None = None) -> int:
    parser = ArgumentParser(prog="jobs.export", description=__doc__.splitlines()[0])
    parser.add_argument("dest", help="run folder or URI")
    parser.add_argument("--format", choices=["coco", "geojson"], required=True)
    parser.add_argument("--output", required=True, help="file to write")
    parser.add_argument(
        "--annotations",
        help="coco: the ground truth's COCO file, whose image ids the results use "
        "(without it: the run's image ids, and OUTPUT.images.json maps them to files)",
    )
    parser.add_argument("--slide", help="geojson: the slide to export")
    parser.add_argument("--image", help="geojson: one tile's URI to export")
    args = parser.parse_args(argv)
    if args.format == "geojson" and not (args.slide or args.image):
        parser.error("--format geojson needs --slide or --image")
    if args.format == "coco" and (args.slide or args.image):
        parser.error("--slide and --image are for --format geojson")
    if not storage.exists(storage.join(args.dest, "run.json")):
        return fail_usage(parser.prog, f"no run at {storage.redact(args.dest)} (run.json not found)")
    output = Path(args.output)
    try:
        if args.format == "coco":
            results, images = coco_results(args.dest, args.annotations)
            output.write_text(json.dumps(results))
            message = f"wrote {len(results)} results to {output}"
            if images is not None:
                mapping = output.with_suffix(".images.json")
                mapping.write_text(json.dumps(images, indent=1))
                message += f" and their {len(images)} images to {mapping}"
        else:
            with output.open("w") as stream:
                count = write_geojson(args.dest, stream, slide=args.slide, image=args.image)
            message = f"wrote {count} features to {output}"
    except (OSError, ValueError) as exc:
        return fail_usage(parser.prog, str(exc))
    print(message)
    return 0


if __name__ == "__main__":
    run_main(main)
