"""One container for every per-instance field of an image, filtered together, written by the schema.

Like segment-anything's ``MaskData`` and detectron2's ``Instances``: fields
share a length, :meth:`InstanceColumns.filter` keeps the same instances in
all of them, and :meth:`InstanceColumns.to_table` builds the Arrow table of a
schema and refuses a field the schema lacks or a schema field it lacks. A new
instance column is one new entry where it is computed plus its schema field.
"""

from __future__ import annotations

from collections.abc import Iterable
from typing import Any

import numpy as np
import pyarrow as pa


class InstanceColumns:
    """Named per-instance fields of equal length N.

    A field is a NumPy array whose first axis is N, or a list of N values
    (strings, bytes, per-channel lists). Fields whose name starts with ``_``
    travel with the instances (filtered with them) but are never written.
    """

    def __init__(self, length: int | None = None, **fields: Any):
        self._fields: dict[str, Any] = {}
        self._length = length
        for name, values in fields.items():
            self[name] = values

    def __len__(self) -> int:
        return 0 if self._length is None else self._length

    def __contains__(self, name: str) -> bool:
        return name in self._fields

    def __getitem__(self, name: str) -> Any:
        return self._fields[name]

    def __setitem__(self, name: str, values: Any) -> None:
        """Add or replace a field; its length must be the container's."""
        length = len(values)
        if self._length is None:
            self._length = length
        elif length != self._length:
            raise ValueError(f"field {name!r} has {length} values, the other fields {self._length}")
        self._fields[name] = values

    @property
    def names(self) -> list[str]:
        """Field names in insertion order."""
        return list(self._fields)

    def update(self, other: InstanceColumns) -> InstanceColumns:
        """Add every field of ``other`` (same instances, same order); returns self."""
        for name in other.names:
            self[name] = other[name]
        return self

    def select(self, names: Iterable[str]) -> InstanceColumns:
        """Only the fields ``names`` (those present) and the private ``_`` fields, same instances."""
        wanted = set(names)
        out = InstanceColumns(length=len(self))
        for name, values in self._fields.items():
            if name in wanted or name.startswith("_"):
                out._fields[name] = values
        return out

    def filter(self, keep: np.ndarray) -> InstanceColumns:
        """The instances where the bool (N,) ``keep`` is true, in order, in every field."""
        keep = np.asarray(keep, bool)
        if keep.shape != (len(self),):
            raise ValueError(f"keep has shape {keep.shape}, expected ({len(self)},)")
        return self.take(np.flatnonzero(keep))

    def take(self, index: np.ndarray) -> InstanceColumns:
        """The instances at positions ``index`` (int (M,)), in that order, in every field."""
        out = InstanceColumns(length=len(index))
        for name, values in self._fields.items():
            out._fields[name] = [values[i] for i in index] if isinstance(values, list) else values[index]
        return out

    def check_schema(self, schema: pa.Schema) -> None:
        """Raise ValueError unless the written fields (those not starting with ``_``) are the schema's."""
        written = {name for name in self._fields if not name.startswith("_")}
        expected = set(schema.names)
        if written != expected:
            name = (schema.metadata or {}).get(b"segpipe.schema", b"?").decode()
            raise ValueError(
                f"instance fields do not match the {name} schema: missing {sorted(expected - written)}, "
                f"not in the schema {sorted(written - expected)}"
            )

    @staticmethod
    def concat(parts: list[InstanceColumns]) -> InstanceColumns:
        """The instances of ``parts`` (same fields, e.g. several images) one after the other."""
        joined = InstanceColumns(length=sum(len(part) for part in parts))
        for name in parts[0].names if parts else []:
            values = [part[name] for part in parts]
            joined[name] = (
                np.concatenate(values)
                if isinstance(values[0], np.ndarray)
                else [v for part in values for v in part]
            )
        return joined

    @staticmethod
    def to_table(parts: Iterable[InstanceColumns], schema: pa.Schema) -> pa.Table:
        """One Arrow table (``schema``) of the instances of several images, in order.

        Raises:
            ValueError: a part's fields are not exactly the schema's (besides ``_`` fields).
        """
        parts = list(parts)
        for part in parts:
            part.check_schema(schema)
        parts = [part for part in parts if len(part)]
        if not parts:
            return schema.empty_table()
        joined = InstanceColumns.concat(parts)
        arrays = []
        for field in schema:
            values = joined[field.name]
            # NaN is null in nullable float fields (a µm value without a pixel size).
            from_pandas = isinstance(values, np.ndarray) and field.nullable
            arrays.append(pa.array(values, type=field.type, from_pandas=from_pandas))
        return pa.Table.from_arrays(arrays, schema=schema)
