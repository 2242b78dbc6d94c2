"""Per-slide statistics agree with a plain pandas groupby on the instances."""

from __future__ import annotations

import numpy as np
import pandas as pd
import pytest

from pipeline.stats import summarize
from schemas import ADDED_IN_VERSION_2
from tests.helpers import run_job


@pytest.fixture
def tables():
    rng = np.random.default_rng(0)
    images = pd.DataFrame(
        {
            "slide_id": ["a"] * 3 + ["b"] * 2 + ["c"],
            "uri": [f"u{i}" for i in range(6)],
            "status": ["ok", "ok", "decode", "ok", "ok", "ok"],
            "height": [100, 100, None, 100, 50, 100],
            "width": [100, 100, None, 100, 50, 100],
        }
    )
    n = 40
    instances = pd.DataFrame(
        {
            "slide_id": rng.choice(["a", "b"], n),
            "uri": rng.choice(["u0", "u1", "u3"], n),
            "class_name": rng.choice(["nucleus", "mitotic"], n, p=[0.8, 0.2]),
            "area": rng.integers(20, 400, n),
            "score": rng.uniform(0.5, 1, n),
        }
    )
    return instances, images


def test_per_slide_matches_plain_groupby(tables):
    instances, images = tables
    table = summarize(instances, images, classes=["nucleus", "mitotic"]).set_index(["slide_id", "class_name"])
    plain = instances.groupby(["slide_id", "class_name"]).agg(
        count=("area", "size"),
        area_mean=("area", "mean"),
        area_median=("area", "median"),
        area_std=("area", "std"),
        score_mean=("score", "mean"),
    )
    for key, row in plain.iterrows():
        for column in plain.columns:
            assert table.loc[key, column] == pytest.approx(row[column])
        p90 = instances[(instances.slide_id == key[0]) & (instances.class_name == key[1])]["area"].quantile(
            0.9
        )
        assert table.loc[key, "area_p90"] == pytest.approx(p90)
    # every slide appears with every class; slide c has no instances
    assert table.loc[("c", "nucleus"), "count"] == 0 and table.loc[("c", "mitotic"), "count"] == 0
    assert table.loc[("a", "nucleus"), "tiles"] == 2 and table.loc[("a", "nucleus"), "tiles_error"] == 1
    a_count = (instances.slide_id == "a").sum()
    total = table.loc["a", "count"].sum()
    assert total == a_count
    assert table.loc["a", "count_per_tile"].sum() == pytest.approx(a_count / 2)
    assert "tiles_enlarged" not in table  # a run without images.scale (schema version 3 and older)


def test_tiles_the_model_saw_enlarged_are_counted_per_slide(tables):
    instances, images = tables
    images = images.assign(scale=[1.0, 2.0, None, 1.0, 1.5, 1.0])
    table = summarize(instances, images, classes=["nucleus"]).set_index("slide_id")
    assert table["tiles_enlarged"].to_dict() == {"a": 1, "b": 1, "c": 0}
    assert table["tiles_enlarged"].dtype == "int64"


def test_pixel_size_gives_um2_and_density_per_mm2(tables):
    instances, images = tables
    table = summarize(instances, images, pixel_size_um=0.5).set_index(["slide_id", "class_name"])
    plain = instances.groupby(["slide_id", "class_name"])["area"].mean() * 0.25
    for key, value in plain.items():
        assert table.loc[key, "area_um2_mean"] == pytest.approx(value)
    tile_mm2 = 2 * 100 * 100 * (0.5 / 1000) ** 2
    assert table.loc["a", "count_per_mm2"].sum() == pytest.approx(
        (instances.slide_id == "a").sum() / tile_mm2
    )


def test_class_filter_and_by_image(tables):
    instances, images = tables
    only = summarize(instances, images, class_name="mitotic")
    assert set(only["class_name"]) == {"mitotic"}
    assert only["count"].sum() == (instances.class_name == "mitotic").sum()
    by_image = summarize(instances, images, by="image")
    assert by_image.groupby("uri")["count"].sum().to_dict() == {
        u: int((instances.uri == u).sum()) for u in images.uri
    }
    with pytest.raises(ValueError, match="unknown class"):
        summarize(instances, images, class_name="cell")


def test_features_give_per_slide_mean_and_median_per_channel(tables):
    instances, images = tables
    rng = np.random.default_rng(1)
    instances = instances.assign(
        solidity=rng.uniform(0.6, 1, len(instances)),
        intensity_mean=[rng.uniform(0, 4000, 2) for _ in range(len(instances))],
    )
    images = images.assign(channels=[["DAPI", "GFP"]] * len(images))
    table = summarize(instances, images, features=["solidity", "intensity_mean"])
    table = table.set_index(["slide_id", "class_name"])
    dapi = instances["intensity_mean"].str[0]
    for key, group in instances.groupby(["slide_id", "class_name"]):
        assert table.loc[key, "solidity_mean"] == pytest.approx(group["solidity"].mean())
        assert table.loc[key, "solidity_median"] == pytest.approx(group["solidity"].median())
        assert table.loc[key, "intensity_mean[DAPI]_median"] == pytest.approx(dapi[group.index].median())
        gfp = group["intensity_mean"].str[1]
        assert table.loc[key, "intensity_mean[GFP]_mean"] == pytest.approx(gfp.mean())
    one = summarize(instances, images, features=["intensity_mean[1]"])
    assert "intensity_mean[GFP]_mean" in one.columns and "intensity_mean[DAPI]_mean" not in one.columns
    for bad, message in (
        ("intensity_mean[Cy5]", "no channel 'Cy5'"),
        ("roundness", "unknown feature"),
        ("solidity[0]", "has no channels"),
        ("class_name", "unknown feature"),
    ):
        with pytest.raises(ValueError, match=message):
            summarize(instances, images, features=[bad])


def test_stats_features_on_a_real_run_and_a_clear_no_for_unknown_ones(segmented_run):
    def stats(*args):
        return run_job("jobs.stats", str(segmented_run), *args, timeout=120)

    ok = stats("--features", "solidity,eccentricity,intensity_mean[0]")
    assert ok.returncode == 0, ok.stderr
    assert "solidity_mean" in ok.stdout and "intensity_mean[0]_median" in ok.stdout
    bad = stats("--features", "roundness")
    assert bad.returncode == 2 and "unknown feature 'roundness'" in bad.stderr
    assert len(bad.stderr.strip().splitlines()) == 1


def test_a_version_1_run_still_reads_and_says_why_it_has_no_features(segmented_run, tmp_path):
    """An old run: tables without the feature columns, schema version 1 in their metadata."""
    import shutil

    import pyarrow.parquet as pq

    from pipeline.stats import per_slide

    old = tmp_path / "old"
    shutil.copytree(segmented_run, old)
    for table_name in ("instances", "images"):
        for path in (old / table_name).glob("*.parquet"):
            table = pq.read_table(path)
            keep = [n for n in table.schema.names if n not in ADDED_IN_VERSION_2]
            meta = {**table.schema.metadata, b"segpipe.schema_version": b"1"}
            pq.write_table(table.select(keep).replace_schema_metadata(meta), path)
    table = per_slide(str(old))
    assert table["count"].sum() == pq.read_table(segmented_run / "instances").num_rows
    with pytest.raises(ValueError, match="schema version 1"):
        per_slide(str(old), features=["solidity"])
