"""The segment job end to end on a real local Ray instance (CPU), local and S3 (DESIGN invariants 2-5)."""

from __future__ import annotations

import io
import json
import os
import shutil
import subprocess
import sys
import time
from dataclasses import asdict
from pathlib import Path

import numpy as np
import pandas as pd
import pyarrow.fs as pafs
import pyarrow.parquet as pq
import pytest
import shapely
import torch
from pycocotools import mask as mask_utils

from jobs import segment as segment_job
from jobs import stats as stats_job
from pipeline import segment
from pipeline.card import ModelCard
from pipeline.export import write_geojson
from pipeline.model import resolve_model
from pipeline.plan import IMAGE_EXTENSIONS
from pipeline.stats import per_slide
from pipeline.synth import tile_paths
from tests.conftest import REPO
from tests.helpers import prepared_tensor, run_job

PLAIN = ["--shard-size", 4, "--batch-size", 1, "--overlap-suppression", 1, "--no-exclusive-pixels"]
"""Settings under which the rows must equal torchvision's own forward() (post-processing off)."""


def run(*args) -> int:
    return segment_job.main([str(a) for a in args] + ["--no-progress"])


def read(dest: Path, table: str) -> pd.DataFrame:
    return pd.read_parquet(dest / table).sort_values(["image_id"], kind="stable").reset_index(drop=True)


@pytest.fixture(scope="module")
def finished_run(ray_local, archive, random_model_path, tmp_path_factory):
    dest = tmp_path_factory.mktemp("runs") / "r1"
    assert run(archive, "--output", dest, "--model", random_model_path, *PLAIN) == 0
    return dest


def test_every_image_once_and_instances_are_consistent(finished_run, archive):
    manifest = pd.read_parquet(finished_run / "manifest.parquet")
    images = read(finished_run, "images")
    instances = pd.read_parquet(finished_run / "instances")
    assert sorted(images["uri"]) == sorted(manifest["uri"]) == [str(p) for p in tile_paths(archive)]
    assert images["uri"].is_unique
    assert (images["status"] == "ok").all()
    assert len(instances) == images["n_instances"].sum() > 0
    for row in instances.itertuples():
        decoded = mask_utils.decode({"size": [row.height, row.width], "counts": row.rle})
        assert decoded.sum() == row.area > 0
        polygon = shapely.from_wkb(row.polygon)
        assert polygon.is_valid and not polygon.is_empty
    per_slide = instances.groupby("slide_id").size()
    expected = images.groupby("slide_id")["n_instances"].sum()
    assert per_slide.to_dict() == expected[expected > 0].to_dict()
    assert set(manifest["slide_id"]) == {"slide-000", "slide-001"}


def test_files_carry_schema_version_and_geoparquet_metadata(finished_run):
    meta = pq.read_schema(finished_run / "instances" / "shard-00000.parquet").metadata
    assert meta[b"segpipe.schema"] == b"instances" and meta[b"segpipe.schema_version"] == b"4"
    geo = json.loads(meta[b"geo"])
    assert geo["primary_column"] == "polygon" and geo["columns"]["polygon"]["encoding"] == "WKB"
    marker = json.loads((finished_run / "_commits" / "shard-00000.committed.json").read_text())
    assert marker["status"] == "committed" and marker["images"] == 4
    run_json = json.loads((finished_run / "run.json").read_text())
    assert run_json["model"]["fingerprint"].startswith("sha256:")
    assert run_json["settings"]["shard_size"] == 4 and run_json["shards"] == 2
    assert {"torch", "ray", "pyarrow"} <= set(run_json["versions"])


def test_rows_equal_torchvision_forward_pasted_and_encoded(finished_run, random_model_path):
    """Invariant 2 through the whole job: RLE == pycocotools(forward()'s pasted masks >= threshold).

    ``MaskRCNN.forward`` pastes with ``paste_masks_in_image``; the job never does.
    """
    loaded = resolve_model(str(random_model_path))
    model = loaded.module
    instances = pd.read_parquet(finished_run / "instances")
    for image in read(finished_run, "images").itertuples():
        with torch.inference_mode():
            out = model([prepared_tensor(image.uri, loaded.card.preprocessing)])[0]
        full = (out["masks"][:, 0] >= 0.5).numpy()
        expected = [
            mask_utils.encode(np.asfortranarray(m.astype(np.uint8)))["counts"].decode()
            for m in full
            if m.any()
        ]
        ours = instances[instances["image_id"] == image.image_id].sort_values("instance_id")
        assert ours["rle"].tolist() == expected
        assert image.n_instances + image.n_empty_masks == len(out["boxes"])
        assert image.n_suppressed == 0


