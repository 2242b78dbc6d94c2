"""Shared fixtures: synthetic archives, small models, a real local Ray, a real S3 server.

S3: when ``AWS_ENDPOINT_URL`` is already set, the suite uses that endpoint
(with the credentials in the environment); otherwise it starts ``moto_server``
on 127.0.0.1 for the session.
"""

from __future__ import annotations

import uuid
from pathlib import Path

import pytest
import torch

from pipeline import bench_scale, preprocess
from pipeline.model import ModelCard, build_model, save_checkpoint
from pipeline.synth import write_archive

REPO = Path(__file__).resolve().parent.parent


@pytest.fixture(scope="session")
def s3_endpoint():
    """An S3 endpoint URL with credentials in the environment (moto_server unless one is given)."""
    with bench_scale.s3_endpoint() as endpoint:
        yield endpoint


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
