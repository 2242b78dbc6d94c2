"""``jobs.bench train``: training with its batches built ahead against batches built in line.

On a synthetic archive: the time one thread takes to build a batch
(``batch_build_ms``: decode, the card's preprocessing, augmentation, targets),
then the same training run twice from the same start, once building each
batch when its step begins (``prefetch=0``, the reference) and once with
:data:`pipeline.train.PREFETCH_BATCHES` built ahead on threads. Both runs see
identical batches and end with the same weights (checked), so the difference
in ``steps_per_s`` is the waiting alone (a short run first warms up both); ``data_wait_*`` is the share
of each run's loop spent waiting for a batch.
"""

from __future__ import annotations

import tempfile
import time
from dataclasses import replace
from pathlib import Path

import torch

from pipeline import synth
from pipeline.model import resolve_model
from pipeline.train import PREFETCH_BATCHES, CocoTiles, TrainConfig, train, training_batch


def batch_build_ms(config: TrainConfig, batches: int) -> float:
    """Median milliseconds to build one training batch of ``config`` on one thread."""
    dataset = CocoTiles(config.images, config.annotations, config.preprocessing)
    seconds = []
    for step in range(batches):
        start = time.perf_counter()
        training_batch(dataset, config, step)
        seconds.append(time.perf_counter() - start)
    return 1000 * sorted(seconds)[len(seconds) // 2]


def bench_train(
    *,
    steps: int = 20,
    size: int = 256,
    batch_size: int = 4,
    device: str = "cpu",
    workdir: Path | None = None,
) -> dict[str, object]:
    """The benchmark's figures (see the module docstring): ``steps`` training steps from scratch on
    batches of ``batch_size`` tiles of ``size`` px, in line and prefetched."""
    with tempfile.TemporaryDirectory(dir=workdir) as tmp:
        root = Path(tmp)
        annotations = synth.write_archive(root / "archive", slides=1, tiles_per_slide=32, size=size, seed=7)
        config = TrainConfig(
            images=str(root / "archive"),
            annotations=str(annotations),
            output=str(root / "warm-up.pt"),
            steps=2,
            batch_size=batch_size,
            warmup_steps=1,
            device=device,
        )
        train(config, progress=False, prefetch=0)
        runs = {}
        for label, prefetch in (("inline", 0), ("prefetched", PREFETCH_BATCHES)):
            config = replace(config, output=str(root / f"{label}.pt"), steps=steps, checkpoint_every=steps)
            start = time.perf_counter()
            summary = train(config, progress=False, prefetch=prefetch)
            runs[label] = (steps / (time.perf_counter() - start), summary["data_wait_fraction"])
        weights = [resolve_model(str(root / f"{label}.pt")).module.state_dict() for label in runs]
        same = all(torch.allclose(weights[0][k], weights[1][k], atol=1e-6) for k in weights[0])
        if not same:
            raise AssertionError("prefetched training ended with other weights than the in-line run")
        build_ms = batch_build_ms(config, batches=min(steps, 10))
    (inline_rate, inline_wait), (prefetched_rate, prefetched_wait) = runs["inline"], runs["prefetched"]
    return {
        "steps": steps,
        "batch_size": batch_size,
        "size": size,
        "prefetch_batches": PREFETCH_BATCHES,
        "batch_build_ms": round(build_ms, 1),
        "steps_per_s_inline": round(inline_rate, 3),
        "steps_per_s_prefetched": round(prefetched_rate, 3),
        "speedup": round(prefetched_rate / inline_rate, 3),
        "data_wait_inline": round(inline_wait, 3),
        "data_wait_prefetched": round(prefetched_wait, 3),
        "same_weights": same,
    }
