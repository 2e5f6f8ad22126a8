"""Atomic writes (ingest.files): a reader sees the old file or the new one, and no temporary file stays."""

import json

import pytest

from ingest.files import replacing, write_atomic, write_json_atomic


@pytest.mark.parametrize("durable", [False, True])
def test_write_atomic_replaces_the_file_and_leaves_nothing_else(tmp_path, durable):
    target = tmp_path / "table.md"
    target.write_text("old")
    write_atomic(target, "new ü", durable=durable)
    write_atomic(tmp_path / "blob.bin", b"\x00\x01", durable=durable)
    assert target.read_text(encoding="utf-8") == "new ü"
    assert (tmp_path / "blob.bin").read_bytes() == b"\x00\x01"
    assert sorted(p.name for p in tmp_path.iterdir()) == ["blob.bin", "table.md"]


def test_a_failed_write_keeps_the_old_file_and_removes_the_temporary(tmp_path):
    target = tmp_path / "model.pt"
    target.write_bytes(b"old weights")
    with pytest.raises(RuntimeError, match="disk full"), replacing(target) as tmp:
        tmp.write_bytes(b"half of the new")
        raise RuntimeError("disk full")
    assert target.read_bytes() == b"old weights"
    assert [p.name for p in tmp_path.iterdir()] == ["model.pt"]


def test_json_is_sorted_and_non_json_values_are_strings(tmp_path):
    path = write_json_atomic(tmp_path / "config.json", {"b": tmp_path, "a": 1})
    assert json.loads(path.read_text()) == {"a": 1, "b": str(tmp_path)}
    assert path.read_text().index('"a"') < path.read_text().index('"b"')


def test_the_temporary_name_keeps_a_requested_suffix(tmp_path):
    with replacing(tmp_path / "image.png", suffix=".png") as tmp:
        assert tmp.parent == tmp_path and tmp.name.startswith(".image.png.") and tmp.suffix == ".png"
        tmp.write_bytes(b"png")
    assert (tmp_path / "image.png").read_bytes() == b"png"
