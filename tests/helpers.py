"""Small helpers shared by tests."""

from __future__ import annotations

import os
import subprocess
import sys
import time
from collections.abc import Callable
from pathlib import Path

import cv2
import numpy as np
import psutil
import torch
import torch.nn.functional as F

from pipeline.decode import RawImage, read_and_decode
from pipeline.preprocess import Preprocessing, model_input
from pipeline.synth import write_slide
from tests.conftest import REPO


def prepared_tensor(uri: str, preprocessing: Preprocessing) -> torch.Tensor:
    """The image at ``uri`` as the model sees it: float (3, H, W), via the card's preprocessing."""
    raw = read_and_decode(uri, max_pixels=10**8)
    assert isinstance(raw, RawImage), raw
    prepared = model_input(raw.pixels, preprocessing, channel_names=raw.channel_names)
    return torch.from_numpy(prepared).expand(3, -1, -1)


def continuous_reference(
    probs: torch.Tensor, boxes: torch.Tensor, i: int, size: tuple[int, int], threshold: float
) -> np.ndarray:
    """Instance i's mask grid pasted over the whole image (H, W) = ``size`` in continuous coordinates
    (Detectron2's paste): every pixel centre (x + 0.5, y + 0.5) sampled in the box's grid, zero
    outside it; bool (H, W) of probability >= ``threshold``."""
    height, width = size
    x0, y0, x1, y1 = boxes[i]
    along_x = ((torch.arange(width, dtype=torch.float32) + 0.5) - x0) / (x1 - x0) * 2 - 1
    along_y = ((torch.arange(height, dtype=torch.float32) + 0.5) - y0) / (y1 - y0) * 2 - 1
    grid = torch.stack([along_x[None, :].expand(height, -1), along_y[:, None].expand(-1, width)], -1)
    sampled = F.grid_sample(probs[i][None, None], grid[None], padding_mode="zeros", align_corners=False)
    return (sampled[0, 0] >= threshold).numpy()


def painted_slide(
    path: Path,
    discs: list[tuple[float, float, float]],
    *,
    size: int = 768,
    compression: str = "zlib",
    seed: int = 0,
) -> np.ndarray:
    """Write an SVS slide (``size`` px, 0.5 µm/px, 3 levels) of bright soft-edged nuclei ``discs``
    (centre x, centre y, radius; level-0 px) on dark noisy glass; return its label map (int32)."""
    rng = np.random.default_rng(seed)
    labels = np.zeros((size, size), np.int32)
    for k, (x, y, radius) in enumerate(discs, start=1):
        cv2.ellipse(labels, (round(x), round(y)), (round(radius), round(radius * 0.8)), 0, 0, 360, k, -1)
    signal = cv2.GaussianBlur((labels > 0).astype(np.float32), (0, 0), 1.2) * rng.uniform(110, 190)
    grey = 12 + signal + rng.normal(0, 2.0, signal.shape)
    pixels = np.clip(np.stack([grey * 0.3, grey * 0.2, grey], axis=2), 0, 255).astype(np.uint8)
    write_slide(path, pixels, compression=compression)
    return labels


def run_job(module: str, *args: str, timeout: int) -> subprocess.CompletedProcess:
    """``python -m MODULE ARGS`` in the repository, output captured as text."""
    return subprocess.run(
        [sys.executable, "-m", module, *args], capture_output=True, text=True, cwd=REPO, timeout=timeout
    )


def start_segment_driver(source: str, dest: str, model: Path, settings: list) -> subprocess.Popen:
    """``python -m jobs.segment SOURCE --output DEST --model MODEL SETTINGS`` started quietly in a
    process group of its own (so its embedded Ray can be found and killed with it), with any
    ``RAY_ADDRESS`` of the test session removed so the job starts its own Ray."""
    command = [sys.executable, "-m", "jobs.segment", source, "--output", dest]
    command += [str(a) for a in [*settings, "--model", model, "--no-progress"]]
    return subprocess.Popen(
        command,
        cwd=REPO,
        env={k: v for k, v in os.environ.items() if k != "RAY_ADDRESS"},
        stdout=subprocess.DEVNULL,
        stderr=subprocess.DEVNULL,
        start_new_session=True,
    )


def process_group(pgid: int) -> list[psutil.Process]:
    """The live (not zombie) processes of process group ``pgid``."""
    members = []
    for proc in psutil.process_iter():
        try:
            if os.getpgid(proc.pid) == pgid and proc.status() != psutil.STATUS_ZOMBIE:
                members.append(proc)
        except (ProcessLookupError, psutil.Error):
            continue
    return members


def wait_for_first_commit(
    markers: Path | None = None, list_markers: Callable[[], list] | None = None, timeout: float = 120
) -> None:
    """Return once a shard's commit marker exists: a ``shard-*.json`` in the local folder
    ``markers``, or anything ``list_markers()`` returns (for object stores)."""
    deadline = time.monotonic() + timeout
    while not (list_markers() if list_markers else list(markers.glob("shard-*.json"))):
        if time.monotonic() > deadline:
            raise TimeoutError("no shard committed")
        time.sleep(0.05)


def painted_nuclei_png(path, width: int, height: int, seed: int) -> list[tuple[float, float, float]]:
    """A grey PNG of soft-edged bright nuclei (two on the seams of 512 px windows overlapping by 64)."""
    rng = np.random.default_rng(seed)
    discs = [(448.0, 300.0, 15.0), (896.0, 448.0, 15.0)]
    while len(discs) < 50:
        x, y, r = rng.uniform(30, width - 30), rng.uniform(30, height - 30), rng.uniform(9, 16)
        if all((x - a) ** 2 + (y - b) ** 2 > (r + c + 12) ** 2 for a, b, c in discs):
            discs.append((x, y, r))
    labels = np.zeros((height, width), np.uint8)
    for x, y, r in discs:
        cv2.ellipse(labels, (round(x), round(y)), (round(r), round(r * 0.8)), 0, 0, 360, 1, -1)
    signal = cv2.GaussianBlur(labels.astype(np.float32), (0, 0), 1.2) * 150
    cv2.imwrite(str(path), np.clip(12 + signal + rng.normal(0, 2, signal.shape), 0, 255).astype(np.uint8))
    return discs