def test_same_inputs_same_rows(finished_run, archive, random_model_path, tmp_path):
    again = tmp_path / "again"
    assert run(archive, "--output", again, "--model", random_model_path, *PLAIN) == 0
    first = pd.read_parquet(finished_run / "instances")
    second = pd.read_parquet(again / "instances")
    pd.testing.assert_frame_equal(first, second, check_exact=True)


def test_resume_does_only_missing_shards_and_rerun_replaces(finished_run, tmp_path, capsys):
    dest = tmp_path / "copy"
    shutil.copytree(finished_run, dest)
    kept = dest / "instances" / "shard-00000.parquet"
    kept_stat = kept.stat().st_mtime_ns
    (dest / "_commits" / "shard-00001.committed.json").unlink()
    (dest / "instances" / "shard-00001.parquet").write_bytes(b"leftover of a crashed attempt")
    assert run("--resume", dest) == 0
    assert "already done 1" in capsys.readouterr().out
    assert kept.stat().st_mtime_ns == kept_stat
    assert pq.read_table(dest / "instances" / "shard-00001.parquet").num_rows > 0

    before = pd.read_parquet(dest / "instances")
    assert run("--resume", dest, "--shards", "0") == 0
    after = pd.read_parquet(dest / "instances")
    assert kept.stat().st_mtime_ns != kept_stat
    marker = json.loads((dest / "_commits" / "shard-00000.committed.json").read_text())
    assert marker["batch_size"] == 1  # the run's
    pd.testing.assert_frame_equal(before, after, check_exact=True)
    assert sorted(os.listdir(dest / "instances")) == ["shard-00000.parquet", "shard-00001.parquet"]


def test_resume_refuses_different_settings(finished_run, capsys):
    assert run("--resume", finished_run, "--score-threshold", "0.9") == 2
    err = capsys.readouterr().err.strip()
    assert "different settings" in err and len(err.splitlines()) == 1
    assert run("--resume", finished_run, "--scale", "2") == 2
    assert "scale: run has 'auto', asked 2.0" in capsys.readouterr().err
    assert run("--resume", finished_run, "--tta", "flips") == 2
    assert "tta: run has 'none', asked 'flips'" in capsys.readouterr().err


def test_a_run_takes_the_cards_threshold_for_its_test_time_augmentation_unless_given_one():
    card = ModelCard(
        name="x", architecture="a", classes=("n",), score_threshold=0.8, tta_score_thresholds={"flips": 0.7}
    )
    resolved = [
        segment._resolved_thresholds(segment.PinnedSettings(source="s", **given), card).score_threshold
        for given in ({}, {"tta": "flips"}, {"tta": "dihedral"}, {"tta": "flips", "score_threshold": 0.6})
    ]
    assert resolved == [0.8, 0.7, 0.8, 0.6]


def test_runs_made_before_a_setting_existed_resume_as_they_were_made():
    made_before = segment.pinned_from_run_json({"source": "s"})
    assert (made_before.tile_size, made_before.scale, made_before.tta) == (None, 1.0, "none")
    new = segment.PinnedSettings(source="s", scale=2.0, exclude=("*_labels.*",))
    assert segment.pinned_from_run_json(json.loads(json.dumps(asdict(new)))) == new  # as run.json holds it
    assert made_before.exclude == ()
    assert segment.PinnedSettings(source="s").scale == "auto"


