"""Atomic file writes, shared by every stage: a reader sees the old file or the new one, never half of one.

The temporary file lives beside the target (same file system, so the rename is atomic) under a unique
hidden name, and is removed if anything fails before the rename. ``durable=True`` also fsyncs the data
before the rename, for files a re-run trusts without re-reading (shards, manifests).
"""

from __future__ import annotations

import json
import os
import uuid
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any


@contextmanager
def replacing(path: str | os.PathLike, suffix: str = "") -> Iterator[Path]:
    """Yield a temporary path beside ``path``; when the block ends without error it replaces ``path``.

    ``suffix`` ends the temporary name, for writers that pick the format from it (``cv2.imwrite``).
    """
    path = Path(path)
    tmp = path.with_name(f".{path.name}.{uuid.uuid4().hex[:8]}.partial{suffix}")
    try:
        yield tmp
        os.replace(tmp, path)
    finally:
        tmp.unlink(missing_ok=True)


def write_atomic(path: str | os.PathLike, data: bytes | str, *, durable: bool = False) -> Path:
    """Write ``data`` (text as UTF-8) to ``path`` atomically; ``durable`` fsyncs it before the rename."""
    path = Path(path)
    with replacing(path) as tmp, open(tmp, "wb") as handle:
        handle.write(data.encode() if isinstance(data, str) else data)
        if durable:
            handle.flush()
            os.fsync(handle.fileno())
    return path


def write_json_atomic(path: str | os.PathLike, document: Any, *, durable: bool = False) -> Path:
    """``document`` as indented, key-sorted JSON (non-JSON values as their ``str``), written atomically."""
    return write_atomic(path, json.dumps(document, indent=2, sort_keys=True, default=str), durable=durable)
