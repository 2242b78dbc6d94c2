"""The per-instance container: fields filtered together, the table built from the schema and only it."""

from __future__ import annotations

import numpy as np
import pyarrow as pa
import pytest

from pipeline.columns import InstanceColumns

SMALL = pa.schema(
    [
        pa.field("name", pa.string(), nullable=False),
        pa.field("score", pa.float32(), nullable=False),
        pa.field("area_um2", pa.float64(), nullable=True),
        pa.field("intensity", pa.list_(pa.float64()), nullable=False),
    ],
    metadata={"segpipe.schema": "small"},
)


def columns(n: int, offset: int = 0) -> InstanceColumns:
    return InstanceColumns(
        name=[f"i{offset + k}" for k in range(n)],
        score=np.arange(n, dtype=np.float32) + offset,
        area_um2=np.where(np.arange(n) % 2 == 0, np.nan, 1.5),
        intensity=[np.array([k, 2.0 * k]) for k in range(n)],
        _box=np.arange(4 * n).reshape(n, 4),
    )


def test_filter_keeps_every_field_aligned():
    data = columns(5)
    kept = data.filter(np.array([True, False, True, False, True]))
    assert len(kept) == 3 and kept.names == data.names
    assert kept["name"] == ["i0", "i2", "i4"]
    assert kept["score"].tolist() == [0, 2, 4]
    assert kept["_box"][:, 0].tolist() == [0, 8, 16]
    assert [v.tolist() for v in kept["intensity"]] == [[0, 0], [2, 4], [4, 8]]
    with pytest.raises(ValueError, match="expected"):
        data.filter(np.ones(4, bool))


def test_a_field_of_another_length_is_refused():
    data = columns(3)
    with pytest.raises(ValueError, match="'extra' has 2 values"):
        data["extra"] = np.zeros(2)


def test_table_follows_the_schema_nan_is_null_where_nullable_and_private_fields_stay_out():
    table = InstanceColumns.to_table([columns(2), columns(0), columns(3, offset=2)], SMALL)
    assert table.schema == SMALL and table.num_rows == 5
    assert table.column("name").to_pylist() == ["i0", "i1", "i2", "i3", "i4"]
    assert table.column("area_um2").to_pylist() == [None, 1.5, None, 1.5, None]
    assert table.column("intensity").to_pylist()[1] == [1.0, 2.0]
    assert InstanceColumns.to_table([], SMALL).num_rows == 0


def test_a_missing_or_extra_field_is_an_error_that_names_it():
    missing = columns(2)
    missing._fields.pop("score")
    with pytest.raises(ValueError, match=r"missing \['score'\]"):
        InstanceColumns.to_table([missing], SMALL)
    extra = columns(2)
    extra["colour"] = ["red", "blue"]
    with pytest.raises(ValueError, match=r"not in the schema \['colour'\]"):
        InstanceColumns.to_table([extra], SMALL)
    empty_but_wrong = InstanceColumns(length=0, name=[])
    with pytest.raises(ValueError, match="missing"):
        InstanceColumns.to_table([empty_but_wrong], SMALL)