def test_resume_refuses_a_model_that_changed_and_leaves_no_replica_behind(
    ray_local, finished_run, tmp_path, capsys
):
    from ray.util.state import list_actors

    dest = tmp_path / "changed"
    shutil.copytree(finished_run, dest)
    (dest / "_commits" / "shard-00001.committed.json").unlink()
    run_json = json.loads((dest / "run.json").read_text())
    run_json["model"]["fingerprint"] = "sha256:" + "0" * 64  # as if the checkpoint was overwritten
    (dest / "run.json").write_text(json.dumps(run_json))
    assert run("--resume", dest) == 2
    err = capsys.readouterr().err.strip()
    assert "the model changed since the run started" in err and len(err.splitlines()) == 1
    assert not (dest / "_commits" / "shard-00001.committed.json").exists()
    # Replicas are started while the model loads; none may outlive the refused resume.
    deadline = time.monotonic() + 30
    while True:
        replicas = list_actors(
            address=ray_local.get_runtime_context().gcs_address,
            filters=[("class_name", "=", "ShardWorker"), ("state", "!=", "DEAD")],
        )
        if not replicas or time.monotonic() > deadline:
            break
        time.sleep(0.5)
    assert not replicas, replicas
    run_json["settings"]["model"] = str(tmp_path / "deleted.pt")  # as if the checkpoint was deleted
    (dest / "run.json").write_text(json.dumps(run_json))
    assert run("--resume", dest) == 2
    err = capsys.readouterr().err.strip()
    assert err.endswith("deleted.pt: it does not exist") and len(err.splitlines()) == 1


def test_failing_shard_is_retried_then_failed_with_resume_command(
    ray_local, archive, random_model_path, tmp_path, capsys
):
    dest = tmp_path / "faulty"
    # Fault: a folder sits where shard 1's file must go, so its commit fails every time.
    (dest / "images" / "shard-00001.parquet").mkdir(parents=True)
    code = run(
        archive, "--output", dest, "--model", random_model_path, "--shard-size", 4, "--max-attempts", 2
    )
    out = capsys.readouterr()
    assert code == 3
    assert "failed shards: 1" in out.out
    assert f"python -m jobs.segment --resume {dest}" in out.out
    assert "retrying" in out.err
    marker = json.loads((dest / "_commits" / "shard-00001.failed.json").read_text())
    assert marker["status"] == "failed" and marker["attempts"] == 2
    assert not (dest / "_commits" / "shard-00001.committed.json").exists()
    (dest / "images" / "shard-00001.parquet").rmdir()
    assert run("--resume", dest) == 0
    assert sorted(os.listdir(dest / "_commits")) == [
        "shard-00000.committed.json",
        "shard-00001.committed.json",
    ]
    images = pd.read_parquet(dest / "images")
    assert len(images) == 6 and images["uri"].is_unique


def test_s3_source_and_destination(ray_local, archive, random_model_path, s3_bucket):
    fs = pafs.S3FileSystem(endpoint_override=os.environ["AWS_ENDPOINT_URL"], scheme="http")
    for path in tile_paths(archive):
        with fs.open_output_stream(f"{s3_bucket}/slides/{path.relative_to(archive)}") as out:
            out.write(path.read_bytes())
    dest = f"s3://{s3_bucket}/runs/r1"
    assert (
        run(f"s3://{s3_bucket}/slides", "--output", dest, "--model", random_model_path, "--shard-size", 4)
        == 0
    )
    instances = pd.read_parquet(f"{dest}/instances")
    images = pd.read_parquet(f"{dest}/images")
    assert len(images) == 6 and (images["status"] == "ok").all()
    assert images["uri"].str.startswith(f"s3://{s3_bucket}/slides/slide-00").all()
    assert len(instances) == images["n_instances"].sum() > 0
    run_json = json.loads(fs.open_input_stream(f"{s3_bucket}/runs/r1/run.json").read())
    assert "testing" not in json.dumps(run_json)
    for info in fs.get_file_info(pafs.FileSelector(f"{s3_bucket}/runs/r1/_commits")):
        assert os.environ["AWS_SECRET_ACCESS_KEY"] not in fs.open_input_stream(info.path).read().decode()
    # The analysis tools read S3 destinations too.
    table = per_slide(dest).groupby("slide_id")["count"].sum()
    assert table.to_dict() == instances.groupby("slide_id").size().to_dict()
    stream = io.StringIO()
    assert write_geojson(dest, stream, slide="slide-000") == (instances["slide_id"] == "slide-000").sum()
    assert len(json.loads(stream.getvalue())["features"]) == (instances["slide_id"] == "slide-000").sum()


