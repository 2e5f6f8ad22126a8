"""Pretraining on Ray Train: config, schedule, metrics, augmentation, shard checks, and real CPU runs.

The Ray tests share one local Ray (`ray_session`, 2 CPUs); each run uses 2 workers × 0.5 CPU so
one CPU stays free for Ray Data's read tasks.
"""

from __future__ import annotations

import hashlib
import io
import json
import math
import tarfile
from pathlib import Path

import cv2
import numpy as np
import pytest
import torch

from pedx_ray.augment import augment_images, build_augmentation
from pedx_ray.config import ConfigError, PretrainConfig, resolve_config
from pedx_ray.data import ShardSetError
from pedx_ray.faults import FAULT_ENV, Fault
from pedx_ray.metrics import classification_metrics, confusion_matrix
from pedx_ray.models import load_checkpoint
from pedx_ray.pretrain import (
    PretrainError,
    build_parser,
    config_from_args,
    main,
    run_pretraining,
)
from pedx_ray.schedule import build_scheduler, lr_factor

CLASSES_7 = ["Head", "Chest", "Abdomen", "Pelvis", "Spine", "Upper_Extremity", "Lower_Extremity"]


def write_tiny_shards(root: Path, per_class=None, size: int = 128, granularity: int = 7) -> Path:
    """A contract-3 shard set: one tar per split, class c drawn as a bright band at height c."""
    per_class = per_class or {"train": 4, "val": 1, "finetune": 1}
    root.mkdir(parents=True, exist_ok=True)
    rng = np.random.default_rng(0)
    shards = []
    for split, n in per_class.items():
        name = f"{split}-000000.tar"
        with tarfile.open(root / name, "w", format=tarfile.USTAR_FORMAT) as tar:
            for c, cls in enumerate(CLASSES_7):
                for i in range(n):
                    image = (rng.random((size, size)) * 40).astype(np.uint8)
                    row = int((c + 0.5) * size / len(CLASSES_7))
                    image[max(0, row - 4) : row + 4, :] = 230
                    record = {
                        "label_7": cls,
                        "label": c,
                        "split": split,
                        "patient_sex": "F",
                        "patient_age_months": 60,
                    }
                    for suffix, data in (
                        ("png", cv2.imencode(".png", image)[1].tobytes()),
                        ("json", json.dumps(record).encode()),
                    ):
                        info = tarfile.TarInfo(f"{split}_{c}_{i}.{suffix}")
                        info.size = len(data)
                        tar.addfile(info, io.BytesIO(data))
        digest = hashlib.sha256((root / name).read_bytes()).hexdigest()
        shards.append({"name": name, "split": split, "samples": n * len(CLASSES_7), "sha256": digest})
    manifest = {
        "format": "pedx-ray-shards/1",
        "granularity": granularity,
        "classes": CLASSES_7,
        "taxonomy_version": "test",
        "seed": 0,
        "preprocessing": {"size": size},
        "counts": {},
        "shards": shards,
    }
    (root / "manifest.json").write_text(json.dumps(manifest))
    return root


@pytest.fixture(scope="module")
def shards(tmp_path_factory) -> Path:
    return write_tiny_shards(tmp_path_factory.mktemp("shards"))


def tiny_config(shards: Path, storage: Path, **changes) -> PretrainConfig:
    fields = dict(
        shards=str(shards),
        storage=str(storage),
        name="run",
        epochs=2,
        num_workers=2,
        cpus_per_worker=0.5,
        image_size=96,
        batch_size=8,
        warmup_epochs=1,
    )
    return PretrainConfig(**(fields | changes))


# ---------------------------------------------------------------- pure parts


def test_lr_schedule_warms_up_linearly_then_decays_polynomially():
    factors = [lr_factor(e, epochs=10, warmup_epochs=5, power=0.9) for e in range(10)]
    assert factors[:5] == [0.2, 0.4, 0.6, 0.8, 1.0]
    assert factors[5] == 1.0
    assert factors[6] == (1 - 1 / 5) ** 0.9
    assert factors[9] == (1 - 4 / 5) ** 0.9  # the last epoch still trains
    optimizer = torch.optim.Adam([torch.nn.Parameter(torch.zeros(1))], lr=1e-4)
    scheduler = build_scheduler(optimizer, epochs=10, warmup_epochs=5, power=0.9)
    seen = []
    for _ in range(10):
        seen.append(optimizer.param_groups[0]["lr"])
        scheduler.step()
    assert seen == pytest.approx([1e-4 * f for f in factors], rel=1e-12)


