"""The final model as one small file: rebuild recipe + one binary mask.

A PRISM model is the frozen random network (``GeneratorSpec``: nz, ngf, nc, seed) times a binary
mask, so ``model.prism`` stores just those, with a checksum over everything (about 443 kB for the
paper's generator against 14.2 MB of float32 weights). ``load_sparse_model`` trusts nothing in the
file and raises ``ModelFileError`` with the reason. Byte layout and checks: docs/security.md.
"""

from __future__ import annotations

import json
import struct
import zlib
from pathlib import Path

import numpy as np
import torch

from prism_flwr.federated.codec import (
    HEADER_BYTES,
    MaskFormatError,
    decode_mask,
    encode_mask,
    packed_length,
    unpack_mask,
)
from prism_flwr.model.generator import GeneratorSpec, ResnetGenerator
from prism_flwr.model.masked import layout_fingerprint, num_masked, set_mask_mode, set_scores
from prism_flwr.storage.blob import strict_json
from prism_flwr.storage.files import write_bytes_atomic

EXPORT_FORMAT = 2
MAGIC = b"PRISMMDL"
_HEAD = struct.Struct("<8sII")
_CRC = struct.Struct("<I")
MAX_HEADER_BYTES = 4096
MAX_WEIGHTS = 2**28  # 268 M masked weights: ngf 512 (the config's maximum) has 226 M at nz 128
LIMITS = {"nz": (1, 4096), "ngf": (1, 512), "nc": (1, 3), "seed": (0, 2**63 - 1)}
META = {"dataset": ("mnist", "fmnist", "cifar10", "celeba"), "mask": ("sample", "threshold")}


class ModelFileError(ValueError):
    """A model file that must not be loaded; the message says why."""


def expected_weight_count(spec: GeneratorSpec) -> int:
    """Masked weights of ``ResnetGenerator(spec)``, computed without building it."""
    nz, g, nc = spec.nz, spec.ngf, spec.nc

    def up(cin: int, cout: int) -> int:  # conv3x3, conv3x3, 1x1 skip
        return 9 * cin * cout + 9 * cout * cout + cin * cout

    return 16 * nz * 8 * g + up(8 * g, 4 * g) + up(4 * g, 2 * g) + up(2 * g, g) + 9 * g * nc


def validate_header(header: object) -> GeneratorSpec:
    """The generator spec of a header that follows the schema; ``ModelFileError`` otherwise."""
    if not isinstance(header, dict):
        raise ModelFileError("header is not a JSON object")
    unknown = set(header) - {"format", "generator", *META}
    if unknown:
        raise ModelFileError(f"unknown header keys {sorted(unknown)[:5]}")
    if header.get("format") != EXPORT_FORMAT or type(header.get("format")) is not int:
        raise ModelFileError(f"header format {header.get('format')!r}, this build reads {EXPORT_FORMAT}")
    for key, allowed in META.items():
        if key in header and header[key] not in allowed:
            raise ModelFileError(f"header {key!r} = {str(header[key])[:40]!r}, allowed: {', '.join(allowed)}")
    gen = header.get("generator")
    if not isinstance(gen, dict) or set(gen) != set(LIMITS):
        raise ModelFileError(f"header 'generator' must hold exactly {sorted(LIMITS)}")
    for key, (lo, hi) in LIMITS.items():
        value = gen[key]
        if type(value) is not int or not lo <= value <= hi:
            raise ModelFileError(f"generator {key} = {repr(value)[:40]}, must be an integer in [{lo}, {hi}]")
    if gen["nc"] == 2:
        raise ModelFileError("generator nc = 2: images have 1 or 3 channels")
    return GeneratorSpec(**gen)


def save_sparse_model(
    path: str | Path, spec: GeneratorSpec, mask: np.ndarray, meta: dict | None = None
) -> int:
    """Write ``spec`` and the flat boolean ``mask``; returns the file size in bytes."""
    header_dict = {"format": EXPORT_FORMAT, "generator": spec.to_dict(), **(meta or {})}
    validate_header(header_dict)  # never write what load_sparse_model would refuse
    model = ResnetGenerator(spec)
    header = json.dumps(header_dict).encode()
    body = (
        _HEAD.pack(MAGIC, EXPORT_FORMAT, len(header))
        + header
        + encode_mask(np.asarray(mask), layout_fingerprint(model))
    )
    blob = body + _CRC.pack(zlib.crc32(body))
    write_bytes_atomic(path, blob)
    return len(blob)


