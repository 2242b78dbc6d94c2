"""Fault injection with real processes and servers (DESIGN invariants 3 and 4).

Each test breaks something for real (kill -9 a replica or the driver, take
the S3 endpoint away, fail a shard on every attempt) and then checks that the
result equals a clean run's: every image once, no instance lost or doubled.
"""

from __future__ import annotations

import contextlib
import json
import os
import re
import shutil
import signal
import socket
import threading
import time
from pathlib import Path

import pandas as pd
import psutil
import pyarrow.fs as pafs
import pytest

from jobs import segment as segment_job
from pipeline.synth import tile_paths, write_archive
from tests.corpus import MAX_PIXELS, write_corpus
from tests.helpers import process_group, start_segment_driver, wait_for_first_commit

SETTINGS = ["--shard-size", 2, "--batch-size", 2]


def run(*args) -> int:
    return segment_job.main([str(a) for a in args] + ["--no-progress"])


def instances(dest) -> pd.DataFrame:
    table = pd.read_parquet(str(dest) + "/instances")
    return table.sort_values(["image_id", "instance_id"]).reset_index(drop=True)


def assert_same_rows(dest, reference, *, ignore=()) -> None:
    got, want = instances(dest), instances(reference)
    assert not got.duplicated(["image_id", "instance_id"]).any()
    pd.testing.assert_frame_equal(
        got.drop(columns=list(ignore)), want.drop(columns=list(ignore)), check_exact=True
    )
    images = pd.read_parquet(str(dest) + "/images")
    assert len(images) == images["image_id"].nunique() == 16
    assert (images["status"] == "ok").all()


@pytest.fixture(scope="module")
def slow_archive(tmp_path_factory) -> Path:
    """16 tiles of 256 px in 8 shards of 2: slow enough to be hit mid-run."""
    root = tmp_path_factory.mktemp("slow-archive")
    write_archive(root, slides=2, tiles_per_slide=8, size=256, seed=5)
    return root


@pytest.fixture(scope="module")
def clean_run(ray_local, slow_archive, random_model_path, tmp_path_factory) -> Path:
    dest = tmp_path_factory.mktemp("clean") / "run"
    assert run(slow_archive, "--output", dest, "--model", random_model_path, *SETTINGS) == 0
    return dest


def test_a_replica_killed_mid_run_loses_and_duplicates_nothing(
    ray_local, slow_archive, random_model_path, clean_run, tmp_path, capsys
):
    from ray.util.state import list_actors

    dest = tmp_path / "run"
    outcome = {}
    job = threading.Thread(
        target=lambda: outcome.update(
            code=run(slow_archive, "--output", dest, "--model", random_model_path, *SETTINGS)
        )
    )
    job.start()
    wait_for_first_commit(dest / "_commits")
    replicas = list_actors(
        address=ray_local.get_runtime_context().gcs_address,  # this session's Ray, not the newest on the host
        filters=[("class_name", "=", "ShardWorker"), ("state", "=", "ALIVE")],
        detail=True,
    )
    assert len(replicas) == 1
    os.kill(replicas[0].pid, signal.SIGKILL)
    job.join(300)
    assert outcome["code"] == 0
    captured = capsys.readouterr()
    assert "replica died" in captured.err and "retrying" in captured.err
    assert re.search(r"shards committed 8, failed 0, already done 0, retries [1-9]", captured.out)
    assert_same_rows(dest, clean_run)


def _is_ray_worker(proc: psutil.Process) -> bool:
    """A raylet or shard worker still alive; one that exits (or turns zombie) while it is read is not."""
    try:
        return "raylet" in proc.name() or "ShardWorker" in " ".join(proc.cmdline())
    except psutil.NoSuchProcess:  # ZombieProcess too
        return False