def test_macro_metrics_from_a_confusion_matrix():
    cm = np.array([[3, 1, 0], [0, 2, 0], [1, 0, 0]])  # class 2 never predicted
    m = classification_metrics(cm)
    assert m["accuracy"] == pytest.approx(5 / 7)
    precision, recall = [3 / 4, 2 / 3, 0.0], [3 / 4, 1.0, 0.0]
    f1 = [2 * p * r / (p + r) if p + r else 0.0 for p, r in zip(precision, recall, strict=True)]
    assert m["precision"] == pytest.approx(np.mean(precision))
    assert m["recall"] == pytest.approx(np.mean(recall))
    assert m["f1"] == pytest.approx(np.mean(f1))
    assert m["confusion_matrix"] == cm.tolist()


def test_confusion_matrices_summed_over_workers_equal_the_whole():
    rng = np.random.default_rng(1)
    y, p = torch.from_numpy(rng.integers(0, 7, 50)), torch.from_numpy(rng.integers(0, 7, 50))
    whole = confusion_matrix(y, p, 7)
    assert whole[2, 5] == int(((y == 2) & (p == 5)).sum())
    torch.testing.assert_close(
        confusion_matrix(y[:20], p[:20], 7) + confusion_matrix(y[20:], p[20:], 7), whole
    )


def test_augmentation_depends_only_on_seed_epoch_and_key():
    transform = build_augmentation(p=1.0)
    images = np.random.default_rng(0).integers(0, 255, (3, 64, 64), dtype=np.uint8)
    keys = ["a", "b", "c"]
    first = augment_images(transform, images, keys, seed=0, epoch=1)
    again = augment_images(build_augmentation(p=1.0), images[::-1], keys[::-1], seed=0, epoch=1)
    np.testing.assert_array_equal(first, again[::-1])  # order and transform instance do not matter
    assert not np.array_equal(first, augment_images(transform, images, keys, seed=0, epoch=2))
    assert not np.array_equal(first, augment_images(transform, images, keys, seed=1, epoch=1))
    assert not np.array_equal(first, images)


def test_config_precedence_is_defaults_then_yaml_then_flags(tmp_path):
    (tmp_path / "run.yaml").write_text("epochs: 7\nlr: 0.001\nimage_size: 299\n")
    args = build_parser().parse_args(
        ["--shards", "S", "--config", str(tmp_path / "run.yaml"), "--epochs", "9"]
    )
    config = config_from_args(args)
    assert (config.epochs, config.lr, config.image_size) == (9, 0.001, 299)  # flag > YAML > default
    assert config.batch_size == 60 and config.weight_decay == 5e-4 and config.betas == (0.9, 0.999)
    assert not config.use_gpu


def test_config_validation_says_how_to_fix():
    with pytest.raises(ConfigError, match="use a multiple of 4"):
        PretrainConfig(batch_size=30, num_workers=4)
    with pytest.raises(ConfigError, match=r"unknown field\(s\) \['epoch'\]"):
        resolve_config({"epoch": 3})
    with pytest.raises(ConfigError, match="granularity must be one of"):
        PretrainConfig(granularity=12)
    with pytest.raises(ConfigError, match="at least one epoch after warm-up"):
        PretrainConfig(epochs=5, warmup_epochs=5)


def test_fault_injection_is_a_test_hook_not_a_config_field(tmp_path, monkeypatch):
    (tmp_path / "old.yaml").write_text("fail_after_epoch: 1\n")
    args = build_parser().parse_args(["--shards", "S", "--config", str(tmp_path / "old.yaml")])
    with pytest.raises(ConfigError, match=f"fail_after_epoch is no longer a config field.*{FAULT_ENV}"):
        config_from_args(args)
    # Runs and checkpoints saved before carry fail_after_epoch: 0 (never); they still load.
    saved = PretrainConfig().to_dict() | {"fail_after_epoch": 0}
    assert PretrainConfig.from_dict(saved) == PretrainConfig()

    monkeypatch.delenv(FAULT_ENV, raising=False)
    assert Fault.from_env() is None
    monkeypatch.setenv(FAULT_ENV, f"2:{tmp_path / 'marker'}")
    assert Fault.from_env() == Fault(after_epoch=2, marker=tmp_path / "marker")
    Fault.from_env().strike(1)  # not its epoch: the process goes on
    monkeypatch.setenv(FAULT_ENV, "2")
    with pytest.raises(ValueError, match="expected EPOCH:MARKER"):
        Fault.from_env()


