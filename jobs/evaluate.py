"""Score a run against COCO ground truth: COCOeval, F1 at mask IoU 0.5, counts, the Otsu baseline.

python -m jobs.evaluate DEST --annotations coco.json [--json]
python -m jobs.evaluate DEST --labels MASKS_FOLDER [--label-suffix _labels] [--json]   # label images as truth
python -m jobs.evaluate DEST --annotations coco.json --sweep 0.3:0.9:0.1 [--plot sweep.png]
python -m jobs.evaluate DEST --annotations coco.json --misses [--score-threshold 0.5] [--json]
python -m jobs.evaluate DEST --annotations coco.json --compare OTHER_DEST [--score-threshold 0.5]
    [--other-score-threshold 0.7] [--json]
"""

from __future__ import annotations

import json
import tempfile
from pathlib import Path

import numpy as np
import pandas as pd

from jobs._cli import ArgumentParser, fail_usage, run_main
from pipeline import storage
from pipeline.evaluate import compare_ap50, evaluate, label_images_for_run, misses, plot_sweep, sweep


def value_table(values: dict[str, float | int], *, digits: int) -> str:
    """One line per entry, ``name  value``: floats to ``digits`` decimals, counts as whole numbers."""
    width = max(map(len, values), default=0)
    return "\n".join(
        f"{name:<{width}}  {value:.{digits}f}" if isinstance(value, float) else f"{name:<{width}}  {value}"
        for name, value in values.items()
    )


def _thresholds(parser: ArgumentParser, text: str) -> list[float]:
    try:
        start, stop, step = (float(v) for v in text.split(":"))
    except ValueError:
        parser.error(f"--sweep takes START:STOP:STEP, got {text!r}")
    if step <= 0 or not 0 <= start <= stop <= 1:
        parser.error(f"--sweep needs 0 <= START <= STOP <= 1 and STEP > 0, got {text!r}")
    return [round(v, 6) for v in np.arange(start, stop + step / 2, step)]


def main(argv: list[str] | None = None) -> int:
    parser = ArgumentParser(prog="jobs.evaluate", description=__doc__.splitlines()[0])
    parser.add_argument("dest", help="run folder or URI")
    truth = parser.add_mutually_exclusive_group(required=True)
    truth.add_argument("--annotations", help="COCO instances JSON of the same images")
    truth.add_argument(
        "--labels",
        metavar="FOLDER",
        help="instance label images (0 background, one id per object) under FOLDER at the images' "
        "relative paths, e.g. StarDist's masks/ beside images/; images without one are not scored",
    )
    parser.add_argument(
        "--label-suffix",
        default="",
        help="with --labels: the label image of NAME.ext is NAME<suffix>.* (default: the same name)",
    )
    parser.add_argument("--json", action="store_true", help="print one JSON object instead of tables")
    parser.add_argument("--sweep", metavar="START:STOP:STEP", help="score thresholds to sweep")
    parser.add_argument("--plot", help="with --sweep: write the sweep's PNG plot here")
    parser.add_argument(
        "--misses",
        action="store_true",
        help="where the errors are: recall per object size, per contrast-to-noise ratio and per "
        "contrast relative to the image's other objects, isolated against touching, and the kinds of "
        "false instances",
    )
    parser.add_argument(
        "--score-threshold",
        type=float,
        help="with --misses or --compare: keep instances scoring at least this (default: all the run stored)",
    )
    parser.add_argument(
        "--other-score-threshold",
        type=float,
        help="with --compare: keep OTHER_DEST's instances scoring at least this (default: "
        "--score-threshold), e.g. each model at its own card's threshold",
    )
    parser.add_argument(
        "--compare",
        metavar="OTHER_DEST",
        help="another run over the same images: both mask AP50s and the difference (OTHER - DEST) "
        "with its paired bootstrap standard error",
    )
    args = parser.parse_args(argv)
    if args.plot and not args.sweep:
        parser.error("--plot needs --sweep")
    if args.misses and args.sweep:
        parser.error("--misses and --sweep are separate reports; ask for one")
    if args.score_threshold is not None and not (args.misses or args.compare):
        parser.error("--score-threshold needs --misses or --compare")
    if args.other_score_threshold is not None and not args.compare:
        parser.error("--other-score-threshold needs --compare")
    if args.compare and (args.sweep or args.misses):
        parser.error("--compare is a report of its own; ask for it without --sweep or --misses")
    if args.label_suffix and not args.labels:
        parser.error("--label-suffix needs --labels")
    for run in filter(None, (args.dest, args.compare)):
        if not storage.exists(storage.join(run, "run.json")):
            return fail_usage(parser.prog, f"no run at {storage.redact(run)} (run.json not found)")
    with tempfile.TemporaryDirectory() as scratch:
        try:
            if args.labels:
                args.annotations = str(Path(scratch) / "annotations.json")
                coco = label_images_for_run(args.dest, args.labels, suffix=args.label_suffix)
                Path(args.annotations).write_text(json.dumps(coco))
            return _report(args, parser)
        except BrokenPipeError:
            raise  # the reader went away: run_main ends quietly
        except (OSError, ValueError, KeyError) as exc:
            return fail_usage(parser.prog, str(exc))


def _report(args, parser: ArgumentParser) -> int:
    """Print the report ``args`` ask for (``args.annotations``: a COCO file); 0."""
    if args.sweep:
        table = sweep(args.dest, args.annotations, _thresholds(parser, args.sweep))
        if args.plot:
            plot_sweep(table, args.plot)
        if args.json:
            print(json.dumps({"sweep": table.to_dict(orient="records")}))
        else:
            print(table.to_string(index=False, float_format="{:.3f}".format))
        return 0
    if args.misses:
        tables = misses(args.dest, args.annotations, score_threshold=args.score_threshold)
        if args.json:
            print(json.dumps({name: table.to_dict(orient="records") for name, table in tables.items()}))
        else:
            with pd.option_context("display.float_format", "{:.3f}".format, "display.width", 200):
                print(tables["recall"].to_string(index=False))
                print()
                print(tables["recall_by_contrast"].to_string(index=False))
                print()
                print(tables["recall_by_relative_contrast"].to_string(index=False))
                print()
                print(tables["false_instances"].to_string(index=False))
        return 0
    if args.compare:
        compared = compare_ap50(
            args.dest,
            args.compare,
            args.annotations,
            score_threshold=args.score_threshold,
            other_score_threshold=args.other_score_threshold,
        )
        if args.json:
            print(json.dumps(compared))
        else:
            print(value_table(compared, digits=4))
        return 0
    scores, tables = evaluate(args.dest, args.annotations)
    if args.json:
        print(json.dumps({**scores, "counts": tables["counts"].to_dict(orient="records")}))
        return 0
    print(value_table(scores, digits=3))
    print()
    with pd.option_context("display.float_format", "{:.3f}".format):
        print(tables["counts"].to_string(index=False))
    return 0


if __name__ == "__main__":
    run_main(main)
