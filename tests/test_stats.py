"""Per-slide statistics agree with a plain pandas groupby on the instances."""

from __future__ import annotations

import numpy as np
import pandas as pd
import pytest

from pipeline.stats import summarize


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
