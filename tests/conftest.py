"""Shared fixtures: a real Orthanc PACS on 127.0.0.1, pydicom's sample files, the synthetic studies, the gpu
marker. Test data comes from factories.py, PACS peers from pacs_peers.py, polling from waiting.py."""

from __future__ import annotations

import os
import shutil
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import pytest
from factories import write_synthetic_studies

from ingest.demo.orthanc import INSTALL_HINT, ORTHANC_BINARY, OrthancServer, free_port

# pydicom's bundled image files (none is downloaded): one study each, six transfer syntaxes.
PYDICOM_TEST_FILES = (
    "CT_small.dcm",  # Explicit VR Little Endian, CT
    "MR_small_jpeg_ls_lossless.dcm",  # JPEG-LS lossless, MR
    "JPEG2000.dcm",  # JPEG 2000, NM
    "SC_rgb_rle.dcm",  # RLE lossless, RGB secondary capture
    "SC_jpeg_no_color_transform.dcm",  # JPEG baseline
    "rtdose.dcm",  # Implicit VR Little Endian, multi-frame
)


def pytest_collection_modifyitems(config: pytest.Config, items: list[pytest.Item]) -> None:
    gpu_items = [item for item in items if item.get_closest_marker("gpu")]
    if not gpu_items:
        return
    import torch  # imported only when gpu tests were collected: it takes seconds

    if torch.cuda.is_available():
        return
    skip = pytest.mark.skip(reason="needs a CUDA GPU (torch.cuda.is_available() is False)")
    for item in gpu_items:
        item.add_marker(skip)


@pytest.fixture(scope="session")
def orthanc_binary() -> str:
    """Path of the Orthanc binary. Missing: skip locally, fail in CI (CI installs it)."""
    path = shutil.which(ORTHANC_BINARY)
    if path is None:
        message = f"Orthanc binary {ORTHANC_BINARY!r} not found on PATH; {INSTALL_HINT}"
        if os.environ.get("CI"):
            pytest.fail(message)
        pytest.skip(message)
    return path


@pytest.fixture
def orthanc_server(orthanc_binary: str, tmp_path: Path) -> Iterator[Callable[..., OrthancServer]]:
    """Factory: ``orthanc_server(**OrthancConfig fields)`` returns a started OrthancServer.

    Each call starts its own Orthanc in a fresh directory under tmp_path on free ports; all are
    stopped when the test ends. Stopping Orthanc 1.10 takes about 3 s.
    """
    servers: list[OrthancServer] = []

    def start(**options: Any) -> OrthancServer:
        server = OrthancServer(tmp_path / f"orthanc-{len(servers)}", **options)
        servers.append(server)
        return server.start()

    yield start
    for server in servers:
        server.stop()


@pytest.fixture(scope="session")
def pydicom_testfiles() -> list[Path]:
    """pydicom's sample images with distinct studies and transfer syntaxes (see PYDICOM_TEST_FILES)."""
    from pydicom.data import get_testdata_file

    paths = [get_testdata_file(name) for name in PYDICOM_TEST_FILES]
    missing = [name for name, path in zip(PYDICOM_TEST_FILES, paths, strict=True) if path is None]
    assert not missing, f"pydicom no longer bundles {missing}; pick other files in tests/conftest.py"
    return [Path(path) for path in paths]


@pytest.fixture(scope="session")
def synthetic_files(tmp_path_factory) -> list[Path]:
    """SYNTHETIC_STUDIES written once per session (20 instances, a few kB each)."""
    return write_synthetic_studies(tmp_path_factory.mktemp("synthetic"))


@pytest.fixture(scope="session")
def ray_session():
    """One local Ray for the whole test session: starting Ray costs ~20 s on 2 cores."""
    import ray

    ray.init(num_cpus=2, include_dashboard=False)
    yield ray
    ray.shutdown()


# ---------------------------------------------------------------- S3-compatible object storage
# A moto S3 server on loopback. Its address and test credentials go into the environment when the
# test session starts, before any Ray starts, so Ray workers (which inherit the environment of the
# raylet that `ray.init` spawns) reach the same server; the server itself starts only when a test
# asks for `s3_bucket`.
S3_PORT = free_port()
S3_TEST_BUCKET = "pedx-test"
os.environ |= {
    "AWS_ENDPOINT_URL": f"http://127.0.0.1:{S3_PORT}",
    "AWS_ACCESS_KEY_ID": "testing",
    "AWS_SECRET_ACCESS_KEY": "testing",
    "AWS_REGION": "us-east-1",
}
for _name in ("AWS_ENDPOINT_URL_S3", "AWS_SESSION_TOKEN", "AWS_PROFILE"):
    os.environ.pop(_name, None)


@pytest.fixture(scope="session")
def s3_bucket(tmp_path_factory) -> Iterator[str]:
    """``s3://pedx-test`` on a moto S3 server (``python -m moto.server``) at AWS_ENDPOINT_URL."""
    import subprocess
    import sys
    import time

    import requests

    log = tmp_path_factory.mktemp("moto") / "moto.log"
    with open(log, "wb") as out:
        server = subprocess.Popen(
            [sys.executable, "-m", "moto.server", "-H", "127.0.0.1", "-p", str(S3_PORT)],
            stdout=out,
            stderr=subprocess.STDOUT,
        )
    try:
        deadline = time.monotonic() + 60
        while True:
            try:
                requests.get(os.environ["AWS_ENDPOINT_URL"], timeout=5)
                break
            except requests.RequestException:  # not listening yet, or still importing its handlers
                if server.poll() is not None or time.monotonic() > deadline:
                    pytest.fail(f"the moto S3 server did not start: {log.read_text()[-2000:]}")
                time.sleep(0.2)
        # One bucket for the session; tests write under their own prefixes.
        requests.put(f"{os.environ['AWS_ENDPOINT_URL']}/{S3_TEST_BUCKET}", timeout=30).raise_for_status()
        yield f"s3://{S3_TEST_BUCKET}"
    finally:
        server.terminate()
        server.wait(timeout=30)


@pytest.fixture(scope="session")
def ray_multinode():
    """A 3-node Ray cluster on this machine (head + worker-1 + worker-2, 1 CPU each, token auth on),
    shared by the cluster tests: each node's start-up costs ~20 s on 2 cores. Tests may replace nodes."""
    from pedx_ray.cluster.local import LocalRayCluster

    with LocalRayCluster(cwd=Path(__file__).parent.parent) as cluster:
        yield cluster
