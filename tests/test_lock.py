"""One job per run folder: a live lock refuses, a dead one is taken over, the heartbeat beats."""

from __future__ import annotations

import json
import os
import socket
import subprocess
import sys
import time

import pytest

from pipeline import commit, lock
from tests.helpers import run_job


def write_owner(dest, **fields):
    owner = {"token": "other", "host": socket.gethostname(), "pid": os.getpid(), "heartbeat": time.time()}
    commit.write_json(lock.lock_uri(str(dest)), {**owner, **fields})


def test_a_live_lock_refuses_a_second_job_and_release_removes_it(tmp_path):
    held = lock.acquire(str(tmp_path))
    owner = json.loads((tmp_path / "_lock.json").read_text())
    assert owner["pid"] == os.getpid() and owner["token"] == held.token
    with pytest.raises(lock.RunLocked, match="being written by another job"):
        lock.acquire(str(tmp_path))
    held.release()
    assert not (tmp_path / "_lock.json").exists()
    lock.acquire(str(tmp_path)).release()


def test_a_lock_whose_process_is_gone_is_taken_over(tmp_path, caplog):
    finished = subprocess.run([sys.executable, "-c", "import os; print(os.getpid())"], capture_output=True)
    write_owner(tmp_path, pid=int(finished.stdout))
    with lock.acquire(str(tmp_path)) as held:
        assert json.loads((tmp_path / "_lock.json").read_text())["token"] == held.token
    assert "is gone" in caplog.text


def test_a_remote_lock_is_stale_only_after_its_heartbeat_stops(tmp_path):
    write_owner(tmp_path, host="another-node", pid=1, heartbeat=time.time() - 5)
    with pytest.raises(lock.RunLocked, match="another-node"):
        lock.acquire(str(tmp_path), stale_after_s=60)
    write_owner(tmp_path, host="another-node", pid=1, heartbeat=time.time() - 120)
    lock.acquire(str(tmp_path), stale_after_s=60).release()


def test_the_heartbeat_refreshes_the_lock(tmp_path):
    with lock.acquire(str(tmp_path), heartbeat_s=0.05):
        first = json.loads((tmp_path / "_lock.json").read_text())["heartbeat"]
        time.sleep(0.3)
        assert json.loads((tmp_path / "_lock.json").read_text())["heartbeat"] > first


def test_a_lock_taken_by_another_job_is_not_deleted_on_release(tmp_path):
    held = lock.acquire(str(tmp_path), heartbeat_s=0.05)
    write_owner(tmp_path, token="thief")
    time.sleep(0.2)
    held.release()
    assert json.loads((tmp_path / "_lock.json").read_text())["token"] == "thief"


def test_the_segment_job_refuses_a_locked_dest_in_one_line(archive, tmp_path):
    write_owner(tmp_path / "run")
    result = run_job("jobs.segment", str(archive), "--output", str(tmp_path / "run"), timeout=120)
    assert result.returncode == 2
    assert len(result.stderr.strip().splitlines()) == 1
    assert "being written by another job" in result.stderr
    assert not (tmp_path / "run" / "run.json").exists()
