"""The ``scale`` benchmark: planning generated listings and the resume scan, without a model or torch.

Kept apart from :mod:`pipeline.bench` so that the process that plans imports
what the segment job's driver imports (no torch), and its memory is the
driver's.
"""

from __future__ import annotations

import contextlib
import os
import socket
import subprocess
import sys
import tempfile
import time
import urllib.request
import uuid
from collections.abc import Iterator
from concurrent.futures import ThreadPoolExecutor

import pyarrow.fs as pafs

from pipeline import commit


class SyntheticListing(pafs.FileSystemHandler):
    """A read-only filesystem that lists ``images`` PNG files without any file existing.

    Layout: ``/archive/slide-NNNNN/tile-NNNNN.png``, ``per_folder`` files per
    slide folder. Only listing works (what planning needs); ``folders_listed``
    counts the recursive folder listings served so far.
    """

    def __init__(self, images: int, per_folder: int = 1000):
        self.images, self.per_folder = images, per_folder
        self.folders = -(-images // per_folder)
        self.folders_listed = 0

    def get_type_name(self) -> str:
        return "synthetic-listing"

    def normalize_path(self, path: str) -> str:
        return path

    def get_file_info(self, paths):
        infos = []
        for path in paths:
            kind = pafs.FileType.Directory if path.rstrip("/") in ("/archive", "") else pafs.FileType.NotFound
            infos.append(pafs.FileInfo(path, kind))
        return infos

    def get_file_info_selector(self, selector):
        base = selector.base_dir.rstrip("/")
        if base == "/archive" and not selector.recursive:
            return [
                pafs.FileInfo(f"{base}/slide-{i:05d}", pafs.FileType.Directory) for i in range(self.folders)
            ]
        folder = int(base.rsplit("-", 1)[1])
        self.folders_listed += 1
        first = folder * self.per_folder
        count = min(self.per_folder, self.images - first)
        return [
            pafs.FileInfo(f"{base}/tile-{k:05d}.png", pafs.FileType.File, size=1000) for k in range(count)
        ]

    def _read_only(self, *args, **kwargs):
        raise OSError("a synthetic listing has no file contents")

    create_dir = delete_dir = delete_dir_contents = delete_root_dir_contents = delete_file = _read_only
    move = copy_file = open_input_stream = open_input_file = _read_only
    open_output_stream = open_append_stream = _read_only


def free_port() -> int:
    """A TCP port on 127.0.0.1 that nothing listens on now."""
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        return probe.getsockname()[1]


@contextlib.contextmanager
def s3_endpoint() -> Iterator[str]:
    """The S3 endpoint in ``AWS_ENDPOINT_URL``, or a ``moto_server`` on 127.0.0.1 for the block.

    With moto, test credentials are set in the environment for the block and
    the previous values restored after it.
    """
    given = os.environ.get("AWS_ENDPOINT_URL")
    if given:
        yield given
        return
    port = free_port()
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
                raise RuntimeError("moto_server did not start (is moto[server] installed?)") from None
            time.sleep(0.2)
    names = ("AWS_ENDPOINT_URL", "AWS_ACCESS_KEY_ID", "AWS_SECRET_ACCESS_KEY", "AWS_REGION")
    saved = {k: os.environ.get(k) for k in names}
    os.environ.update(
        AWS_ENDPOINT_URL=endpoint,
        AWS_ACCESS_KEY_ID="testing",
        AWS_SECRET_ACCESS_KEY="testing",
        AWS_REGION="us-east-1",
    )
    try:
        yield endpoint
    finally:
        server.terminate()
        server.wait(10)
        for key, value in saved.items():
            if value is None:
                os.environ.pop(key, None)
            else:
                os.environ[key] = value


def peak_rss_bytes() -> int:
    """This process's peak resident memory (``VmHWM``; unlike ``ru_maxrss`` it does not carry the
    peak of the process that forked it across ``exec``)."""
    with open("/proc/self/status") as status:
        for line in status:
            if line.startswith("VmHWM:"):
                return int(line.split()[1]) * 1024
    raise OSError("no VmHWM in /proc/self/status")


def _plan_in_this_process(images: int, per_folder: int, dest: str) -> dict[str, float]:
    """Plan a generated listing of ``images`` into ``dest`` (child-process body of :func:`bench_scale`)."""
    import ray  # noqa: F401  (the driver's modules: their memory counts)

    import pipeline.segment  # noqa: F401
    from pipeline.plan import ManifestWriter, Plan

    baseline = peak_rss_bytes()
    fs = pafs.PyFileSystem(SyntheticListing(images, per_folder))
    start = time.perf_counter()
    plan = Plan("/archive", shard_size=None, replicas=1, filesystem=fs)
    first = None
    sizes: dict[int, int] = {}
    with ManifestWriter(dest) as manifest:
        for shard in plan:
            manifest.write(shard)
            sizes[shard.shard_id] = shard.rows.num_rows  # what the scheduler keeps per shard
            first = first if first is not None else time.perf_counter() - start
    return {
        "images": manifest.images,
        "shards": len(sizes),
        "shard_size": plan.shard_size,
        "plan_s": round(time.perf_counter() - start, 2),
        "first_dispatch_s": round(first, 3),
        "driver_baseline_rss_bytes": baseline,
        "driver_peak_rss_bytes": peak_rss_bytes(),
        "driver_imports_torch": "torch" in sys.modules,
    }


def _resume_scan(markers: int) -> dict[str, float]:
    """Write ``markers`` committed markers on the S3 endpoint; time one listing and one GET per marker."""
    import boto3

    bucket = f"segpipe-bench-{uuid.uuid4().hex[:10]}"
    boto3.client("s3", endpoint_url=os.environ["AWS_ENDPOINT_URL"]).create_bucket(Bucket=bucket)
    dest = f"s3://{bucket}/runs/scale"
    with ThreadPoolExecutor(16) as pool:
        list(
            pool.map(
                lambda s: commit.write_json(commit.marker_uri(dest, s, "committed"), {"shard_id": s}),
                range(markers),
            )
        )
    start = time.perf_counter()
    states = commit.shard_states(dest)
    scan_s = time.perf_counter() - start
    if len(states.committed) != markers:
        raise AssertionError(f"the scan found {len(states.committed)} of {markers} markers")
    start = time.perf_counter()
    for shard_id in range(markers):
        commit.read_marker(dest, shard_id)
    return {
        "markers": markers,
        "resume_scan_s": round(scan_s, 2),
        "get_per_marker_s": round(time.perf_counter() - start, 2),
    }


def bench_scale(sizes=(100_000, 1_000_000), *, markers: int = 10_000, per_folder: int = 1000) -> list[dict]:
    """Planning at archive scale, and the resume scan, without a model or real files.

    For each size, a fresh process plans a generated listing
    (:class:`SyntheticListing`, ``per_folder`` images per slide folder) with
    the shard size chosen automatically, writes the manifest to a temporary
    folder and reports ``images``, ``shards``, ``plan_s``,
    ``first_dispatch_s`` (the first shard ready to hand out) and its peak RSS
    (``driver_peak_rss_bytes``, beside its RSS before planning). Then
    ``markers`` committed markers are written to S3 (``moto_server`` unless
    ``AWS_ENDPOINT_URL`` is set) and ``resume_scan_s`` times the one listing
    a resume makes, beside ``get_per_marker_s``, one GET per marker as runs
    before it did.
    """
    import multiprocessing

    results = []
    context = multiprocessing.get_context("spawn")
    for images in sizes:
        with tempfile.TemporaryDirectory(prefix="segpipe-scale-") as dest, context.Pool(1) as pool:
            results.append(pool.apply(_plan_in_this_process, (images, per_folder, dest)))
    with s3_endpoint():
        results.append(_resume_scan(markers))
    return results
