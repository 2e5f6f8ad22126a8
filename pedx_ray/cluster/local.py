"""Multi-node Ray and Dask clusters on one machine, started as child processes and stopped by pid.

``LocalRayCluster`` runs ``ray start --head --block`` and one ``ray start --address ... --block`` per
worker node, each with its own CPUs, custom resources and node labels, on free loopback ports, under its
own ``--temp-dir`` (so a bare ``ray.init()`` elsewhere never finds it). Token authentication stays on:
the cluster gets a fresh token in ``TEMP/auth_token`` and every node, CLI and client reaches it through
``RAY_AUTH_MODE=token`` + ``RAY_AUTH_TOKEN_PATH`` (``client_env``) or an ``Authorization: Bearer`` header
(``auth_headers``, for ``JobSubmissionClient``). ``LocalDaskCluster`` does the same for ``dask scheduler``
and ``dask worker``. Both are context managers; stopping ends exactly the processes they started.
"""

from __future__ import annotations

import json
import os
import secrets
import shutil
import signal
import subprocess
import sys
import tempfile
import time
import urllib.request
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path

from ingest.demo.orthanc import free_port

NODE_LABEL = "pedx-node"  # every node's label naming it, e.g. pedx-node=worker-1
TOKEN_FILE = "auth_token"
STOP_TIMEOUT_S = 30.0
# `ray start` gives a node 30 s (fixed) to register with the GCS; a loaded machine can miss that, so a
# node that exits while starting is started again, up to this many times in all.
START_ATTEMPTS = 3
# Per node: Ray would otherwise reserve 30% of RAM for each node's object store on this one machine.
OBJECT_STORE_BYTES = 300 * 1024**2


class ClusterError(RuntimeError):
    """A local cluster did not start; the message says which process and where its log is."""


class NodeExitedError(ClusterError):
    """A node's ``ray start`` exited while it was starting."""


@dataclass(frozen=True)
class NodeSpec:
    """One Ray node: its name (the ``pedx-node`` label), CPUs, custom resources and extra labels."""

    name: str
    num_cpus: int = 1
    resources: Mapping[str, float] = field(default_factory=dict)
    labels: Mapping[str, str] = field(default_factory=dict)

    def __post_init__(self) -> None:
        if self.num_cpus < 0:
            raise ValueError(f"node {self.name}: num_cpus must be >= 0, got {self.num_cpus}")


DEFAULT_WORKERS = (NodeSpec("worker-1"), NodeSpec("worker-2"))


@dataclass
class RayNode:
    spec: NodeSpec
    process: subprocess.Popen
    log: Path

    @property
    def pid(self) -> int:
        return self.process.pid

    def raylet_pid(self) -> int:
        """The pid of this node's raylet (a descendant of its ``ray start`` process)."""
        import psutil

        for child in psutil.Process(self.pid).children(recursive=True):
            if child.name() == "raylet":
                return child.pid
        raise ClusterError(f"node {self.spec.name} (ray start pid {self.pid}) has no raylet process")


def _kill_group(process: subprocess.Popen) -> None:
    """SIGKILL what is left of the process group of a child we started (its pid is the group id)."""
    try:
        os.killpg(process.pid, signal.SIGKILL)
    except ProcessLookupError:
        pass


def _stop_process(process: subprocess.Popen, timeout_s: float = STOP_TIMEOUT_S) -> None:
    """SIGTERM the process we started, then SIGKILL its process group if it has not exited in time.

    Each child runs in its own session, so its group id is its pid: the group holds only what it spawned."""
    if process.poll() is None:
        process.send_signal(signal.SIGTERM)
        try:
            process.wait(timeout_s)
        except subprocess.TimeoutExpired:
            _kill_group(process)
            process.wait(timeout_s)
    _kill_group(process)  # anything it spawned that outlived it


def _spawn(argv: list[str], log: Path, env: Mapping[str, str], cwd: Path | None) -> subprocess.Popen:
    log.parent.mkdir(parents=True, exist_ok=True)
    with open(log, "ab") as out:
        return subprocess.Popen(
            argv, stdout=out, stderr=subprocess.STDOUT, env=dict(env), cwd=cwd, start_new_session=True
        )


