"""A DICOM association acceptor for C-STORE and C-ECHO on plain sockets: the receiving end of C-MOVE.

Why not pynetdicom's server: for each 0.8 MB radiograph a PACS pushed, pynetdicom spent ~13 ms of
GIL-bound CPU even with a store handler that did nothing (PDU and primitive objects per PDU, a state
machine that two threads per association poll every millisecond, pydicom validation of every UID,
~25 ms per association to negotiate the ~130 contexts a PACS proposes), while dcmtk's storescp
spends well under 1 ms; that capped a pull at ~55 instances/s per process. This module speaks the
upper layer protocol (PS3.8 section 9) itself: one thread per association decodes the
A-ASSOCIATE-RQ, answers with an A-ASSOCIATE-AC or -RJ, then reads each PDU into a reused buffer,
splits it into PDVs, collects a message's fragments, and answers each C-STORE and C-ECHO. Anything
else in the data phase is a protocol error that aborts the association. SCP/SCU role selection is
not negotiated (no reply item), so the default roles apply, which is what a storage SCP needs
(PS3.7 D.3.3.4).
"""

from __future__ import annotations

import logging
import socket
import socketserver
import struct
import threading
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass

from pydicom.uid import UID

from ingest.dicom.upper_layer import (
    ABORT,
    ABORT_PDU,
    ABSTRACT_SYNTAX_ITEM,
    ABSTRACT_SYNTAX_NOT_SUPPORTED,
    ACCEPTED,
    APPLICATION_CONTEXT,
    APPLICATION_CONTEXT_ITEM,
    ASSOCIATE_AC,
    ASSOCIATE_RJ,
    ASSOCIATE_RQ,
    C_ECHO_RQ,
    C_STORE_RQ,
    COMMAND_BIT,
    CONTEXT_AC_ITEM,
    CONTEXT_RQ_ITEM,
    FIXED_FIELDS,
    LAST_BIT,
    MAX_UNLIMITED_PDU,
    MAXIMUM_LENGTH_ITEM,
    P_DATA_TF,
    PDU_HEADER,
    RELEASE_RP_PDU,
    RELEASE_RQ,
    TRANSFER_SYNTAX_ITEM,
    TRANSFER_SYNTAXES_NOT_SUPPORTED,
    USER_INFORMATION_ITEM,
    Command,
    PduReader,
    ProtocolError,
    StoreHandler,
    decode_command,
    encode_response,
    implementation_items,
    item,
    iter_items,
    iter_pdvs,
    p_data_tf,
    send_quietly,
    store_received,
    text,
)

LOGGER = logging.getLogger("ingest.dicom.acceptor")

# Implicit VR little endian, explicit VR little endian, explicit VR big endian.
_UNCOMPRESSED = frozenset({"1.2.840.10008.1.2", "1.2.840.10008.1.2.1", "1.2.840.10008.1.2.2"})
# A-ASSOCIATE-RQ is read before the peer is admitted: a bound on what an unknown peer may make us allocate.
_MAX_ASSOCIATE_RQ = 1 << 20

STATUS_SUCCESS = 0x0000
STATUS_UNRECOGNIZED_OPERATION = 0x0211

# A-ASSOCIATE-RJ (result, source, diagnostic), PS3.8 9.3.4.
REJECT_CALLING_AET = (0x01, 0x01, 0x03)  # permanent; service user; calling AE title not recognized
REJECT_BUSY = (0x02, 0x03, 0x02)  # transient; service provider (presentation); local limit exceeded
REJECT_APPLICATION_CONTEXT = (0x01, 0x01, 0x02)  # permanent; service user; context name not supported
REJECT_PROTOCOL_VERSION = (0x01, 0x02, 0x02)  # permanent; service provider (ACSE); version not supported


@dataclass(frozen=True)
class AssociateRequest:
    """What an A-ASSOCIATE-RQ asks for. ``contexts``: context ID -> (abstract syntax, transfer syntaxes)."""

    called_aet: bytes
    calling_aet: bytes
    protocol_version: int
    application_context: str
    contexts: dict[int, tuple[str, tuple[str, ...]]]
    maximum_length: int


