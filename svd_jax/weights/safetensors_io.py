"""safetensors files without the safetensors library: headers checked against the file, tensors read (whole or
by rows) into aligned buffers, files memory-mapped or streamed out, and the shards of one checkpoint merged.

No pickle and no torch: a header is JSON, a tensor is a byte range. Every byte range is checked against the
file before any data is read, so a truncated or corrupt file is reported (naming it), not misread.
"""

from __future__ import annotations

import dataclasses
import json
import math
import mmap
import os
from collections.abc import Iterable, Mapping, Sequence
from pathlib import Path
from typing import Any, BinaryIO

import ml_dtypes
import numpy as np

from .errors import CheckpointError

__all__ = ["TensorInfo", "locate_tensors", "read_checkpoint", "read_safetensors", "read_safetensors_header",
           "read_tensor", "write_safetensors"]

_ST_DTYPES = {
    "F64": np.float64, "F32": np.float32, "F16": np.float16, "BF16": ml_dtypes.bfloat16,
    "I64": np.int64, "I32": np.int32, "I16": np.int16, "I8": np.int8, "U8": np.uint8, "BOOL": np.bool_,
    "F8_E4M3": ml_dtypes.float8_e4m3fn, "F8_E5M2": ml_dtypes.float8_e5m2,
}


_ST_NAMES = {np.dtype(v): k for k, v in _ST_DTYPES.items()}


@dataclasses.dataclass(frozen=True)
class TensorInfo:
    """One tensor of a safetensors file: dtype, shape, and where its bytes are (absolute file offsets)."""

    dtype: np.dtype
    shape: tuple[int, ...]
    start: int  # first byte in the file
    nbytes: int


def read_safetensors_header(path: str | os.PathLike) -> tuple[dict[str, TensorInfo], dict[str, str]]:
    """Parse and check a safetensors header: ``({name: TensorInfo}, metadata)``; no tensor data is read.

    Every tensor's byte range must lie inside the file and its size equal dtype x shape, so a truncated or corrupt
    file raises :class:`CheckpointError` naming the file.
    """
    path = Path(path)
    size = path.stat().st_size
    if size < 8:
        raise CheckpointError(f"{path}: {size} bytes, too short for a safetensors file (truncated?)")
    with open(path, "rb") as f:
        n = int.from_bytes(f.read(8), "little")
        if n <= 0 or 8 + n > size:
            raise CheckpointError(
                f"{path}: header length {n} does not fit a {size}-byte file (truncated or not safetensors)")
        try:
            header = json.loads(f.read(n))
        except ValueError as e:
            raise CheckpointError(f"{path}: header is not valid JSON (corrupt or not safetensors): {e}") from e
    if not isinstance(header, dict):
        raise CheckpointError(f"{path}: header is not a JSON object (corrupt or not safetensors)")
    metadata = header.pop("__metadata__", None) or {}
    data_start = 8 + n
    data_len = size - data_start
    out = {}
    for name, info in header.items():
        try:
            dtype = np.dtype(_ST_DTYPES[info["dtype"]])
            shape = tuple(int(d) for d in info["shape"])
            begin, end = (int(o) for o in info["data_offsets"])
        except (KeyError, TypeError, ValueError) as e:
            raise CheckpointError(f"{path}: bad header entry for {name!r}: {info!r}") from e
        nbytes = math.prod(shape) * dtype.itemsize
        if end - begin != nbytes or begin < 0:
            raise CheckpointError(
                f"{path}: {name!r} occupies {end - begin} bytes but {info['dtype']}{list(shape)} needs {nbytes}")
        if end > data_len:
            raise CheckpointError(
                f"{path}: {name!r} ends at byte {data_start + end} but the file has {size} bytes (truncated download?)"
            )
        out[name] = TensorInfo(dtype, shape, data_start + begin, nbytes)
    return out, metadata