def _log_tail(log: Path, lines: int = 15) -> str:
    try:
        return "\n".join(log.read_text(errors="replace").splitlines()[-lines:])
    except OSError:
        return "(no log)"


class LocalRayCluster:
    """A Ray head plus worker nodes on this machine, each a ``ray start --block`` child process.

    ``with LocalRayCluster(workers=[NodeSpec("worker-1"), NodeSpec("worker-2")]) as cluster:`` returns
    once every node is alive; ``cluster.dashboard_url`` takes ``ray job submit`` / ``serve deploy`` /
    ``JobSubmissionClient``, ``cluster.gcs_address`` takes ``ray status --address``, ``ray.init``.
    Nodes start in ``cwd`` (default: this process's) with this process's environment plus ``env``; they
    run ``python`` = ``sys.executable``'s ``ray`` script, so they see this interpreter's packages."""

    def __init__(
        self,
        *,
        head: NodeSpec = NodeSpec("head"),
        workers: Sequence[NodeSpec] = DEFAULT_WORKERS,
        env: Mapping[str, str] | None = None,
        cwd: Path | None = None,
        start_timeout_s: float = 180.0,
    ) -> None:
        names = [head.name, *(w.name for w in workers)]
        if len(set(names)) != len(names):
            raise ValueError(f"node names must be unique, got {names}")
        self.head_spec, self.worker_specs = head, tuple(workers)
        self.extra_env = dict(env or {})
        self.cwd = cwd
        self.start_timeout_s = start_timeout_s
        self.nodes: list[RayNode] = []
        self.temp_dir: Path | None = None
        self.port = self.dashboard_port = 0
        self._token = ""

    # ------------------------------------------------------------ addresses and credentials

    @property
    def gcs_address(self) -> str:
        return f"127.0.0.1:{self.port}"

    @property
    def dashboard_url(self) -> str:
        return f"http://127.0.0.1:{self.dashboard_port}"

    @property
    def token_path(self) -> Path:
        assert self.temp_dir is not None, "the cluster is not started"
        return self.temp_dir / TOKEN_FILE

    @property
    def auth_headers(self) -> dict[str, str]:
        """HTTP headers for the dashboard's REST API (``JobSubmissionClient(url, headers=...)``)."""
        return {"Authorization": f"Bearer {self._token}"}

    def client_env(self) -> dict[str, str]:
        """Environment variables for the Ray CLI (``ray job submit``, ``ray status``, ``serve deploy``)."""
        return {
            "RAY_AUTH_MODE": "token",
            "RAY_AUTH_TOKEN_PATH": str(self.token_path),
            "RAY_ADDRESS": self.dashboard_url,
            "RAY_DASHBOARD_ADDRESS": self.dashboard_url,
            "RAY_GCS_ADDRESS": self.gcs_address,
        }

    # ------------------------------------------------------------ start / stop

    def _node_env(self) -> dict[str, str]:
        env = dict(os.environ) | self.extra_env
        env.pop("RAY_ADDRESS", None)  # `ray start` must not join some other cluster
        env.pop("RAY_AUTH_TOKEN", None)  # the token file below is the only credential
        # This interpreter's bin first: a job's entrypoint `python` and Ray's workers are then this venv's.
        path = os.pathsep.join([str(Path(sys.executable).parent), env.get("PATH", "")])
        return env | {"RAY_AUTH_MODE": "token", "RAY_AUTH_TOKEN_PATH": str(self.token_path), "PATH": path}

    def _ray_argv(self, spec: NodeSpec, head: bool) -> list[str]:
        ray = str(Path(sys.executable).with_name("ray"))
        argv = [ray, "start", "--block", "--disable-usage-stats", "--node-ip-address", "127.0.0.1"]
        if head:
            argv += [
                "--head",
                "--port",
                str(self.port),
                "--temp-dir",
                str(self.temp_dir),
                "--include-dashboard",
                "true",
                "--dashboard-host",
                "127.0.0.1",
                "--dashboard-port",
                str(self.dashboard_port),
                "--ray-client-server-port",
                str(free_port()),
            ]
        else:
            argv += ["--address", self.gcs_address]
        labels = {NODE_LABEL: spec.name} | dict(spec.labels)
        argv += [
            "--num-cpus",
            str(spec.num_cpus),
            "--num-gpus",
            "0",
            "--object-store-memory",
            str(OBJECT_STORE_BYTES),
            "--resources",
            json.dumps(dict(spec.resources)),
            "--labels",
            ",".join(f"{k}={v}" for k, v in labels.items()),
            # Several nodes share this machine: each needs its own agent ports (defaults collide).
            "--dashboard-agent-listen-port",
            str(free_port()),
            "--metrics-export-port",
            str(free_port()),
        ]
        return argv

    def start(self) -> LocalRayCluster:
        # A short path: Ray's unix sockets live under it and socket paths are limited to ~100 bytes.
        self.temp_dir = Path(tempfile.mkdtemp(prefix="rc-", dir="/tmp"))
        self._token = secrets.token_hex(32)
        fd = os.open(self.token_path, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600)
        with os.fdopen(fd, "w") as out:
            out.write(self._token)
        try:
            self._start_alive(self.head_spec, head=True)
            for spec in self.worker_specs:  # one at a time: simultaneous starts overload small machines
                self.add_worker(spec)
        except BaseException:
            self.stop()
            raise
        return self

    def _start_node(self, spec: NodeSpec, head: bool) -> RayNode:
        log = self.temp_dir / "node-logs" / f"{spec.name}.log"
        process = _spawn(self._ray_argv(spec, head), log, self._node_env(), self.cwd)
        node = RayNode(spec, process, log)
        self.nodes.append(node)
        return node

    def add_worker(self, spec: NodeSpec) -> RayNode:
        """Start one more worker node (e.g. to replace a failed one); returns once it is alive."""
        if any(node.spec.name == spec.name and node.process.poll() is None for node in self.nodes):
            raise ValueError(f"a running node is already named {spec.name}")
        return self._start_alive(spec, head=False)

    def _start_alive(self, spec: NodeSpec, head: bool) -> RayNode:
        for attempt in range(1, START_ATTEMPTS + 1):
            if head:  # fresh ports: the failed head's may not be free again yet
                self.port, self.dashboard_port = free_port(), free_port()
            node = self._start_node(spec, head)
            try:
                self.wait_for_nodes(names=[spec.name])
                return node
            except NodeExitedError:
                _stop_process(node.process)
                self.nodes.remove(node)
                if attempt == START_ATTEMPTS:
                    raise

    def node(self, name: str) -> RayNode:
        """The running node started as ``name``."""
        for node in reversed(self.nodes):
            if node.spec.name == name and node.process.poll() is None:
                return node
        raise KeyError(f"no running node named {name}")

    def alive_nodes(self) -> list[dict]:
        """The cluster's alive nodes as the state API lists them (node_id, labels, resources_total...)."""
        request = urllib.request.Request(
            f"{self.dashboard_url}/api/v0/nodes?limit=1000&detail=true", headers=self.auth_headers
        )
        with urllib.request.urlopen(request, timeout=10) as response:
            nodes = json.load(response)["data"]["result"]["result"]
        return [node for node in nodes if node["state"] == "ALIVE"]

    def node_ids(self) -> dict[str, str]:
        """Alive nodes by name (their ``pedx-node`` label) → Ray node id."""
        return {node["labels"][NODE_LABEL]: node["node_id"] for node in self.alive_nodes()}

    def wait_for_nodes(self, *, names: Sequence[str]) -> None:
        """Poll until the nodes ``names`` are alive; raise ClusterError at the deadline, NodeExitedError as
        soon as the ``ray start`` of one of them exits."""
        deadline = time.monotonic() + self.start_timeout_s
        last_error = "no answer yet"
        while time.monotonic() < deadline:
            for node in self.nodes:
                if node.process.poll() is not None and node.spec.name in names:
                    raise NodeExitedError(
                        f"ray node {node.spec.name} exited with code {node.process.returncode}; "
                        f"its log ({node.log}) ends:\n{_log_tail(node.log)}"
                    )
            try:
                alive = self.node_ids()
            except OSError as exc:  # the dashboard is still starting
                last_error = str(exc)
            else:
                if set(names) <= set(alive):
                    return
                last_error = f"alive: {sorted(alive)}"
            time.sleep(1.0)
        raise ClusterError(
            f"Ray nodes not alive after {self.start_timeout_s:g} s ({last_error}); logs: "
            f"{self.temp_dir / 'node-logs'}"
        )

    def stop(self) -> None:
        """Stop the worker nodes, then the head, by pid; remove the temp dir (logs included)."""
        for node in reversed(self.nodes):
            _stop_process(node.process)
        self.nodes.clear()
        if self.temp_dir is not None:
            shutil.rmtree(self.temp_dir, ignore_errors=True)

    def __enter__(self) -> LocalRayCluster:
        return self.start()

    def __exit__(self, *exc_info) -> None:
        self.stop()


