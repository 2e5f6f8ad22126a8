"""Locations that are either a filesystem path or an object-store URI (``s3://bucket/prefix``).

Shard sets, run storage, sweep results and served checkpoints may live on one machine's disk, on a
shared mount, or in S3-compatible object storage. Every stage reads and writes them through these
functions, which go through pyarrow's filesystems as Ray Train and Ray Data do, so a location means
the same thing to the driver, to Ray workers on other nodes and to Ray itself.

S3 is configured by the standard AWS environment variables, which every node must see:
``AWS_ENDPOINT_URL_S3`` or ``AWS_ENDPOINT_URL`` (an S3-compatible server such as MinIO; unset for AWS),
``AWS_ACCESS_KEY_ID`` / ``AWS_SECRET_ACCESS_KEY`` (unset: the default AWS credential chain) and
``AWS_REGION`` / ``AWS_DEFAULT_REGION``.

Local paths behave exactly as plain ``pathlib`` code would: writes are atomic renames (`ingest.files`).
On object storage a single object is replaced atomically (written under a temporary key, then moved);
a directory of objects is not, so `replace_tree` writes the files one by one.
"""

from __future__ import annotations

import hashlib
import json
import os
import shutil
import tempfile
import uuid
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any

import pyarrow.fs as pafs

from ingest import files

ENDPOINT_VARS = ("AWS_ENDPOINT_URL_S3", "AWS_ENDPOINT_URL")
REGION_VARS = ("AWS_REGION", "AWS_DEFAULT_REGION")
CHUNK = 1 << 20


class StorageError(OSError):
    """A location cannot be read or written; the message names it and says what to check."""


def is_uri(location: str | os.PathLike) -> bool:
    """True for ``scheme://...`` locations other than ``file://`` (those are plain paths)."""
    text = str(location)
    return "://" in text and not text.startswith("file://")


def resolve(location: str | os.PathLike) -> str:
    """An absolute path (``~`` expanded), or the URI without a trailing slash."""
    if is_uri(location):
        return str(location).rstrip("/")
    return str(Path(str(location).removeprefix("file://")).expanduser().resolve())


def location(value: str | os.PathLike) -> Path | str:
    """An absolute ``Path`` for a filesystem path, the URI (a ``str``) for an object-store location."""
    return resolve(value) if is_uri(value) else Path(resolve(value))


def join(location: str | os.PathLike, *parts: str) -> Path | str:
    """``location/part/...``: a ``Path`` for a filesystem path, a ``str`` for a URI."""
    if is_uri(location):
        return "/".join([str(location).rstrip("/"), *(p.strip("/") for p in parts)])
    return Path(location, *parts)


def name_of(location: str | os.PathLike) -> str:
    return str(location).rstrip("/").rsplit("/", 1)[-1]


def _environment(names: tuple[str, ...]) -> str | None:
    return next((os.environ[n] for n in names if os.environ.get(n)), None)


def s3_filesystem() -> pafs.S3FileSystem:
    """pyarrow's S3 filesystem configured from the AWS environment variables (see the module doc)."""
    endpoint = _environment(ENDPOINT_VARS)
    options: dict[str, Any] = {
        "region": _environment(REGION_VARS) or "us-east-1",
        # An unreachable endpoint fails in seconds with StorageError instead of retrying for minutes.
        "connect_timeout": 5,
        "request_timeout": 30,
        "retry_strategy": pafs.AwsStandardS3RetryStrategy(max_attempts=3),
    }
    if endpoint:
        scheme, _, address = endpoint.partition("://")
        options |= {"endpoint_override": address or scheme, "scheme": scheme if address else "https"}
    key, secret = os.environ.get("AWS_ACCESS_KEY_ID"), os.environ.get("AWS_SECRET_ACCESS_KEY")
    if key and secret:
        options |= {
            "access_key": key,
            "secret_key": secret,
            "session_token": os.environ.get("AWS_SESSION_TOKEN"),
        }
    return pafs.S3FileSystem(**options)


def filesystem_and_path(location: str | os.PathLike) -> tuple[pafs.FileSystem, str]:
    """The pyarrow filesystem holding ``location`` and the path within it (``bucket/key`` for S3)."""
    if not is_uri(location):
        return pafs.LocalFileSystem(), resolve(location)
    uri = resolve(location)
    scheme, _, rest = uri.partition("://")
    if scheme in ("s3", "s3a"):
        return s3_filesystem(), rest
    try:
        return pafs.FileSystem.from_uri(uri)
    except (pafs.ArrowInvalid, OSError) as exc:  # type: ignore[attr-defined]
        raise StorageError(f"{uri}: unsupported storage location ({exc})") from exc


def ray_storage(location: str | os.PathLike) -> tuple[str, pafs.FileSystem | None]:
    """``(storage_path, storage_filesystem)`` for Ray Train's and Tune's ``RunConfig``: a URI goes as its
    path with the filesystem configured here, so the driver, Ray and the workers share one S3 setup."""
    if not is_uri(location):
        return str(location), None
    filesystem, path = filesystem_and_path(location)
    return path, filesystem