def read_tensor(
    f: BinaryIO, info: TensorInfo, rows: tuple[int, int] | None = None, buffer: np.ndarray | None = None
) -> np.ndarray:
    """Read one tensor, or the rows ``[lo, hi)`` of its leading axis, from an open safetensors file.

    Args:
      f: the file, opened ``"rb"``.
      info: the tensor's entry from :func:`read_safetensors_header`.
      rows: ``(lo, hi)`` to read only ``tensor[lo:hi]`` (shape ``(hi - lo,) + shape[1:]``); None for all of it.
      buffer: a uint8 array of at least the bytes read, to read into (a caller's reusable scratch space, for
        data copied out right away); the result is then a view of it.

    Returns:
      The tensor in the file's dtype: a new 64-byte-aligned array (jax on CPU adopts such a buffer without
      copying it), or a view of ``buffer``.

    Plain reads, not a memory map: on the VMs measured, faulting a map's pages in cost 6x the time of reading
    the same bytes (a 3 GB UNet from the page cache: 6.2 s mapped, 0.9 s read), and a map keeps every page read
    resident in the process.
    """
    shape = info.shape
    start, nbytes = info.start, info.nbytes
    if rows is not None and len(shape) > 0:
        row = math.prod(shape[1:]) * info.dtype.itemsize
        lo, hi = rows
        shape = (hi - lo,) + tuple(shape[1:])
        start, nbytes = info.start + lo * row, (hi - lo) * row
    out = _aligned_empty(shape, info.dtype) if buffer is None else buffer[:nbytes].view(info.dtype).reshape(shape)
    buf = out.reshape(-1).view(np.uint8)
    f.seek(start)
    done = 0
    while done < nbytes:  # one read() returns at most ~2 GB on Linux
        n = f.readinto(buf[done:])
        if not n:
            raise CheckpointError(f"{f.name}: ends inside a tensor's data (truncated while loading?)")
        done += n
    return out


_ALIGN = 64
_MAP_MIN = 1 << 20
_MAP_FLAGS = getattr(mmap, "MAP_PRIVATE", 0) | getattr(mmap, "MAP_ANONYMOUS", 0) | getattr(mmap, "MAP_POPULATE", 0)


def _aligned_empty(shape: tuple[int, ...], dtype: Any) -> np.ndarray:
    # On CPU, jax.device_put adopts a 64-byte-aligned numpy buffer as is, but copies any other one again at about
    # 1-2 GB/s (jnp.asarray always copies): seconds for a 3 GB UNet. Big buffers are fresh pre-faulted anonymous
    # maps (page-aligned): on the VMs measured, numpy's large allocations (advised as huge pages, compacted on
    # fault) took 1.2 s per GB to first touch, a pre-faulted map 0.35 s.
    dtype = np.dtype(dtype)
    nbytes = math.prod(shape) * dtype.itemsize
    if nbytes >= _MAP_MIN and _MAP_FLAGS & getattr(mmap, "MAP_ANONYMOUS", 0):
        return np.frombuffer(mmap.mmap(-1, nbytes, flags=_MAP_FLAGS), np.uint8).view(dtype).reshape(shape)
    raw = np.empty(nbytes + _ALIGN, np.uint8)
    begin = -raw.ctypes.data % _ALIGN
    return raw[begin : begin + nbytes].view(dtype).reshape(shape)


def _aligned_copy(src: np.ndarray, dtype: Any) -> np.ndarray:
    """``src`` copied (cast to ``dtype``) into a new 64-byte-aligned array."""
    out = _aligned_empty(src.shape, dtype)
    np.copyto(out, src, casting="unsafe")
    return out


class _Scratch:
    # One read buffer reused for bytes that are copied out right away: its pages are faulted in once, not per
    # tensor. Grown by replacement, so views handed out earlier stay valid.
    def __init__(self):
        self._buf = np.empty(0, np.uint8)

    def get(self, nbytes: int) -> np.ndarray:
        if self._buf.size < nbytes:
            self._buf = np.empty(nbytes, np.uint8)
        return self._buf


