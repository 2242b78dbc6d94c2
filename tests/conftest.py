"""Shared fixtures: synthetic archives, small models, a real local Ray, a real S3 server.

S3: when ``AWS_ENDPOINT_URL`` is already set, the suite uses that endpoint
(with the credentials in the environment); otherwise it starts ``moto_server``
on 127.0.0.1 for the session.
"""

from __future__ import annotations

import os
import socket
import subprocess
import sys
import time
import urllib.request
import uuid
from pathlib import Path

import pytest
import torch

from pipeline import preprocess
from pipeline.model import ModelCard, build_model, save_checkpoint
from pipeline.synth import write_archive

REPO = Path(__file__).resolve().parent.parent


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@pytest.fixture(scope="session")
def s3_endpoint():
    """An S3 endpoint URL with credentials in the environment (moto_server unless one is given)."""
    given = os.environ.get("AWS_ENDPOINT_URL")
    if given:
        yield given
        return
    port = _free_port()
    server = subprocess.Popen(
        [sys.executable, "-m", "moto.server", "-H", "127.0.0.1", "-p", str(port)],
        stdout=subprocess.DEVNULL,
        stderr=subprocess.DEVNULL,
    )
    endpoint = f"http://127.0.0.1:{port}"
    deadline = time.monotonic() + 30
    while True:
        try:
            urllib.request.urlopen(endpoint, timeout=1)
            break
        except OSError:
            if time.monotonic() > deadline or server.poll() is not None:
                server.kill()
                raise RuntimeError("moto_server did not start") from None
            time.sleep(0.2)
    saved = {
        k: os.environ.get(k)
        for k in ("AWS_ENDPOINT_URL", "AWS_ACCESS_KEY_ID", "AWS_SECRET_ACCESS_KEY", "AWS_REGION")
    }
    os.environ.update(
        AWS_ENDPOINT_URL=endpoint,
        AWS_ACCESS_KEY_ID="testing",
        AWS_SECRET_ACCESS_KEY="testing",
        AWS_REGION="us-east-1",
    )
    yield endpoint
    server.terminate()
    server.wait(10)
    for key, value in saved.items():
        if value is None:
            os.environ.pop(key, None)
        else:
            os.environ[key] = value


@pytest.fixture
def s3_bucket(s3_endpoint):
    """A fresh, empty bucket name on the session's S3 endpoint."""
    import boto3

    name = f"segpipe-test-{uuid.uuid4().hex[:12]}"
    boto3.client("s3", endpoint_url=s3_endpoint).create_bucket(Bucket=name)
    return name


@pytest.fixture(scope="session")
def ray_local(s3_endpoint):
    """A real embedded local Ray instance for the session (started after the S3 env is set).

    With the dashboard, which serves Ray's state API (the fault tests find replicas through it).
    """
    import ray

    ray.init(address="local", num_cpus=2, include_dashboard=True, log_to_driver=False)
    yield ray
    ray.shutdown()


@pytest.fixture(scope="session")
def archive(tmp_path_factory) -> Path:
    """A small synthetic archive: 2 slides x 3 tiles of 96 x 96 px, with annotations.json."""
    root = tmp_path_factory.mktemp("archive")
    write_archive(root, slides=2, tiles_per_slide=3, size=96, seed=11)
    return root


@pytest.fixture(scope="session")
def random_model_path(tmp_path_factory) -> Path:
    """A randomly initialised small Mask R-CNN checkpoint that detects (random) things.

    Score threshold 0 and a cap of 20 detections per image make every image
    produce instances, which exercises every column without a trained model.
    """
    torch.manual_seed(0)
    card = ModelCard(
        name="random-lite",
        architecture="maskrcnn_resnet18_fpn_lite",
        classes=("nucleus", "mitotic"),
        preprocessing=preprocess.DEFAULT,
        score_threshold=0.0,
        max_detections=20,
    )
    model = build_model(card).eval()
    path = tmp_path_factory.mktemp("models") / "random.pt"
    save_checkpoint(path, model, card)
    return path


@pytest.fixture(scope="session")
def segmented_run(ray_local, archive, random_model_path, tmp_path_factory) -> Path:
    """A finished run of the random model over ``archive`` (2 shards), for the analysis tests."""
    from jobs import segment as segment_job

    dest = tmp_path_factory.mktemp("segmented") / "run"
    argv = [str(archive), "--output", str(dest), "--model", str(random_model_path), "--shard-size", "4"]
    assert segment_job.main([*argv, "--no-progress"]) == 0
    return dest