def _explain(location: str, exc: OSError) -> StorageError:
    hint = ""
    if is_uri(location):
        endpoint = _environment(ENDPOINT_VARS) or "AWS's default endpoint"
        hint = (
            f" (endpoint {endpoint}); check that the bucket exists, that AWS_ENDPOINT_URL points at a "
            "reachable S3 server and that AWS_ACCESS_KEY_ID / AWS_SECRET_ACCESS_KEY are set on every node"
        )
    return StorageError(f"{location}: {exc}{hint}")


@contextmanager
def _translated(location: str | os.PathLike) -> Iterator[None]:
    """Object-store failures as StorageError naming the location; local errors pass unchanged."""
    try:
        yield
    except StorageError:
        raise
    except OSError as exc:
        if not is_uri(location):
            raise
        raise _explain(str(location), exc) from exc


def _info(location: str | os.PathLike) -> pafs.FileInfo:
    fs, path = filesystem_and_path(location)
    with _translated(location):
        return fs.get_file_info(path)


def exists(location: str | os.PathLike) -> bool:
    return _info(location).type != pafs.FileType.NotFound


def is_file(location: str | os.PathLike) -> bool:
    return _info(location).type == pafs.FileType.File


def is_dir(location: str | os.PathLike) -> bool:
    """A directory, or on object storage a prefix that holds at least one object."""
    return _info(location).type == pafs.FileType.Directory


def read_bytes(location: str | os.PathLike) -> bytes:
    if not is_uri(location):
        return Path(location).read_bytes()
    fs, path = filesystem_and_path(location)
    with _translated(location), fs.open_input_stream(path) as stream:
        return stream.read()


def read_text(location: str | os.PathLike) -> str:
    return read_bytes(location).decode()


def read_json(location: str | os.PathLike) -> Any:
    return json.loads(read_bytes(location))


def sha256(location: str | os.PathLike) -> str:
    """Hex sha256 of a file or object, streamed in 1 MiB chunks."""
    digest = hashlib.sha256()
    if not is_uri(location):
        with open(location, "rb") as handle:
            while chunk := handle.read(CHUNK):
                digest.update(chunk)
        return digest.hexdigest()
    fs, path = filesystem_and_path(location)
    with _translated(location), fs.open_input_stream(path) as stream:
        while chunk := stream.read(CHUNK):
            digest.update(chunk)
    return digest.hexdigest()


def _temporary_key(path: str) -> str:
    parent, _, name = path.rpartition("/")
    return f"{parent}/.{name}.{uuid.uuid4().hex[:8]}.partial"


def write_bytes(location: str | os.PathLike, data: bytes | str, *, durable: bool = False) -> Path | str:
    """Replace ``location`` with ``data`` (text as UTF-8) atomically: readers see the old or the new one."""
    if not is_uri(location):
        return files.write_atomic(location, data, durable=durable)
    fs, path = filesystem_and_path(location)
    tmp = _temporary_key(path)
    with _translated(location):
        try:
            # A failed stream still completes its upload on close: only the move publishes the object.
            with fs.open_output_stream(tmp) as stream:
                stream.write(data.encode() if isinstance(data, str) else data)
            fs.move(tmp, path)
        finally:
            if fs.get_file_info(tmp).type != pafs.FileType.NotFound:
                fs.delete_file(tmp)
    return resolve(location)


def write_json_atomic(location: str | os.PathLike, document: Any, *, durable: bool = False) -> Path | str:
    """``document`` as indented, key-sorted JSON (non-JSON values as their ``str``), written atomically."""
    return write_bytes(location, json.dumps(document, indent=2, sort_keys=True, default=str), durable=durable)


def upload_file(local: str | os.PathLike, location: str | os.PathLike) -> str:
    """Copy a local file to ``location`` atomically (temporary name or key, then rename/move)."""
    if not is_uri(location):
        with tempfile.NamedTemporaryFile(dir=Path(location).parent, prefix=".upload.", delete=False) as tmp:
            pass
        try:
            shutil.copy2(local, tmp.name)
            os.replace(tmp.name, location)
        finally:
            Path(tmp.name).unlink(missing_ok=True)
        return resolve(location)
    fs, path = filesystem_and_path(location)
    tmp_key = _temporary_key(path)
    with _translated(location):
        try:
            pafs.copy_files(str(local), tmp_key, pafs.LocalFileSystem(), fs)
            fs.move(tmp_key, path)
        finally:
            if fs.get_file_info(tmp_key).type != pafs.FileType.NotFound:
                fs.delete_file(tmp_key)
    return resolve(location)


def makedirs(location: str | os.PathLike) -> None:
    """Create a directory and its parents (object stores need none: a no-op there)."""
    if not is_uri(location):
        Path(location).mkdir(parents=True, exist_ok=True)


