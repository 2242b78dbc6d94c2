"""The cluster path: a real two-node Ray cluster on 127.0.0.1, the job submitted with ``ray job submit``.

The head declares one logical GPU (``--num-gpus 1`` on a machine without
one): the replica is scheduled on it, finds no CUDA, runs on the CPU and
says so once. The output must equal the embedded run's.
"""

from __future__ import annotations

import json
import os
import re
import subprocess
import sys
import time
from pathlib import Path

import pandas as pd
import pytest

from pipeline.bench_scale import free_port
from tests.conftest import REPO

RAY = str(Path(sys.executable).parent / "ray")


def _env() -> dict[str, str]:
    """Environment of every ``ray`` command: this venv first on PATH, no RAY_ADDRESS, token auth on.

    ``ray start`` enables token auth for a new cluster; the CLI clients send
    the token only when ``RAY_AUTH_MODE=token`` is set (the token file is shared).
    """
    env = {k: v for k, v in os.environ.items() if k != "RAY_ADDRESS"}
    env["PATH"] = f"{Path(sys.executable).parent}{os.pathsep}{env.get('PATH', '')}"
    env["RAY_AUTH_MODE"] = "token"
    return env


def _wait(predicate, what: str, timeout: float = 120) -> None:
    deadline = time.monotonic() + timeout
    while not predicate():
        if time.monotonic() > deadline:
            raise TimeoutError(f"{what} within {timeout} s")
        time.sleep(1)


def _alive_nodes(dashboard: str) -> int:
    listed = subprocess.run(
        [RAY, "list", "nodes", "--address", dashboard, "--format", "json"],
        capture_output=True,
        text=True,
        env=_env(),
        timeout=60,
    )
    try:
        nodes = json.loads(listed.stdout) if listed.returncode == 0 else []
    except ValueError:  # the dashboard is still starting
        return 0
    return sum(node["state"] == "ALIVE" for node in nodes)


@pytest.fixture(scope="module")
def cluster(tmp_path_factory):
    """A Ray head (1 logical GPU, 2 CPUs) and a worker node (1 CPU) on 127.0.0.1; yields the dashboard URL."""
    port, dashboard_port = free_port(), free_port()
    logs = tmp_path_factory.mktemp("cluster-logs")

    def node_ports() -> list[str]:
        # Every node's agents get free ports: the suite's embedded Ray holds the defaults.
        flags = ["--dashboard-agent-listen-port", "--dashboard-agent-grpc-port"]
        flags += ["--runtime-env-agent-port", "--metrics-export-port", "--node-manager-port"]
        flags += ["--object-manager-port"]
        return [str(part) for flag in flags for part in (flag, free_port())]

    common = ["--disable-usage-stats", "--block"]
    head = subprocess.Popen(
        [
            RAY,
            "start",
            "--head",
            "--port",
            str(port),
            "--num-gpus",
            "1",
            "--num-cpus",
            "2",
            "--include-dashboard",
            "true",
            "--dashboard-host",
            "127.0.0.1",
            "--dashboard-port",
            str(dashboard_port),
            *node_ports(),
            *common,
        ],
        env=_env(),
        stdout=(logs / "head.log").open("w"),
        stderr=subprocess.STDOUT,
    )
    dashboard = f"http://127.0.0.1:{dashboard_port}"
    worker = None
    try:
        _wait(lambda: _alive_nodes(dashboard) == 1, "the head did not start")
        worker = subprocess.Popen(
            [RAY, "start", "--address", f"127.0.0.1:{port}", "--num-cpus", "1", *node_ports(), *common],
            env=_env(),
            stdout=(logs / "worker.log").open("w"),
            stderr=subprocess.STDOUT,
        )
        _wait(lambda: _alive_nodes(dashboard) == 2, "the worker node did not join")
        yield dashboard
    finally:
        for proc in filter(None, (worker, head)):
            proc.terminate()
        for proc in filter(None, (worker, head)):
            try:
                proc.wait(60)
            except subprocess.TimeoutExpired:
                proc.kill()


def test_ray_job_submit_to_a_two_node_cluster_equals_the_embedded_run(
    cluster, archive, random_model_path, segmented_run, tmp_path
):
    dest = tmp_path / "cluster-run"
    submit = [RAY, "job", "submit", "--address", cluster, "--working-dir", str(REPO), "--"]
    command = ["python", "-m", "jobs.segment", str(archive), "--output", str(dest)]
    command += ["--model", str(random_model_path), "--shard-size", "4", "--no-progress"]
    deadline = time.monotonic() + 120
    while True:
        result = subprocess.run(
            [*submit, *command], capture_output=True, text=True, cwd=REPO, env=_env(), timeout=600
        )
        # The head's job agent starts a little after the node is listed as alive.
        if "No available agent to submit job" not in result.stderr or time.monotonic() > deadline:
            break
        time.sleep(2)
    assert result.returncode == 0, result.stdout[-3000:] + result.stderr[-3000:]
    job_id = re.search(r"Job '([^']+)' submitted successfully", result.stdout).group(1)
    logs = subprocess.run(
        [RAY, "job", "logs", "--address", cluster, job_id],
        capture_output=True,
        text=True,
        env=_env(),
        timeout=120,
    ).stdout
    assert logs.count("CUDA is not available") == 1 and "running on the CPU" in logs
    assert "shards committed 2, failed 0" in logs

    markers = [json.loads(p.read_text()) for p in sorted((dest / "_commits").glob("shard-*.json"))]
    assert [m["status"] for m in markers] == ["committed", "committed"]
    assert all(m["worker"]["gpu_ids"] == ["0"] and m["device"] == "cpu" for m in markers)

    def rows(run):
        return (
            pd.read_parquet(run / "instances").sort_values(["image_id", "instance_id"]).reset_index(drop=True)
        )

    pd.testing.assert_frame_equal(rows(dest), rows(segmented_run), check_exact=True)