# Returns why a calling AE title is refused, or None to admit it.
AdmissionPolicy = Callable[[str], "str | None"]


def parse_associate_rq(body: bytes) -> AssociateRequest:
    """The fields of an A-ASSOCIATE-RQ PDU body (after its 6-byte header) that an acceptor needs."""
    if len(body) < FIXED_FIELDS.size:
        raise ProtocolError(f"A-ASSOCIATE-RQ of {len(body)} bytes is shorter than its fixed fields")
    version, _, called, calling = FIXED_FIELDS.unpack_from(body)
    application_context, maximum_length = "", 0
    contexts: dict[int, tuple[str, tuple[str, ...]]] = {}
    for item_type, content in iter_items(body[FIXED_FIELDS.size :], "A-ASSOCIATE-RQ"):
        if item_type == APPLICATION_CONTEXT_ITEM:
            application_context = text(content)
        elif item_type == CONTEXT_RQ_ITEM:
            if len(content) < 4:
                raise ProtocolError("presentation context item shorter than its context ID field")
            abstract, transfer = "", []
            for sub_type, value in iter_items(content[4:], "presentation context item"):
                if sub_type == ABSTRACT_SYNTAX_ITEM:
                    abstract = text(value)
                elif sub_type == TRANSFER_SYNTAX_ITEM:
                    transfer.append(text(value))
            contexts[content[0]] = (abstract, tuple(transfer))
        elif item_type == USER_INFORMATION_ITEM:
            for sub_type, value in iter_items(content, "user information item"):
                if sub_type == MAXIMUM_LENGTH_ITEM and len(value) == 4:
                    (maximum_length,) = struct.unpack(">L", value)
    return AssociateRequest(called, calling, version, application_context, contexts, maximum_length)


def negotiate(request: AssociateRequest, syntaxes: Mapping[str, Sequence[str]]) -> dict[int, tuple[int, str]]:
    """Context ID -> (result, transfer syntax) for each proposed context.

    Of the transfer syntaxes we accept, the one the peer listed first wins: a sender lists the
    syntax it holds first, so an instance arrives as stored, neither decompressed nor recompressed
    on the way (and a sender that cannot transcode, like dcmtk's storescu, can send at all). The
    uncompressed syntaxes only differ in how elements are encoded, so where the sender's choice is
    one of them, our order among those it proposed decides (explicit VR little endian first).
    """
    results = {}
    for context_id, (abstract, proposed) in request.contexts.items():
        ours = syntaxes.get(abstract)
        if ours is None:
            results[context_id] = (ABSTRACT_SYNTAX_NOT_SUPPORTED, proposed[0] if proposed else "")
            continue
        chosen = next((syntax for syntax in proposed if syntax in ours), None)
        if chosen in _UNCOMPRESSED:
            chosen = next(syntax for syntax in ours if syntax in proposed and syntax in _UNCOMPRESSED)
        if chosen is None:
            results[context_id] = (TRANSFER_SYNTAXES_NOT_SUPPORTED, proposed[0] if proposed else "")
        else:
            results[context_id] = (ACCEPTED, chosen)
    return results


def encode_associate_ac(
    request: AssociateRequest, results: dict[int, tuple[int, str]], max_pdu: int
) -> bytes:
    """The A-ASSOCIATE-AC PDU accepting ``request`` with the negotiated ``results``."""
    body = bytearray(FIXED_FIELDS.pack(0x0001, 0, request.called_aet, request.calling_aet))
    body += item(APPLICATION_CONTEXT_ITEM, APPLICATION_CONTEXT.encode())
    for context_id, (result, syntax) in sorted(results.items()):
        content = struct.pack(">BxBx", context_id, result) + item(TRANSFER_SYNTAX_ITEM, syntax.encode())
        body += item(CONTEXT_AC_ITEM, content)
    body += item(USER_INFORMATION_ITEM, implementation_items(max_pdu))
    return PDU_HEADER.pack(ASSOCIATE_AC, 0, len(body)) + body


