"""Ray Tune sweeps of PedXnet pretraining and fine-tuning: the paper's study design on any data.

``python -m tune_spaces.run {pretrain,transfer,ablation} --config configs/tune_*.yaml [flags]``

- ``pretrain``: a search over `pedx_ray.pretrain` runs (``--shards G=DIR`` per granularity);
  ASHA stops poor learning rates early, within each granularity.
- ``transfer``: a search over `pedx_ray.finetune` runs (``--data``), initialisation × training
  size × learning rate; ASHA within each initialisation × size cell.
- ``ablation``: a grid of initialisation × training size × seeds at a fixed learning rate, run to
  the end (FIFO). PedXnet checkpoints come from ``--pedxnet G=DIR`` or, for granularities with
  ``--shards G=DIR`` instead, from a first pretraining stage (the best trial per granularity).
  The report (`tune_spaces.report`) is written to ``RESULTS/NAME/report`` at the end.

Every trial is a Tune function that builds and fits a Ray Train ``TorchTrainer`` (the Train V2
pattern): ``TuneReportCallback`` forwards each epoch's validation metrics to Tune, the trial then
reports the test metrics of the best checkpoint and writes ``trial.json``. Trials are named by
Tune's trial id plus their grid cell, never a timestamp, so a restarted trial finds its Train run
(``TRIAL_DIR/run``) and Train resumes it from its latest checkpoint. Failures are retried at both
levels: Train restarts failed workers (the job config's ``max_failures``), Tune restarts failed
trials (``--max-failures``). ``--resume`` continues an interrupted sweep with ``Tuner.restore``:
finished trials are kept, unfinished ones continue. Progress: the Ray dashboard and
``tensorboard --logdir RESULTS`` (Tune's per-trial logs and each run's own).

Configuration: defaults < ``--config`` YAML (fields of `SweepConfig`; ``pretrain_base`` /
``finetune_base`` hold the job config fields every trial shares) < flags; ``--set FIELD=VALUE``
overrides one job field. The resolved sweep is saved as ``RESULTS/NAME/sweep.json``.
"""

from __future__ import annotations

import argparse
import dataclasses
import io
import os
import sys
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import yaml
from ray.tune.schedulers import AsyncHyperBandScheduler, FIFOScheduler

from ingest import storage
from pedx_ray.config import ConfigError, PretrainConfig, from_known_fields, read_yaml, resolve_config
from pedx_ray.finetune import FinetuneConfig, resolve_finetune_config
from tune_spaces.spaces import (
    DEFAULT_SPACE,
    MODES,
    SYMBOLIC_KEYS,
    Space,
    cell,
    init_granularity,
    load_space,
    parse_train_size,
    sample,
)

RUN_NAME = "run"  # the Ray Train run inside each trial directory
TRIAL_FILE = "trial.json"
SWEEP_FILE = "sweep.json"
PRETRAIN_SUFFIX = "-pretrain"
SCHEDULERS = ("asha", "fifo")


class SweepError(RuntimeError):
    """The sweep cannot start or failed; the message says why and what to do."""


