"""ingest.storage: one set of file operations for directories and S3-compatible object storage.

The object-store cases run against a real S3 protocol server on loopback (moto, `s3_bucket`).
"""

from __future__ import annotations

import hashlib
import json
import uuid
from pathlib import Path

import pytest

from ingest import storage


@pytest.fixture
def prefix(s3_bucket) -> str:
    """A fresh prefix in the test bucket for one test."""
    return f"{s3_bucket}/{uuid.uuid4().hex[:12]}"


def test_locations_join_and_resolve_as_paths_or_uris(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    assert storage.location("runs") == tmp_path / "runs"
    assert storage.join("runs", "a", "b") == Path("runs", "a", "b")
    assert storage.join("s3://bucket/runs/", "a", "best") == "s3://bucket/runs/a/best"
    assert storage.location("s3://bucket/runs/") == "s3://bucket/runs"
    assert not storage.is_uri("file:///data") and storage.is_uri("s3://b/k")
    assert storage.name_of("s3://bucket/runs/x/") == "x"
    assert storage.ray_storage(tmp_path) == (str(tmp_path), None)
    path, filesystem = storage.ray_storage("s3://bucket/runs")
    assert path == "bucket/runs" and filesystem.type_name == "s3"


@pytest.mark.parametrize("where", ["local", "s3"])
def test_the_same_operations_on_a_directory_and_a_bucket(where, tmp_path, request):
    root = str(tmp_path / "root") if where == "local" else request.getfixturevalue("prefix")
    storage.makedirs(root)
    document = storage.join(root, "a", "doc.json")
    storage.makedirs(storage.join(root, "a"))
    storage.write_json_atomic(document, {"x": 1})
    assert storage.read_json(document) == {"x": 1}
    assert storage.is_file(document) and not storage.is_dir(document)
    assert storage.is_dir(storage.join(root, "a")) and not storage.exists(storage.join(root, "nothing"))
    # Only the finished object is visible: no temporary key or file is left behind.
    assert storage.list_files(root) == ["a/doc.json"]
    assert storage.sha256(document) == hashlib.sha256(json.dumps({"x": 1}, indent=2).encode()).hexdigest()

    staged = tmp_path / "staged"
    staged.mkdir()
    for name in ("model.pt", "config.json", "metrics.json", "extra.txt"):
        (staged / name).write_text(name)
    best = storage.join(root, "best")
    storage.replace_tree(staged, best)
    storage.replace_tree(staged, best, names=("model.pt", "config.json"))  # the stale two are removed
    assert storage.list_files(best) == ["config.json", "model.pt"]
    with storage.local_copy(best) as local:
        assert (local / "model.pt").read_text() == "model.pt"
    assert storage.subdirectories_holding(root, "model.pt") == [best]
    copy = storage.join(root, "copy")
    storage.copy_tree(best, copy)
    assert storage.list_files(copy) == ["config.json", "model.pt"]


def test_object_storage_failures_name_the_location_and_what_to_check(prefix, monkeypatch):
    with pytest.raises(storage.StorageError, match="no-such-bucket.*bucket exists"):
        storage.read_bytes("s3://no-such-bucket/manifest.json")
    monkeypatch.setenv("AWS_ENDPOINT_URL", "http://127.0.0.1:9")  # nothing listens on the discard port
    with pytest.raises(storage.StorageError, match=r"127\.0\.0\.1:9.*AWS_ENDPOINT_URL"):
        storage.exists(storage.join(prefix, "x"))
