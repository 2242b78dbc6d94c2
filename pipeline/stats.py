"""Read a run's tables with pandas and compute per-slide (or per-image) statistics."""

from __future__ import annotations

import re

import numpy as np
import pandas as pd
import pyarrow as pa
import pyarrow.dataset as ds
import pyarrow.parquet as pq

from pipeline import commit, storage
from pipeline.plan import slides_uri
from schemas import IMAGES, INSTANCES, READABLE_VERSIONS, at_version, check_version

FEATURE_PATTERN = re.compile(r"^(?P<column>[a-z_0-9]+)(\[(?P<channel>[^\]]+)\])?$")
"""A feature spec: a numeric instances column, or a per-channel one with ``[channel name or index]``."""


def dataset(dest: str, name: str) -> ds.Dataset:
    """The run's ``instances`` or ``images`` table as a ``pyarrow`` dataset of its committed shard files.

    Files of shards without a committed marker (an interrupted attempt) are left out.
    """
    if name not in ("instances", "images"):
        raise ValueError(f"table must be 'instances' or 'images', got {name!r}")
    committed = sorted(commit.committed_shards(dest))
    uri_for = commit.instances_uri if name == "instances" else commit.images_uri
    fs, _ = storage.resolve(dest)
    paths = [storage.resolve(uri_for(dest, shard))[1] for shard in committed]
    if not paths:
        schema = INSTANCES if name == "instances" else IMAGES
        return ds.dataset(schema.empty_table())
    found = ds.dataset(paths, format="parquet", filesystem=fs)
    check_version(found.schema, name, READABLE_VERSIONS)
    return found


def read_table(dest: str, name: str, columns: list[str] | None = None) -> pd.DataFrame:
    """The run's ``instances`` or ``images`` table as a DataFrame (committed shard files only).

    Raises:
        ValueError: a column the run's schema version does not have.
    """
    found = dataset(dest, name)
    missing = sorted(set(columns or []) - set(found.schema.names))
    if missing:
        version = (found.schema.metadata or {}).get(b"segpipe.schema_version", b"?").decode()
        raise ValueError(
            f"the run at {storage.redact(dest)} has no {name} column {', '.join(missing)}: it was written "
            f"with table schema version {version}; segment it again to get them"
        )
    return found.to_table(columns=columns).to_pandas()


def feature_columns(instances: pd.DataFrame, images: pd.DataFrame, specs: list[str]) -> pd.DataFrame:
    """The features named by ``specs`` as plain numeric columns, one row per instance.

    A spec is a numeric instances column (``solidity``, ``area_um2``), or a
    per-channel one: ``intensity_mean`` gives one column per channel,
    ``intensity_mean[DAPI]`` or ``intensity_mean[0]`` just that one. Channels
    are named by ``images.channels`` when every image has the same channels,
    else by index. Output columns are named ``column`` or ``column[channel]``.

    Raises:
        ValueError: a malformed spec, a column that is not numeric, or an unknown channel.
    """
    channels = _common_channels(images)
    out = {}
    for spec in specs:
        match = FEATURE_PATTERN.match(spec)
        if not match or match["column"] not in instances or match["column"] not in numeric_features():
            raise ValueError(f"unknown feature {spec!r}; numeric columns: {numeric_features()}")
        values = instances[match["column"]]
        if not pa.types.is_list(INSTANCES.field(match["column"]).type):
            if match["channel"] is not None:
                raise ValueError(f"{match['column']!r} has no channels")
            out[spec] = values.astype(np.float64)
            continue
        stacked = np.array([np.asarray(v, np.float64) for v in values], dtype=object)
        width = max((len(v) for v in stacked), default=0)
        names = channels if channels and len(channels) == width else [str(k) for k in range(width)]
        wanted = names if match["channel"] is None else [match["channel"]]
        for name in wanted:
            if name in names:
                index = names.index(name)
            elif name.isdigit() and int(name) < width:
                index = int(name)
            else:
                raise ValueError(f"{match['column']}: no channel {name!r}; channels: {names}")
            out[f"{match['column']}[{names[index]}]"] = [
                v[index] if len(v) > index else np.nan for v in stacked
            ]
    return pd.DataFrame(out, index=instances.index)


def numeric_features() -> list[str]:
    """Instances columns that ``--features`` accepts (measurements, not ids)."""
    skip = {"image_id", "shard_id", "instance_id", "label", "height", "width"}
    return [
        f.name
        for f in INSTANCES
        if f.name not in skip
        and (pa.types.is_floating(f.type) or pa.types.is_integer(f.type) or pa.types.is_list(f.type))
    ]


def _common_channels(images: pd.DataFrame) -> list[str] | None:
    if "channels" not in images:
        return None
    seen = {tuple(c) for c in images["channels"].dropna()}
    return list(next(iter(seen))) if len(seen) == 1 else None


