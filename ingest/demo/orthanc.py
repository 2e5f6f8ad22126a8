"""A throw-away Orthanc PACS on 127.0.0.1 for the tests and the demo.

``OrthancServer`` writes a generated configuration for Debian's ``Orthanc`` (1.10.1) into a work
directory, starts it on free ports and talks to its REST API with the standard library only.

Orthanc 1.10.1 has no option to choose the listening address: both the DICOM and the HTTP server
listen on every interface. ``RemoteAccessAllowed: false`` makes the HTTP server refuse other
hosts; the DICOM port answers any host that can reach it, so only load data you could publish
(the synthetic phantoms) and keep the machine's firewall closed to the chosen ports.
"""

from __future__ import annotations

import atexit
import base64
import json
import os
import re
import shutil
import socket
import subprocess
import tempfile
import time
import urllib.error
import urllib.request
from collections.abc import Iterable, Mapping
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Self

from tqdm import tqdm

from ingest.files import write_json_atomic

ORTHANC_BINARY = "Orthanc"
INSTALL_HINT = "install it with: apt-get install -y orthanc (or run scripts/setup.sh)"
DICOMWEB_PLUGIN = Path("/usr/share/orthanc/plugins/libOrthancDicomWeb.so")
DICOMWEB_INSTALL_HINT = "install it with: apt-get install -y orthanc-dicomweb (or run scripts/setup.sh)"
DICOMWEB_ROOT = "/dicom-web"
LOOPBACK = "127.0.0.1"
DEFAULT_AET = "PEDXPACS"

_AET_PATTERN = re.compile(r"^[\x20-\x5b\x5d-\x7e]{1,16}$")  # printable ASCII except backslash
_PORT_IN_USE_MARKER = "already in use"
_START_ATTEMPTS = 3  # another process can grab a probed free port before Orthanc binds it
_LOG_TAIL_LINES = 30
_LOG_ERROR_PATTERN = re.compile(r"^E\d{4} [\d:.]+ [^\]]*\] (.*)$")

# Options the server sets itself; extra_options may not override them.
_MANAGED_OPTIONS = frozenset(
    """
    Name StorageDirectory IndexDirectory TemporaryDirectory DicomAet DicomPort HttpPort DicomModalities
    DicomModalitiesInDatabase DicomCheckCalledAet DicomAlwaysAllowEcho DicomAlwaysAllowStore
    DicomAlwaysAllowFind DicomAlwaysAllowGet DicomAlwaysAllowMove RemoteAccessAllowed AuthenticationEnabled
    StorageCompression OverwriteInstances DicomScpTimeout LimitFindResults LimitFindInstances Plugins
    LuaScripts SaveJobs RegisteredUsers DicomWeb
    """.split()
)


class OrthancError(RuntimeError):
    """Orthanc could not be started, stopped or used."""


class OrthancNotFoundError(OrthancError):
    """The Orthanc binary is not installed."""


def orthanc_available(binary: str = ORTHANC_BINARY) -> bool:
    """True when the Orthanc binary can be run from PATH (or is an executable path)."""
    return shutil.which(binary) is not None


def _validate_aet(aet: str, what: str) -> None:
    if not isinstance(aet, str) or not _AET_PATTERN.match(aet) or not aet.strip():
        raise ValueError(
            f"{what} {aet!r} is not a valid DICOM AE title: use 1-16 printable ASCII characters "
            "without backslash, e.g. 'PEDXPACS'"
        )


def _validate_modality_name(name: str) -> None:
    if not isinstance(name, str) or not re.fullmatch(r"[A-Za-z0-9_.-]+", name):
        raise ValueError(
            f"modality name {name!r} must be letters, digits, '_', '.' or '-' (it becomes a REST path)"
        )


def _validate_port(port: int, what: str) -> None:
    if not isinstance(port, int) or isinstance(port, bool) or not 1 <= port <= 65535:
        raise ValueError(f"{what} {port!r} is not a TCP port: use an integer in 1..65535")


@dataclass(frozen=True)
class Modality:
    """A remote DICOM node Orthanc may send to (the C-MOVE destination)."""

    aet: str
    host: str
    port: int

    def __post_init__(self) -> None:
        _validate_aet(self.aet, "modality AE title")
        if not isinstance(self.host, str) or not self.host:
            raise ValueError(f"modality host {self.host!r} is empty: give an address such as '127.0.0.1'")
        _validate_port(self.port, "modality port")

    def as_orthanc(self) -> dict[str, Any]:
        return {"AET": self.aet, "Host": self.host, "Port": self.port}


