"""Shared fixtures: a real Orthanc PACS on 127.0.0.1, pydicom's sample files, the gpu marker."""

from __future__ import annotations

import os
import shutil
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import pytest
from pydicom.dataset import Dataset
from pynetdicom import AE, evt
from pynetdicom.sop_class import ComputedRadiographyImageStorage, StudyRootQueryRetrieveInformationModelGet

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


# Small synthetic studies for the networking tests: (StudyDate, StudyTime, modality, instances per series).
# Four studies share 2018-01-01 so a result cap of 3 forces find_studies to split one day by time.
SYNTHETIC_STUDIES = (
    ("20150302", "081500", "CR", (1, 2)),
    ("20151120", "140000", "DX", (2,)),
    ("20160615", "093000", "CR", (1,)),
    ("20170101", "000001", "DX", (1, 1)),
    ("20180101", "080000", "CR", (1,)),
    ("20180101", "101500", "DX", (2,)),
    ("20180101", "133000", "CR", (1,)),
    ("20180101", "235959", "CR", (1,)),
    ("20190704", "120000", "DX", (1, 2)),
    ("20200229", "110000", "CR", (1,)),
    ("20211231", "170000", "DX", (2,)),
    ("20220515", "090000", "MR", (1,)),  # not a radiograph: the default modality filter skips it
)


def make_instance(
    path: Path,
    *,
    study_uid: str,
    series_uid: str,
    sop_uid: str,
    study_date: str = "20200101",
    study_time: str = "120000",
    modality: str = "CR",
    patient_id: str = "P0",
    seed: int = 0,
) -> Path:
    """Write a ~2 kB CR-storage Part 10 file (32x32 uint16 pixels derived from seed)."""
    import numpy as np
    from pydicom.dataset import FileMetaDataset
    from pydicom.uid import ComputedRadiographyImageStorage, ExplicitVRLittleEndian

    ds = Dataset()
    ds.file_meta = FileMetaDataset()
    ds.file_meta.MediaStorageSOPClassUID = ComputedRadiographyImageStorage
    ds.file_meta.MediaStorageSOPInstanceUID = sop_uid
    ds.file_meta.TransferSyntaxUID = ExplicitVRLittleEndian
    ds.SOPClassUID = ComputedRadiographyImageStorage
    ds.SOPInstanceUID = sop_uid
    ds.StudyInstanceUID = study_uid
    ds.SeriesInstanceUID = series_uid
    ds.PatientID = patient_id
    ds.PatientName = f"Phantom^{patient_id}"
    ds.StudyDate = study_date
    ds.StudyTime = study_time
    ds.Modality = modality
    ds.StudyDescription = f"{modality} test study"
    ds.SeriesNumber = 1
    ds.InstanceNumber = 1
    ds.Rows = ds.Columns = 32
    ds.SamplesPerPixel = 1
    ds.PhotometricInterpretation = "MONOCHROME2"
    ds.BitsAllocated = 16
    ds.BitsStored = 12
    ds.HighBit = 11
    ds.PixelRepresentation = 0
    pixels = np.random.default_rng(seed).integers(0, 4096, size=(32, 32), dtype=np.uint16)
    ds.PixelData = pixels.tobytes()
    path.parent.mkdir(parents=True, exist_ok=True)
    ds.save_as(path, enforce_file_format=True)
    return path


def write_synthetic_studies(root: Path, studies=SYNTHETIC_STUDIES) -> list[Path]:
    """One file per instance under root; UIDs are unique per study, series and instance."""
    paths = []
    for s, (date, time_of_day, modality, series_sizes) in enumerate(studies):
        study_uid = f"1.2.826.0.1.3680043.10.999.{s + 1}"
        for n, size in enumerate(series_sizes):
            series_uid = f"{study_uid}.{n + 1}"
            for i in range(size):
                sop_uid = f"{series_uid}.{i + 1}"
                paths.append(
                    make_instance(
                        root / f"{sop_uid}.dcm",
                        study_uid=study_uid,
                        series_uid=series_uid,
                        sop_uid=sop_uid,
                        study_date=date,
                        study_time=time_of_day,
                        modality=modality,
                        patient_id=f"P{s % 5}",
                        seed=len(paths),
                    )
                )
    return paths


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


class GetPacs:
    """A pynetdicom C-GET SCP on 127.0.0.1 serving the instances it is asked for by SOPInstanceUID.

    It sends ``abort_after`` instances of each request, then aborts (None: never). ``require`` limits
    the calling AE titles it accepts (empty: any).
    """

    def __init__(self, datasets: list[Dataset], require: list[str] | None = None) -> None:
        self.datasets = {ds.SOPInstanceUID: ds for ds in datasets}
        self.abort_after: int | None = None
        self.requests = 0
        ae = AE(ae_title="FLAKYPACS")
        ae.require_calling_aet = require or []
        ae.add_supported_context(StudyRootQueryRetrieveInformationModelGet)
        ae.add_supported_context(ComputedRadiographyImageStorage, scu_role=True, scp_role=True)
        self.port = free_port()
        self.server = ae.start_server(
            ("127.0.0.1", self.port), block=False, evt_handlers=[(evt.EVT_C_GET, self.on_get)]
        )

    def on_get(self, event):
        self.requests += 1
        wanted = event.identifier.SOPInstanceUID
        wanted = [wanted] if isinstance(wanted, str) else list(wanted)
        selected = [self.datasets[uid] for uid in wanted if uid in self.datasets]
        yield len(selected)
        for sent, dataset in enumerate(selected):
            if sent == self.abort_after:
                event.assoc.abort()
                return
            yield 0xFF00, dataset


@pytest.fixture(scope="session")
def ray_multinode():
    """A 3-node Ray cluster on this machine (head + worker-1 + worker-2, 1 CPU each, token auth on),
    shared by the cluster tests: each node's start-up costs ~20 s on 2 cores. Tests may replace nodes."""
    from pedx_ray.cluster.local import LocalRayCluster

    with LocalRayCluster(cwd=Path(__file__).parent.parent) as cluster:
        yield cluster
