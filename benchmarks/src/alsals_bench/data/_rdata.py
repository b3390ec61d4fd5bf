"""Read objects from an R lazy-load database (``Rdata.rdx`` index + ``Rdata.rdb`` blobs).

R packages ship their datasets this way; reading them directly avoids needing R.
The ``.rdx`` is a gzip-compressed serialized R list whose ``variables`` entry maps
each object name to ``(offset, length)`` in the ``.rdb``. Each blob there is a
4-byte big-endian uncompressed length followed by the compressed serialization:
plain zlib, or a type byte then the payload (``Z`` raw LZMA2, ``2`` bz2, ``1``
zlib, ``0`` stored). The PyPI package ``rdata`` parses the serialization.
"""

from __future__ import annotations

import bz2
import gzip
import lzma
import struct
import warnings
import zlib
from collections.abc import Iterable
from pathlib import Path
from typing import Any

# R compresses type-"Z" blobs with xz preset 9|extreme (src/main/serialize.c);
# the raw decoder must be set up with a dictionary at least that large.
_LZMA_FILTERS = [{"id": lzma.FILTER_LZMA2, "preset": 9 | lzma.PRESET_EXTREME}]


def _rdata():
    """Import ``rdata`` lazily, with an install hint when it is missing."""
    try:
        import rdata
    except ImportError as err:
        raise ImportError(
            "reading R datasets needs the `rdata` package: pip install rdata"
        ) from err
    return rdata


def _parse(serialized: bytes) -> Any:
    """Turn an uncompressed R serialization into Python/numpy/pandas objects."""
    rdata = _rdata()
    with warnings.catch_warnings():
        # Lazy-load blobs lack the RDS magic header; rdata warns "assumed RDS", correctly.
        warnings.simplefilter("ignore", UserWarning)
        return rdata.conversion.convert(rdata.parser.parse_data(serialized))


def _decompress(blob: bytes) -> bytes:
    """Decompress one ``.rdb`` blob (length header + possibly typed payload)."""
    if len(blob) < 5:
        raise ValueError("R lazy-load blob is truncated")
    (expected,) = struct.unpack(">I", blob[:4])
    kind, payload = blob[4:5], blob[5:]
    if kind == b"Z":
        data = lzma.decompress(payload, format=lzma.FORMAT_RAW, filters=_LZMA_FILTERS)
    elif kind == b"2":
        data = bz2.decompress(payload)
    elif kind == b"1":
        data = zlib.decompress(payload)
    elif kind == b"0":
        data = payload
    else:  # no type byte: the whole rest is a zlib stream (R's default)
        data = zlib.decompress(blob[4:])
    if len(data) != expected:
        raise ValueError(f"R lazy-load blob decompressed to {len(data)} bytes, expected {expected}")
    return data


def read_index(rdx: Path) -> dict[str, tuple[int, int]]:
    """Map each object name in the database to its ``(offset, length)`` in the ``.rdb``."""
    index = _parse(gzip.decompress(rdx.read_bytes()))
    return {str(name): (int(pos[0]), int(pos[1])) for name, pos in index["variables"].items()}


def read_objects(rdx: Path, rdb: Path, names: Iterable[str]) -> dict[str, Any]:
    """Load the named objects from an R lazy-load database.

    Raises KeyError naming the available objects if one is absent, ValueError if a
    blob is corrupt.
    """
    index = read_index(rdx)
    out: dict[str, Any] = {}
    with rdb.open("rb") as f:
        for name in names:
            if name not in index:
                raise KeyError(f"{name!r} not in {rdx}; it holds {sorted(index)}")
            offset, length = index[name]
            f.seek(offset)
            blob = f.read(length)
            try:
                out[name] = _parse(_decompress(blob))
            except (ValueError, zlib.error, lzma.LZMAError, OSError) as err:
                raise ValueError(f"cannot decode {name!r} from {rdb}: {err}") from err
    return out
