"""``jobs.bench train``: today's training step against the step it replaced, side by side.

On a synthetic archive: the time one thread takes to build a batch
(``batch_build_ms``: decode, the card's preprocessing, augmentation,
targets), then the same training run three times from the same start, after
a short warm-up:

* ``reference``: each batch built when its step begins, torchvision's CPU
  kernel for RoIAlign's backward (training as it was);
* ``prefetched``: batches built ahead on threads
  (:data:`pipeline.train.PREFETCH_BATCHES`), torchvision's kernel;
* ``default``: batches ahead and, on CPU, :mod:`pipeline.roi_align_grad`'s
  kernel (what ``jobs.train`` does).

``reference`` and ``prefetched`` see identical batches and, on CPU, end with
the same weights (``same_weights``; on CUDA it is None: torchvision's RoIAlign
backward adds with atomics there, so two runs of the same batches part by
rounding, which an H200 run showed; the batches' identity is tested on CPU by
``tests/test_train.py``). ``default``'s gradients differ from torchvision's
by float rounding: ``gradient_difference`` is the largest difference of one
step's parameter gradients (relative to each tensor's largest gradient),
beside ``gradient_difference_threads``, the same between torchvision's kernel
on one thread and on all of torch's. Such differences grow over a training
run (Adam amplifies them), as a change of thread count does, so
``default``'s final weights are not compared with the others'.
``data_wait_*`` is the share of each run's loop spent waiting for a batch.
"""

from __future__ import annotations

import tempfile
import time
from dataclasses import replace
from pathlib import Path

import torch

from pipeline import synth
from pipeline.model import resolve_model
from pipeline.roi_align_grad import faster_backward
from pipeline.train import PREFETCH_BATCHES, CocoTiles, TrainConfig, initial_model, train, training_batch


def batch_build_ms(dataset: CocoTiles, config: TrainConfig, batches: int) -> float:
    """Median milliseconds to build one training batch of ``config`` on one thread."""
    seconds = []
    for step in range(batches):
        start = time.perf_counter()
        training_batch(dataset, config, step)
        seconds.append(time.perf_counter() - start)
    return 1000 * sorted(seconds)[len(seconds) // 2]


def _gradients(model: torch.nn.Module, batch: list, threads: int) -> dict[str, torch.Tensor]:
    before = torch.get_num_threads()
    torch.set_num_threads(threads)
    try:
        model.zero_grad()
        torch.manual_seed(0)
        losses = model([image for image, _ in batch], [target for _, target in batch])
        sum(losses.values()).backward()
    finally:
        torch.set_num_threads(before)
    return {name: p.grad.clone() for name, p in model.named_parameters() if p.grad is not None}


def gradient_differences(dataset: CocoTiles, config: TrainConfig) -> dict[str, float]:
    """``gradient_difference`` (this project's RoIAlign backward against torchvision's) and
    ``gradient_difference_threads`` (torchvision's on one thread against all of torch's) on the
    first batch of ``config``, for the model training starts from, on CPU whatever the run's device:
    the largest difference over the parameters, relative to each tensor's largest gradient."""
    batch = training_batch(dataset, config, 0)
    torch.manual_seed(config.seed)
    model, _ = initial_model(config, dataset.classes)
    model.train()
    threads = torch.get_num_threads()
    reference = _gradients(model, batch, threads)
    one_thread = _gradients(model, batch, 1)
    with faster_backward(model):
        faster = _gradients(model, batch, threads)

    def largest(other: dict[str, torch.Tensor]) -> float:
        scale = {k: reference[k].abs().max().clamp(min=1e-12) for k in reference}
        return max(float((reference[k] - other[k]).abs().max() / scale[k]) for k in reference)

    return {"gradient_difference": largest(faster), "gradient_difference_threads": largest(one_thread)}


def bench_train(
    *,
    steps: int = 20,
    size: int = 256,
    batch_size: int = 4,
    device: str = "cpu",
    workdir: Path | None = None,
) -> dict[str, object]:
    """The benchmark's figures (see the module docstring): ``steps`` training steps from scratch on
    batches of ``batch_size`` tiles of ``size`` px, each of the three ways."""
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
        for label, prefetch, faster in (
            ("reference", 0, False),
            ("prefetched", PREFETCH_BATCHES, False),
            ("default", PREFETCH_BATCHES, True),
        ):
            config = replace(config, output=str(root / f"{label}.pt"), steps=steps, checkpoint_every=steps)
            start = time.perf_counter()
            summary = train(config, progress=False, prefetch=prefetch, faster_roi_align=faster)
            runs[label] = (steps / (time.perf_counter() - start), summary["data_wait_fraction"])
        weights = {label: resolve_model(str(root / f"{label}.pt")).module.state_dict() for label in runs}
        dataset = CocoTiles(config.images, config.annotations, config.preprocessing)
        build_ms = batch_build_ms(dataset, config, batches=min(steps, 10))
        differences = gradient_differences(dataset, config)
    reference = weights["reference"]
    same = None
    if device == "cpu":
        same = all(torch.allclose(reference[k], weights["prefetched"][k], atol=1e-6) for k in reference)
        if not same:
            raise AssertionError("prefetched training ended with other weights than the in-line run")
    rate = {label: steps_per_s for label, (steps_per_s, _) in runs.items()}
    return {
        "steps": steps,
        "batch_size": batch_size,
        "size": size,
        "prefetch_batches": PREFETCH_BATCHES,
        "batch_build_ms": round(build_ms, 1),
        **{f"steps_per_s_{label}": round(value, 3) for label, value in rate.items()},
        "speedup_prefetch": round(rate["prefetched"] / rate["reference"], 3),
        "speedup": round(rate["default"] / rate["reference"], 3),
        **{f"data_wait_{label}": round(wait, 3) for label, (_, wait) in runs.items()},
        "same_weights": same,
        **differences,
    }
