"""The benchmark commands run on tiny inputs and report the keys BENCHMARKS.md relies on."""

from __future__ import annotations

import json
import subprocess
import sys
from dataclasses import replace

import pytest

from tests.conftest import REPO
from tests.helpers import run_job


def bench(*args: str, timeout: int) -> subprocess.CompletedProcess:
    """``python -m jobs.bench ARGS`` in the repository, output captured as text."""
    return run_job("jobs.bench", *args, timeout=timeout)


def test_masks_benchmark_json_has_the_keys_and_checks_rle():
    result = bench("masks", "--cases", "128x5,96x3", "--repeats", "1", "--json", timeout=300)
    assert result.returncode == 0, result.stderr
    rows = [json.loads(line) for line in result.stdout.splitlines()]
    assert [(r["size"], r["instances"]) for r in rows] == [(128, 5), (96, 3)]
    for row in rows:
        assert {"size", "instances", "reference_s", "pipeline_s", "speedup", "features_s"} <= set(row)
        assert row["reference_s"] > 0 and row["pipeline_s"] > 0 and row["features_s"] > 0
        assert row["feature_growth"] > 0
        assert row["decode_reference_s"] > 0 and row["decode_s"] > 0 and row["decode_speedup"] > 0
        assert row["continuous_s"] > 0 and row["continuous_ratio"] > 0


def test_pipeline_benchmark_runs_on_a_tiny_input_and_reports_the_keys(random_model_path):
    flags = ["--images", "4", "--size", "96", "--shard-size", "2", "--memory-factor", "2"]
    result = bench("pipeline", *flags, "--model", str(random_model_path), "--json", timeout=600)
    assert result.returncode == 0, result.stderr
    row = json.loads(result.stdout)
    for key in ("ratio", "steady_ratio", "pipeline_images_per_s", "forward_images_per_s", "first_commit_s"):
        assert row[key] > 0, key
    assert row["peak_rss_bytes"] > 0 and row["peak_rss_bytes_2x"] > 0
    assert 0 < row["replica_start_s"] < row["images"] / row["pipeline_images_per_s"]
    assert row["memory_growth"] == round(row["peak_rss_bytes_2x"] / row["peak_rss_bytes"] - 1, 4)
    for suffix in ("", "_2x"):
        by_role = row[f"peak_rss_by_role{suffix}"]
        assert sum(by_role.values()) == row[f"peak_rss_bytes{suffix}"]
        assert {"driver", "replica", "raylet", "gcs_server"} <= set(by_role), by_role
    assert {"decode_s", "infer_s", "encode_s", "write_s"} <= set(row["stage_s_per_image"])


def test_pipeline_benchmark_rejects_a_bad_flag_in_one_line():
    result = bench("pipeline", "--images", "0", timeout=60)
    assert result.returncode == 2
    assert len(result.stderr.strip().splitlines()) == 1 and "--images" in result.stderr