@pytest.mark.parametrize(
    ("args", "message"),
    [
        ([], "give SOURCE and --output"),
        (["{archive}", "--output", "{tmp}/x", "--bogus"], "unrecognized arguments"),
        (["{tmp}/nothing-here", "--output", "{tmp}/x"], "does not exist"),
        (["{empty}", "--output", "{tmp}/x"], "no image files"),
        (["{archive}", "--output", "{tmp}/x", "--model", "{tmp}/missing.pt"], "cannot read model"),
        (["{archive}", "--output", "{tmp}/x", "--tile-overlap", "3"], "--tile-overlap must be even"),
        (["{archive}", "--output", "{tmp}/x", "--mpp", "0"], "--mpp must be > 0"),
        (["{archive}", "--output", "{tmp}/x", "--tissue", "some"], "invalid choice"),
        (["{archive}", "--output", "{tmp}/x", "--tta", "rotations"], "invalid choice: 'rotations'"),
        (["{archive}", "--output", "{tmp}/x", "--score-threshold", "2"], "must be in [0, 1]"),
        (["{archive}", "--output", "{tmp}/x", "--scale", "0"], "--scale: must be auto or a factor in (0, 8]"),
        (["{archive}", "--output", "{tmp}/x", "--scale", "big"], "a factor in (0, 8], got 'big'"),
        (["--resume", "{tmp}/never-ran"], "no run to resume"),
    ],
)
def test_usage_errors_are_one_line_and_exit_2(args, message, archive, tmp_path):
    (tmp_path / "empty").mkdir()
    values = {"archive": archive, "tmp": tmp_path, "empty": tmp_path / "empty"}
    argv = [a.format(**values) for a in args]
    result = run_job("jobs.segment", *argv, timeout=120)
    assert result.returncode == 2
    lines = result.stderr.strip().splitlines()
    assert len(lines) == 1, result.stderr
    assert message in lines[0] and "Traceback" not in result.stderr


def test_a_missing_source_or_model_is_refused_before_ray_starts(archive, tmp_path):
    """A request or two answer whether the source is a folder with something to list and the model a
    file; a typo or an empty folder never waits for Ray and replicas."""
    (tmp_path / "a.png").write_bytes(b"x")
    (tmp_path / "folder.pt").mkdir()
    (tmp_path / "notes" / ".hidden").mkdir(parents=True)
    (tmp_path / "notes" / "readme.txt").write_text("no images here")
    (tmp_path / "notes" / ".hidden" / "a.png").write_bytes(b"x")
    looked_for = ", ".join(sorted(IMAGE_EXTENSIONS))
    script = (
        "import sys, ray\n"
        "from pipeline import segment\n"
        "from pipeline.card import ModelLoadError\n"
        "from pipeline.plan import PlanError\n"
        "try:\n"
        "    pinned = segment.PinnedSettings(source=sys.argv[1], model=sys.argv[3] or None)\n"
        "    segment.new_run(sys.argv[2], pinned, segment.ExecutionSettings())\n"
        "except (PlanError, ModelLoadError) as exc:\n"
        "    print(exc, ray.is_initialized())\n"
    )
    refused = {
        (tmp_path / "nope", ""): "does not exist",
        (tmp_path / "a.png", ""): "not a folder or prefix",
        (tmp_path / "notes", ""): f"no image files under {tmp_path / 'notes'} (looked for {looked_for})",
        (archive, tmp_path / "missing.pt"): f"cannot read model {tmp_path / 'missing.pt'}: it does not exist",
        (archive, tmp_path / "folder.pt"): "a folder, not a checkpoint file",
    }
    for k, ((source, model), message) in enumerate(refused.items()):
        dest = tmp_path / f"run-{k}"
        result = subprocess.run(
            [sys.executable, "-c", script, str(source), str(dest), str(model)],
            capture_output=True,
            text=True,
            cwd=REPO,
            timeout=120,
        )
        assert result.stdout.strip().endswith(f"{message} False"), result.stdout + result.stderr
        assert not dest.exists()


