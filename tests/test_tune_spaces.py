"""Ray Tune sweeps: the spaces, the per-cell ASHA, the report's numbers, and resuming an interrupted sweep.

The report is checked on fixed fake results (trial directories written here) against numbers
computed independently with numpy / scipy. The resume test interrupts a real sweep (a subprocess
on the session's Ray, stopped with SIGINT after its first trial) and restores it in-process.
"""

from __future__ import annotations

import json
import math
import os
import signal
import subprocess
import sys
import time
from pathlib import Path
from types import SimpleNamespace

import cv2
import numpy as np
import pandas as pd
import pytest
from ray import tune
from ray.tune.schedulers import AsyncHyperBandScheduler, TrialScheduler
from scipy import stats as sps

from pedx_ray.config import ConfigError, PretrainConfig
from pedx_ray.finetune import FinetuneConfig
from tune_spaces.report import write_report
from tune_spaces.run import (
    CellASHA,
    SweepConfig,
    SweepError,
    _job,
    build_parser,
    config_from_args,
    job_config,
    run_sweep,
)
from tune_spaces.spaces import (
    ABLATION,
    INITS,
    PRETRAIN,
    SPACES,
    TRANSFER,
    Space,
    load_space,
    parse_train_size,
    sample,
)

REPO = Path(__file__).resolve().parents[1]


# ---------------------------------------------------------------- spaces


def fake_job(mode: str, tmp_path: Path) -> dict:
    return {
        "mode": mode,
        "base": {"backbone": "tiny_cnn", "image_size": 64, "data": "phantom:x"} if mode != "pretrain" else {},
        "shards": {7: "/s7", 30: "/s30", 68: "/s68"},
        "pedxnet": {7: "/p7", 30: "/p30", 68: "/p68"},
        "imagenet": "/w/inception_v3_google.pth",
        "cache_dir": str(tmp_path / "cache"),
    }


@pytest.mark.parametrize("name", sorted(SPACES))
def test_every_builtin_space_gives_valid_job_configs(name, tmp_path):
    space = SPACES[name]
    mode = "pretrain" if space.mode == "pretrain" else "finetune"
    for params in sample(space, 1):
        config = job_config(fake_job(mode, tmp_path), params, str(tmp_path))
        assert isinstance(config, PretrainConfig if mode == "pretrain" else FinetuneConfig)
        assert config.name == "run" and config.storage == str(tmp_path)
        for key, value in params.items():
            if key not in ("init", "train_size"):
                assert getattr(config, key) == value


def test_pretrain_space_samples_the_grid_and_a_log_uniform_learning_rate():
    configs = sample(PRETRAIN, num_samples=300, seed=1)
    assert len(configs) == 3 * 300
    assert {g: sum(c["granularity"] == g for c in configs) for g in (7, 30, 68)} == {7: 300, 30: 300, 68: 300}
    log_lr = np.log10([c["lr"] for c in configs])
    assert log_lr.min() >= -5 and log_lr.max() <= -3
    assert abs(np.median(log_lr) - (-4)) < 0.15  # uniform in log space: the median is the geometric mean
    assert abs(np.mean(log_lr < -4) - 0.5) < 0.06
    assert {c["batch_size"] for c in configs} == {30, 60, 120}
    assert all(0.25 <= c["augment_p"] <= 0.75 for c in configs)
    assert sample(PRETRAIN, 2, seed=5) == sample(PRETRAIN, 2, seed=5)
    assert sample(PRETRAIN, 2, seed=5) != sample(PRETRAIN, 2, seed=6)


def test_transfer_and_ablation_spaces_cover_every_cell():
    configs = sample(TRANSFER)
    cells = {(c["init"], c["train_size"]) for c in configs}
    assert len(configs) == len(INITS) * 7 * TRANSFER.num_samples
    assert cells == {(i, s) for i in INITS for s in ("100%", "50%", "20%", "10%", "5%", "500", "100")}
    ablation = sample(ABLATION)
    assert len(ablation) == 5 * 5 * 3
    assert len({(c["init"], c["train_size"], c["seed"]) for c in ablation}) == 75
    assert {c["lr"] for c in ablation} == {1e-4}


def test_train_size_tokens():
    assert parse_train_size("20%") == {"train_fraction": 0.2, "train_size": 0}
    assert parse_train_size("500") == {"train_fraction": 1.0, "train_size": 500}
    for bad in ("150%", "0", "half", "0%"):
        with pytest.raises(ConfigError, match="train_size"):
            parse_train_size(bad)