def test_robustness_benchmark_scores_every_shift_and_a_real_folder(random_model_path, tmp_path):
    """Tiny archives, a random model: the table has a row per archive with both methods' scores."""
    import cv2
    import numpy as np

    from pipeline.synth import SHIFTS

    real, other = tmp_path / "real", tmp_path / "other"
    for folder, centres in ((real, [(16, 16), (44, 20), (30, 46)]), (other, [(20, 30), (44, 40)])):
        folder.mkdir()
        image = np.zeros((64, 64), np.uint8)
        labels = np.zeros((64, 64), np.uint8)
        for k, (x, y) in enumerate(centres, start=1):
            cv2.circle(image, (x, y), 7, 200, -1)
            cv2.circle(labels, (x, y), 7, k, -1)
        cv2.imwrite(str(folder / "a.png"), image)
        cv2.imwrite(str(folder / "a_labels.png"), labels)
    flags = ["--slides", "1", "--tiles-per-slide", "2", "--size", "96", "--scale", "2"]
    flags += ["--real", str(real), "--real", str(other)]
    flags += ["--keep", str(tmp_path / "kept"), "--json"]
    result = bench("robustness", "--model", str(random_model_path), *flags, timeout=600)
    assert result.returncode == 0, result.stderr
    rows = [json.loads(line) for line in result.stdout.splitlines()]
    names = ["in-distribution", *SHIFTS, "background-only", "real: real", "real: other"]
    assert [r["archive"] for r in rows] == names
    for row in rows:
        assert {"AP50", "AP50_se", "AP", "F1", "count_mae", "baseline_AP50", "baseline_count_mae"} <= set(row)
        assert row["images"] >= 1 and row["enlarged"] == 1.0  # --scale 2 reached every run
        if row["archive"] == "background-only":
            # Nothing to find: no AP, and every instance counted is a false one.
            assert row["truth"] == 0 and row["AP50"] is None and row["F1"] is None
            assert row["baseline_AP50"] is None and row["AP50_se"] is None
            assert row["faint_share"] is None and row["recall_faint"] is None and row["recall_rest"] is None
            assert row["count_mae"] == pytest.approx(row["instances"] / row["images"], abs=0.005)
        else:
            assert 0 <= row["AP50"] <= 1 and 0 <= row["F1"] <= 1 and 0 <= row["AP50_se"] <= 0.5
    # Each real folder is scored against its own labels: three discs, then two, each image alone.
    assert [(r["truth"], r["images"]) for r in rows[-2:]] == [(3, 1), (2, 1)]
    # Well-separated bright discs: the threshold baseline finds them exactly.
    # and none is faint (200 grey levels over a noise-free background).
    for row in rows[-2:]:
        assert row["baseline_AP50"] == 1.0 and row["baseline_count_mae"] == 0
        assert row["faint_share"] == 0 and row["recall_faint"] is None and 0 <= row["recall_rest"] <= 1
    # --keep: the run and each archive's truth stay, and score as the table did.
    from pipeline.evaluate import evaluate, faint_recall, outcomes

    noisy = next(row for row in rows if row["archive"] == "noisy")
    scores, _ = evaluate(str(tmp_path / "kept" / "run"), str(tmp_path / "kept" / "truth-noisy.json"))
    assert round(scores["agnostic.segm.AP50"], 3) == noisy["AP50"] and scores["images"] == noisy["images"]
    kept = outcomes(str(tmp_path / "kept" / "run"), str(tmp_path / "kept" / "truth-noisy.json"))
    faint = faint_recall(kept.objects)
    assert round(faint["faint_share"], 3) == noisy["faint_share"] and 0 < noisy["faint_share"] < 1
    for taken in (tmp_path / "kept", tmp_path / "kept" / "run" / "run.json"):
        refused = bench("robustness", "--keep", str(taken), timeout=60)
        assert refused.returncode == 2 and "not an empty folder" in refused.stderr


def test_robustness_archives_take_cell_bodies_where_asked_and_keep_their_shifts():
    from pipeline.bench import robustness_looks
    from pipeline.synth import SHIFTS, TRAINING

    plain, cells = robustness_looks(), robustness_looks(0.7)
    assert [n for n, _ in plain] == [n for n, _ in cells] == ["in-distribution", *SHIFTS, "background-only"]
    assert plain[0][1] == TRAINING and TRAINING.cytoplasm_fraction == 0
    for (name, look), (_, with_cells) in zip(plain, cells, strict=True):
        assert with_cells.cytoplasm_fraction == 0.7
        assert replace(with_cells, cytoplasm_fraction=look.cytoplasm_fraction) == look, name
    wrong = bench("robustness", "--cell-bodies", "2", timeout=60)
    assert wrong.returncode == 2 and wrong.stderr.strip().splitlines()[-1].endswith(
        "--cell-bodies must be in [0, 1] (see --help)"
    )