@dataclass(frozen=True)
class SweepConfig:
    mode: str = "ablation"
    space: str = ""  # built-in name or FILE.py:NAME; default per mode (tune_spaces.spaces.DEFAULT_SPACE)
    pretrain_space: str = "PRETRAIN"  # the ablation's first stage, when it has to pretrain
    results: str = "tune_results"
    name: str = ""  # the experiment directory RESULTS/NAME; default: the mode
    pretrain_base: dict = field(default_factory=dict)  # PretrainConfig fields shared by all trials
    finetune_base: dict = field(default_factory=dict)  # FinetuneConfig fields shared by all trials
    data: str = ""  # fine-tuning data KIND:PATH (pedx_ray.datasets)
    shards: dict = field(default_factory=dict)  # granularity → shard directory
    pedxnet: dict = field(default_factory=dict)  # granularity → PedXnet checkpoint directory
    imagenet: str = ""  # ImageNet weights file for init "imagenet"
    num_samples: int = 0  # 0: the space's own
    scheduler: str = ""  # asha | fifo; default asha for pretrain/transfer, fifo for ablation
    grace_period: int = 1  # ASHA: epochs before a trial can be stopped
    reduction_factor: float = 2.0
    max_concurrent: int = 1  # trials (= Train runs) at once; size it to the limiting resource
    trial_cpus: float = 0.1  # the trial is only the Train driver; its workers ask for their own CPUs
    max_failures: int = 1  # Tune: restarts of a failed trial (Train retries workers on its own)
    seed: int = 0  # of the search's random draws

    def __post_init__(self) -> None:
        object.__setattr__(self, "shards", {int(g): str(p) for g, p in self.shards.items()})
        object.__setattr__(self, "pedxnet", {int(g): str(p) for g, p in self.pedxnet.items()})
        checks = [
            (self.mode in MODES, f"mode must be one of {MODES}, not {self.mode!r}"),
            (
                self.scheduler in ("", *SCHEDULERS),
                f"scheduler must be one of {SCHEDULERS}, not {self.scheduler!r}",
            ),
            (self.num_samples >= 0, f"num_samples must be >= 0 (0 = the space's), not {self.num_samples}"),
            (self.grace_period >= 1, f"grace_period must be at least 1 epoch, not {self.grace_period}"),
            (self.reduction_factor > 1, f"reduction_factor must be above 1, not {self.reduction_factor}"),
            (self.max_concurrent >= 1, f"max_concurrent must be at least 1, not {self.max_concurrent}"),
            (self.trial_cpus > 0, f"trial_cpus must be positive (e.g. 0.1), not {self.trial_cpus}"),
            (self.max_failures >= -1, f"max_failures must be -1 (forever) or more, not {self.max_failures}"),
            (
                self.mode == "pretrain" or bool(self.data or self.finetune_base.get("data")),
                f"{self.mode} needs fine-tuning data: pass --data KIND:PATH (e.g. phantom:DIR)",
            ),
        ]
        for ok, message in checks:
            if not ok:
                raise ConfigError(message)

    @property
    def space_name(self) -> str:
        return self.space or DEFAULT_SPACE[self.mode]

    @property
    def experiment(self) -> str:
        return self.name or self.mode

    @property
    def scheduler_name(self) -> str:
        return self.scheduler or ("fifo" if self.mode == "ablation" else "asha")

    def results_dir(self) -> Path | str:
        """An absolute directory, or an object-store URI (ingest.storage)."""
        return storage.location(self.results)

    def to_dict(self) -> dict[str, Any]:
        return dataclasses.asdict(self)

    @classmethod
    def from_dict(cls, data: dict[str, Any], source: str = "sweep config") -> SweepConfig:
        return from_known_fields(cls, data, source)


# ---------------------------------------------------------------- trial configs


def _job(sweep: SweepConfig, mode: str, pedxnet: dict[int, str]) -> dict[str, Any]:
    """Everything a trial needs besides its own parameters (plain data: it travels to the trial)."""
    base = dict(sweep.pretrain_base if mode == "pretrain" else sweep.finetune_base)
    results = sweep.results_dir()
    if mode != "pretrain" and sweep.data:
        base["data"] = sweep.data
    return {
        "mode": mode,
        "base": _with_absolute_paths(base),
        "shards": {int(g): storage.resolve(p) for g, p in sweep.shards.items()},
        "pedxnet": {int(g): storage.resolve(p) for g, p in pedxnet.items()},
        "imagenet": storage.resolve(sweep.imagenet) if sweep.imagenet else "",
        # Images are cached as files: beside the results, or in ./cache when those are in object storage.
        "cache_dir": str(Path("cache").resolve() if storage.is_uri(results) else results / "cache"),
        "results": str(results),
    }


# Fine-tuning fields that name files or folders (pedx_ray.finetune.FinetuneConfig).
_PATH_FIELDS = ("images", "labels", "val_list", "test_list", "cache_dir")


def _with_absolute_paths(base: dict[str, Any]) -> dict[str, Any]:
    """Tune runs each trial in a working directory of its own: paths given relative to where the
    sweep was started are fixed here, before they travel to the trials."""
    fixed = dict(base)
    kind, sep, path = str(fixed.get("data", "")).partition(":")
    if sep and path:
        fixed["data"] = f"{kind}:{storage.resolve(path)}"
    for name in _PATH_FIELDS:
        if fixed.get(name):
            fixed[name] = storage.resolve(fixed[name])
    return fixed