def test_stats_job_prints_the_table_and_writes_files(finished_run, tmp_path, capsys):
    assert stats_job.main([str(finished_run)]) == 0
    printed = capsys.readouterr().out
    assert "slide-000" in printed and "slide-001" in printed and "count" in printed
    assert f"{per_slide(str(finished_run))['score_mean'].iloc[0]:.3f}" in printed  # scores keep 3 decimals
    out = tmp_path / "stats.csv"
    assert stats_job.main([str(finished_run), "--output", str(out), "--pixel-size-um", "0.5"]) == 0
    table = pd.read_csv(out)
    instances = pd.read_parquet(finished_run / "instances")
    assert table["count"].sum() == len(instances)
    assert {"area_um2_mean", "count_per_mm2"} <= set(table.columns)
    assert stats_job.main([str(tmp_path / "no-run")]) == 2


def test_dense_post_processing_accounts_for_every_detection(ray_local, archive, random_model_path, tmp_path):
    """With suppression and exclusive pixels on, detections = kept + empty + suppressed, masks disjoint."""
    dest = tmp_path / "dense"
    args = [
        "--model",
        random_model_path,
        "--overlap-suppression",
        0.3,
        "--exclusive-pixels",
        "--batch-size",
        1,
    ]
    assert run(archive, "--output", dest, *args) == 0
    loaded = resolve_model(str(random_model_path))
    instances = pd.read_parquet(dest / "instances")
    images = read(dest, "images")
    assert images["n_suppressed"].sum() > 0
    for image in images.itertuples():
        with torch.inference_mode():
            out = loaded.module([prepared_tensor(image.uri, loaded.card.preprocessing)])[0]
        assert image.n_instances + image.n_empty_masks + image.n_suppressed == len(out["boxes"])
        rows = instances[instances["image_id"] == image.image_id]
        decoded = [
            mask_utils.decode({"size": [r.height, r.width], "counts": r.rle}) for r in rows.itertuples()
        ]
        assert decoded and np.sum(decoded, axis=0).max() == 1


def test_the_driver_blocks_instead_of_polling_when_no_retry_is_waiting():
    from pipeline.schedule import backoff_timeout

    assert backoff_timeout([1, 2], {}, now=100.0) is None
    assert backoff_timeout([1, 2], {1: 99.0}, now=100.0) is None
    assert backoff_timeout([1, 2], {1: 103.0, 2: 101.5}, now=100.0) == pytest.approx(1.5)
    assert backoff_timeout([], {1: 103.0}, now=100.0) is None


def test_resume_reuses_the_runs_batch_size_and_warns_on_another(finished_run, caplog):
    run_json = json.loads((finished_run / "run.json").read_text())
    assert run_json["batch_size"] == 1
    assert segment._batch_size(run_json, None) == 1
    assert not caplog.records
    assert segment._batch_size(run_json, 3) == 3
    assert "differs from the run's 1" in caplog.text


def test_the_driver_never_reads_manifest_rows_on_resume(finished_run, tmp_path, monkeypatch):
    """O(shards) driver: only the manifest's footer; each replica reads its own shard's rows."""
    from pipeline.plan import ManifestReader

    dest = tmp_path / "copy"
    shutil.copytree(finished_run, dest)
    for marker in (dest / "_commits").iterdir():
        marker.unlink()

    def refuse(self, shard_id):
        raise AssertionError("the driver read a shard's rows")

    monkeypatch.setattr(ManifestReader, "rows", refuse)  # patched in this (the driver's) process only
    assert run("--resume", dest) == 0
    pd.testing.assert_frame_equal(
        pd.read_parquet(finished_run / "instances"), pd.read_parquet(dest / "instances"), check_exact=True
    )


def test_the_shard_size_chooses_itself_and_is_pinned(ray_local, archive, random_model_path, tmp_path):
    dest = tmp_path / "auto"
    assert run(archive, "--output", dest, "--model", random_model_path) == 0
    run_json = json.loads((dest / "run.json").read_text())
    assert run_json["settings"]["shard_size"] == 16 and run_json["shards"] == 1
    assert run("--resume", dest, "--shard-size", 8) == 2


def test_excluded_files_are_not_planned_and_the_globs_are_pinned(
    ray_local, archive, random_model_path, tmp_path
):
    dest = tmp_path / "excluded"
    assert run(archive, "--output", dest, "--model", random_model_path, "--exclude", "slide-001/*") == 0
    images = pd.read_parquet(dest / "images")
    assert len(images) == 3 and set(images["slide_id"]) == {"slide-000"}
    assert json.loads((dest / "run.json").read_text())["settings"]["exclude"] == ["slide-001/*"]
    assert run("--resume", dest, "--exclude", "slide-001/*") == 0
    assert run("--resume", dest, "--exclude", "*.png") == 2