def test_bad_spaces_are_refused_with_the_fix():
    with pytest.raises(ConfigError, match="'learning_rate' is not a transfer config field"):
        Space("X", "transfer", "", {"learning_rate": tune.loguniform(1e-5, 1e-3)})
    with pytest.raises(ConfigError, match="init 'pedxnet-12'"):
        Space("X", "ablation", "", {"init": tune.grid_search(["scratch", "pedxnet-12"])})
    with pytest.raises(ConfigError, match="train_size '150%'"):
        Space("X", "transfer", "", {"train_size": "150%"})
    with pytest.raises(ConfigError, match="'data' comes from the runner"):
        Space("X", "transfer", "", {"data": "phantom:x"})
    with pytest.raises(ConfigError, match="granularity 12"):
        Space("X", "pretrain", "", {"granularity": tune.grid_search([7, 12])})
    with pytest.raises(ConfigError, match="grid axes"):
        Space("X", "transfer", "", {"lr": 1e-3}, grid_axes=("init",))


def test_a_users_space_file_is_loaded_and_a_missing_checkpoint_named(tmp_path):
    path = tmp_path / "my_spaces.py"
    path.write_text(
        "from ray import tune\nfrom tune_spaces.spaces import Space\n"
        "MINE = Space('MINE', 'transfer', 'lr only',\n"
        "             {'init': 'pedxnet-68', 'lr': tune.uniform(1e-4, 2e-4)})\n"
    )
    space = load_space(f"{path}:MINE")
    assert space.name == "MINE" and load_space("TRANSFER") is TRANSFER
    with pytest.raises(ConfigError, match="has no Space named OTHER"):
        load_space(f"{path}:OTHER")
    job = fake_job("finetune", tmp_path) | {"pedxnet": {}}
    with pytest.raises(ConfigError, match="--pedxnet 68=DIR"):
        job_config(job, sample(space, 1)[0], str(tmp_path))


def test_cli_resolves_yaml_below_flags(tmp_path):
    yaml_file = tmp_path / "sweep.yaml"
    yaml_file.write_text(
        "space: PHANTOM_ABLATION\nmax_concurrent: 2\nshards: {7: /a}\n"
        "finetune_base: {epochs: 3, task: bone_age}\n"
    )
    args = build_parser().parse_args(
        ["ablation", "--config", str(yaml_file), "--data", "phantom:/d", "--shards", "30=/b",
         "--set", "epochs=5", "--max-concurrent", "1", "--use-gpu", "--gpus-per-worker", "0.25"]
    )  # fmt: skip
    sweep = config_from_args(args)
    assert sweep.space == "PHANTOM_ABLATION" and sweep.max_concurrent == 1
    assert sweep.shards == {7: "/a", 30: "/b"}
    assert sweep.finetune_base == {"epochs": 5, "task": "bone_age", "use_gpu": True, "gpus_per_worker": 0.25}
    assert sweep.pretrain_base == {"use_gpu": True, "gpus_per_worker": 0.25}
    with pytest.raises(ConfigError, match="needs fine-tuning data"):
        SweepConfig(mode="transfer")


def test_relative_data_paths_reach_the_trials_absolute(tmp_path, monkeypatch):
    """Tune starts each trial in its own working directory: a path relative to where the sweep was
    started must not be read from there."""
    monkeypatch.chdir(tmp_path)
    args = build_parser().parse_args(
        ["transfer", "--data", "rsna:labels.csv", "--set", "images=pngs", "--pedxnet", "7=ckpt",
         "--results", "out"]
    )  # fmt: skip
    job = _job(config_from_args(args), "finetune", {7: "ckpt"})
    assert job["base"]["data"] == f"rsna:{tmp_path / 'labels.csv'}"
    assert job["base"]["images"] == str(tmp_path / "pngs")
    assert job["pedxnet"] == {7: str(tmp_path / "ckpt")} and job["results"] == str(tmp_path / "out")


# ---------------------------------------------------------------- scheduling


def _trial(trial_id: str, **config) -> SimpleNamespace:
    return SimpleNamespace(trial_id=trial_id, config=config)