def _resolve_init(token: str, job: dict) -> str:
    granularity = init_granularity(token)
    if token == "scratch":
        return "scratch"
    if token == "imagenet":
        if not job["imagenet"]:
            raise ConfigError("init 'imagenet' needs the weights file: pass --imagenet PATH")
        return f"imagenet:{job['imagenet']}"
    if granularity not in job["pedxnet"]:
        raise ConfigError(
            f"init {token!r} needs a PedXnet-{granularity}C checkpoint: pass --pedxnet {granularity}=DIR "
            f"(or, in ablation mode, --shards {granularity}=DIR to pretrain one first)"
        )
    return f"pedxnet:{job['pedxnet'][granularity]}"


def job_config(job: dict, params: dict[str, Any], storage: str) -> PretrainConfig | FinetuneConfig:
    """The job config of one trial: shared base < the trial's parameters < where it writes."""
    if job["mode"] == "pretrain":
        granularity = int(
            params.get("granularity", job["base"].get("granularity", PretrainConfig.granularity))
        )
        if granularity not in job["shards"]:
            raise ConfigError(
                f"granularity {granularity} needs its shard set: pass --shards {granularity}=DIR"
            )
        where = {"shards": job["shards"][granularity], "storage": storage, "name": RUN_NAME}
        return resolve_config(job["base"], params, where)
    layer = {k: v for k, v in params.items() if k not in SYMBOLIC_KEYS}
    if "train_size" in params:
        layer |= parse_train_size(params["train_size"])
    if "init" in params:
        layer["init"] = _resolve_init(params["init"], job)
    cache = job["base"].get("cache_dir") or job["cache_dir"]
    return resolve_finetune_config(
        job["base"], layer, {"storage": storage, "name": RUN_NAME, "cache_dir": cache}
    )


def trial_label(config: dict[str, Any], axes: tuple[str, ...]) -> str:
    """The grid cell as a directory-safe name, e.g. ``init=pedxnet-7,train_size=50pct,seed=1``."""
    keys = [*axes, *(["seed"] if "seed" in config and "seed" not in axes else [])]
    return ",".join(f"{k}={str(config[k]).replace('%', 'pct')}" for k in keys if k in config)


# ---------------------------------------------------------------- the trial (a Tune function)


def score_test_split(task: str, predictions_csv: Path | str) -> dict[str, float]:
    """The best checkpoint's scores on the test split (NaN where a split cannot give one)."""
    import numpy as np
    import pandas as pd

    from pedx_ray import stats

    frame = pd.read_csv(io.BytesIO(storage.read_bytes(predictions_csv)))
    target, prediction = frame["target"].to_numpy(float), frame["prediction"].to_numpy(float)
    try:
        if task == "bone_age":
            scores = stats.regression_metrics(target, prediction)
            return {k: scores[k] for k in ("mae", "mae_sd", "mse", "r2")} | {"n": len(frame)}
        scores = stats.binary_metrics(target.astype(int), prediction) | {
            "auc": stats.auc(target.astype(int), prediction)
        }
        keys = ("auc", "f1", "accuracy", "sensitivity", "specificity", "ppv", "npv")
        return {k: scores[k] for k in keys} | {"n": len(frame)}
    except stats.StatsError:
        return {"n": len(frame), ("mae" if task == "bone_age" else "auc"): float(np.nan)}


