"""The one atomic-write helper: every file the bundle writes (label maps, GeoJSON, CSV, overlays, ``metrics.json``,
slides, checkpoints, model files) goes to a temporary file in the same folder that is ``os.replace``d over the
target when complete, so a reader never sees a half-written file and a failed write leaves the old file (or none).
"""

from __future__ import annotations

import os
import tempfile
from contextlib import contextmanager
from pathlib import Path
from typing import IO, Any, Iterator

__all__ = ["atomic_path", "atomic_open", "atomic_torch_save"]

_UMASK = os.umask(0)  # the process umask (read, then restored)
os.umask(_UMASK)


@contextmanager
def atomic_path(path: str | os.PathLike, suffix: str | None = None) -> Iterator[Path]:
    """Yield a temporary path next to ``path`` (its parent folders are created); when the block exits without error
    the temporary file replaces ``path`` (usual permissions), on error it is removed.

    Args:
        suffix: the temporary file's suffix (default: that of ``path``, so format-guessing writers still work).
    """
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.", suffix=suffix or path.suffix)
    os.close(fd)
    try:
        yield Path(tmp)
        os.chmod(tmp, 0o666 & ~_UMASK)  # mkstemp creates 0600; give the usual permissions
        os.replace(tmp, path)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise


@contextmanager
def atomic_open(path: str | os.PathLike, mode: str = "w", fsync: bool = False, suffix: str | None = None,
                **kwargs: Any) -> Iterator[IO]:
    """``open`` a temporary file next to ``path`` (``mode``, ``kwargs`` as ``open``) that replaces ``path`` when the
    block exits without error; ``fsync``: flush it to disk before the rename (survives a power cut); ``suffix``: as
    :func:`atomic_path`."""
    with atomic_path(path, suffix) as tmp, open(tmp, mode, **kwargs) as f:
        yield f
        if fsync:
            f.flush()
            os.fsync(f.fileno())


def atomic_torch_save(obj: Any, path: str | os.PathLike) -> None:
    """``torch.save`` ``obj`` to ``path`` atomically, flushed to disk before the rename: a reader (a resuming
    training, an export) never sees a partial checkpoint."""
    import torch  # here, so that the writers of plain files do not import torch

    with atomic_open(path, "wb", fsync=True, suffix=".tmp") as f:
        torch.save(obj, f)