def test_a_killed_driver_is_resumed_without_redoing_committed_shards(
    ray_local, slow_archive, random_model_path, clean_run, tmp_path
):
    dest = tmp_path / "run"
    driver = start_segment_driver(str(slow_archive), str(dest), random_model_path, SETTINGS)
    try:
        wait_for_first_commit(dest / "_commits")
        os.kill(driver.pid, signal.SIGKILL)
        driver.wait(30)
        # Its embedded Ray's raylet and workers exit with it (no more commits after
        # that); Ray leaves two idle agent processes behind, which we clean up.
        deadline = time.monotonic() + 30
        while any(_is_ray_worker(p) for p in process_group(driver.pid)):
            assert time.monotonic() < deadline, "the killed driver's Ray kept running"
            time.sleep(0.2)
    finally:
        for proc in process_group(driver.pid):
            proc.kill()
    markers = {
        p.name.split(".")[0]: json.loads(p.read_text()) for p in (dest / "_commits").glob("shard-*.json")
    }
    committed = {
        f"{name}.parquet": (
            (dest / "instances" / f"{name}.parquet").stat().st_mtime_ns,
            (dest / "instances" / f"{name}.parquet").read_bytes(),
        )
        for name, marker in markers.items()
        if marker["status"] == "committed"
    }
    assert 0 < len(committed) < 8
    assert (dest / "_lock.json").exists()

    assert run("--resume", dest) == 0
    for name, (mtime, data) in committed.items():
        path = dest / "instances" / name
        assert path.stat().st_mtime_ns == mtime and path.read_bytes() == data, f"{name} was redone"
    assert not (dest / "_lock.json").exists()
    assert_same_rows(dest, clean_run)


class Outage:
    """A TCP forwarder in front of the S3 server that can be taken down and brought back.

    ``stop()`` closes the listening socket and every open connection (the
    endpoint refuses connections, as a restarting server does); ``start()``
    listens again on the same port. The server behind keeps its state.
    """

    def __init__(self, target_port: int):
        self.target_port = target_port
        probe = socket.socket()
        probe.bind(("127.0.0.1", 0))
        self.port = probe.getsockname()[1]
        probe.close()
        self._connections: list[socket.socket] = []
        self._listener: socket.socket | None = None

    def start(self) -> None:
        listener = socket.socket()
        listener.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        listener.bind(("127.0.0.1", self.port))
        listener.listen(64)
        self._listener = listener
        threading.Thread(target=self._accept, args=(listener,), daemon=True).start()

    def stop(self) -> None:
        self._listener.close()
        for conn in self._connections:
            with contextlib.suppress(OSError):
                conn.shutdown(socket.SHUT_RDWR)
            conn.close()
        self._connections.clear()

    def _accept(self, listener: socket.socket) -> None:
        while True:
            try:
                client, _ = listener.accept()
            except OSError:
                return
            upstream = socket.create_connection(("127.0.0.1", self.target_port))
            self._connections += [client, upstream]
            for a, b in ((client, upstream), (upstream, client)):
                threading.Thread(target=self._pipe, args=(a, b), daemon=True).start()

    @staticmethod
    def _pipe(source: socket.socket, sink: socket.socket) -> None:
        try:
            while data := source.recv(65536):
                sink.sendall(data)
        except OSError:
            pass
        finally:
            for s in (source, sink):
                with contextlib.suppress(OSError):
                    s.shutdown(socket.SHUT_RDWR)