def encode_associate_rj(rejection: tuple[int, int, int]) -> bytes:
    """The A-ASSOCIATE-RJ PDU for a (result, source, diagnostic) triple."""
    return PDU_HEADER.pack(ASSOCIATE_RJ, 0, 4) + struct.pack(">xBBB", *rejection)


class _Association:
    """One accepted connection, from A-ASSOCIATE-RQ to release or abort."""

    def __init__(self, sock: socket.socket, address: tuple, server: StorageAcceptor) -> None:
        self.sock, self.server = sock, server
        self.where = f"{address[0]}:{address[1]}"
        self.calling_aet = ""
        self.contexts: dict[int, UID] = {}
        self.peer_max_pdu = 0
        self.pdus = PduReader(sock)

    def run(self) -> None:
        self.sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
        self.sock.settimeout(self.server.network_timeout)
        try:
            if self._negotiate():
                try:
                    self._data_phase()
                finally:
                    self.server.release_slot()
        except TimeoutError:
            LOGGER.warning(
                "association from %r at %s: nothing received for %g s, aborting",
                self.calling_aet,
                self.where,
                self.server.network_timeout,
            )
            send_quietly(self.sock, ABORT_PDU)
        except ProtocolError as exc:
            LOGGER.warning("association from %r at %s aborted: %s", self.calling_aet, self.where, exc)
            send_quietly(self.sock, ABORT_PDU)
        except OSError as exc:
            LOGGER.warning("association from %r at %s lost: %s", self.calling_aet, self.where, exc)
        except Exception:  # a bug here must end this association, logged, not the server
            LOGGER.exception("association from %r at %s failed", self.calling_aet, self.where)
            send_quietly(self.sock, ABORT_PDU)

    def _negotiate(self) -> bool:
        pdu_type, body = self.pdus.read(limit=_MAX_ASSOCIATE_RQ)
        if pdu_type != ASSOCIATE_RQ:
            raise ProtocolError(f"expected an A-ASSOCIATE-RQ, got PDU type 0x{pdu_type:02X}")
        request = parse_associate_rq(bytes(body))
        self.calling_aet = text(request.calling_aet)
        reason, rejection = self.server.admit(self.calling_aet), REJECT_CALLING_AET
        if reason is None and not request.protocol_version & 0x0001:
            reason, rejection = f"protocol version 0x{request.protocol_version:04X}", REJECT_PROTOCOL_VERSION
        if reason is None and request.application_context != APPLICATION_CONTEXT:
            reason = f"application context {request.application_context!r} is not DICOM's"
            rejection = REJECT_APPLICATION_CONTEXT
        if reason is None and not self.server.take_slot():
            reason, rejection = "too many concurrent associations", REJECT_BUSY
        if reason is not None:
            LOGGER.warning("rejected association from %r at %s: %s", self.calling_aet, self.where, reason)
            self.sock.sendall(encode_associate_rj(rejection))
            return False
        results = negotiate(request, self.server.syntaxes)
        self.contexts = {cid: UID(syntax) for cid, (result, syntax) in results.items() if result == ACCEPTED}
        self.peer_max_pdu = request.maximum_length
        self.sock.sendall(encode_associate_ac(request, results, self.server.max_pdu))
        LOGGER.debug("accepted association from %r at %s", self.calling_aet, self.where)
        return True

    def _data_phase(self) -> None:
        command: Command | None = None
        command_context = 0
        fragments: list[bytes] = []
        while True:
            pdu_type, body = self.pdus.read(limit=self.server.max_pdu or MAX_UNLIMITED_PDU)
            if pdu_type == RELEASE_RQ:
                if command is not None or fragments:
                    LOGGER.warning("%r released the association in the middle of a message", self.calling_aet)
                self.sock.sendall(RELEASE_RP_PDU)
                return
            if pdu_type == ABORT:
                if command is not None or fragments:
                    LOGGER.warning("%r aborted the association in the middle of a message", self.calling_aet)
                return
            if pdu_type != P_DATA_TF:
                raise ProtocolError(f"unexpected PDU type 0x{pdu_type:02X} in the data transfer phase")
            for context_id, control, fragment in iter_pdvs(body):
                if context_id not in self.contexts:
                    raise ProtocolError(f"PDV on presentation context {context_id}, which was not accepted")
                if command is not None and context_id != command_context:
                    raise ProtocolError(
                        f"data set on context {context_id} for a command sent on context {command_context}"
                    )
                is_command = bool(control & COMMAND_BIT)
                if is_command and command is not None:
                    raise ProtocolError("a command arrived before the previous command's data set")
                if not is_command and command is None:
                    raise ProtocolError("a data set fragment arrived without its command")
                fragments.append(bytes(fragment))
                if not control & LAST_BIT:
                    continue
                message, fragments = b"".join(fragments), []
                if is_command:
                    command, command_context = decode_command(message), context_id
                    if command.has_data_set:
                        continue  # its data set follows
                    message = None
                self._answer(command_context, command, message)
                command = None

    def _answer(self, context_id: int, command: Command, dataset: bytes | None) -> None:
        if command.command_field == C_ECHO_RQ:
            status = STATUS_SUCCESS
        elif command.command_field == C_STORE_RQ and dataset is not None:
            status = store_received(
                self.server.on_store,
                command,
                self.contexts[context_id],
                dataset,
                self.calling_aet,
                f"{self.calling_aet}@{self.where}",
            )
        else:
            LOGGER.warning(
                "%r sent command 0x%04X, which a storage SCP does not serve",
                self.calling_aet,
                command.command_field,
            )
            status = STATUS_UNRECOGNIZED_OPERATION
        response = encode_response(command, status)
        self.sock.sendall(p_data_tf(context_id, response, self.peer_max_pdu, command=True))


