"""Lazy .npz reading: only the members a command uses are ever decompressed, each member's .npy
header is checked against the member's real size before any data is read, and a model input is an
``NpzColumn`` that decompresses the rows of one batch at a time (a forward stream through the zip
member), converted to the model's dtype per batch.

Every member a command uses is read to its end once (``NpzMember.chunks``, the pass that also checks
the values), so that zipfile compares its CRC-32: a corrupted member is a one-line error, not data.
Members that are encrypted or compressed by a method zipfile cannot undo are refused by their
headers. A column-major (Fortran-order) array, whose rows are not contiguous in the file, is read
once, in one pass, into a row-major copy held in memory."""
from __future__ import annotations

import contextlib
import lzma
import math
import zipfile
import zlib
from collections.abc import Iterator
from pathlib import Path
from typing import IO

import numpy as np

from onnxprune.errors import InputError, first_line

METHODS = {zipfile.ZIP_STORED: "stored", zipfile.ZIP_DEFLATED: "deflate", zipfile.ZIP_BZIP2: "bzip2",
           zipfile.ZIP_LZMA: "lzma"}  # the compression methods zipfile reads
READ_CHUNK = 1 << 20  # bytes read at a time when a member is read through
# what zipfile and its decompressors raise on corrupt members
CORRUPT = (zipfile.BadZipFile, zlib.error, lzma.LZMAError, EOFError, OSError, ValueError, NotImplementedError,
           RuntimeError)


