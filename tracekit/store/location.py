"""Where a trace lives: a local directory (``pathlib.Path``) or a URI on a pyarrow filesystem.

A local trace keeps its ``Path`` and every local guarantee (temp file + fsync + rename,
first-writer-wins links). A URI (``s3://bucket/prefix``, ``gs://``, ``hdfs://`` ... anything
``pyarrow.fs.FileSystem.from_uri`` knows) becomes a :class:`RemotePath`: the small part of the
``pathlib`` surface the store uses, over pyarrow's filesystem layer, so the store's code reads the
same for both. Credentials and endpoints come from the filesystem's usual environment
(``AWS_ACCESS_KEY_ID``, ``AWS_SECRET_ACCESS_KEY``, ``AWS_ENDPOINT_URL``, ``AWS_DEFAULT_REGION``
for S3), never from the trace, and are never written into it.

Object stores have no rename: an object written through ``open_output_stream`` becomes visible
only when the stream is closed (a single PUT or a completed multipart upload), so a part is never
seen half-written; a writer that dies mid-part leaves no object (pyarrow aborts the upload).
"""

from __future__ import annotations

import fnmatch
import os
import posixpath
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any, BinaryIO

import pyarrow.fs as pafs

from ..errors import TracekitError


class LocationError(TracekitError):
    """The trace location cannot be used (unknown scheme, bad bucket, no credentials)."""


def is_uri(s: object) -> bool:
    text = str(s)
    return "://" in text and not text.startswith("file://")


@dataclass(frozen=True)
class _Stat:
    st_size: int


class RemotePath:
    """A path on a pyarrow filesystem, with the ``pathlib`` methods the store needs."""

    __slots__ = ("fs", "path", "scheme")

    def __init__(self, fs: pafs.FileSystem, path: str, scheme: str) -> None:
        self.fs = fs
        self.path = path.rstrip("/")
        self.scheme = scheme

    @classmethod
    def from_uri(cls, uri: str) -> RemotePath:
        scheme = str(uri).split("://", 1)[0].lower()
        try:
            fs, path = pafs.FileSystem.from_uri(str(uri))
        except Exception as e:  # pyarrow: ArrowInvalid / OSError with a multi-line message
            raise LocationError(f"{uri}: cannot open this location ({_first_line(e)})") from None
        return cls(fs, path, scheme)

    # ---------------------------------------------------------------- pure path ops
    def __truediv__(self, other: str | os.PathLike[str]) -> RemotePath:
        return RemotePath(self.fs, posixpath.join(self.path, str(other)), self.scheme)

    def __str__(self) -> str:
        return f"{self.scheme}://{self.path}"

    def __repr__(self) -> str:
        return f"RemotePath({str(self)!r})"

    def __eq__(self, other: object) -> bool:
        return isinstance(other, RemotePath) and (self.scheme, self.path) == (other.scheme, other.path)

    def __hash__(self) -> int:
        return hash((self.scheme, self.path))

    @property
    def name(self) -> str:
        return posixpath.basename(self.path)

    @property
    def parent(self) -> RemotePath:
        return RemotePath(self.fs, posixpath.dirname(self.path), self.scheme)

    def with_name(self, name: str) -> RemotePath:
        return self.parent / name

    def resolve(self) -> RemotePath:
        return self

    # ---------------------------------------------------------------- queries
    def _info(self) -> pafs.FileInfo:
        try:
            return self.fs.get_file_info(self.path)
        except Exception as e:
            raise LocationError(f"{self}: {_first_line(e)}") from None

    def exists(self) -> bool:
        return self._info().type != pafs.FileType.NotFound

    def is_dir(self) -> bool:
        return self._info().type == pafs.FileType.Directory

    def is_file(self) -> bool:
        return self._info().type == pafs.FileType.File

    def stat(self) -> _Stat:
        info = self._info()
        if info.type == pafs.FileType.NotFound:
            raise FileNotFoundError(str(self))
        return _Stat(int(info.size or 0))

    def _children(self, recursive: bool) -> list[pafs.FileInfo]:
        sel = pafs.FileSelector(self.path, allow_not_found=True, recursive=recursive)
        try:
            return self.fs.get_file_info(sel)
        except Exception as e:
            raise LocationError(f"{self}: {_first_line(e)}") from None

    def iterdir(self) -> Iterator[RemotePath]:
        for i in self._children(False):
            yield RemotePath(self.fs, i.path, self.scheme)

    def glob(self, pattern: str) -> Iterator[RemotePath]:
        """Files directly below this directory whose name matches ``pattern`` (no ``/``)."""
        for i in self._children(False):
            if i.type == pafs.FileType.File and fnmatch.fnmatchcase(i.base_name, pattern):
                yield RemotePath(self.fs, i.path, self.scheme)

    def rglob(self, pattern: str) -> Iterator[RemotePath]:
        for i in self._children(True):
            if i.type == pafs.FileType.File and fnmatch.fnmatchcase(i.base_name, pattern):
                yield RemotePath(self.fs, i.path, self.scheme)

    def tree_size(self) -> int:
        """Bytes of every object below this prefix, from one recursive listing."""
        return sum(int(i.size or 0) for i in self._children(True) if i.type == pafs.FileType.File)

    # ---------------------------------------------------------------- I/O
    def open_input(self) -> Any:
        try:
            return self.fs.open_input_file(self.path)
        except FileNotFoundError:
            raise
        except Exception as e:
            if self._info().type == pafs.FileType.NotFound:
                raise FileNotFoundError(str(self)) from None
            raise OSError(f"{self}: {_first_line(e)}") from None

    def read_bytes(self) -> bytes:
        with self.open_input() as f:
            return f.read()

    def read_text(self, encoding: str = "utf-8", errors: str = "strict") -> str:
        return self.read_bytes().decode(encoding, errors)

    def open_output(self) -> BinaryIO:
        """A stream whose object appears only when it is closed (all or nothing)."""
        return self.fs.open_output_stream(self.path)  # type: ignore[return-value]

    def write_bytes(self, data: bytes) -> int:
        with self.open_output() as f:
            f.write(data)
        return len(data)

    def write_text(self, text: str, encoding: str = "utf-8") -> int:
        return self.write_bytes(text.encode(encoding))

    def mkdir(self, parents: bool = True, exist_ok: bool = True) -> None:
        # Object stores have no directories; pyarrow writes a marker so an empty trace is listed.
        self.fs.create_dir(self.path, recursive=True)

    def unlink(self, missing_ok: bool = False) -> None:
        try:
            self.fs.delete_file(self.path)
        except FileNotFoundError:
            if not missing_ok:
                raise
        except OSError:
            if not missing_ok or self.exists():
                raise