class _RequestHandler(socketserver.BaseRequestHandler):
    server: StorageAcceptor

    def handle(self) -> None:
        self.server.track(self.request, add=True)
        try:
            _Association(self.request, self.client_address, self.server).run()
        finally:
            self.server.track(self.request, add=False)


class StorageAcceptor(socketserver.ThreadingTCPServer):
    """Accepts associations on ``address`` and hands each received instance to ``on_store``.

    ``syntaxes`` maps each abstract syntax served to the transfer syntaxes accepted for it.
    ``admit(calling_aet)`` returns a reason to refuse a peer (or None). At most
    ``maximum_associations`` run at once; more are rejected as transient. ``max_pdu`` is the largest
    PDU we accept (0 = unlimited). ``share_port`` sets SO_REUSEPORT so several processes can listen
    on one port and the kernel spreads the incoming associations over them.
    """

    daemon_threads = True
    allow_reuse_address = True

    def __init__(
        self,
        address: tuple[str, int],
        *,
        on_store: StoreHandler,
        admit: AdmissionPolicy,
        syntaxes: Mapping[str, Sequence[str]],
        maximum_associations: int,
        network_timeout: float,
        max_pdu: int,
        share_port: bool = False,
    ) -> None:
        self.on_store, self.admit = on_store, admit
        self.syntaxes = syntaxes
        self.maximum_associations = maximum_associations
        self.network_timeout, self.max_pdu = network_timeout, max_pdu
        self.share_port = share_port
        self._lock = threading.Lock()
        self._slots = 0
        self._connections: set[socket.socket] = set()
        super().__init__(address, _RequestHandler)

    def server_bind(self) -> None:
        if self.share_port:
            self.socket.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEPORT, 1)
        super().server_bind()

    def take_slot(self) -> bool:
        with self._lock:
            if self._slots >= self.maximum_associations:
                return False
            self._slots += 1
            return True

    def release_slot(self) -> None:
        with self._lock:
            self._slots -= 1

    def track(self, connection: socket.socket, *, add: bool) -> None:
        with self._lock:
            if add:
                self._connections.add(connection)
            else:
                self._connections.discard(connection)

    def close_connections(self) -> None:
        """Cut every open association (their threads then end): what stopping the SCP means."""
        with self._lock:
            connections = list(self._connections)
        for connection in connections:
            try:
                connection.shutdown(socket.SHUT_RDWR)
            except OSError:
                pass