def test_shipped_yaml_configs_are_valid():
    root = Path(__file__).resolve().parents[1] / "configs"
    paths = sorted(root.glob("pretrain_*.yaml"))
    assert paths
    for path in paths:
        args = build_parser().parse_args(["--shards", "S", "--config", str(path)])
        assert config_from_args(args).granularity in (7, 30, 68)


def test_missing_shard_dir_and_manifest_are_clear_errors(tmp_path, capsys):
    with pytest.raises(ShardSetError, match="does not exist"):
        run_pretraining(tiny_config(tmp_path / "nowhere", tmp_path / "runs"))
    (tmp_path / "empty").mkdir()
    with pytest.raises(ShardSetError, match="manifest.json is missing"):
        run_pretraining(tiny_config(tmp_path / "empty", tmp_path / "runs"))
    with pytest.raises(SystemExit) as exit_info:
        main(["--shards", str(tmp_path / "empty"), "--storage", str(tmp_path / "runs")])
    assert exit_info.value.code == 2
    err = capsys.readouterr().err
    assert "manifest.json is missing" in err and "Traceback" not in err


def test_granularity_mismatch_and_damaged_shard_are_refused(tmp_path):
    root = write_tiny_shards(tmp_path / "shards")
    with pytest.raises(ShardSetError, match="holds 7-class shards.*--granularity 7"):
        run_pretraining(tiny_config(root, tmp_path / "runs", granularity=30))
    with open(root / "val-000000.tar", "r+b") as f:
        f.seek(600)
        f.write(b"\xff")
    with pytest.raises(ShardSetError, match=r"val-000000\.tar does not match its sha256"):
        run_pretraining(tiny_config(root, tmp_path / "runs"))


# ---------------------------------------------------------------- Ray Train runs


@pytest.mark.slow
def test_cpu_run_survives_a_killed_worker_checkpoints_and_resumes(
    ray_session, shards, tmp_path, capsys, monkeypatch
):
    # One run covers recovery and resume: every Ray Train start costs ~30 s of process spawning on 2 cores.
    fault_marker = tmp_path / "fault-injected"
    monkeypatch.setenv(FAULT_ENV, f"1:{fault_marker}")  # rank 0 dies once, in the epoch after checkpoint 1
    (tmp_path / "run.yaml").write_text("max_failures: 1\nwarmup_epochs: 1\n")
    storage = tmp_path / "runs"
    argv = [
        "--shards",
        str(shards),
        "--granularity",
        "7",
        "--epochs",
        "2",
        "--num-workers",
        "2",
        "--cpus-per-worker",
        "0.5",
        "--image-size",
        "96",
        "--batch-size",
        "8",
        "--storage",
        str(storage),
        "--name",
        "run",
        "--config",
        str(tmp_path / "run.yaml"),
    ]
    assert main(argv) == 0
    out = capsys.readouterr().out
    run_dir = storage / "run"
    assert "best checkpoint (epoch" in out and str(run_dir / "best") in out
    assert fault_marker.exists()  # rank 0 really died during epoch 2
    monkeypatch.delenv(FAULT_ENV)

    saved = json.loads((run_dir / "config.json").read_text())
    assert saved["classes"] == CLASSES_7 and saved["epochs"] == 2 and "fail_after_epoch" not in saved
    assert sorted(p.name for p in run_dir.glob("checkpoint_epoch_*")) == [
        "checkpoint_epoch_0001",
        "checkpoint_epoch_0002",
    ]
    last = json.loads((run_dir / "checkpoint_epoch_0002" / "metrics.json").read_text())
    assert last["start_epoch"] == 1  # the restarted workers continued from epoch 1's checkpoint
    assert list((run_dir / "tensorboard").glob("events.out.tfevents.*"))
    best = json.loads((run_dir / "best" / "metrics.json").read_text())
    for split in ("val", "finetune"):
        assert best[f"{split}_samples"] == 7  # every sample scored once across the 2 workers
        assert np.array(best[f"{split}_confusion_matrix"]).sum(axis=1).tolist() == [1] * 7
        assert 0 <= best[f"{split}_f1"] <= 1
    assert best["train_samples"] == 28
    model, config = load_checkpoint(run_dir / "best")
    assert config.classes == tuple(CLASSES_7)
    with torch.no_grad():
        assert model(torch.rand(2, 1, 96, 96)).shape == (2, 7)

    with pytest.raises(SystemExit):  # the same name again without --resume would silently continue
        main(argv)
    assert "--resume" in capsys.readouterr().err

    result = run_pretraining(PretrainConfig.from_dict(saved).replace(epochs=3), resume=True)
    assert result.last_metrics["start_epoch"] == 2
    assert result.last_metrics["epoch"] == 3
    expected_lr = 1e-4 * lr_factor(2, epochs=3, warmup_epochs=1, power=0.9)
    assert result.last_metrics["lr"] == pytest.approx(expected_lr)
    assert math.isfinite(result.last_metrics["train_loss"])
    assert (run_dir / "checkpoint_epoch_0003").is_dir()