def run_trial(params: dict[str, Any], job: dict) -> None:
    """One trial: fit the Ray Train job, then report and record its best checkpoint's results."""
    import ray.tune
    from ray.tune.integration.ray_train import TuneReportCallback

    from pedx_ray.datasets import load_table
    from pedx_ray.finetune import run_finetuning
    from pedx_ray.models import CONFIG_FILE
    from pedx_ray.pretrain import run_pretraining

    context = ray.tune.get_context()
    # The trial's directory under --results (get_trial_dir() is a local staging copy that Tune
    # syncs its own logs from; the Train run and trial.json must live in the persistent one).
    trial_storage = context.get_storage()
    trial_dir = storage.join(job["results"], trial_storage.experiment_dir_name, trial_storage.trial_dir_name)
    done = storage.join(trial_dir, TRIAL_FILE)
    if storage.is_file(done):
        # Finished, but interrupted before Tune recorded it: report the saved results, train nothing.
        ray.tune.report(storage.read_json(done)["final"])
        return
    config = job_config(job, params, str(trial_dir))
    # A restarted or restored trial continues its own Train run from the latest checkpoint.
    resume = storage.is_file(storage.join(trial_dir, RUN_NAME, CONFIG_FILE))
    summary: dict[str, Any] = {
        "trial_id": context.get_trial_id(),
        "experiment": context.get_experiment_name(),
        "mode": job["mode"],
        "params": params,
        "checkpoint": f"{RUN_NAME}/best",
    }
    final: dict[str, Any] = {}
    if job["mode"] == "pretrain":
        result = run_pretraining(config, resume=resume, progress=False, callbacks=[TuneReportCallback()])
        summary |= {"granularity": config.granularity, "lr": config.lr, "best": result.best_metrics}
    else:
        result = run_finetuning(config, resume=resume, progress=False, callbacks=[TuneReportCallback()])
        n_train = int((load_table(config)["split"] == "train").sum())
        test = (
            score_test_split(config.task, result.predictions["test"]) if "test" in result.predictions else {}
        )
        summary |= {
            "task": config.task,
            "lr": config.lr,
            "seed": config.seed,
            "n_train": n_train,
            "best": result.best_metrics,
            "test": test,
            "predictions": {s: str(p).removeprefix(f"{trial_dir}/") for s, p in result.predictions.items()},
        }
        final = {"n_train": n_train} | {f"test_{k}": v for k, v in test.items()}
    # The last result repeats the best epoch's metrics (Tune checks every result has the sweep's
    # metric) under "best_epoch" instead of "epoch", so the scheduler does not take it for an epoch.
    best = {k: v for k, v in result.best_metrics.items() if isinstance(v, int | float) and k != "epoch"}
    final = best | {"best_epoch": result.best_metrics["epoch"]} | final
    storage.write_json_atomic(done, summary | {"config": config.to_dict(), "final": final})
    ray.tune.report(final)


# ---------------------------------------------------------------- scheduling


class CellASHA(FIFOScheduler):
    """ASHA within each cell of the design: a trial competes only with trials of the same grid
    values (the same granularity, or the same initialisation and training size), never across
    cells whose scores are not comparable."""

    def __init__(self, axes: tuple[str, ...], **asha: Any) -> None:
        super().__init__()
        self._axes, self._asha = tuple(axes), asha
        self._metric = self._mode = None
        self._cells: dict[tuple, Any] = {}
        self._seen: set[str] = set()

    def set_search_properties(self, metric, mode, **spec) -> bool:
        self._metric, self._mode = metric or self._metric, mode or self._mode
        return True

    def _cell(self, controller, trial):
        key = cell(trial.config, self._axes)
        if key not in self._cells:
            self._cells[key] = AsyncHyperBandScheduler(metric=self._metric, mode=self._mode, **self._asha)
        scheduler = self._cells[key]
        if trial.trial_id not in self._seen:  # trials restored with the experiment were never added
            self._seen.add(trial.trial_id)
            scheduler.on_trial_add(controller, trial)
        return scheduler

    def on_trial_add(self, controller, trial) -> None:
        self._cell(controller, trial)

    def on_trial_result(self, controller, trial, result) -> str:
        return self._cell(controller, trial).on_trial_result(controller, trial, result)

    def on_trial_complete(self, controller, trial, result) -> None:
        self._cell(controller, trial).on_trial_complete(controller, trial, result)
        self._seen.discard(trial.trial_id)

    def on_trial_remove(self, controller, trial) -> None:
        self._cell(controller, trial).on_trial_remove(controller, trial)
        self._seen.discard(trial.trial_id)

    def debug_string(self) -> str:
        return f"ASHA in {len(self._cells)} cell(s) of {', '.join(self._axes) or 'the whole space'}"


# ---------------------------------------------------------------- experiments


