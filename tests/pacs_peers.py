"""PACS peers the DICOM networking tests talk to on 127.0.0.1: pynetdicom servers and a DICOMweb server
that misbehave on demand."""

from __future__ import annotations

import json
import time
from http.server import BaseHTTPRequestHandler
from pathlib import Path
from urllib.parse import parse_qs, urlsplit

from pydicom.dataset import Dataset
from pynetdicom import AE, evt
from pynetdicom.sop_class import ComputedRadiographyImageStorage, StudyRootQueryRetrieveInformationModelGet

from ingest.demo.orthanc import free_port


class GetPacs:
    """A pynetdicom C-GET SCP on 127.0.0.1 serving the instances it is asked for by SOPInstanceUID.

    It sends ``abort_after`` instances of each request, then aborts (None: never). The first
    ``stall`` requests stay pending (after ``abort_after`` instances, if set) until the requestor
    sends C-CANCEL; ``cancelled`` counts those. The first ``out_of_resources`` requests are refused
    with A702 and no sub-operation. ``require`` limits the calling AE titles it accepts (empty: any).
    """

    def __init__(self, datasets: list[Dataset], require: list[str] | None = None) -> None:
        self.datasets = {ds.SOPInstanceUID: ds for ds in datasets}
        self.abort_after: int | None = None
        self.stall = 0
        self.cancelled = 0
        self.out_of_resources = 0
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
        stall, self.stall = self.stall > 0, max(self.stall - 1, 0)
        refuse, self.out_of_resources = self.out_of_resources > 0, max(self.out_of_resources - 1, 0)
        yield len(selected)
        if refuse:
            time.sleep(0.1)  # the storm hits requests running at once
            yield 0xA702, None
            return
        for sent, dataset in enumerate(selected):
            if sent == self.abort_after:
                if not stall:
                    event.assoc.abort()
                    return
                deadline = time.monotonic() + 60  # pending until cancelled (a test gives up after this)
                while not event.is_cancelled and time.monotonic() < deadline:
                    time.sleep(0.01)
                self.cancelled += 1
                yield 0xFE00, None
                return
            yield 0xFF00, dataset


class DicomwebPeer:
    """A small DICOMweb server on 127.0.0.1 (QIDO-RS, WADO-RS) that misbehaves on demand.

    It serves ``files`` (Part 10 paths). ``drop`` holds SOPInstanceUIDs it leaves out of every
    study answer (a partial transfer reported as complete) and answers 404 for when asked alone;
    the first ``throttle`` requests get 429 with ``Retry-After: 0``; the first ``stall`` WADO-RS
    answers send half their body, then wait ``stall_s`` seconds; after ``down_after`` WADO-RS
    answers (None: never) it drops every connection unanswered, as a PACS going down mid-pull.
    ``token`` is the bearer token
    it requires (None: any). ``requests`` counts what it was asked, ``authorizations`` keeps the
    Authorization headers it saw, ``connections`` counts the TCP connections it accepted. Its
    multipart answers are chunked and end with an epilogue after the close delimiter, as RFC 2046
    allows.
    """

    def __init__(self, files, token: str | None = None) -> None:
        import threading
        from http.server import ThreadingHTTPServer

        from pydicom import dcmread

        self.instances: dict[str, tuple[Dataset, bytes]] = {}
        for path in files:
            header = dcmread(path, stop_before_pixels=True)
            self.instances[header.SOPInstanceUID] = (header, Path(path).read_bytes())
        self.token = token
        self.drop: set[str] = set()
        self.throttle = 0
        self.stall = 0
        self.stall_s = 5.0
        self.down_after: int | None = None
        self.requests: list[str] = []
        self.authorizations: list[str] = []
        self.connections = 0
        peer = self

        class Handler(_DicomwebHandler):
            server_peer = peer

        self.server = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
        self.server.daemon_threads = True
        self.url = f"http://127.0.0.1:{self.server.server_address[1]}/dicom-web"
        self._thread = threading.Thread(target=self.server.serve_forever, daemon=True)
        self._thread.start()

    def close(self) -> None:
        self.server.shutdown()
        self.server.server_close()

    def __enter__(self):
        return self

    def __exit__(self, *exc_info) -> None:
        self.close()

    def matches(self, query: dict[str, list[str]]) -> list[Dataset]:
        def study_date_ok(ds: Dataset) -> bool:
            wanted = query.get("StudyDate", [""])[0]
            if not wanted:
                return True
            first, _, last = wanted.partition("-") if "-" in wanted else (wanted, "", wanted)
            return (first or "00000000") <= ds.StudyDate <= (last or "99999999")

        studies = {}
        for ds, _ in self.instances.values():
            if study_date_ok(ds):
                studies.setdefault(ds.StudyInstanceUID, ds)
        found = sorted(studies.values(), key=lambda ds: ds.StudyInstanceUID)
        limit = query.get("limit")
        return found[: int(limit[0])] if limit else found