def test_cell_asha_stops_trials_only_against_their_own_cell():
    asha = dict(time_attr="epoch", max_t=8, grace_period=1, reduction_factor=2, stop_last_trials=False)
    cells = CellASHA(("init", "train_size"), **asha)
    cells.set_search_properties("val_score", "max")
    plain = AsyncHyperBandScheduler(metric="val_score", mode="max", **asha)
    good = [_trial(f"a{i}", init="pedxnet-7", train_size="100%") for i in range(2)]
    small = [_trial(f"b{i}", init="scratch", train_size="5%") for i in range(2)]
    for scheduler in (cells, plain):
        for trial in good + small:
            scheduler.on_trial_add(None, trial)
        for trial, score in zip(good, (-10.0, -11.0), strict=True):
            scheduler.on_trial_result(None, trial, {"epoch": 1, "val_score": score})
    # A 5% run scores far worse than the 100% runs; plain ASHA stops it, per-cell ASHA does not ...
    assert plain.on_trial_result(None, small[0], {"epoch": 1, "val_score": -40.0}) == TrialScheduler.STOP
    assert cells.on_trial_result(None, small[0], {"epoch": 1, "val_score": -40.0}) == TrialScheduler.CONTINUE
    # ... but stops the worse of two runs in the same cell.
    assert cells.on_trial_result(None, small[1], {"epoch": 1, "val_score": -45.0}) == TrialScheduler.STOP
    # The final result (test metrics, no epoch) never stops a trial.
    final = {"val_score": -99.0, "best_epoch": 1}
    assert cells.on_trial_result(None, good[0], final) == TrialScheduler.CONTINUE


# ---------------------------------------------------------------- the report on fixed fake results


def _write(path: Path, data) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(json.dumps(data) if not isinstance(data, str) else data)


def _experiment(root: Path, name: str, mode: str, axes: list[str], metric: str) -> Path:
    path = root / name
    _write(path / "sweep.json", {"mode": mode, "grid_axes": axes, "metric": metric, "metric_mode": "max"})
    return path


TARGETS = np.array([12.0, 30.0, 55.0, 80.0, 101.0, 140.0, 160.0, 190.0])
N_TRAIN = {"100%": 40, "50%": 20}


def _predictions(init: str, size: str, seed: int) -> np.ndarray:
    """Deterministic, distinct predictions per run: a bias and a per-image wobble."""
    rng = np.random.default_rng([INITS.index(init), N_TRAIN[size], seed])
    bias = {"scratch": 20.0, "pedxnet-7": 9.0, "pedxnet-30": 11.0}[init] * (1 if size == "100%" else 1.5)
    return TARGETS + bias * rng.choice([-1, 1], len(TARGETS)) + rng.normal(0, 4, len(TARGETS))


def _bone_age_trial(experiment: Path, init: str, size: str, seed: int, lr: float, val: float) -> None:
    trial = experiment / f"t{init}{N_TRAIN[size]}{seed}{lr}"
    prediction = _predictions(init, size, seed) + (0 if lr == 1e-3 else 50)  # the other lr is bad
    ids = [f"img{i}" for i in range(len(TARGETS))]
    frame = pd.DataFrame(
        {
            "id": ids,
            "target": TARGETS,
            "prediction": prediction,
            "sex": 1,
            "age_months": TARGETS,
            "split": "test",
        }
    )
    _write(trial / "run" / "predictions_test.csv", frame.to_csv(index=False))
    error = prediction - TARGETS
    params = {"init": init, "train_size": size, "seed": seed, "lr": lr}
    _write(trial / "params.json", params)
    progress = [{"epoch": e, "val_score": val - 3 + e, "val_mae": 3 - val - e} for e in (1, 2, 3)]
    _write(trial / "result.json", "\n".join(json.dumps(r) for r in progress))
    _write(
        trial / "trial.json",
        {
            "params": params, "task": "bone_age", "lr": lr, "seed": seed, "n_train": N_TRAIN[size],
            "best": {"best_val_score": val},
            "test": {"mae": float(np.abs(error).mean()), "mse": float((error**2).mean()),
                     "r2": float(1 - (error**2).sum() / ((TARGETS - TARGETS.mean()) ** 2).sum())},
            "predictions": {"test": "run/predictions_test.csv"},
            "config": {"init": "scratch"},
        },
    )  # fmt: skip


def _pretrain_trial(experiment: Path, name: str, granularity: int, lr: float, finetune_f1: float) -> None:
    trial = experiment / name
    best = {"val_f1": finetune_f1 - 0.05, "val_accuracy": finetune_f1 - 0.01, "val_precision": 0.5,
            "val_recall": 0.25 + granularity / 100, "finetune_f1": finetune_f1, "epoch": 3}  # fmt: skip
    _write(trial / "params.json", {"granularity": granularity, "lr": lr})
    _write(trial / "result.json", json.dumps({"epoch": 1, "finetune_f1": finetune_f1}))
    _write(trial / "trial.json", {"granularity": granularity, "lr": lr, "best": best, "params": {}})


