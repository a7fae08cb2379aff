"""A group of arrays in one Tiled container, made ahead of their data and then overwritten.

Making an array node in Tiled (a catalog insert and new Zarr storage) costs the
server more than filling it, and it is the part a reader waits for at the
first live image and at the final result. A sink that knows the layout early
(the canvas is fixed when the run is configured; the final result has the
live snapshots' layout) makes the nodes while nothing is waiting, and the
writes that matter become uploads only.

Arrays that grow by rows (``diffraction/``) are appended with
:func:`append_rows`, which both the run's writer and the recovery of a kept
result use: each array at its own length, so an attempt that failed half way
is completed, never duplicated.
"""

from __future__ import annotations

import contextlib
import logging
from concurrent.futures import Executor
from typing import Any

import numpy as np

logger = logging.getLogger(__name__)

#: Shape and dtype of each array of a group, by key.
Layout = dict[str, tuple[tuple[int, ...], np.dtype[Any]]]


def new_array(parent: Any, key: str, shape: tuple[int, ...], dtype: np.dtype[Any]) -> Any:
    """An empty array node chunked as Tiled's own ``write_array`` would chunk it."""
    from dask.array.core import normalize_chunks
    from tiled.structures.array import ArrayStructure, BuiltinDtype
    from tiled.structures.core import StructureFamily
    from tiled.structures.data_source import DataSource

    chunks = normalize_chunks(
        tuple("auto" for _ in shape),
        limit=parent._SUGGESTED_MAX_UPLOAD_SIZE,
        dtype=dtype,
        shape=shape,
    )
    structure = ArrayStructure(
        shape=tuple(shape),
        chunks=chunks,
        dims=None,
        data_type=BuiltinDtype.from_numpy_dtype(np.dtype(dtype)),
    )
    return parent.new(
        StructureFamily.array,
        [DataSource(structure=structure, structure_family=StructureFamily.array)],
        key=key,
    )


def fill(client: Any, value: np.ndarray) -> None:
    """Upload all of ``value`` into an existing array node, block by block if it has blocks."""
    chunks = client.structure().chunks
    if all(len(dim) == 1 for dim in chunks):
        client.write(np.ascontiguousarray(value))
        return
    starts = [np.cumsum((0, *dim[:-1])) for dim in chunks]
    for block in np.ndindex(*(len(dim) for dim in chunks)):
        region = tuple(
            slice(int(starts[axis][i]), int(starts[axis][i]) + chunks[axis][i])
            for axis, i in enumerate(block)
        )
        client.write_block(np.ascontiguousarray(value[region]), block=block)


def _layout_of(client: Any) -> tuple[tuple[int, ...], np.dtype[Any]]:
    return tuple(client.shape), client.structure().data_type.to_numpy_dtype()


class ArrayGroup:
    """The arrays under one child container (``live/``, ``final/``), by key.

    Used from the sink's writer thread only; ``put`` of different keys may run
    in parallel on the sink's pool (each touches its own key).
    """

    def __init__(self, node: Any) -> None:
        self.node = node
        self.arrays: dict[str, Any] = {}
        #: Keys whose making failed half way: the node may exist without its data.
        self._uncertain: set[str] = set()

    @classmethod
    def existing(cls, node: Any) -> ArrayGroup:
        """A group over a container that may already hold arrays (a second attempt)."""
        group = cls(node)
        group.arrays = {key: node[key] for key in node}
        return group

    def make_ahead(self, layout: Layout, pool: Executor) -> None:
        """Make an empty node for every array of ``layout`` (in parallel); one made earlier
        with another layout is replaced."""
        wanted = {}
        for key, (shape, dtype) in layout.items():
            client = self.arrays.get(key)
            if client is not None and _layout_of(client) == (tuple(shape), np.dtype(dtype)):
                continue
            wanted[key] = (shape, dtype)
        made = {
            key: pool.submit(self._replace, key, shape, dtype)
            for key, (shape, dtype) in wanted.items()
        }
        for key, future in made.items():
            try:
                self.arrays[key] = future.result()
            except Exception as exc:  # put() makes it with the data instead
                self.arrays.pop(key, None)
                self._uncertain.add(key)
                logger.info("%s not made ahead: %s", key, exc)

    def _replace(self, key: str, shape: tuple[int, ...], dtype: np.dtype[Any]) -> Any:
        old = self.arrays.get(key)
        if old is not None:
            old.delete(external_only=False)  # the node and its (empty) Zarr files
        return new_array(self.node, key, shape, dtype)

    def put(self, key: str, value: np.ndarray) -> None:
        """Overwrite the array of ``key`` (made ahead or by an earlier put), or make it now.

        A node made ahead with another layout than ``value`` (a guess that did not
        hold) is replaced.
        """
        client = self._known(key)
        if client is None:
            self._make(key, value)
            return
        held = _layout_of(client)
        if held == (value.shape, value.dtype):
            fill(client, value)
            return
        logger.info("%s: made as %s, the data is %s %s", key, held, value.shape, value.dtype)
        client.delete(external_only=False)  # the node and its (empty) Zarr files
        del self.arrays[key]
        self._make(key, value)

    def extend(self, key: str, value: np.ndarray) -> None:
        """A growing 1-D array (the error history): write the part Tiled lacks."""
        client = self._known(key)
        if client is None:
            self._make(key, value)
            return
        written = client.shape[0]
        if value.shape[0] > written:
            client.patch(value[written:], offset=(written,), extend=True)
            client.refresh()

    def _known(self, key: str) -> Any:
        """The node of ``key`` if it exists (asking Tiled only after a failed attempt)."""
        if key in self._uncertain:
            with contextlib.suppress(KeyError):
                self.arrays[key] = self.node[key]
            self._uncertain.discard(key)
        return self.arrays.get(key)

    def _make(self, key: str, value: np.ndarray) -> None:
        try:
            self.arrays[key] = self.node.write_array(value, key=key)
        except Exception:
            self._uncertain.add(key)
            raise


def append_rows(
    group: Any,
    key: str,
    data: np.ndarray,
    *,
    first: int,
    client: Any = None,
    held: int | None = None,
) -> tuple[Any, int]:
    """Make array ``key`` of ``group`` hold ``data`` as its rows from row ``first`` on,
    writing only the rows it lacks; returns its client and ``first + len(data)``.

    ``client`` and ``held`` are the node and the rows it holds when the caller's own
    earlier writes tell it; without them Tiled is asked. A node the caller did not
    see made either starts at ``data`` (an earlier ``write_array`` that may have
    failed before its data landed: its rows are written again) or holds rows past
    ``first`` from an earlier append (skipped).
    """
    if client is None and key in group:
        client = group[key]
        held = int(client.shape[0])
        if first == 0:
            if held > len(data):
                raise RuntimeError(f"{key} has {held} rows, {len(data)} to write")
            client.write(np.ascontiguousarray(data[:held]))
    elif client is None:
        if first:
            raise RuntimeError(f"{key} is missing its first {first} rows in Tiled")
        return group.write_array(np.ascontiguousarray(data), key=key), len(data)
    if held is None:
        held = int(client.shape[0])
    skip = held - first
    if skip < 0:
        raise RuntimeError(f"{key} holds {held} rows, the data follows row {first}")
    if skip < len(data):
        client.patch(np.ascontiguousarray(data[skip:]), offset=(held,), extend=True)
    return client, first + len(data)