def summarize(
    instances: pd.DataFrame,
    images: pd.DataFrame,
    *,
    by: str = "slide",
    classes: list[str] | None = None,
    class_name: str | None = None,
    pixel_size_um: float | None = None,
    features: list[str] | None = None,
    slides: pd.DataFrame | None = None,
) -> pd.DataFrame:
    """Per slide (``by="slide"``) or image (``by="image"``) and class statistics.

    Columns: the group key (``slide_id`` or ``uri``), ``class_name``, ``count``,
    ``area_mean``, ``area_median``, ``area_p10``, ``area_p90``, ``area_std``
    (px^2, or um^2 with ``pixel_size_um`` and then named ``area_um2_*``),
    ``score_mean``, ``count_per_tile``, ``count_per_mm2`` (with a pixel size),
    ``tiles`` (images processed ok) and ``tiles_error``; ``tiles_enlarged``
    (images the model saw enlarged, ``--scale``) when ``images`` has a
    ``scale`` column (schema version 4 on); with ``features``
    (see :func:`feature_columns`), ``F_mean`` and ``F_median`` for each. Every
    group appears with every class (count 0 where none was found).

    ``slides`` (the run's ``slides`` table, whole-slide runs): per slide also
    ``slide_status``, ``tissue_mm2`` and ``count_per_mm2_tissue``, and, from
    the instances' own ``area_um2`` (each slide's pixel size), ``area_um2_mean``
    and ``area_um2_median``; a slide in error or without tissue has a row too.
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
    counted = {
        "tiles": ("ok", "sum"),
        "tiles_error": ("ok", lambda s: int((~s).sum())),
        "tile_px": ("px", "sum"),
    }
    if "scale" in images:
        tiles = tiles.assign(enlarged=ok & (images["scale"] > 1))
        counted["tiles_enlarged"] = ("enlarged", "sum")
    per_group = tiles.groupby(key).agg(**counted)
    slide_wise = slides is not None and by == "slide" and len(slides)
    if slide_wise:
        index = per_group.index.union(pd.Index(slides["slide_id"], name=key))
        per_group = per_group.reindex(index, fill_value=0)
    scale = (pixel_size_um**2) if pixel_size_um else 1.0
    area = instances["area"] * scale
    extra = feature_columns(instances, images, features) if features else pd.DataFrame(index=instances.index)
    if slide_wise and not pixel_size_um and "area_um2" in instances:
        extra = extra.assign(area_um2=instances["area_um2"])
    grouped = pd.concat([instances.assign(area=area)[[key, "class_name", "area", "score"]], extra], axis=1)
    grouped = grouped.groupby([key, "class_name"])
    table = grouped.agg(
        count=("area", "size"),
        area_mean=("area", "mean"),
        area_median=("area", "median"),
        area_p10=("area", lambda a: a.quantile(0.1)),
        area_p90=("area", lambda a: a.quantile(0.9)),
        area_std=("area", "std"),
        score_mean=("score", "mean"),
        **{f"{c}_{how}": (c, how) for c in extra.columns for how in ("mean", "median")},
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
    if slide_wise:
        table = table.rename(
            columns={"area_um2_mean_mean": "area_um2_mean", "area_um2_median": "area_um2_median"}
        )
        tissue = slides.set_index("slide_id")[["status", "tissue_area_mm2"]]
        tissue = tissue.rename(columns={"status": "slide_status", "tissue_area_mm2": "tissue_mm2"})
        table = table.join(tissue, on=key)
        table["count_per_mm2_tissue"] = table["count"] / table["tissue_mm2"].where(table["tissue_mm2"] > 0)
    table = table.drop(columns="tile_px").reset_index()
    table["tiles"] = table["tiles"].astype("int64")
    table["tiles_error"] = table["tiles_error"].astype("int64")
    if "tiles_enlarged" in table:
        table["tiles_enlarged"] = table["tiles_enlarged"].astype("int64")
    return table


def per_slide(
    dest: str,
    *,
    by: str = "slide",
    class_name: str | None = None,
    pixel_size_um: float | None = None,
    features: list[str] | None = None,
) -> pd.DataFrame:
    """Statistics of the run at ``dest`` (local or S3); see :func:`summarize` for the columns."""
    run = commit.read_json(storage.join(dest, "run.json"))
    classes = list(run["model"]["card"]["classes"])
    matches = [(spec, FEATURE_PATTERN.match(spec)) for spec in features or []]
    for spec, match in matches:
        if not match or match["column"] not in numeric_features():
            raise ValueError(f"unknown feature {spec!r}; numeric columns: {numeric_features()}")
    wanted = {match["column"] for _, match in matches}
    columns = ["slide_id", "uri", "class_name", "area", "score", *sorted(wanted - {"area", "score"})]
    instances = read_table(dest, "instances", columns=columns)
    image_columns = ["slide_id", "uri", "status", "height", "width"] + (["channels"] if features else [])
    if "scale" in at_version(IMAGES, run.get("schema_version", "1")).names:
        image_columns.append("scale")
    images = read_table(dest, "images", columns=image_columns)
    slides = read_slides(dest)
    if slides is not None and "area_um2" not in columns and run.get("schema_version", "1") != "1":
        instances = instances.join(read_table(dest, "instances", columns=["area_um2"]))
    return summarize(
        instances,
        images,
        by=by,
        classes=classes,
        class_name=class_name,
        pixel_size_um=pixel_size_um,
        features=features,
        slides=slides,
    )


def read_slides(dest: str) -> pd.DataFrame | None:
    """The run's ``slides`` table (whole-slide runs), or None for a run without slide files."""
    uri = slides_uri(dest)
    if not storage.exists(uri):
        return None
    fs, path = storage.resolve(uri)
    with fs.open_input_file(path) as handle:
        table = pq.read_table(handle)
    check_version(table.schema, "slides", READABLE_VERSIONS)
    return table.to_pandas()


def slide_row(dest: str, slide: str) -> pd.Series | None:
    """The ``slides`` row of slide file ``slide`` in the run, or None (no such slide file)."""
    slides = read_slides(dest)
    if slides is None or not (slides["slide_id"] == slide).any():
        return None
    return slides[slides["slide_id"] == slide].iloc[0]
