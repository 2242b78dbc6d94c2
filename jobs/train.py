"""Train or fine-tune a Mask R-CNN on a COCO-annotated folder of images.

    python -m jobs.train --images DIR --annotations coco.json --output model.pt \
        [--init CHECKPOINT | torchvision:maskrcnn_resnet50_fpn] [--arch NAME] [--steps N]
        [--device cpu|cuda] [--prefetch N]
"""

from __future__ import annotations

import torch

from jobs._cli import ArgumentParser, fail_usage, run_main
from pipeline.model import ARCHITECTURES, ModelLoadError
from pipeline.preprocess import parse_channel
from pipeline.train import PREFETCH_BATCHES, TrainConfig, train


def main(argv: list[str] | None = None) -> int:
    parser = ArgumentParser(prog="jobs.train", description=__doc__.splitlines()[0])
    parser.add_argument("--images", required=True, help="folder the COCO file_name paths are relative to")
    parser.add_argument("--annotations", required=True, help="COCO instances JSON (RLE or polygons)")
    parser.add_argument("--output", required=True, help="checkpoint to write")
    parser.add_argument("--init", help="checkpoint or torchvision:NAME to fine-tune from")
    parser.add_argument("--init-weights", help="weights for a torchvision:NAME init (DEFAULT or PATH)")
    parser.add_argument("--arch", default="maskrcnn_resnet18_fpn_lite", choices=sorted(ARCHITECTURES))
    parser.add_argument(
        "--input-size", help="'native' or the shorter side in px (default: native, or the init's)"
    )
    parser.add_argument("--name", default="custom", help="model name for the card")
    parser.add_argument("--steps", type=int, default=1500)
    parser.add_argument("--batch-size", type=int, default=4)
    parser.add_argument("--lr", type=float, default=1e-3)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--device", default="cpu", choices=["cpu", "cuda"])
    parser.add_argument("--checkpoint-every", type=int, default=100)
    parser.add_argument("--half", action="store_true", help="store weights as fp16 (halves the file)")
    parser.add_argument("--threads", type=int, help="torch intra-op threads (default: torch's)")
    parser.add_argument(
        "--prefetch",
        type=int,
        default=PREFETCH_BATCHES,
        help=f"batches built ahead on this many threads (default {PREFETCH_BATCHES}; 0: each built when "
        "its step starts); raise it when the summary shows the model waiting for batches",
    )
    parser.add_argument(
        "--channel",
        default="max",
        help="input channel the model is trained on and its card records: max (default), rgb, "
        "an index or a name",
    )
    parser.add_argument(
        "--normalize",
        default="percentile",
        choices=["percentile", "range"],
        help="percentile (1 / 99.8 with a noise floor; default) or range (value / the type's range)",
    )
    args = parser.parse_args(argv)
    parser.require_positive(
        args, "steps", "batch_size", "checkpoint_every", *(["threads"] if args.threads is not None else [])
    )
    if args.prefetch < 0:
        parser.error("--prefetch must be at least 0")
    if args.device == "cuda" and not torch.cuda.is_available():
        parser.error("--device cuda but CUDA is not available")
    if args.threads:
        torch.set_num_threads(args.threads)
    config = TrainConfig(
        images=args.images,
        annotations=args.annotations,
        output=args.output,
        init=args.init,
        init_weights=args.init_weights,
        arch=args.arch,
        input_size=args.input_size,
        steps=args.steps,
        batch_size=args.batch_size,
        lr=args.lr,
        seed=args.seed,
        device=args.device,
        checkpoint_every=args.checkpoint_every,
        half=args.half,
        name=args.name,
        channel=parse_channel(args.channel),
        normalize=args.normalize,
    )
    try:
        summary = train(config, prefetch=args.prefetch)
    except (ModelLoadError, FileNotFoundError) as exc:
        return fail_usage(parser.prog, str(exc))
    if summary:
        print(
            f"loss {summary['first.total']:.3f} -> {summary['last.total']:.3f}; "
            f"waited for batches {summary['data_wait_fraction']:.0%} of the time; wrote {args.output}"
        )
    return 0


if __name__ == "__main__":
    run_main(main)