@pytest.fixture
def fake_results(tmp_path) -> Path:
    root = tmp_path / "results"
    pre = _experiment(root, "abl-pretrain", "pretrain", ["granularity"], "finetune_f1")
    _pretrain_trial(pre, "p1", 7, 1e-3, 0.70)
    _pretrain_trial(pre, "p2", 7, 1e-4, 0.80)
    _pretrain_trial(pre, "p3", 30, 1e-3, 0.40)
    (pre / "p4").mkdir()  # a trial that never started: no params.json
    abl = _experiment(root, "abl", "ablation", ["init", "train_size"], "val_score")
    for init in ("scratch", "pedxnet-7", "pedxnet-30"):
        for size in ("100%", "50%"):
            for seed in (0, 1):
                _bone_age_trial(abl, init, size, seed, 1e-3, val=-10.0)
                _bone_age_trial(abl, init, size, seed, 1e-2, val=-30.0)  # worse validation: not reported
    return root


def test_report_numbers_match_an_independent_computation(fake_results, tmp_path):
    written = write_report(fake_results, tmp_path / "report")

    def run_mae(init, size, seed):
        return np.abs(_predictions(init, size, seed) - TARGETS).mean()

    # Data-size ablation: mean ± sample SD over the two seeds, the bad learning rate left out.
    ablation = pd.read_csv(tmp_path / "report" / "ablation.csv")
    assert len(ablation) == 6 and set(ablation["lr"]) == {1e-3}
    for row in ablation.itertuples():
        maes = [run_mae(row.init, row.train_size, s) for s in (0, 1)]
        assert row.mean == pytest.approx(np.mean(maes), rel=1e-9)
        assert row.sd == pytest.approx(np.std(maes, ddof=1), rel=1e-9)
        assert row.seeds == 2 and row.n_train == N_TRAIN[row.train_size]

    # Table 3: at the largest size; p from scipy's paired t-test on seed-averaged absolute errors.
    table3 = pd.read_csv(tmp_path / "report" / "table3_bone_age.csv").set_index("init")
    assert list(table3.index) == ["scratch", "pedxnet-7", "pedxnet-30"]
    assert set(table3["train_size"]) == {"100%"}

    def mean_abs_error(init):
        return np.mean([np.abs(_predictions(init, "100%", s) - TARGETS) for s in (0, 1)], axis=0)

    for init in ("pedxnet-7", "pedxnet-30"):
        expected_p = sps.ttest_rel(mean_abs_error("scratch"), mean_abs_error(init)).pvalue
        assert table3.loc[init, "p_vs_scratch"] == pytest.approx(expected_p, rel=1e-9)
        mses = [((_predictions(init, "100%", s) - TARGETS) ** 2).mean() for s in (0, 1)]
        assert table3.loc[init, "mse_mean"] == pytest.approx(np.mean(mses), rel=1e-9)
    assert math.isnan(table3.loc["scratch", "p_vs_scratch"])

    # Table 1: the best trial per granularity by fine-tuning F1, its validation metrics.
    table1 = pd.read_csv(tmp_path / "report" / "table1_upstream.csv").set_index("granularity")
    assert table1.loc[7, "lr"] == 1e-4 and table1.loc[7, "f1"] == pytest.approx(0.75)
    assert table1.loc[7, "trials"] == 2 and table1.loc[30, "recall"] == pytest.approx(0.55)

    markdown = Path(written["markdown"]).read_text()
    maes = [run_mae("pedxnet-7", "50%", s) for s in (0, 1)]
    assert f"{np.mean(maes):.2f} ± {np.std(maes, ddof=1):.2f}" in markdown
    assert "| 7C | 0.750 | 0.790 | 0.500 | 0.320 |" in markdown
    for png in written["png"]:
        image = cv2.imread(str(png))
        assert image is not None and image.shape == (560, 640, 3)
        assert len(np.unique(image.reshape(-1, 3), axis=0)) > 50  # drawn on, not a blank canvas
    assert {p.name for p in written["png"]} == {
        "size_bone_age.png", "curves_abl.png", "curves_abl-pretrain.png", "lr_abl.png", "lr_abl-pretrain.png"
    }  # fmt: skip