def _element(vr: str, value) -> dict:
    return {"vr": vr, "Value": [value]} if value not in (None, "") else {"vr": vr}


class _DicomwebHandler(BaseHTTPRequestHandler):
    protocol_version = "HTTP/1.1"
    server_peer: DicomwebPeer

    def log_message(self, *args) -> None:  # keep the test output clean
        pass

    def setup(self) -> None:
        super().setup()
        self.server_peer.connections += 1

    def do_GET(self) -> None:
        peer = self.server_peer
        url = urlsplit(self.path)
        peer.requests.append(url.path)
        peer.authorizations.append(self.headers.get("Authorization", ""))
        if peer.token is not None and self.headers.get("Authorization") != f"Bearer {peer.token}":
            return self._send(401, b"", "text/plain")
        if peer.throttle > 0:
            peer.throttle -= 1
            return self._send(429, b"", "text/plain", {"Retry-After": "0"})
        parts = url.path.removeprefix("/dicom-web").strip("/").split("/")
        if parts == ["studies"]:
            body = [
                {
                    "0020000D": _element("UI", ds.StudyInstanceUID),
                    "00080020": _element("DA", ds.StudyDate),
                    "00080061": {"vr": "CS", "Value": [ds.Modality]},
                }
                for ds in peer.matches(parse_qs(url.query))
            ]
            return self._send(200, json.dumps(body).encode(), "application/dicom+json")
        study = parts[1] if len(parts) > 1 else ""
        members = [(ds, data) for ds, data in peer.instances.values() if ds.StudyInstanceUID == study]
        if parts[2:] == ["instances"]:
            body = [
                {
                    "0020000D": _element("UI", ds.StudyInstanceUID),
                    "0020000E": _element("UI", ds.SeriesInstanceUID),
                    "00080018": _element("UI", ds.SOPInstanceUID),
                    "00080016": _element("UI", ds.SOPClassUID),
                }
                for ds, _ in members
            ]
            return self._send(200, json.dumps(body).encode(), "application/dicom+json")
        if peer.down_after is not None:
            if peer.down_after <= 0:
                self.close_connection = True  # no answer at all
                return
            peer.down_after -= 1
        if len(parts) == 2:
            selected = [data for ds, data in members if ds.SOPInstanceUID not in peer.drop]
        else:
            uid = parts[-1]
            selected = [data for ds, data in members if ds.SOPInstanceUID == uid and uid not in peer.drop]
            if not selected:
                return self._send(404, b"", "text/plain")
        boundary = "pedx-test-boundary"
        body = b"".join(
            f"--{boundary}\r\nContent-Type: application/dicom\r\n\r\n".encode() + data + b"\r\n"
            for data in selected
        )
        body += f"--{boundary}--\r\nthe epilogue, which a client skips\r\n".encode()
        content_type = f'multipart/related; type="application/dicom"; boundary={boundary}'
        if peer.stall > 0:
            peer.stall -= 1
            return self._send(200, body, content_type, stall_s=peer.stall_s)
        self._send_chunked(body, content_type)

    def _send_chunked(self, body: bytes, content_type: str) -> None:
        """A 200 in chunked transfer coding, as cloud DICOMweb services stream their answers: one
        chunk per 64 kB, then the last (empty) chunk."""
        self.send_response(200)
        self.send_header("Content-Type", content_type)
        self.send_header("Transfer-Encoding", "chunked")
        self.end_headers()
        for start in range(0, len(body), 1 << 16):
            piece = body[start : start + (1 << 16)]
            self.wfile.write(f"{len(piece):x}\r\n".encode() + piece + b"\r\n")
            self.wfile.flush()
        self.wfile.write(b"0\r\n\r\n")

    def _send(
        self, code: int, body: bytes, content_type: str, headers: dict | None = None, stall_s: float = 0
    ) -> None:
        self.send_response(code)
        self.send_header("Content-Type", content_type)
        self.send_header("Content-Length", str(len(body)))
        for name, value in (headers or {}).items():
            self.send_header(name, value)
        self.end_headers()
        if stall_s:
            self.wfile.write(body[: len(body) // 2])
            self.wfile.flush()
            time.sleep(stall_s)
            try:
                self.wfile.write(body[len(body) // 2 :])
            except OSError:  # the client gave up
                self.close_connection = True
            return
        self.wfile.write(body)