def _connect_ray(sweep: SweepConfig, base_config) -> int:
    """Connect (or start local Ray); returns how many trials can run at once, at most --max-concurrent.

    A trial holds its driver's CPUs and its Train workers' for its whole run; pretraining also
    needs one free CPU for Ray Data's read tasks, or every running trial waits on its data forever.
    """
    import ray

    if not ray.is_initialized():
        if os.environ.get("RAY_ADDRESS"):
            ray.init()
        else:
            context = ray.init(num_cpus=os.cpu_count() or 1)
            if context.dashboard_url:
                print(f"Ray dashboard: http://{context.dashboard_url}", flush=True)
    per_trial = sweep.trial_cpus + base_config.num_workers * base_config.cpus_per_worker
    data_tasks = 1 if isinstance(base_config, PretrainConfig) else 0
    have = ray.cluster_resources().get("CPU", 0)
    fits = int((have - data_tasks + 1e-9) // per_trial)
    if fits < 1:
        raise SweepError(
            f"one trial needs {per_trial + data_tasks:g} CPUs (driver {sweep.trial_cpus:g} + workers "
            f"{per_trial - sweep.trial_cpus:g}"
            + (" + 1 for Ray Data" if data_tasks else "")
            + f") but the Ray cluster has {have:g}; lower --cpus-per-worker or --trial-cpus"
        )
    if fits < sweep.max_concurrent:
        print(f"running {fits} trial(s) at once: {have:g} CPUs hold no more", flush=True)
    return min(fits, sweep.max_concurrent)


def _check_space(space: Space, mode: str) -> None:
    if (space.mode == "pretrain") != (mode == "pretrain"):
        raise ConfigError(f"space {space.name} is written for {space.mode} runs, not {mode}")


def run_experiment(
    sweep: SweepConfig, space: Space, job: dict, name: str, scheduler: str, resume: bool
) -> list[dict]:
    """Run (or restore and finish) one Tune experiment; returns the finished trials' summaries."""
    import ray.tune
    from ray.tune.search.basic_variant import BasicVariantGenerator

    results = sweep.results_dir()
    path = storage.join(results, name)
    storage_path, filesystem = storage.ray_storage(results)
    num_samples = sweep.num_samples or space.num_samples
    # Fail on a bad field, path or missing checkpoint here, before any trial starts.
    configs = [job_config(job, params, str(path)) for params in sample(space, 1, seed=sweep.seed)]
    concurrent = _connect_ray(sweep, configs[0])
    trainable = ray.tune.with_resources(
        ray.tune.with_parameters(run_trial, job=job), {"CPU": sweep.trial_cpus}
    )
    if ray.tune.Tuner.can_restore(str(path), storage_filesystem=filesystem):
        if not resume:
            raise SweepError(
                f"experiment {path} exists; pass --resume to continue it or choose another --name"
            )
        print(f"resuming {path}", flush=True)
        tuner = ray.tune.Tuner.restore(
            str(path), trainable, resume_unfinished=True, resume_errored=True, storage_filesystem=filesystem
        )
    else:
        storage.makedirs(path)
        meta = {
            "mode": job["mode"] if job["mode"] == "pretrain" else sweep.mode,
            "space": {"name": space.name, "description": space.description, "params": repr(space.params)},
            "grid_axes": list(space.grid_axes),
            "metric": space.metric,
            "metric_mode": space.metric_mode,
            "num_samples": num_samples,
            "scheduler": scheduler,
            "sweep": sweep.to_dict(),
        }
        storage.write_json_atomic(storage.join(path, SWEEP_FILE), meta)
        epochs = configs[0].epochs
        chosen = (
            CellASHA(
                space.grid_axes,
                time_attr="epoch",
                max_t=epochs,
                grace_period=min(sweep.grace_period, epochs),
                reduction_factor=sweep.reduction_factor,
                stop_last_trials=False,  # a trial that reaches max_t must live on to export its results
            )
            if scheduler == "asha"
            else None
        )

        def name_trial(trial) -> str:
            return f"{trial.trial_id}_{trial_label(trial.config, space.grid_axes)}".rstrip("_")

        tuner = ray.tune.Tuner(
            trainable,
            param_space=space.params,
            tune_config=ray.tune.TuneConfig(
                metric=space.metric,
                mode=space.metric_mode,
                scheduler=chosen,
                # The generator limits concurrency itself (Tune ignores max_concurrent_trials with it).
                search_alg=BasicVariantGenerator(random_state=sweep.seed, max_concurrent=concurrent),
                num_samples=num_samples,
                trial_name_creator=name_trial,
                trial_dirname_creator=name_trial,
            ),
            run_config=ray.tune.RunConfig(
                name=name,
                storage_path=storage_path,
                storage_filesystem=filesystem,
                failure_config=ray.tune.FailureConfig(max_failures=sweep.max_failures),
            ),
        )
    grid = tuner.fit()
    failed = [r for r in grid if r.error is not None]
    if failed:
        print(
            f"{len(failed)} trial(s) of {name} failed; see error.txt in their directories: "
            + ", ".join(storage.name_of(r.path) for r in failed[:5]),
            file=sys.stderr,
        )
    return collect_trials(path)


def collect_trials(path: Path | str) -> list[dict]:
    """The ``trial.json`` of every finished trial of an experiment, with its directory."""
    return [
        storage.read_json(storage.join(trial, TRIAL_FILE)) | {"dir": str(trial)}
        for trial in storage.subdirectories_holding(path, TRIAL_FILE)
    ]


def best_checkpoints(trials: list[dict]) -> dict[int, str]:
    """Per granularity, the checkpoint of the trial with the best fine-tuning-split F1."""
    best: dict[int, dict] = {}
    for trial in trials:
        g = trial["granularity"]
        if g not in best or trial["best"]["finetune_f1"] > best[g]["best"]["finetune_f1"]:
            best[g] = trial
    return {g: str(storage.join(t["dir"], t["checkpoint"])) for g, t in best.items()}


def run_sweep(sweep: SweepConfig, *, resume: bool = False) -> dict[str, Any]:
    """Run the sweep the config describes; the ablation also writes its report."""
    space = load_space(sweep.space_name)
    _check_space(space, sweep.mode)
    if sweep.mode == "pretrain":
        trials = run_experiment(
            sweep, space, _job(sweep, "pretrain", {}), sweep.experiment, sweep.scheduler_name, resume
        )
        return {"trials": trials, "experiments": [storage.join(sweep.results_dir(), sweep.experiment)]}
    pedxnet = dict(sweep.pedxnet)
    experiments = []
    if sweep.mode == "ablation":
        needed = {init_granularity(t) for t in space.values("init")} if "init" in space.params else set()
        to_pretrain = sorted(g for g in needed - {None} if g not in pedxnet)
        if to_pretrain:
            stage = load_space(sweep.pretrain_space)
            _check_space(stage, "pretrain")
            from ray import tune

            stage = stage.replace(params=stage.params | {"granularity": tune.grid_search(to_pretrain)})
            name = sweep.experiment + PRETRAIN_SUFFIX
            print(f"stage 1: pretraining PedXnet-{'/'.join(map(str, to_pretrain))}C ({name})", flush=True)
            trials = run_experiment(
                sweep, stage, _job(sweep, "pretrain", {}), name, sweep.scheduler or "fifo", resume
            )
            experiments.append(storage.join(sweep.results_dir(), name))
            found = best_checkpoints(trials)
            missing = [g for g in to_pretrain if g not in found]
            if missing:
                raise SweepError(
                    f"pretraining produced no checkpoint for granularity {missing}; see the trials' "
                    f"error.txt under {storage.join(sweep.results_dir(), name)} and rerun with --resume"
                )
            pedxnet |= found
    trials = run_experiment(
        sweep, space, _job(sweep, "finetune", pedxnet), sweep.experiment, sweep.scheduler_name, resume
    )
    experiments.append(storage.join(sweep.results_dir(), sweep.experiment))
    outcome: dict[str, Any] = {"trials": trials, "experiments": experiments}
    if sweep.mode == "ablation":
        from tune_spaces.report import write_report

        report_dir = storage.join(sweep.results_dir(), sweep.experiment, "report")
        outcome["report"] = write_report(experiments, report_dir)
    return outcome


# ---------------------------------------------------------------- CLI


def _granularity_path(text: str) -> tuple[int, str]:
    granularity, sep, path = text.partition("=")
    if not sep or not granularity.isdigit():
        raise argparse.ArgumentTypeError(f"{text!r}: use GRANULARITY=PATH, e.g. 7=/data/shards-7")
    return int(granularity), path


def _assignment(text: str) -> tuple[str, Any]:
    key, sep, value = text.partition("=")
    if not sep or not key:
        raise argparse.ArgumentTypeError(f"{text!r}: use FIELD=VALUE, e.g. epochs=10")
    return key.strip(), yaml.safe_load(value)


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="python -m tune_spaces.run",
        description=__doc__.split("\n\n")[0],
        epilog="Precedence: defaults < --config YAML < flags. Spaces: tune_spaces/spaces.py.",
    )
    parser.add_argument("mode", choices=MODES)
    parser.add_argument("--config", type=Path, help="YAML of SweepConfig fields (e.g. configs/tune_*.yaml)")
    parser.add_argument("--space", help="built-in space name or FILE.py:NAME")
    parser.add_argument("--pretrain-space", help="space of the ablation's pretraining stage")
    parser.add_argument("--results", help="directory of the sweep's experiments (default ./tune_results)")
    parser.add_argument("--name", help="experiment name (default: the mode)")
    parser.add_argument("--data", help="fine-tuning data KIND:PATH, e.g. phantom:DIR")
    parser.add_argument("--shards", type=_granularity_path, action="append", metavar="G=DIR")
    parser.add_argument("--pedxnet", type=_granularity_path, action="append", metavar="G=CHECKPOINT")
    parser.add_argument("--imagenet", help="ImageNet weights file for init 'imagenet'")
    parser.add_argument("--num-samples", type=int, help="draws per grid cell (default: the space's)")
    parser.add_argument("--scheduler", choices=SCHEDULERS)
    parser.add_argument("--grace-period", type=int)
    parser.add_argument("--max-concurrent", type=int, help="trials at once (default 1)")
    parser.add_argument("--trial-cpus", type=float, help="CPUs of each trial's driver (default 0.1)")
    parser.add_argument("--max-failures", type=int, help="Tune restarts of a failed trial (default 1)")
    parser.add_argument("--seed", type=int, help="seed of the search's random draws")
    parser.add_argument(
        "--set",
        type=_assignment,
        action="append",
        metavar="FIELD=VALUE",
        default=[],
        help="a job config field for every trial (fine-tuning fields in transfer/ablation)",
    )
    parser.add_argument(
        "--pretrain-set",
        type=_assignment,
        action="append",
        metavar="FIELD=VALUE",
        default=[],
        help="a pretraining config field (pretrain mode, ablation stage 1)",
    )
    parser.add_argument("--cpus-per-worker", type=float, help="shorthand for --set cpus_per_worker=N")
    parser.add_argument(
        "--gpus-per-worker",
        type=float,
        help="with --use-gpu: GPUs per Train worker, a fraction shares a GPU between runs",
    )
    parser.add_argument("--use-gpu", action="store_true", default=None)
    parser.add_argument("--resume", action="store_true", help="continue an interrupted sweep (Tuner.restore)")
    return parser  # fmt: skip


