"""Read a run's tables with pandas and compute per-slide (or per-image) statistics."""

from __future__ import annotations

import pandas as pd
import pyarrow.dataset as ds

from pipeline import commit, storage


def read_table(dest: str, name: str, columns: list[str] | None = None) -> pd.DataFrame:
    """The run's ``instances`` or ``images`` table as a DataFrame (committed shard files only).

    Files of shards without a committed marker (an interrupted attempt) are not read.
    """
    if name not in ("instances", "images"):
        raise ValueError(f"table must be 'instances' or 'images', got {name!r}")
    committed = sorted(commit.committed_shards(dest))
    uri_for = commit.instances_uri if name == "instances" else commit.images_uri
    fs, _ = storage.resolve(dest)
    paths = [storage.resolve(uri_for(dest, shard))[1] for shard in committed]
    if not paths:
        from schemas import IMAGES, INSTANCES

        schema = INSTANCES if name == "instances" else IMAGES
        return schema.empty_table().to_pandas()
    return ds.dataset(paths, format="parquet", filesystem=fs).to_table(columns=columns).to_pandas()


def summarize(
    instances: pd.DataFrame,
    images: pd.DataFrame,
    *,
    by: str = "slide",
    classes: list[str] | None = None,
    class_name: str | None = None,
    pixel_size_um: float | None = None,
) -> pd.DataFrame:
    """Per slide (``by="slide"``) or image (``by="image"``) and class statistics.

    Columns: the group key (``slide_id`` or ``uri``), ``class_name``, ``count``,
    ``area_mean``, ``area_median``, ``area_p10``, ``area_p90``, ``area_std``
    (px^2, or um^2 with ``pixel_size_um`` and then named ``area_um2_*``),
    ``score_mean``, ``count_per_tile``, ``count_per_mm2`` (with a pixel size),
    ``tiles`` (images processed ok) and ``tiles_error``. Every group appears
    with every class (count 0 where none was found).
    """
    key = {"slide": "slide_id", "image": "uri"}.get(by)
    if key is None:
        raise ValueError(f"by must be 'slide' or 'image', got {by!r}")
    classes = list(classes or sorted(instances["class_name"].unique()))
    if class_name is not None:
        if class_name not in classes:
            raise ValueError(f"unknown class {class_name!r}; classes: {classes}")
        classes = [class_name]
        instances = instances[instances["class_name"] == class_name]

    ok = images["status"] == "ok"
    tiles = images.assign(ok=ok, px=(images["height"].fillna(0) * images["width"].fillna(0)).where(ok, 0))
    per_group = tiles.groupby(key).agg(
        tiles=("ok", "sum"), tiles_error=("ok", lambda s: int((~s).sum())), tile_px=("px", "sum")
    )
    scale = (pixel_size_um**2) if pixel_size_um else 1.0
    area = instances["area"] * scale
    grouped = instances.assign(area=area).groupby([key, "class_name"])
    table = grouped.agg(
        count=("area", "size"),
        area_mean=("area", "mean"),
        area_median=("area", "median"),
        area_p10=("area", lambda a: a.quantile(0.1)),
        area_p90=("area", lambda a: a.quantile(0.9)),
        area_std=("area", "std"),
        score_mean=("score", "mean"),
    )
    full_index = pd.MultiIndex.from_product([per_group.index, classes], names=[key, "class_name"])
    table = table.reindex(full_index)
    table["count"] = table["count"].fillna(0).astype("int64")
    table = table.join(per_group, on=key)
    table["count_per_tile"] = table["count"] / table["tiles"].where(table["tiles"] > 0)
    if pixel_size_um:
        mm2 = table["tile_px"] * (pixel_size_um / 1000) ** 2
        table["count_per_mm2"] = table["count"] / mm2.where(mm2 > 0)
        table = table.rename(
            columns={c: c.replace("area_", "area_um2_") for c in table.columns if c.startswith("area_")}
        )
    table = table.drop(columns="tile_px").reset_index()
    table["tiles"] = table["tiles"].astype("int64")
    table["tiles_error"] = table["tiles_error"].astype("int64")
    return table


def per_slide(
    dest: str, *, by: str = "slide", class_name: str | None = None, pixel_size_um: float | None = None
) -> pd.DataFrame:
    """Statistics of the run at ``dest`` (local or S3); see :func:`summarize` for the columns."""
    run = commit.read_json(storage.join(dest, "run.json"))
    classes = list(run["model"]["card"]["classes"])
    instances = read_table(dest, "instances", columns=["slide_id", "uri", "class_name", "area", "score"])
    images = read_table(dest, "images", columns=["slide_id", "uri", "status", "height", "width"])
    return summarize(
        instances, images, by=by, classes=classes, class_name=class_name, pixel_size_um=pixel_size_um
    )