def test_an_s3_outage_mid_run_loses_nothing(
    ray_local, slow_archive, random_model_path, clean_run, s3_bucket, monkeypatch
):
    server = os.environ["AWS_ENDPOINT_URL"]
    fs = pafs.S3FileSystem(endpoint_override=server, scheme="http")
    for path in tile_paths(slow_archive):
        with fs.open_output_stream(f"{s3_bucket}/slides/{path.relative_to(slow_archive)}") as out:
            out.write(path.read_bytes())
    outage = Outage(int(server.rsplit(":", 1)[1]))
    outage.start()
    monkeypatch.setenv("AWS_ENDPOINT_URL", f"http://127.0.0.1:{outage.port}")
    dest = f"s3://{s3_bucket}/runs/r1"
    outcome = {}
    job = threading.Thread(
        target=lambda: outcome.update(
            code=run(f"s3://{s3_bucket}/slides", "--output", dest, "--model", random_model_path, *SETTINGS)
        )
    )
    job.start()

    def list_markers():
        return fs.get_file_info(pafs.FileSelector(f"{s3_bucket}/runs/r1/_commits", allow_not_found=True))

    wait_for_first_commit(list_markers=list_markers)
    outage.stop()
    time.sleep(12)  # longer than one attempt's storage retries (0.5 + 1 + 2 s of backoff)
    outage.start()
    committed_during_outage = len(list_markers())
    job.join(300)
    # The outage hit the run: shards were still to be done. Storage calls retry
    # with backoff; a shard whose retries ran out is retried whole, and one that
    # failed every attempt is left for --resume.
    assert committed_during_outage < 8
    assert outcome["code"] in (0, 3)
    if outcome["code"] == 3:
        assert run("--resume", dest) == 0
    assert_same_rows(dest, clean_run, ignore=["uri"])


def test_odd_and_broken_files_in_an_archive_are_each_accounted_for_once(
    ray_local, archive, random_model_path, tmp_path
):
    source = tmp_path / "source"
    shutil.copytree(archive, source)
    expected = write_corpus(source)
    dest = tmp_path / "run"
    code = run(source, "--output", dest, "--model", random_model_path, "--max-pixels", MAX_PIXELS, *SETTINGS)
    assert code == 0
    images = pd.read_parquet(dest / "images")
    names = images["uri"].map(lambda uri: Path(uri).relative_to(source).as_posix())
    assert names.is_unique and "odd/folder.png" not in set(names)
    by_name = images.set_index(names)
    for name, want in expected.items():
        row = by_name.loc[name]
        assert row["status"] == want.status, (name, row["error"])
        if want.size:
            assert (row["height"], row["width"]) == want.size, name
        else:
            assert row["error"] and "\n" not in row["error"]
    normal = by_name.drop(index=list(expected))
    assert len(normal) == 6 and (normal["status"] == "ok").all()


def test_input_keys_cannot_write_outside_dest(ray_local, archive, random_model_path, s3_bucket):
    fs = pafs.S3FileSystem(endpoint_override=os.environ["AWS_ENDPOINT_URL"], scheme="http")
    tile = tile_paths(archive)[0].read_bytes()
    keys = [
        "slides/a/../../escape.png",
        "slides/b/x..%2F..%2Fescape2.png",
        "slides/c/%0a new line;rm -rf.png",
        "slides/d/C:\\abs\\olute.png",
        "slides/../slides/e/ünïcode ✓.png",
        "slides/f/a...png",
    ]
    for key in keys:
        with fs.open_output_stream(f"{s3_bucket}/{key}") as out:
            out.write(tile)

    def stored() -> set[str]:
        selector = pafs.FileSelector(s3_bucket, recursive=True)
        return {i.path.removeprefix(f"{s3_bucket}/") for i in fs.get_file_info(selector) if i.is_file}

    inputs = stored()
    dest = f"s3://{s3_bucket}/runs/r1"
    assert run(f"s3://{s3_bucket}", "--output", dest, "--model", random_model_path, *SETTINGS) == 0
    images = pd.read_parquet(f"{dest}/images")
    assert len(images) == len(inputs) and images["uri"].is_unique
    allowed = {"runs/r1/run.json", "runs/r1/manifest.parquet"}
    for shard in range(-(-len(inputs) // 2)):
        allowed |= {
            f"runs/r1/{folder}/shard-{shard:05d}.{ext}"
            for folder, ext in (
                ("instances", "parquet"),
                ("images", "parquet"),
                ("_commits", "committed.json"),
            )
        }
    assert stored() - inputs == allowed
