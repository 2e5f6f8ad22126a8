"""bench/train_throughput.py: the real-shard mode runs pretraining's input pipeline in both modes and
reports throughput and the data-loading stall; the CUDA-only options run (or are refused) on the CPU."""

from __future__ import annotations

import importlib.util
import json
import sys
from pathlib import Path

import pytest
from test_pretrain import write_tiny_shards

BENCH = Path(__file__).resolve().parents[1] / "bench" / "train_throughput.py"


@pytest.fixture(scope="module")
def bench():
    spec = importlib.util.spec_from_file_location("train_throughput", BENCH)
    module = importlib.util.module_from_spec(spec)
    sys.modules[spec.name] = module
    spec.loader.exec_module(module)
    yield module
    del sys.modules[spec.name]


@pytest.mark.slow
def test_shard_mode_reports_both_modes_with_throughput_and_stall(bench, ray_session, tmp_path, capsys):
    import ray.cloudpickle

    # Ray Train's worker cannot import bench/ by name: ship the module's code with the training loop.
    ray.cloudpickle.register_pickle_by_value(bench)
    shards = write_tiny_shards(tmp_path / "shards")  # 28 train samples: batches of 8, 8, 8, 4
    out = tmp_path / "summary.json"
    argv = ["--shards", str(shards), "--arch", "tiny_cnn", "--image-size", "32", "--batch-size", "8"]
    argv += ["--steps", "4", "--warmup", "1", "--threads", "1", "--worker-cpus", "1", "--data-cpus", "1"]
    argv += ["--bf16", "--channels-last", "--pin-memory", "--storage", str(tmp_path / "runs")]
    assert bench.main([*argv, "--json", str(out)]) == 0

    assert "--pin-memory ignored" in capsys.readouterr().out
    summary = json.loads(out.read_text())
    assert summary["input"] == "shards"
    assert summary["settings"]["train_samples"] == 28
    assert summary["settings"]["bf16"] and summary["settings"]["channels_last"]
    assert set(summary["results"]) == {"torch", "ray_train_1_worker"}
    for result in summary["results"].values():
        assert result["images_per_s"] > 0
        assert 0 <= result["data_wait_fraction"] <= 1
        # The four timed steps after one warm-up batch cross into the second epoch: 8 + 8 + 4 + 8.
        assert result["images"] == 28
        assert result["gpu_idle_fraction"] is None  # CPU: no GPU idle time to measure
        assert result["torch_threads"] == 1


@pytest.mark.slow
def test_input_mode_reads_each_shard_repeat_times_per_epoch(bench, ray_session, tmp_path):
    shards = write_tiny_shards(tmp_path / "shards")  # 28 train samples
    out = tmp_path / "summary.json"
    argv = ["--mode", "input", "--shards", str(shards), "--arch", "tiny_cnn", "--image-size", "32"]
    argv += ["--batch-size", "8", "--steps", "7", "--warmup", "0", "--repeat-shards", "2", "--data-cpus", "1"]
    assert bench.main([*argv, "--json", str(out)]) == 0

    result = json.loads(out.read_text())["results"]["input_only"]
    # 56 samples an epoch: seven full batches after the first (untimed) one. Once per epoch would be 48.
    assert result["images"] == 56 and result["images_per_s"] > 0


def test_synthetic_mode_runs_the_cuda_options_on_the_cpu(bench, tmp_path, capsys):
    out = tmp_path / "summary.json"
    argv = ["--mode", "torch", "--arch", "tiny_cnn", "--image-size", "32", "--batch-size", "4"]
    argv += ["--steps", "2", "--warmup", "1", "--bf16", "--channels-last", "--json", str(out)]
    assert bench.main(argv) == 0

    result = json.loads(out.read_text())["results"]["torch"]
    assert result["images"] == 8 and result["images_per_s"] > 0
    assert result["data_wait_fraction"] < 0.5  # the batch is made once, up front


def test_a_missing_shard_set_is_a_clear_error(bench, tmp_path, capsys):
    with pytest.raises(SystemExit) as exit_info:
        bench.main(["--shards", str(tmp_path / "nowhere")])
    assert exit_info.value.code == 2
    assert "python -m ingest shards" in capsys.readouterr().err
