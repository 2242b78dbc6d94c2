"""The benchmark commands run on tiny inputs and report the keys BENCHMARKS.md relies on."""

from __future__ import annotations

import json
import subprocess
import sys

from tests.conftest import REPO


def test_masks_benchmark_json_has_the_keys_and_checks_rle():
    result = subprocess.run(
        [sys.executable, "-m", "jobs.bench", "masks", "--cases", "128x5,96x3", "--repeats", "1", "--json"],
        capture_output=True,
        text=True,
        cwd=REPO,
        timeout=300,
    )
    assert result.returncode == 0, result.stderr
    rows = [json.loads(line) for line in result.stdout.splitlines()]
    assert [(r["size"], r["instances"]) for r in rows] == [(128, 5), (96, 3)]
    for row in rows:
        assert {"size", "instances", "reference_s", "pipeline_s", "speedup"} <= set(row)
        assert row["reference_s"] > 0 and row["pipeline_s"] > 0
