"""Shard markers: status in the name, at most one per shard, one listing tells every shard's state."""

from __future__ import annotations

import json

from pipeline import commit, storage
from schemas import IMAGES, instances_schema


def empty_tables():
    return instances_schema().empty_table(), IMAGES.empty_table()


def test_commit_then_fail_then_commit_leaves_one_marker_with_the_status_in_its_name(tmp_path):
    dest = str(tmp_path)
    commit.commit_shard(dest, 3, *empty_tables(), {"images": 0})
    assert sorted(p.name for p in (tmp_path / "_commits").iterdir()) == ["shard-00003.committed.json"]
    assert commit.shard_states(dest).committed == {3}
    commit.mark_failed(dest, 3, {"error": "boom"})
    assert sorted(p.name for p in (tmp_path / "_commits").iterdir()) == ["shard-00003.failed.json"]
    states = commit.shard_states(dest)
    assert states.committed == set() and states.failed == {3}
    commit.commit_shard(dest, 3, *empty_tables(), {"images": 0})
    assert commit.shard_states(dest).committed == {3}
    assert commit.read_marker(dest, 3)["status"] == "committed"


def test_legacy_markers_of_older_runs_are_read_for_their_status(tmp_path):
    commits = tmp_path / "_commits"
    commits.mkdir()
    (commits / "shard-00000.json").write_text(json.dumps({"shard_id": 0, "status": "committed"}))
    (commits / "shard-00001.json").write_text(json.dumps({"shard_id": 1, "status": "failed"}))
    (commits / "shard-00002.committed.json").write_text(json.dumps({"shard_id": 2, "status": "committed"}))
    (commits / "notes.txt").write_text("not a marker")
    states = commit.shard_states(str(tmp_path))
    assert states.committed == {0, 2} and states.failed == {1} and states.legacy_markers == 2
    # Redoing a legacy shard replaces its old marker.
    commit.commit_shard(str(tmp_path), 1, *empty_tables(), {})
    assert not (commits / "shard-00001.json").exists()
    assert commit.shard_states(str(tmp_path)).committed == {0, 1, 2}


def test_a_shard_with_both_markers_counts_as_not_committed(tmp_path):
    commits = tmp_path / "_commits"
    commits.mkdir()
    for status in ("committed", "failed"):
        (commits / f"shard-00004.{status}.json").write_text("{}")
    states = commit.shard_states(str(tmp_path))
    assert states.committed == set() and states.failed == {4}


def test_a_run_without_commits_has_no_shard_states(tmp_path):
    states = commit.shard_states(str(tmp_path / "nothing-yet"))
    assert states.committed == set() and states.failed == set()


def test_shard_states_lists_s3_once(s3_bucket, monkeypatch):
    dest = f"s3://{s3_bucket}/runs/r1"
    for shard_id in range(30):
        storage.write_bytes_atomic(commit.marker_uri(dest, shard_id, "committed"), b"{}")
    opened = []
    monkeypatch.setattr(storage, "read_bytes", lambda uri: opened.append(uri) or b"{}")
    assert commit.shard_states(dest).committed == set(range(30))
    assert opened == []  # no GET per marker