def list_files(location: str | os.PathLike) -> list[str]:
    """Names (relative, ``/``-separated) of the files under a directory or prefix, sorted; [] if none."""
    fs, path = filesystem_and_path(location)
    with _translated(location):
        infos = fs.get_file_info(pafs.FileSelector(path, recursive=True, allow_not_found=True))
    return sorted(i.path[len(path) :].lstrip("/") for i in infos if i.type == pafs.FileType.File)


def delete_tree(location: str | os.PathLike) -> None:
    fs, path = filesystem_and_path(location)
    with _translated(location):
        if fs.get_file_info(path).type == pafs.FileType.Directory:
            fs.delete_dir(path)


def replace_tree(
    local_dir: str | os.PathLike, location: str | os.PathLike, names: tuple[str, ...] | None = None
) -> str:
    """Make ``location`` hold exactly the files ``names`` of ``local_dir`` (default: all of them).

    On a filesystem the new directory is staged beside the old and renamed over it (atomic). On an
    object store each object is replaced atomically and stale ones are removed afterwards."""
    local_dir = Path(local_dir)
    if names is None:
        names = tuple(
            sorted(p.relative_to(local_dir).as_posix() for p in local_dir.rglob("*") if p.is_file())
        )
    if not is_uri(location):
        target = Path(resolve(location))
        staging = target.with_name(f".{target.name}.{uuid.uuid4().hex[:8]}")
        for name in names:
            (staging / name).parent.mkdir(parents=True, exist_ok=True)
            shutil.copy2(local_dir / name, staging / name)
        old = target.with_name(f".{target.name}.old.{uuid.uuid4().hex[:8]}")
        if target.exists():
            os.replace(target, old)
        os.replace(staging, target)
        shutil.rmtree(old, ignore_errors=True)
        return str(target)
    for name in names:
        upload_file(local_dir / name, join(location, name))
    fs, path = filesystem_and_path(location)
    with _translated(location):
        for stale in set(list_files(location)) - set(names):
            fs.delete_file(f"{path}/{stale}")
    return resolve(location)


def copy_tree(source: str | os.PathLike, destination: str | os.PathLike) -> None:
    """Copy every file under ``source`` to the same names under ``destination`` (either may be a URI)."""
    source_fs, source_path = filesystem_and_path(source)
    destination_fs, destination_path = filesystem_and_path(destination)
    makedirs(destination)
    with _translated(source if is_uri(source) else destination):
        pafs.copy_files(
            source_path, destination_path, source_filesystem=source_fs, destination_filesystem=destination_fs
        )


@contextmanager
def local_copy(location: str | os.PathLike) -> Iterator[Path]:
    """A local directory with the files under ``location``: the path itself when it is local, else a
    temporary download (removed when the block ends) for readers such as ``torch.load``."""
    if not is_uri(location):
        yield Path(location)
        return
    with tempfile.TemporaryDirectory(prefix="pedx-download-") as tmp:
        copy_tree(location, tmp)
        yield Path(tmp)


def local_file(location: str | os.PathLike, directory: str | os.PathLike) -> Path:
    """A local path for the file at ``location``: itself when local, else a copy in ``directory``."""
    if not is_uri(location):
        return Path(location)
    target = Path(directory) / name_of(location)
    fs, path = filesystem_and_path(location)
    with _translated(location):
        pafs.copy_files(path, str(target), fs, pafs.LocalFileSystem())
    return target


def subdirectories_holding(location: str | os.PathLike, filename: str) -> list[Path | str]:
    """The direct subdirectories of ``location`` that hold a file ``filename``, sorted (``*/filename``)."""
    fs, path = filesystem_and_path(location)
    with _translated(location):
        children = fs.get_file_info(pafs.FileSelector(path, allow_not_found=True))
        names = sorted(c.base_name for c in children if c.type == pafs.FileType.Directory)
        found = fs.get_file_info([f"{path}/{name}/{filename}" for name in names])
    holding = [n for n, info in zip(names, found, strict=True) if info.type == pafs.FileType.File]
    return [join(location, name) for name in holding]


def delete_file(location: str | os.PathLike) -> None:
    """Remove a file or object if it exists."""
    if not is_uri(location):
        Path(location).unlink(missing_ok=True)
        return
    fs, path = filesystem_and_path(location)
    with _translated(location):
        if fs.get_file_info(path).type == pafs.FileType.File:
            fs.delete_file(path)


@contextmanager
def replacing(location: str | os.PathLike, *, durable: bool = False) -> Iterator[Path]:
    """Yield a local temporary path to write; when the block ends without error it replaces ``location``
    (``ingest.files.replacing`` for a path, fsynced first when ``durable``; an upload for a URI)."""
    if not is_uri(location):
        with files.replacing(location) as tmp:
            yield tmp
            if durable:
                with open(tmp, "rb+") as handle:
                    os.fsync(handle.fileno())
        return
    with tempfile.TemporaryDirectory(prefix="pedx-upload-") as directory:
        tmp = Path(directory) / name_of(location)
        yield tmp
        upload_file(tmp, location)