def read_sparse_model(path: str | Path, max_weights: int = MAX_WEIGHTS) -> tuple[dict, GeneratorSpec, bytes]:
    """Checked ``(header, spec, mask wire bytes)`` of a model file, nothing allocated beyond the file."""
    path = Path(path)
    with open(path, "rb") as f:
        # A model file is its mask plus a small header: never read more than the largest allowed one.
        blob = f.read(
            _HEAD.size + MAX_HEADER_BYTES + HEADER_BYTES + packed_length(max_weights) + _CRC.size + 1
        )
    where = str(path)
    if len(blob) < _HEAD.size + _CRC.size:
        raise ModelFileError(f"{where}: truncated ({len(blob)} bytes)")
    magic, version, hlen = _HEAD.unpack_from(blob)
    if magic != MAGIC:
        if blob[4:5] == b"{":
            raise ModelFileError(
                f"{where}: written by an older version (format 1, no header checksum); export it again"
            )
        raise ModelFileError(f"{where}: not a PRISM model file (magic {magic!r})")
    if version != EXPORT_FORMAT:
        raise ModelFileError(f"{where}: model format {version}, this build reads {EXPORT_FORMAT}")
    if zlib.crc32(blob[: -_CRC.size]) != _CRC.unpack_from(blob, len(blob) - _CRC.size)[0]:
        raise ModelFileError(f"{where}: checksum mismatch: the file is corrupted, truncated or too large")
    if hlen > MAX_HEADER_BYTES or _HEAD.size + hlen > len(blob) - _CRC.size:
        raise ModelFileError(f"{where}: header length {hlen} is beyond {MAX_HEADER_BYTES} bytes or the file")
    header = strict_json(blob[_HEAD.size : _HEAD.size + hlen], ModelFileError, where)
    try:
        spec = validate_header(header)
    except ModelFileError as err:
        raise ModelFileError(f"{where}: {err}") from None
    count = expected_weight_count(spec)
    if count > max_weights:
        raise ModelFileError(
            f"{where}: the header's generator has {count:,} weights, more than the {max_weights:,} allowed"
        )
    mask = blob[_HEAD.size + hlen : -_CRC.size]
    if len(mask) != HEADER_BYTES + packed_length(count):
        raise ModelFileError(
            f"{where}: mask section is {len(mask)} bytes, the header's generator needs "
            f"{HEADER_BYTES + packed_length(count)}"
        )
    return header, spec, mask


def load_sparse_model(path: str | Path, max_weights: int = MAX_WEIGHTS) -> tuple[ResnetGenerator, dict]:
    """Rebuild the generator with its stored mask fixed (threshold mode); returns (model, header).

    ``ModelFileError`` for any file that is not exactly what ``save_sparse_model`` writes.
    """
    header, spec, wire = read_sparse_model(path, max_weights)
    model = ResnetGenerator(spec)
    n = num_masked(model)
    if n != expected_weight_count(spec):  # the architecture changed without expected_weight_count
        raise RuntimeError(
            f"expected_weight_count({spec}) = {expected_weight_count(spec)}, the model has {n}"
        )
    try:
        mask = unpack_mask(decode_mask(wire, n, layout_fingerprint(model)), n)
    except MaskFormatError as err:
        raise ModelFileError(f"{path}: mask: {err}") from None
    # Scores of +-1 with threshold mode reproduce the stored mask exactly.
    set_scores(model, torch.from_numpy(np.where(mask, 1.0, -1.0).astype(np.float32)))
    set_mask_mode(model, "threshold")
    return model.eval(), header


def dense_float32_bytes(spec: GeneratorSpec) -> int:
    """Size of the same generator's masked weights stored densely as float32."""
    return 4 * expected_weight_count(spec)