def config_from_args(args: argparse.Namespace) -> SweepConfig:
    layer = read_yaml(args.config) if args.config else {}
    defaults = {
        f.name: f.default if f.default is not dataclasses.MISSING else f.default_factory()
        for f in dataclasses.fields(SweepConfig)
    }
    merged = defaults | layer
    cli = {
        "mode": args.mode,
        "space": args.space,
        "pretrain_space": args.pretrain_space,
        "results": args.results,
        "name": args.name,
        "data": args.data,
        "imagenet": args.imagenet,
        "num_samples": args.num_samples,
        "scheduler": args.scheduler,
        "grace_period": args.grace_period,
        "max_concurrent": args.max_concurrent,
        "trial_cpus": args.trial_cpus,
        "max_failures": args.max_failures,
        "seed": args.seed,
    }
    merged |= {k: v for k, v in cli.items() if v is not None}
    for key, flag in (("shards", args.shards), ("pedxnet", args.pedxnet)):
        merged[key] = {int(g): p for g, p in (merged.get(key) or {}).items()} | dict(flag or [])
    job_flags = {
        "cpus_per_worker": args.cpus_per_worker,
        "gpus_per_worker": args.gpus_per_worker,
        "use_gpu": args.use_gpu,
    }
    job_flags = {k: v for k, v in job_flags.items() if v is not None}
    main_base = "pretrain_base" if args.mode == "pretrain" else "finetune_base"
    merged[main_base] = dict(merged.get(main_base) or {}) | job_flags | dict(args.set)
    merged["pretrain_base"] = dict(merged.get("pretrain_base") or {}) | dict(args.pretrain_set)
    if args.mode == "ablation":
        merged["pretrain_base"] |= job_flags
    return SweepConfig.from_dict(merged, source=str(args.config or "flags"))


def main(argv: list[str] | None = None) -> int:
    parser = build_parser()
    args = parser.parse_args(argv)
    from pedx_ray.data import ShardSetError
    from pedx_ray.datasets import DatasetError

    try:
        sweep = config_from_args(args)
        outcome = run_sweep(sweep, resume=args.resume)
    except (ConfigError, SweepError, ShardSetError, DatasetError) as exc:
        parser.exit(2, f"error: {exc}\n")
    print(f"{len(outcome['trials'])} finished trial(s) in {outcome['experiments'][-1]}")
    if "report" in outcome:
        print(f"report: {outcome['report']['markdown']}")
    else:
        print(f"report: python -m tune_spaces.report {sweep.results_dir()}")
    print(f"tensorboard: tensorboard --logdir {sweep.results_dir()}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
