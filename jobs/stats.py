"""Per-slide (or per-image) instance statistics of a run.

python -m jobs.stats DEST [--by slide|image] [--class NAME] [--pixel-size-um X] [--features COL,...]
    [--output FILE.csv|.parquet]
"""

from __future__ import annotations

import pandas as pd

from jobs._cli import ArgumentParser, fail_usage, run_main
from pipeline import storage
from pipeline.stats import per_slide


def main(argv: list[str] | None = None) -> int:
    parser = ArgumentParser(prog="jobs.stats", description=__doc__.splitlines()[0])
    parser.add_argument("dest", help="run folder or URI")
    parser.add_argument("--by", choices=["slide", "image"], default="slide")
    parser.add_argument("--class", dest="class_name", help="only this class")
    parser.add_argument(
        "--pixel-size-um", type=float, help="pixel size in micrometres: areas in um^2, density per mm^2"
    )
    parser.add_argument(
        "--features",
        help="also mean and median of these instance columns, comma-separated: solidity, "
        "axis_major_length, intensity_mean (one column per channel) or intensity_mean[DAPI]...",
    )
    parser.add_argument("--output", help="write the table to FILE.csv or FILE.parquet instead of printing it")
    args = parser.parse_args(argv)
    if args.pixel_size_um is not None and args.pixel_size_um <= 0:
        parser.error("--pixel-size-um must be positive")
    if args.output and not args.output.endswith((".csv", ".parquet")):
        parser.error("--output must end in .csv or .parquet")
    if not storage.exists(storage.join(args.dest, "run.json")):
        return fail_usage(parser.prog, f"no run at {storage.redact(args.dest)} (run.json not found)")
    try:
        table = per_slide(
            args.dest,
            by=args.by,
            class_name=args.class_name,
            pixel_size_um=args.pixel_size_um,
            features=[f.strip() for f in args.features.split(",") if f.strip()] if args.features else None,
        )
    except ValueError as exc:
        return fail_usage(parser.prog, str(exc))
    if args.output:
        if args.output.endswith(".csv"):
            table.to_csv(args.output, index=False)
        else:
            table.to_parquet(args.output, index=False)
        print(f"wrote {len(table)} rows to {args.output}")
        return 0
    with pd.option_context(
        "display.width",
        200,
        "display.max_columns",
        30,
        "display.max_rows",
        500,
        "display.float_format",
        "{:.1f}".format,
    ):
        precise = {
            c: "{:.3f}".format
            for c in table.columns
            if c == "score_mean" or (c.endswith(("_mean", "_median")) and not c.startswith("area"))
        }
        print(table.to_string(index=False, formatters=precise))
    return 0


if __name__ == "__main__":
    run_main(main)
