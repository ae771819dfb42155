"""A pickle-free file format for state: JSON metadata plus raw tensors, with a checksum over all.

Server checkpoints and client state are read back from disk, where anyone with write access could
have left something; ``torch.load`` without ``weights_only`` runs whatever a pickle says. This
format holds only data::

    magic    8s   which kind of file (b"PRISMCKP" checkpoint, b"PRISMCST" client state, ...)
    version  I    FORMAT_VERSION
    hlen     I    length of the JSON header
    header        JSON: {"meta": <any JSON>, "tensors": [{"name", "dtype", "shape"}, ...]}
    data          every tensor's bytes (C order, little endian), in header order
    crc32    I    zlib.crc32 of everything before it

``unpack`` checks every field (magic, version, lengths, JSON, dtypes from a short list, shapes,
exact total size, checksum) and raises ``BlobError`` (a ``ValueError``) naming what is wrong.
"""

from __future__ import annotations

import json
import math
import struct
import zlib
from typing import Any

import numpy as np
import torch

FORMAT_VERSION = 1
_HEAD = struct.Struct("<8sII")
_CRC = struct.Struct("<I")
MAX_HEADER_BYTES = 256 * 2**20
DTYPES = ("float32", "float64", "float16", "int64", "int32", "int16", "int8", "uint8", "bool")


class BlobError(ValueError):
    """A state file or blob that must not be used."""


def _dumps(obj: Any) -> bytes:
    return json.dumps(obj, allow_nan=True, separators=(",", ":")).encode()


def strict_json(data: bytes, error: type[ValueError], what: str) -> Any:
    """``json.loads`` of untrusted bytes: ``error`` for invalid UTF-8 or JSON and duplicate keys."""

    def no_duplicates(pairs: list[tuple[str, Any]]) -> dict:
        out: dict = {}
        for key, value in pairs:
            if key in out:
                raise error(f"{what}: duplicate key {key!r} in the header")
            out[key] = value
        return out

    try:
        return json.loads(data.decode(), object_pairs_hook=no_duplicates)
    except (UnicodeDecodeError, json.JSONDecodeError, RecursionError) as err:
        raise error(f"{what}: header is not JSON: {err}") from None


def pack(magic: bytes, meta: Any, tensors: dict[str, torch.Tensor | np.ndarray] | None = None) -> bytes:
    """``meta`` (anything ``json`` writes) and named tensors -> bytes."""
    if len(magic) != 8:
        raise ValueError("magic must be 8 bytes")
    entries, chunks = [], []
    for name, value in (tensors or {}).items():
        arr = (
            value.detach().cpu().contiguous().numpy()
            if isinstance(value, torch.Tensor)
            else np.ascontiguousarray(value)
        )
        if str(arr.dtype) not in DTYPES:
            raise ValueError(f"tensor {name!r}: dtype {arr.dtype} is not one of {DTYPES}")
        arr = arr.astype(arr.dtype.newbyteorder("<"), copy=False)
        entries.append({"name": name, "dtype": str(arr.dtype), "shape": list(arr.shape)})
        chunks.append(arr.tobytes())
    header = _dumps({"meta": meta, "tensors": entries})
    body = _HEAD.pack(magic, FORMAT_VERSION, len(header)) + header + b"".join(chunks)
    return body + _CRC.pack(zlib.crc32(body))


def unpack(blob: bytes, magic: bytes, what: str = "file") -> tuple[Any, dict[str, torch.Tensor]]:
    """Bytes from ``pack`` -> ``(meta, {name: tensor})``; ``BlobError`` for anything else."""
    blob = bytes(blob)
    if len(blob) < _HEAD.size + _CRC.size:
        raise BlobError(f"{what} is truncated: {len(blob)} bytes")
    got_magic, version, hlen = _HEAD.unpack_from(blob)
    if got_magic != magic:
        raise BlobError(f"{what} is not a {magic.decode(errors='replace')} file (magic {got_magic!r})")
    if version != FORMAT_VERSION:
        raise BlobError(f"{what} has format version {version}, this build reads {FORMAT_VERSION}")
    if zlib.crc32(blob[: -_CRC.size]) != _CRC.unpack_from(blob, len(blob) - _CRC.size)[0]:
        raise BlobError(f"{what} checksum mismatch: the file is corrupted or truncated")
    if hlen > min(MAX_HEADER_BYTES, len(blob) - _HEAD.size - _CRC.size):
        raise BlobError(f"{what} header length {hlen} exceeds the file")
    header = strict_json(blob[_HEAD.size : _HEAD.size + hlen], BlobError, what)
    if (
        not isinstance(header, dict)
        or set(header) != {"meta", "tensors"}
        or not isinstance(header["tensors"], list)
    ):
        raise BlobError(f"{what} header must be an object with 'meta' and 'tensors'")
    offset, end, tensors = _HEAD.size + hlen, len(blob) - _CRC.size, {}
    for entry in header["tensors"]:
        if not (
            isinstance(entry, dict)
            and set(entry) == {"name", "dtype", "shape"}
            and isinstance(entry["name"], str)
            and entry["dtype"] in DTYPES
            and isinstance(entry["shape"], list)
            and all(type(d) is int and 0 <= d < 2**40 for d in entry["shape"])
        ):
            raise BlobError(f"{what}: bad tensor entry {str(entry)[:100]}")
        if entry["name"] in tensors:
            raise BlobError(f"{what}: tensor {entry['name']!r} appears twice")
        dtype = np.dtype(entry["dtype"]).newbyteorder("<")
        nbytes = math.prod(entry["shape"]) * dtype.itemsize
        if nbytes > end - offset:
            raise BlobError(f"{what}: tensor {entry['name']!r} runs past the end of the data")
        arr = np.frombuffer(blob, dtype=dtype, count=nbytes // dtype.itemsize, offset=offset)
        tensors[entry["name"]] = torch.from_numpy(
            arr.astype(dtype.newbyteorder("="), copy=True).reshape(entry["shape"])
        )
        offset += nbytes
    if offset != end:
        raise BlobError(f"{what}: {end - offset} bytes after the last tensor")
    return header["meta"], tensors