@dataclass(frozen=True)
class OrthancConfig:
    """What the generated Orthanc configuration may vary. Ports left as None are chosen at start."""

    aet: str = DEFAULT_AET
    modalities: Mapping[str, tuple[str, str, int]] = field(default_factory=dict)
    dicom_port: int | None = None
    http_port: int | None = None
    # Orthanc caps the answers of one C-FIND (0 = no cap); the ingest tests its paging with these.
    limit_find_results: int = 0
    limit_find_instances: int = 0
    dicom_scp_timeout: int = 30
    # Load the DICOMweb plugin (QIDO-RS, WADO-RS under DICOMWEB_ROOT) from this path.
    dicomweb_plugin: Path | None = None
    # HTTP basic-auth users (name -> password); empty: the REST API and DICOMweb need no login.
    http_users: Mapping[str, str] = field(default_factory=dict)
    binary: str = ORTHANC_BINARY
    startup_timeout: float = 30.0
    stop_timeout: float = 10.0
    extra_options: Mapping[str, Any] = field(default_factory=dict)

    def __post_init__(self) -> None:
        _validate_aet(self.aet, "aet")
        for name, entry in self.modalities.items():
            _validate_modality_name(name)
            if not isinstance(entry, tuple | list) or len(entry) != 3:
                raise ValueError(
                    f"modality {name!r} must be (aet, host, port), e.g. ('PEDXRAY', '127.0.0.1', 11112)"
                )
            Modality(*entry)
        for what, port in (("dicom_port", self.dicom_port), ("http_port", self.http_port)):
            if port is not None:
                _validate_port(port, what)
        if self.dicom_port is not None and self.dicom_port == self.http_port:
            raise ValueError("dicom_port and http_port must differ (or leave them None for free ports)")
        for what, limit in (
            ("limit_find_results", self.limit_find_results),
            ("limit_find_instances", self.limit_find_instances),
        ):
            if not isinstance(limit, int) or limit < 0:
                raise ValueError(f"{what} must be an integer >= 0 (0 means no limit), got {limit!r}")
        if not isinstance(self.dicom_scp_timeout, int) or self.dicom_scp_timeout < 1:
            raise ValueError(
                f"dicom_scp_timeout must be a whole number of seconds >= 1, got {self.dicom_scp_timeout!r}"
            )
        if self.startup_timeout <= 0 or self.stop_timeout <= 0:
            raise ValueError("startup_timeout and stop_timeout must be positive seconds")
        if self.dicomweb_plugin is not None and not Path(self.dicomweb_plugin).is_file():
            raise OrthancNotFoundError(
                f"Orthanc DICOMweb plugin {self.dicomweb_plugin} not found; {DICOMWEB_INSTALL_HINT}"
            )
        clashes = sorted(set(self.extra_options) & _MANAGED_OPTIONS)
        if clashes:
            raise ValueError(
                f"extra_options may not set {clashes}: OrthancServer manages them; use its constructor "
                "arguments (aet, modalities, ports, limits, dicom_scp_timeout) instead"
            )


def free_port() -> int:
    """A TCP port that is free on 127.0.0.1 right now."""
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as sock:
        sock.bind((LOOPBACK, 0))
        return sock.getsockname()[1]


def port_is_free(port: int) -> bool:
    """No one listens on ``port``. Connections of a stopped server still in TIME-WAIT do not count:
    Orthanc binds with SO_REUSEADDR, so it can listen there again at once, and so does this probe."""
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as sock:
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        try:
            sock.bind((LOOPBACK, port))
        except OSError:
            return False
        return True


def port_accepts_connections(port: int, timeout: float = 0.5) -> bool:
    try:
        with socket.create_connection((LOOPBACK, port), timeout=timeout):
            return True
    except OSError:
        return False


def _two_free_ports() -> tuple[int, int]:
    # Hold both sockets at once so the two probed ports differ.
    with socket.socket() as first, socket.socket() as second:
        first.bind((LOOPBACK, 0))
        second.bind((LOOPBACK, 0))
        return first.getsockname()[1], second.getsockname()[1]


def find_dicom_files(root: Path | str) -> list[Path]:
    """Regular files under root (recursively, sorted) that carry the DICOM Part 10 'DICM' marker."""
    root = Path(root)
    if root.is_file():
        return [root] if _has_dicom_marker(root) else []
    return [path for path in sorted(root.rglob("*")) if path.is_file() and _has_dicom_marker(path)]