def test_resume_without_a_run_is_refused(shards, tmp_path):
    with pytest.raises(PretrainError, match="nothing to resume"):
        run_pretraining(tiny_config(shards, tmp_path / "runs"), resume=True)


# ---------------------------------------------------------------- object storage (S3 on loopback)


def test_shard_set_on_object_storage_is_read_and_verified(s3_bucket, tmp_path):
    from ingest import storage
    from pedx_ray.data import check_manifest, read_manifest, shard_paths, verify_shards

    remote = f"{s3_bucket}/{tmp_path.name}/shards"
    storage.copy_tree(write_tiny_shards(tmp_path / "shards"), remote)
    manifest = read_manifest(remote)
    check_manifest(manifest, 7, remote)
    verify_shards(manifest, remote, progress=False)
    assert shard_paths(manifest, remote, "val") == [f"{remote}/val-000000.tar"]

    storage.write_bytes(f"{remote}/val-000000.tar", b"not the shard")
    with pytest.raises(ShardSetError, match=r"s3://.*val-000000\.tar does not match its sha256"):
        verify_shards(manifest, remote, progress=False)
    with pytest.raises(ShardSetError, match="does not exist"):
        read_manifest(f"{s3_bucket}/{tmp_path.name}/nowhere")


@pytest.mark.slow
def test_run_on_object_storage_exports_best_and_resumes(ray_session, shards, s3_bucket, tmp_path):
    from ingest import storage

    remote_shards = f"{s3_bucket}/{tmp_path.name}/shards"
    storage.copy_tree(shards, remote_shards)
    runs = f"{s3_bucket}/{tmp_path.name}/runs"
    result = run_pretraining(tiny_config(remote_shards, runs, epochs=1, warmup_epochs=0), progress=False)
    run_dir = f"{runs}/run"
    assert (result.run_dir, result.best_dir) == (run_dir, f"{run_dir}/best")
    assert storage.list_files(result.best_dir) == ["config.json", "metrics.json", "model.pt"]
    assert storage.is_file(f"{run_dir}/checkpoint_epoch_0001/train_state.pt")
    assert any("events.out.tfevents" in name for name in storage.list_files(f"{run_dir}/tensorboard"))
    model, config = load_checkpoint(result.best_dir)
    assert config.classes == tuple(CLASSES_7) and config.shards == remote_shards
    with torch.no_grad():
        assert model(torch.rand(1, 1, 96, 96)).shape == (1, 7)

    args = build_parser().parse_args(["--resume", "--name", "run", "--storage", runs, "--epochs", "2"])
    resumed = run_pretraining(config_from_args(args), resume=True, progress=False)
    assert resumed.last_metrics["start_epoch"] == 1 and resumed.last_metrics["epoch"] == 2
    assert storage.read_json(f"{run_dir}/best/metrics.json")["epoch"] in (1, 2)
    assert storage.is_file(f"{run_dir}/checkpoint_epoch_0002/model.pt")