def test_an_older_run_with_its_markers_and_schema_still_resumes(finished_run, tmp_path):
    """A run as segpipe 0.1 wrote it: markers with the status inside, one-row-group manifest,
    tables at schema version 1, run.json without a schema version. Resume redoes one missing shard,
    writing version 1 tables, so the run's files stay one dataset."""
    from schemas import ADDED_IN_VERSION_2, ADDED_IN_VERSION_3, ADDED_IN_VERSION_4

    later = ADDED_IN_VERSION_2 | ADDED_IN_VERSION_3 | ADDED_IN_VERSION_4
    dest = tmp_path / "old"
    shutil.copytree(finished_run, dest)
    for marker in (dest / "_commits").iterdir():
        legacy = dest / "_commits" / (marker.name.split(".")[0] + ".json")
        marker.rename(legacy)
    for path in [*(dest / "instances").glob("*.parquet"), *(dest / "images").glob("*.parquet")]:
        table = pq.read_table(path)
        keep = [n for n in table.schema.names if n not in later]
        pq.write_table(table.select(keep).replace_schema_metadata(_version_1(table.schema.metadata)), path)
    manifest = pq.read_table(dest / "manifest.parquet")
    manifest = manifest.select([n for n in manifest.schema.names if n not in later])
    pq.write_table(
        manifest.replace_schema_metadata(_version_1(manifest.schema.metadata)), dest / "manifest.parquet"
    )
    run_json = json.loads((dest / "run.json").read_text())
    del run_json["schema_version"]
    del run_json["settings"]["scale"]
    (dest / "run.json").write_text(json.dumps(run_json))
    before = pd.read_parquet(dest / "instances")
    (dest / "_commits" / "shard-00001.json").unlink()
    kept = (dest / "instances" / "shard-00000.parquet").stat().st_mtime_ns

    assert run("--resume", dest) == 0
    assert (dest / "instances" / "shard-00000.parquet").stat().st_mtime_ns == kept
    redone = pq.read_table(dest / "instances" / "shard-00001.parquet")
    assert redone.schema.metadata[b"segpipe.schema_version"] == b"1"
    assert not set(redone.schema.names) & later
    pd.testing.assert_frame_equal(before, pd.read_parquet(dest / "instances"), check_exact=True)
    assert sorted(p.name for p in (dest / "_commits").iterdir()) == [
        "shard-00000.json",
        "shard-00001.committed.json",
    ]


def _version_1(metadata: dict[bytes, bytes]) -> dict[bytes, bytes]:
    return {**metadata, b"segpipe.schema_version": b"1"}


def test_a_bad_model_is_a_one_line_error_from_the_driver(ray_local, archive, tmp_path, capsys):
    """The model is loaded in a task on the driver's node; its refusal still reaches the user as exit 2."""
    import pickle

    marker = tmp_path / "ran"

    class Evil:
        def __reduce__(self):
            return (open, (str(marker), "w"))

    evil = tmp_path / "evil.pt"
    evil.write_bytes(pickle.dumps({"format": "segpipe-checkpoint", "card": Evil()}))
    assert run(archive, "--output", tmp_path / "r", "--model", evil) == 2
    err = capsys.readouterr().err.strip()
    assert "not a weights-only checkpoint" in err and len(err.splitlines()) == 1
    assert not marker.exists()
    assert run(archive, "--output", tmp_path / "r2", "--model", tmp_path / "missing.pt") == 2
    assert "cannot read model" in capsys.readouterr().err  # (refused before Ray, see above)


def test_the_driver_does_not_import_torch():
    """The driver plans and schedules; torch (about 0.7 GB resident) lives in the replicas only."""
    code = "import sys, jobs.segment, pipeline.segment; print('torch' in sys.modules)"
    result = subprocess.run(
        [sys.executable, "-c", code], capture_output=True, text=True, cwd=REPO, timeout=120
    )
    assert result.returncode == 0, result.stderr
    assert result.stdout.strip() == "False"
