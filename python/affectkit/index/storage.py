"""The on-disk format of an EmbeddingIndex: one file, written atomically.

Layout (little-endian):
    0   8 bytes  magic b"AFKINDEX"
    8   u32      format version
    12  u32      reserved (0)
    16  u64      header length H
    24  H bytes  JSON header: {"meta": {...}, "arrays": [{name, dtype, shape, offset, nbytes}],
                 "payload_end": E}
    ... arrays, each at a 64-byte aligned absolute offset (so they can be memory-mapped)
    E   u32      zlib.crc32 of bytes [0, E)
    E+4 u32      reserved (0)
    E+8 8 bytes  end magic b"AFKEND\\0\\0"
The file is written to a temporary name in the same folder and renamed over the target
(os.replace), so a crash never leaves a half-written index under the real name.

Versions: 1 holds float32 vectors only; 2 has the same layout and may hold float16 vectors
(meta["dtype"]). Writers pick the lowest version that describes the file, so float32 indexes
stay readable by affectkit releases that know only version 1, and those refuse float16 files
("unsupported version 2") instead of reading their vectors as float32.
"""

from __future__ import annotations

import json
import os
import struct
import tempfile
import zlib

import numpy as np

MAGIC = b"AFKINDEX"
END_MAGIC = b"AFKEND\0\0"
VERSION = 2  # the newest version; save() writes version 1 unless told otherwise
READABLE_VERSIONS = (1, 2)
_PREFIX = struct.Struct("<8sIIQ")
_TRAILER = struct.Struct("<II8s")
_ALIGN = 64


class IndexFormatError(ValueError):
    """The file is not an affectkit index, is truncated, corrupted or of an unknown version."""


def _aligned(x: int) -> int:
    return (x + _ALIGN - 1) // _ALIGN * _ALIGN


def save(path: str | os.PathLike, meta: dict, arrays: dict[str, np.ndarray], version: int = 1) -> None:
    if version not in READABLE_VERSIONS:
        raise ValueError(f"version: expected one of {READABLE_VERSIONS}, got {version!r}")
    path = os.fspath(path)
    arrays = {k: np.ascontiguousarray(v) for k, v in arrays.items()}
    # Lay out the arrays after a header whose size depends on the offsets: iterate until the
    # header written fits in front of the offsets it names. (Stopping when two headers had the
    # same length kept the older one, whose offsets could start 64 bytes before those written
    # when its length crossed an alignment boundary: a corrupt file, rarely.)
    header = b""
    for _ in range(16):
        base = _aligned(_PREFIX.size + len(header))
        table, offset = [], base
        for name, arr in arrays.items():
            table.append({"name": name, "dtype": arr.dtype.str, "shape": list(arr.shape),
                          "offset": offset, "nbytes": arr.nbytes})
            offset = _aligned(offset + arr.nbytes)
        header = json.dumps({"meta": meta, "arrays": table, "payload_end": offset}).encode()
        if _aligned(_PREFIX.size + len(header)) == base:
            break
    else:  # offsets only grow with the header, so this cannot happen
        raise RuntimeError("index header layout did not converge")
    payload_end = offset

    folder = os.path.dirname(os.path.abspath(path))
    fd, tmp = tempfile.mkstemp(prefix=".affectkit-index-", suffix=".tmp", dir=folder)
    try:
        with os.fdopen(fd, "wb") as f:
            crc = 0

            def write(b: bytes | memoryview) -> None:
                nonlocal crc
                f.write(b)
                crc = zlib.crc32(b, crc)

            write(_PREFIX.pack(MAGIC, version, 0, len(header)))
            write(header)
            pos = _PREFIX.size + len(header)
            for entry, arr in zip(table, arrays.values()):
                write(b"\0" * (entry["offset"] - pos))
                write(memoryview(arr.reshape(-1).view(np.uint8)) if arr.size else b"")
                pos = entry["offset"] + arr.nbytes
            write(b"\0" * (payload_end - pos))
            f.write(_TRAILER.pack(crc & 0xFFFFFFFF, 0, END_MAGIC))
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
    except BaseException:
        if os.path.exists(tmp):
            os.unlink(tmp)
        raise


def _crc_of_file(path: str, end: int) -> int:
    crc = 0
    with open(path, "rb") as f:
        left = end
        while left:
            chunk = f.read(min(left, 1 << 24))
            if not chunk:
                break
            crc = zlib.crc32(chunk, crc)
            left -= len(chunk)
    return crc & 0xFFFFFFFF


def load(path: str | os.PathLike, mmap: bool = True, verify: bool = True) -> tuple[dict, dict[str, np.ndarray]]:
    """Read (meta, arrays). mmap=True maps the arrays read-only instead of reading them."""
    path = os.fspath(path)
    size = os.path.getsize(path)
    with open(path, "rb") as f:
        prefix = f.read(_PREFIX.size)
        if len(prefix) < _PREFIX.size or prefix[:8] != MAGIC:
            raise IndexFormatError(f"{path}: not an affectkit index file (expected magic {MAGIC!r} at the start, "
                                   f"got {prefix[:8]!r})")
        magic, version, _, header_len = _PREFIX.unpack(prefix)
        if version not in READABLE_VERSIONS:
            raise IndexFormatError(f"{path}: unsupported index format version {version} "
                                   f"(this affectkit reads versions {', '.join(map(str, READABLE_VERSIONS))})")
        if size < _PREFIX.size + header_len:
            raise IndexFormatError(f"{path}: truncated file ({size} bytes, the header alone needs "
                                   f"{_PREFIX.size + header_len})")
        try:
            header = json.loads(f.read(header_len))
        except ValueError as e:
            raise IndexFormatError(f"{path}: corrupted header ({e})") from None
    end = int(header["payload_end"])
    if size != end + _TRAILER.size:
        raise IndexFormatError(f"{path}: truncated or padded file: expected {end + _TRAILER.size} bytes, got {size}")
    with open(path, "rb") as f:
        f.seek(end)
        crc, _, end_magic = _TRAILER.unpack(f.read(_TRAILER.size))
    if end_magic != END_MAGIC:
        raise IndexFormatError(f"{path}: missing end marker (expected {END_MAGIC!r}, got {end_magic!r})")
    if verify and _crc_of_file(path, end) != crc:
        raise IndexFormatError(f"{path}: checksum mismatch: the file is corrupted")
    arrays = {}
    for entry in header["arrays"]:
        dtype, shape = np.dtype(entry["dtype"]), tuple(entry["shape"])
        if entry["nbytes"] == 0:
            arrays[entry["name"]] = np.zeros(shape, dtype=dtype)
        elif mmap:
            arrays[entry["name"]] = np.memmap(path, dtype=dtype, mode="r", offset=entry["offset"], shape=shape)
        else:
            with open(path, "rb") as f:
                f.seek(entry["offset"])
                arrays[entry["name"]] = np.frombuffer(f.read(entry["nbytes"]), dtype=dtype).reshape(shape).copy()
    return header["meta"], arrays
