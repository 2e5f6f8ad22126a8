"""PACS peers the DICOM networking tests talk to on 127.0.0.1: pynetdicom servers that misbehave on demand."""

from __future__ import annotations

from pydicom.dataset import Dataset
from pynetdicom import AE, evt
from pynetdicom.sop_class import ComputedRadiographyImageStorage, StudyRootQueryRetrieveInformationModelGet

from ingest.demo.orthanc import free_port


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