def test_report_cli_refuses_a_directory_without_results(tmp_path, capsys):
    from tune_spaces.report import main

    assert main([str(tmp_path)]) == 2
    assert "no sweep results" in capsys.readouterr().err


# ---------------------------------------------------------------- an interrupted sweep resumes


@pytest.fixture(scope="module")
def tiny_bone_age(tmp_path_factory) -> Path:
    from ingest.phantoms import generate_task_set

    root = tmp_path_factory.mktemp("bone_age")
    generate_task_set(root, "bone_age", n=24, seed=3)
    return root


SEEDS_SPACE = """from ray import tune
from tune_spaces.spaces import Space
SEEDS = Space("SEEDS", "ablation", "three seeds of one cell",
              {"init": "scratch", "train_size": "100%", "seed": tune.grid_search([0, 1, 2]), "lr": 1e-3},
              grid_axes=("init", "train_size"), metric="val_score")
"""


@pytest.mark.slow
def test_an_interrupted_sweep_resumes_without_rerunning_finished_trials(ray_session, tiny_bone_age, tmp_path):
    space_file = tmp_path / "seeds.py"
    space_file.write_text(SEEDS_SPACE)
    results = tmp_path / "results"
    argv = [
        "transfer", "--space", f"{space_file}:SEEDS", "--data", f"phantom:{tiny_bone_age}",
        "--results", str(results), "--name", "seeds", "--scheduler", "fifo",
        "--set", "backbone=tiny_cnn", "--set", "image_size=32", "--set", "epochs=2",
        "--set", "warmup_epochs=0", "--set", "batch_size=4", "--set", "augment=false",
    ]  # fmt: skip
    env = os.environ | {"RAY_ADDRESS": ray_session.get_runtime_context().gcs_address, "PYTHONPATH": str(REPO)}
    process = subprocess.Popen(
        [sys.executable, "-m", "tune_spaces.run", *argv],
        cwd=REPO,
        env=env,
        stdout=subprocess.DEVNULL,
        stderr=subprocess.DEVNULL,
    )
    experiment = results / "seeds"
    deadline = time.monotonic() + 240
    try:
        while not list(experiment.glob("*/trial.json")):
            assert process.poll() is None, "the sweep ended before any trial finished"
            assert time.monotonic() < deadline, "no trial finished in 240 s"
            time.sleep(0.2)
        process.send_signal(signal.SIGINT)  # Ctrl-C: Tune saves the experiment state and stops
        process.wait(timeout=120)
    finally:
        if process.poll() is None:
            process.kill()

    def trained(trial_dir: Path) -> dict:  # what training writes: its checkpoints and the results file
        files = [trial_dir / "trial.json", *trial_dir.glob("run/checkpoint_epoch_*/model.pt")]
        return {str(f): f.stat().st_mtime_ns for f in files}

    finished = {p.parent.name: trained(p.parent) for p in experiment.glob("*/trial.json")}
    assert 1 <= len(finished) < 3, "the interruption must leave unfinished trials"

    args = build_parser().parse_args(argv)
    with pytest.raises(SweepError, match="pass --resume"):
        run_sweep(config_from_args(args))
    outcome = run_sweep(config_from_args(args), resume=True)

    assert len(outcome["trials"]) == 3
    assert sorted(t["params"]["seed"] for t in outcome["trials"]) == [0, 1, 2]
    for name, files in finished.items():  # finished trials were not trained again
        assert trained(experiment / name) == files
    for trial in outcome["trials"]:
        assert trial["n_train"] > 0 and trial["test"]["mae"] > 0
        assert Path(trial["dir"]).name.split("_")[0] == trial["trial_id"].split("_")[0]  # named by id


def test_report_reads_results_from_and_writes_to_object_storage(fake_results, s3_bucket, tmp_path):
    from ingest import storage

    remote = f"{s3_bucket}/{tmp_path.name}/results"
    storage.copy_tree(fake_results, remote)
    local = write_report(fake_results, tmp_path / "report")
    written = write_report(remote, f"{remote}/report")
    assert written["markdown"] == f"{remote}/report/report.md"
    assert [storage.name_of(p) for p in written["csv"]] == [p.name for p in local["csv"]]
    for path in local["csv"]:
        assert storage.read_text(f"{remote}/report/{path.name}") == path.read_text()
    assert storage.read_text(written["markdown"]) == local["markdown"].read_text()
    assert len(written["png"]) == len(local["png"])