TraceRoot = Path | RemotePath


def as_root(root: str | os.PathLike[str] | RemotePath) -> TraceRoot:
    """A trace location as given on the command line or to the API."""
    if isinstance(root, (Path, RemotePath)):
        return root
    text = os.fspath(root)
    if text.startswith("file://"):
        return Path(text[len("file://"):])
    if is_uri(text):
        return RemotePath.from_uri(text)
    return Path(text)


def move(src: TraceRoot, dst: TraceRoot) -> None:
    """Rename a file (local: atomic ``os.replace``; object store: copy, then delete)."""
    if isinstance(src, RemotePath):
        assert isinstance(dst, RemotePath)
        src.fs.move(src.path, dst.path)
    else:
        os.replace(src, dst)  # type: ignore[arg-type]


def replace_text(p: TraceRoot, text: str) -> None:
    """Replace a small file whole: local temp file + ``os.replace``; on an object store the new
    object replaces the old one when its upload completes."""
    if isinstance(p, RemotePath):
        p.write_text(text)
        return
    import uuid

    tmp = p.with_name(f".{p.name}.{uuid.uuid4().hex}.tmp")
    tmp.write_text(text)
    os.replace(tmp, p)


def rmtree(p: TraceRoot) -> None:
    if isinstance(p, RemotePath):
        try:
            p.fs.delete_dir(p.path)
        except (FileNotFoundError, OSError):
            pass
    else:
        import shutil

        shutil.rmtree(p, ignore_errors=True)


def copy_path(src: TraceRoot, dst: TraceRoot) -> None:
    """Copy a file or a directory between any two locations (upload, download or local copy)."""
    s_fs, s_path = fs_path(src)
    d_fs, d_path = fs_path(dst)
    if isinstance(dst, Path):  # a local destination needs its directories first
        if s_fs.get_file_info(s_path).type == pafs.FileType.Directory:
            os.makedirs(d_path, exist_ok=True)
            for i in s_fs.get_file_info(pafs.FileSelector(s_path, recursive=True)):
                if i.type == pafs.FileType.Directory:
                    os.makedirs(posixpath.join(d_path, posixpath.relpath(i.path, s_path)), exist_ok=True)
        else:
            os.makedirs(os.path.dirname(d_path), exist_ok=True)
    pafs.copy_files(s_path, d_path, source_filesystem=s_fs, destination_filesystem=d_fs)


def fs_path(p: TraceRoot) -> tuple[pafs.FileSystem, str]:
    """(filesystem, path) for pyarrow's readers, writers and copies (a local path made absolute)."""
    if isinstance(p, RemotePath):
        return p.fs, p.path
    return pafs.LocalFileSystem(), str(Path(p).resolve())


def _first_line(e: BaseException) -> str:
    for line in str(e).strip().splitlines():
        if line.strip():
            return line.strip()
    return type(e).__name__


__all__ = ["LocationError", "RemotePath", "TraceRoot", "as_root", "copy_path", "fs_path", "is_uri", "move",
           "replace_text", "rmtree"]