def _has_dicom_marker(path: Path) -> bool:
    try:
        with path.open("rb") as handle:
            handle.seek(128)
            return handle.read(4) == b"DICM"
    except OSError:
        return False


class OrthancServer:
    """Orthanc on 127.0.0.1 with a generated configuration; a context manager.

    ``work_dir`` holds the configuration, the storage, the index and ``orthanc.log``; when None a
    temporary directory is made at ``start()`` and removed at ``stop()``. Pass either a ready
    ``config`` or its fields as keyword arguments (``aet``, ``modalities``, ``limit_find_results`` ...).
    """

    def __init__(
        self, work_dir: Path | str | None = None, config: OrthancConfig | None = None, **options: Any
    ) -> None:
        if config is not None and options:
            raise ValueError("pass either config=OrthancConfig(...) or its fields as keywords, not both")
        self.config = config if config is not None else OrthancConfig(**options)
        self._given_work_dir = Path(work_dir).resolve() if work_dir is not None else None
        self._work_dir: Path | None = None
        self._modalities = {name: Modality(*entry) for name, entry in self.config.modalities.items()}
        self._process: subprocess.Popen[bytes] | None = None
        self._ports: tuple[int, int] | None = None
        # Bypass any http_proxy from the environment: every request goes to 127.0.0.1 directly.
        self._opener = urllib.request.build_opener(urllib.request.ProxyHandler({}))

    # -- lifecycle ---------------------------------------------------------------------------

    def __enter__(self) -> Self:
        return self.start()

    def __exit__(self, *exc_info: object) -> None:
        self.stop()

    def start(self) -> Self:
        """Start Orthanc and wait until its REST API and DICOM port answer."""
        if self.is_running():
            return self
        binary = shutil.which(self.config.binary)
        if binary is None:
            raise OrthancNotFoundError(
                f"Orthanc binary {self.config.binary!r} not found on PATH; {INSTALL_HINT}"
            )
        for port, what in ((self.config.dicom_port, "dicom_port"), (self.config.http_port, "http_port")):
            if port is not None and not port_is_free(port):
                raise OrthancError(
                    f"{what} {port} is already in use on {LOOPBACK}: choose another port or leave "
                    f"{what} unset to get a free one"
                )
        self._work_dir = self._given_work_dir or Path(tempfile.mkdtemp(prefix="orthanc-"))
        # Even an interrupted start (Ctrl-C while waiting) must not leave Orthanc running.
        atexit.register(self.stop)
        auto_ports = self.config.dicom_port is None and self.config.http_port is None
        attempt = 1
        try:
            while True:
                try:
                    self._launch(binary)
                    return self
                except OrthancError as error:
                    if not (auto_ports and _PORT_IN_USE_MARKER in str(error) and attempt < _START_ATTEMPTS):
                        raise
                    attempt += 1
        except BaseException:
            self.stop()
            raise

    def _launch(self, binary: str) -> None:
        work_dir = self.work_dir
        for sub in ("storage", "index", "tmp"):
            (work_dir / sub).mkdir(parents=True, exist_ok=True)
        auto_dicom, auto_http = _two_free_ports()
        self._ports = (self.config.dicom_port or auto_dicom, self.config.http_port or auto_http)
        write_json_atomic(self.config_path, self._orthanc_config())
        with self.log_path.open("wb") as log:
            # Own session: a terminal's Ctrl-C reaches only our process, which then stops Orthanc in order.
            self._process = subprocess.Popen(
                [binary, "--no-jobs", str(self.config_path)],
                cwd=work_dir,
                stdin=subprocess.DEVNULL,
                stdout=log,
                stderr=subprocess.STDOUT,
                start_new_session=True,
                # DCMTK inside Orthanc reads this: without it every DIMSE answer waits ~40 ms on
                # the client's delayed ACK (Nagle), which made a C-FIND take 90 ms on loopback.
                env={**os.environ, "TCP_NODELAY": "1"},
            )
        deadline = time.monotonic() + self.config.startup_timeout
        while time.monotonic() < deadline:
            code = self._process.poll()
            if code is not None:
                self._process = None
                raise OrthancError(
                    f"Orthanc ({binary}) exited with code {code} during startup{self._first_log_error()}; "
                    f"last lines of its log:\n{self.log_tail()}"
                )
            if self._system_answers() and port_accepts_connections(self.dicom_port):
                return
            time.sleep(0.1)
        self._terminate()
        raise OrthancError(
            f"Orthanc did not answer {self.url}/system within {self.config.startup_timeout:.0f} s; "
            f"last lines of its log:\n{self.log_tail()}"
        )

    def _system_answers(self) -> bool:
        try:
            self.request("GET", "/system", timeout=1.0)
        except (OrthancError, OSError):
            return False
        return True

    def stop(self) -> None:
        """Stop Orthanc (SIGTERM, then SIGKILL after stop_timeout); safe to call more than once."""
        atexit.unregister(self.stop)
        self._terminate()
        self._cleanup_work_dir()

    def _terminate(self) -> None:
        process, self._process = self._process, None
        if process is None or process.poll() is not None:
            return
        process.terminate()
        try:
            process.wait(timeout=self.config.stop_timeout)
        except subprocess.TimeoutExpired:
            process.kill()
            process.wait()

    def _cleanup_work_dir(self) -> None:
        if self._given_work_dir is None and self._work_dir is not None:
            shutil.rmtree(self._work_dir, ignore_errors=True)
            self._work_dir = None

    def is_running(self) -> bool:
        return self._process is not None and self._process.poll() is None

    def _orthanc_config(self) -> dict[str, Any]:
        work_dir = self.work_dir
        managed: dict[str, Any] = {
            "Name": f"pedx-{self.aet}",
            "StorageDirectory": str(work_dir / "storage"),
            "IndexDirectory": str(work_dir / "index"),
            "TemporaryDirectory": str(work_dir / "tmp"),
            "DicomAet": self.aet,
            "DicomPort": self.dicom_port,
            "HttpPort": self.http_port,
            "DicomModalities": {name: modality.as_orthanc() for name, modality in self._modalities.items()},
            "DicomModalitiesInDatabase": False,
            "DicomCheckCalledAet": False,
            # Any calling AE title may query and retrieve, as from a site's own PACS; C-MOVE still
            # only sends to destinations listed in DicomModalities.
            "DicomAlwaysAllowEcho": True,
            "DicomAlwaysAllowStore": True,
            "DicomAlwaysAllowFind": True,
            "DicomAlwaysAllowGet": True,
            "DicomAlwaysAllowMove": True,
            "RemoteAccessAllowed": False,
            "AuthenticationEnabled": bool(self.config.http_users),
            "RegisteredUsers": dict(self.config.http_users),
            "StorageCompression": False,
            "OverwriteInstances": False,
            "DicomScpTimeout": self.config.dicom_scp_timeout,
            "LimitFindResults": self.config.limit_find_results,
            "LimitFindInstances": self.config.limit_find_instances,
            "Plugins": [str(self.config.dicomweb_plugin)] if self.config.dicomweb_plugin else [],
            "DicomWeb": {"Enable": self.config.dicomweb_plugin is not None, "Root": f"{DICOMWEB_ROOT}/"},
            "LuaScripts": [],
            "SaveJobs": False,
        }
        # A throw-away PACS does not need an fsync per stored instance; extra_options may turn it on.
        return {"SyncStorageArea": False, **self.config.extra_options, **managed}

    # -- properties --------------------------------------------------------------------------

    @property
    def aet(self) -> str:
        return self.config.aet

    @property
    def host(self) -> str:
        return LOOPBACK

    @property
    def dicom_port(self) -> int:
        return self._started_ports()[0]

    @property
    def http_port(self) -> int:
        return self._started_ports()[1]

    @property
    def url(self) -> str:
        return f"http://{LOOPBACK}:{self.http_port}"

    @property
    def dicomweb_url(self) -> str:
        """The DICOMweb service root (QIDO-RS and WADO-RS), served when ``dicomweb_plugin`` is set."""
        return self.url + DICOMWEB_ROOT

    @property
    def pid(self) -> int | None:
        return self._process.pid if self._process is not None else None

    @property
    def work_dir(self) -> Path:
        if self._work_dir is None:
            raise OrthancError("the Orthanc work directory exists only while the server runs: call start()")
        return self._work_dir

    @property
    def config_path(self) -> Path:
        return self.work_dir / "orthanc.json"

    @property
    def log_path(self) -> Path:
        return self.work_dir / "orthanc.log"

    def _started_ports(self) -> tuple[int, int]:
        if self._ports is None:
            raise OrthancError("the Orthanc ports are chosen at start: call start() first")
        return self._ports

    def log_tail(self, lines: int = _LOG_TAIL_LINES) -> str:
        return "\n".join(self._log_lines()[-lines:]) or "(Orthanc wrote no log)"

    def _log_lines(self) -> list[str]:
        try:
            return self.log_path.read_text(errors="replace").splitlines()
        except (OSError, OrthancError):
            return []

    def _first_log_error(self) -> str:
        # Orthanc logs errors as "E<date> <time> <source>] <message>"; the first one names the cause.
        for line in self._log_lines():
            match = _LOG_ERROR_PATTERN.match(line)
            if match:
                return f": {match.group(1)}"
        return ""

    # -- REST API ----------------------------------------------------------------------------

    def request(
        self,
        method: str,
        path: str,
        body: bytes | None = None,
        content_type: str = "application/json",
        timeout: float = 60.0,
    ) -> Any:
        """Call the REST API; returns the decoded JSON answer (None for an empty one)."""
        request = urllib.request.Request(self.url + path, data=body, method=method)
        if self.config.http_users:
            user, password = next(iter(self.config.http_users.items()))
            token = base64.b64encode(f"{user}:{password}".encode()).decode()
            request.add_header("Authorization", f"Basic {token}")
        if body is not None:
            request.add_header("Content-Type", content_type)
        try:
            with self._opener.open(request, timeout=timeout) as response:
                payload = response.read()
        except urllib.error.HTTPError as error:
            detail = error.read().decode(errors="replace")
            try:
                detail = json.loads(detail).get("Message", detail)
            except (ValueError, AttributeError):
                pass
            raise OrthancError(f"{method} {path} failed with HTTP {error.code}: {detail}") from None
        return json.loads(payload) if payload.strip() else None

    def upload(self, paths: Iterable[Path | str], progress: bool = True, workers: int = 4) -> int:
        """POST DICOM files to /instances; directories are searched for DICOM files.

        Returns how many files Orthanc holds afterwards (newly stored or already stored); raises
        OrthancError naming the files Orthanc refused, after trying all of them.
        """
        files: list[Path] = []
        for path in map(Path, paths):
            if path.is_dir():
                files.extend(find_dicom_files(path))
            elif path.is_file():
                files.append(path)
            else:
                raise FileNotFoundError(f"cannot upload {path}: no such file or directory")
        failures: list[str] = []
        accepted = 0
        with (
            ThreadPoolExecutor(max_workers=workers) as pool,
            tqdm(total=len(files), unit="file", desc="upload to Orthanc", disable=not progress) as bar,
        ):
            for path, error in pool.map(self._upload_one, files):
                if error is None:
                    accepted += 1
                else:
                    failures.append(f"{path}: {error}")
                bar.update()
        if failures:
            shown = "\n  ".join(failures[:10])
            raise OrthancError(
                f"Orthanc refused {len(failures)} of {len(files)} files (are they DICOM Part 10?):\n  {shown}"
            )
        return accepted

    def _upload_one(self, path: Path) -> tuple[Path, str | None]:
        try:
            answer = self.request("POST", "/instances", path.read_bytes(), "application/dicom")
        except (OrthancError, OSError) as error:
            return path, str(error)
        status = answer.get("Status") if isinstance(answer, dict) else None
        if status in ("Success", "AlreadyStored"):
            return path, None
        return path, f"unexpected answer {answer!r}"

    def instance_count(self) -> int:
        return int(self.request("GET", "/statistics")["CountInstances"])

    def study_uids(self) -> list[str]:
        studies = self.request("GET", "/studies?expand")
        return sorted(study["MainDicomTags"]["StudyInstanceUID"] for study in studies)

    def delete_all(self) -> int:
        """Delete every patient (and so every instance); returns how many patients were deleted."""
        patients = self.request("GET", "/patients")
        for patient in patients:
            self.request("DELETE", f"/patients/{patient}")
        return len(patients)

    def add_modality(self, name: str, aet: str, host: str, port: int) -> None:
        """Register a DICOM node at runtime (e.g. a C-MOVE destination); kept across restarts."""
        _validate_modality_name(name)
        modality = Modality(aet, host, port)
        self.request("PUT", f"/modalities/{name}", json.dumps(modality.as_orthanc()).encode())
        self._modalities[name] = modality

    def modalities(self) -> dict[str, Modality]:
        return dict(self._modalities)