def _map_tensors(path: str | os.PathLike, infos: Mapping[str, TensorInfo]) -> dict[str, np.ndarray]:
    # Read-only views of one memory map of the file, nothing copied until used.
    if not any(i.nbytes for i in infos.values()):
        return {k: np.zeros(i.shape, i.dtype) for k, i in infos.items()}
    raw = np.memmap(path, dtype=np.uint8, mode="r")
    return {k: raw[i.start : i.start + i.nbytes].view(i.dtype).reshape(i.shape) for k, i in infos.items()}


def read_safetensors(path: str | os.PathLike) -> dict[str, np.ndarray]:
    """Memory-map a safetensors file: ``{name: read-only numpy view}``, nothing copied until used.

    The header is checked against the file (:func:`read_safetensors_header`), so a truncated or corrupt file
    raises :class:`CheckpointError` naming the file.
    """
    return _map_tensors(path, read_safetensors_header(path)[0])


def write_safetensors(
    path: str | os.PathLike,
    specs: Sequence[tuple[str, Any, tuple[int, ...]]],
    arrays: Iterable[np.ndarray],
    metadata: Mapping[str, str] | None = None,
) -> int:
    """Stream tensors into a safetensors file, one at a time: the header is written first from ``specs``.

    Args:
      path: the file to write.
      specs: ``(name, dtype, shape)`` of every tensor, in file order.
      arrays: the tensors in the same order, each produced when needed (a generator), so that peak memory is one
        tensor, not the model. Each must match its spec's dtype and shape.
      metadata: string key/values stored in the header's ``__metadata__``.

    Returns:
      The file size in bytes.
    """
    header: dict[str, Any] = {"__metadata__": dict(metadata)} if metadata else {}
    offset = 0
    for name, dtype, shape in specs:
        dtype = np.dtype(dtype)
        nbytes = math.prod(shape) * dtype.itemsize
        header[name] = {"dtype": _ST_NAMES[dtype], "shape": list(shape), "data_offsets": [offset, offset + nbytes]}
        offset += nbytes
    blob = json.dumps(header, separators=(",", ":")).encode()
    blob += b" " * (-len(blob) % 8)  # the data starts 8-byte aligned, as the safetensors library writes it
    with open(path, "wb") as f:
        f.write(len(blob).to_bytes(8, "little"))
        f.write(blob)
        count = 0
        for (name, dtype, shape), arr in zip(specs, arrays):
            if arr.dtype != np.dtype(dtype) or tuple(arr.shape) != tuple(shape):
                raise ValueError(
                    f"{name}: got {arr.dtype}{list(arr.shape)}, the header says {np.dtype(dtype)}{list(shape)}")
            f.write(np.ascontiguousarray(arr).reshape(-1).view(np.uint8))  # bytes (bf16 has no buffer format)
            count += 1
        if count != len(specs):
            raise ValueError(f"{path}: {len(specs)} tensors in the header but {count} arrays were given")
    return 8 + len(blob) + offset


def locate_tensors(files: Iterable[str | os.PathLike]) -> dict[str, tuple[Any, TensorInfo]]:
    """Where every tensor of one checkpoint (one file, or the shards of an index) is: ``{name: (file,
    TensorInfo)}``, each ``file`` as given, from the checked headers only (no tensor data is read).

    Raises:
      CheckpointError for a corrupt or truncated file (:func:`read_safetensors_header`), or a tensor name that
      appears in more than one shard.
    """
    located: dict[str, tuple[Any, TensorInfo]] = {}
    for f in files:
        for name, info in read_safetensors_header(f)[0].items():
            if name in located:
                raise CheckpointError(f"tensor {name!r} appears in more than one shard ({f})")
            located[name] = (f, info)
    return located


def read_checkpoint(files: Iterable[str | os.PathLike]) -> dict[str, np.ndarray]:
    """All tensors of one or several (sharded) safetensors files, memory-mapped; a name in two shards is an
    error (:func:`locate_tensors`)."""
    by_file: dict[Any, dict[str, TensorInfo]] = {}
    for name, (f, info) in locate_tensors(files).items():
        by_file.setdefault(f, {})[name] = info
    tensors: dict[str, np.ndarray] = {}
    for f, infos in by_file.items():
        tensors.update(_map_tensors(f, infos))
    return tensors