def test_robustness_refuses_a_real_folder_without_label_images_before_any_work(tmp_path):
    (tmp_path / "a.tif").write_bytes(b"not read")
    wrong = bench("robustness", "--real", str(tmp_path), timeout=60)
    assert wrong.returncode == 2 and len(wrong.stderr.strip().splitlines()) == 1
    assert wrong.stderr.strip().endswith("nor images/ and masks/ folders of them (see --help)")
    for name in ("x", "y"):
        folder = tmp_path / name / "real"
        folder.mkdir(parents=True)
        (folder / "a.png").write_bytes(b"not read")
        (folder / "a_labels.png").write_bytes(b"not read")
    same_names = bench(
        "robustness", "--real", str(tmp_path / "x/real"), "--real", str(tmp_path / "y/real"), timeout=60
    )
    assert same_names.returncode == 2 and "--real folders must have different names" in same_names.stderr


def test_scale_benchmark_plans_generated_listings_and_scans_markers():
    result = bench("scale", "--sizes", "3000,9000", "--markers", "150", "--json", timeout=600)
    assert result.returncode == 0, result.stderr
    small, large, scan = (json.loads(line) for line in result.stdout.splitlines())
    assert small["images"] == 3000 and large["images"] == 9000
    assert (small["shard_size"], small["shards"]) == (512, 6)  # about 8 shards for one replica
    assert (large["shard_size"], large["shards"]) == (1024, 9)
    for row in (small, large):
        assert 0 < row["first_dispatch_s"] <= row["plan_s"]
        assert row["driver_peak_rss_bytes"] >= row["driver_baseline_rss_bytes"] > 0
    assert scan["markers"] == 150 and scan["resume_scan_s"] > 0 and scan["get_per_marker_s"] > 0


def test_slide_benchmark_reports_the_fields_units(random_model_path):
    flags = ["--slides", "1", "--size", "1024", "--tile-size", "256", "--model", str(random_model_path)]
    result = bench("slide", *flags, "--json", timeout=600)
    assert result.returncode == 0, result.stderr
    row = json.loads(result.stdout)
    for key in ("tiles_per_s_read", "pipeline_images_per_s", "forward_images_per_s", "ratio", "mm2_per_s"):
        assert row[key] > 0, key
    assert 0 <= row["background_skipped"] < 1 and row["windows"] > 0 and row["peak_rss_bytes"] > 0
    assert row["cells_per_s"] >= 0 and row["geojson_features_per_s"] >= 0


def test_a_wrong_flag_is_refused_before_torch_is_imported():
    """Flags are checked before the heavy imports: exit 2 at once, torch never loaded."""
    script = (
        "import sys\n"
        "from jobs import bench\n"
        "try:\n"
        "    bench.main(sys.argv[1:])\n"
        "except SystemExit as exc:\n"
        "    print(exc.code, 'torch' in sys.modules)\n"
    )
    wrong = (
        ["masks", "--cases", "12x"],
        ["masks", "--repeats", "0"],
        ["pipeline", "--images", "0"],
        ["robustness", "--cell-bodies", "2"],
        ["scale", "--sizes", "ten"],
        ["slide", "--tile-size", "64"],
        ["train", "--steps", "0"],
    )
    for args in wrong:
        result = subprocess.run(
            [sys.executable, "-c", script, *args], capture_output=True, text=True, cwd=REPO, timeout=120
        )
        assert result.stdout.split() == ["2", "False"], (args, result.stdout, result.stderr)


def test_train_benchmark_times_three_runs_and_checks_how_they_end():
    result = bench("train", "--steps", "2", "--size", "64", "--batch-size", "1", "--json", timeout=600)
    assert result.returncode == 0, result.stderr
    row = json.loads(result.stdout)
    assert row["same_weights"] is True and 0 <= row["gradient_difference"] < 1e-3
    assert 0 <= row["gradient_difference_threads"] < 1e-3
    assert row["batch_build_ms"] > 0
    for run in ("reference", "prefetched", "default"):
        assert row[f"steps_per_s_{run}"] > 0 and 0 <= row[f"data_wait_{run}"] <= 1
    # The ratio of the unrounded rates; the rates are printed rounded to 3 decimals.
    ratio = row["steps_per_s_default"] / row["steps_per_s_reference"]
    assert row["speedup"] == pytest.approx(ratio, rel=0.01)