class LocalDaskCluster:
    """``dask scheduler`` plus ``n_workers`` ``dask worker`` processes on loopback, stopped by pid.

    ``with LocalDaskCluster(n_workers=2) as dask:`` returns once every worker has joined;
    ``dask.address`` (``tcp://127.0.0.1:PORT``) is what ``python -m ingest pull --scheduler`` takes."""

    def __init__(
        self,
        n_workers: int = 2,
        *,
        threads_per_worker: int = 1,
        env: Mapping[str, str] | None = None,
        cwd: Path | None = None,
        start_timeout_s: float = 60.0,
    ) -> None:
        if n_workers < 1:
            raise ValueError(f"n_workers must be at least 1, got {n_workers}")
        self.n_workers, self.threads_per_worker = n_workers, threads_per_worker
        self.env = dict(os.environ) | dict(env or {})
        self.cwd = cwd
        self.start_timeout_s = start_timeout_s
        self.scheduler: subprocess.Popen | None = None
        self.workers: list[subprocess.Popen] = []
        self.temp_dir: Path | None = None
        self.port = 0

    @property
    def address(self) -> str:
        return f"tcp://127.0.0.1:{self.port}"

    def _dask(self) -> str:
        return str(Path(sys.executable).with_name("dask"))

    def start(self) -> LocalDaskCluster:
        self.temp_dir = Path(tempfile.mkdtemp(prefix="dask-", dir="/tmp"))
        self.port = free_port()
        try:
            self.scheduler = _spawn(
                [self._dask(), "scheduler", "--host", "127.0.0.1", "--port", str(self.port), "--no-show"]
                + ["--dashboard-address", f"127.0.0.1:{free_port()}"],
                self.temp_dir / "scheduler.log",
                self.env,
                self.cwd,
            )
            for i in range(self.n_workers):
                self.add_worker(f"worker-{i + 1}")
            self.wait_for_workers(self.n_workers)
        except BaseException:
            self.stop()
            raise
        return self

    def add_worker(self, name: str) -> subprocess.Popen:
        worker = _spawn(
            [self._dask(), "worker", self.address, "--name", name, "--nworkers", "1"]
            + ["--nthreads", str(self.threads_per_worker), "--no-dashboard"]
            + ["--local-directory", str(self.temp_dir / name)],
            self.temp_dir / f"{name}.log",
            self.env,
            self.cwd,
        )
        self.workers.append(worker)
        return worker

    def wait_for_workers(self, count: int) -> None:
        from distributed import Client

        deadline = time.monotonic() + self.start_timeout_s
        while time.monotonic() < deadline:
            if self.scheduler.poll() is not None:
                log = self.temp_dir / "scheduler.log"
                raise ClusterError(f"dask scheduler exited; its log ({log}) ends:\n{_log_tail(log)}")
            try:
                with Client(self.address, timeout=5) as client:
                    client.wait_for_workers(count, timeout=max(1.0, deadline - time.monotonic()))
                return
            except (OSError, TimeoutError):
                time.sleep(0.5)
        raise ClusterError(f"{count} dask workers did not join {self.address} in {self.start_timeout_s:g} s")

    def stop(self) -> None:
        for worker in self.workers:
            _stop_process(worker)
        if self.scheduler is not None:
            _stop_process(self.scheduler)
        self.workers.clear()
        self.scheduler = None
        if self.temp_dir is not None:
            shutil.rmtree(self.temp_dir, ignore_errors=True)

    def __enter__(self) -> LocalDaskCluster:
        return self.start()

    def __exit__(self, *exc_info) -> None:
        self.stop()