class NpzMember:
    """One array of an .npz file, not yet read: shape and dtype from its .npy header (checked
    against the member's size), rows decompressed on request."""

    def __init__(self, archive: zipfile.ZipFile, name: str, source: str):
        self.archive, self.name, self.source = archive, name, source
        info = archive.getinfo(name)
        key = name[:-4] if name.endswith(".npy") else name
        self.key = key
        if info.flag_bits & 0x1:
            raise InputError(f"{source}: array {key!r} is encrypted; store the arrays unencrypted (numpy.savez)")
        if info.compress_type not in METHODS:
            raise InputError(f"{source}: array {key!r} is compressed with method {info.compress_type}, which cannot be "
                             f"read here ({', '.join(METHODS.values())} can); save it with numpy.savez_compressed")
        try:
            with archive.open(info) as f:
                version = np.lib.format.read_magic(f)
                if version == (1, 0):
                    shape, fortran, dtype = np.lib.format.read_array_header_1_0(f)
                elif version in ((2, 0), (3, 0)):
                    shape, fortran, dtype = np.lib.format.read_array_header_2_0(f)
                else:
                    raise ValueError(f"unknown .npy version {version}")
                self.offset = f.tell()
        except (ValueError, SyntaxError, TypeError) as exc:
            raise InputError(f"{source}: array {key!r} has a corrupt .npy header ({first_line(exc)})") from None
        except CORRUPT as exc:  # the zip member itself (a CRC, the compressed stream)
            raise InputError(f"{source}: array {key!r} is corrupt ({first_line(exc)})") from None
        if dtype.hasobject:
            raise InputError(f"{source}: array {key!r} holds Python objects (pickled data is not read)")
        if any(int(d) < 0 for d in shape):
            raise InputError(f"{source}: array {key!r} has a negative dimension {list(shape)}")
        self.shape, self.dtype, self.fortran = tuple(int(d) for d in shape), dtype, fortran
        size = math.prod(self.shape) * dtype.itemsize
        if size != info.file_size - self.offset:
            raise InputError(f"{source}: array {key!r} claims shape {list(self.shape)} of {dtype} ({size:,} bytes) "
                             f"but holds {max(info.file_size - self.offset, 0):,} bytes")
        self._stream: IO[bytes] | None = None  # open on the member, positioned at _position
        self._position = 0
        self._rows: np.ndarray | None = None   # a Fortran-order array, read once in row-major order

    @contextlib.contextmanager
    def _reading(self):
        """What zipfile and the decompressors raise on a corrupt member, as one-line bad input."""
        try:
            yield
        except InputError:
            raise
        except CORRUPT as exc:
            self.close()
            raise InputError(f"{self.source}: array {self.key!r} is corrupt ({first_line(exc)})") from None

    @property
    def ndim(self) -> int:
        return len(self.shape)

    def __len__(self) -> int:
        if not self.shape:
            raise TypeError("len() of a 0-d array")
        return self.shape[0]

    @property
    def row_bytes(self) -> int:
        return math.prod(self.shape[1:]) * self.dtype.itemsize

    def rows(self, start: int, stop: int) -> np.ndarray:
        """Rows ``start:stop`` as a new array (a forward read continues the open stream)."""
        if not self.shape:
            return self.read()
        if self.fortran:  # column-major: its rows are not contiguous in the file
            return self._row_major()[start:stop].copy()
        start, stop = max(0, min(start, len(self))), max(0, min(stop, len(self)))
        stop = max(start, stop)
        with self._reading():
            raw = self._read_at(self.offset + start * self.row_bytes, (stop - start) * self.row_bytes)
        return np.frombuffer(raw, self.dtype).reshape((stop - start,) + self.shape[1:]).copy()

    def _read_at(self, begin: int, count: int) -> bytes:
        """``count`` bytes of the member from ``begin`` on (a forward read continues the open stream);
        a read that reaches the member's end has zipfile check its CRC."""
        if self._stream is None or begin < self._position:
            self.close()
            self._stream, self._position = self.archive.open(self.name), 0
        if begin > self._position:
            self._stream.seek(begin)
        raw = self._stream.read(count)
        self._position = begin + len(raw)
        if len(raw) != count:
            raise InputError(f"{self.source}: array {self.key!r} is truncated")
        if self._position == self.offset + self.nbytes:
            self._stream.read(1)  # at the end: zipfile compares the CRC-32 now
        return raw

    @property
    def nbytes(self) -> int:
        return math.prod(self.shape) * self.dtype.itemsize

    def _row_major(self) -> np.ndarray:
        """A Fortran-order array in row-major order, read once in one pass: the file holds the
        row-major array of the reversed shape, which is our array transposed."""
        if self._rows is None:
            rows = np.empty(self.shape, self.dtype)
            stored = rows.T  # the file's layout: shape reversed, row-major
            row_bytes = math.prod(stored.shape[1:]) * self.dtype.itemsize
            step = max(1, READ_CHUNK // max(row_bytes, 1))
            with self._reading():
                for start in range(0, len(stored), step):
                    stop = min(len(stored), start + step)
                    raw = self._read_at(self.offset + start * row_bytes, (stop - start) * row_bytes)
                    stored[start:stop] = np.frombuffer(raw, self.dtype).reshape((stop - start,) + stored.shape[1:])
            self.close()
            self._rows = rows
        return self._rows

    def chunks(self, rows: int) -> Iterator[np.ndarray]:
        """The whole array, ``rows`` rows at a time, read through to the member's end (its CRC checked)."""
        if not self.shape or len(self) == 0:
            yield self.read()
            return
        for start in range(0, len(self), rows):
            yield self.rows(start, start + rows)

    def read(self) -> np.ndarray:
        """The whole array (its CRC checked)."""
        if self.fortran and self.shape:
            return self._row_major().copy()
        with self._reading(), self.archive.open(self.name) as f:
            value = np.lib.format.read_array(f, allow_pickle=False)
            f.read(1)  # at the end: zipfile compares the CRC-32 now
            return value

    def close(self) -> None:
        if self._stream is not None:
            self._stream.close()
            self._stream = None


class NpzColumn:
    """A model input read from an .npz member batch by batch, converted to the model's dtype (and
    scaled for uint8 images) on the way: it slices like the array it stands for."""

    def __init__(self, member: NpzMember, dtype: np.dtype, scale: float | None):
        self.member, self.dtype, self.scale = member, np.dtype(dtype), scale
        self.shape = member.shape

    @property
    def ndim(self) -> int:
        return len(self.shape)

    def __len__(self) -> int:
        return self.shape[0]

    def convert(self, raw: np.ndarray) -> np.ndarray:
        return convert(raw, self.dtype, self.scale)

    def __getitem__(self, index) -> np.ndarray:
        if not isinstance(index, slice) or index.step not in (None, 1):
            return np.asarray(self)[index]
        start, stop, _ = index.indices(len(self))
        return self.convert(self.member.rows(start, stop))

    def __array__(self, dtype=None, copy=None):
        value = self[:]
        return value if dtype is None else value.astype(dtype)

    def chunks(self, rows: int) -> Iterator[np.ndarray]:
        return self.member.chunks(rows)


def open_npz(path: str | Path) -> dict[str, LazyMember]:
    """The members of an .npz file by array name, none of them read yet (see NpzMember)."""
    path = Path(path)
    if not path.is_file():
        raise InputError(f"data file {path} does not exist")
    if not zipfile.is_zipfile(path):
        with open(path, "rb") as f:
            kind = "an .npy file (one array)" if f.read(6) == b"\x93NUMPY" else "not a zip archive"
        raise InputError(f"{path} is not a readable .npz file ({kind}); save the arrays with numpy.savez")
    try:
        archive = zipfile.ZipFile(path)
        names = [n for n in archive.namelist() if not n.endswith("/")]
    except (zipfile.BadZipFile, ValueError, OSError, EOFError) as exc:
        raise InputError(f"{path} is not a readable .npz file ({first_line(exc)})") from None
    members = {}
    for name in names:
        key = name[:-4] if name.endswith(".npy") else name
        members[key] = LazyMember(archive, name, str(path))
    return members


class LazyMember:
    """A member whose header is parsed only when the member is used."""

    def __init__(self, archive, name, source):
        self.args, self._member = (archive, name, source), None

    def get(self) -> NpzMember:
        if self._member is None:
            self._member = NpzMember(*self.args)
        return self._member


def read_npz(path: str | Path, keys=None) -> dict[str, np.ndarray]:
    """Arrays of an .npz file, only those named in ``keys`` (all when None) decompressed."""
    members = open_npz(path)
    return {k: m.get().read() for k, m in members.items() if keys is None or k in keys}


def convert(raw: np.ndarray, dtype: np.dtype, scale: float | None) -> np.ndarray:
    """Data as the model takes it: its dtype, uint8 images times the model's input scale."""
    if scale is not None:
        return raw.astype(dtype) * dtype.type(scale)
    return np.ascontiguousarray(raw.astype(dtype, copy=False))
