"""Local or remote (gs://) paths, for code whose libraries read and write local files only.

etils.epath reaches Cloud Storage; os, open, pathlib, ArrayRecord's writer and the video
codecs do not (pathlib even turns "gs://b" into a local "gs:/b"). A remote file is therefore
written through a local temporary file uploaded as one object (`local_file_for`), and read
from a downloaded temporary copy (`local_copy_of`).
"""

from __future__ import annotations

import contextlib
import os
import shutil
import tempfile
from collections.abc import Iterator
from pathlib import Path

from etils import epath

PathLike = str | os.PathLike



def is_remote(path: PathLike) -> bool:
    """Whether `path` is a URL (gs://...) that os, open, pathlib and the codecs cannot use."""
    return "://" in os.fspath(path)


def write_atomic(path: PathLike, data: bytes | str) -> None:
    """Writes a small file whole, so that a reader (another process, or a run after a crash)
    sees the old content or the new, never a part.

    Local: a temporary file beside it, fsynced, then renamed over it (atomic on POSIX; the
    temporary name carries the pid, so concurrent writers do not share one). Remote (gs://):
    one object write, which is atomic already (renames there are copies).
    """
    data = data.encode() if isinstance(data, str) else data
    if is_remote(path):
        epath.Path(path).write_bytes(data)
        return
    tmp = f"{os.fspath(path)}.tmp-{os.getpid()}"
    try:
        with open(tmp, "wb") as f:
            f.write(data)
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
    finally:
        if os.path.exists(tmp):
            os.unlink(tmp)


@contextlib.contextmanager
def local_file_for(path: PathLike) -> Iterator[Path]:
    """A local file to write `path`'s content to, for writers that need a real file.

    Local `path`: `path` itself, its folder created. Remote `path` (gs://): a file of the same
    name in a fresh temporary folder, uploaded as one object when the block ends without an
    error (the object then appears whole or not at all), and removed in any case.
    """
    if not is_remote(path):
        local = Path(path)
        local.parent.mkdir(parents=True, exist_ok=True)
        yield local
        return
    destination = epath.Path(path)
    destination.parent.mkdir(parents=True, exist_ok=True)
    staging = Path(tempfile.mkdtemp(prefix="lumiere_upload_"))
    try:
        local = staging / destination.name  # same suffix: PyAV picks the container by it
        yield local
        epath.Path(local).copy(destination, overwrite=True)
    finally:
        shutil.rmtree(staging, ignore_errors=True)


@contextlib.contextmanager
def local_copy_of(path: PathLike) -> Iterator[Path]:
    """A local file with `path`'s content, for readers that need a real file: `path` itself
    when local; for a remote `path` (gs://), a downloaded temporary copy of the same name,
    removed when the block ends."""
    if not is_remote(path):
        yield Path(path)
        return
    source = epath.Path(path)
    staging = Path(tempfile.mkdtemp(prefix="lumiere_download_"))
    try:
        local = staging / source.name
        source.copy(local)
        yield local
    finally:
        shutil.rmtree(staging, ignore_errors=True)
