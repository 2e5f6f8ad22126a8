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
from collections.abc import Callable, Iterator, Mapping, Sequence
from dataclasses import dataclass

from pydicom.uid import UID

LOGGER = logging.getLogger("ingest.acceptor")

# Identifies this receiver in the A-ASSOCIATE-AC and in the file meta of what it stores.
IMPLEMENTATION_CLASS_UID = UID("2.25.124424956662067966831314624402673137886")
IMPLEMENTATION_VERSION_NAME = "PEDXRAY_1"

_ASSOCIATE_RQ, _ASSOCIATE_AC, _ASSOCIATE_RJ = 0x01, 0x02, 0x03
_P_DATA_TF, _RELEASE_RQ, _ABORT = 0x04, 0x05, 0x07
_RELEASE_RP_PDU = b"\x06\x00\x00\x00\x00\x04\x00\x00\x00\x00"
_ABORT_PDU = b"\x07\x00\x00\x00\x00\x04\x00\x00\x02\x00"  # source: service provider, reason not given
_APPLICATION_CONTEXT = "1.2.840.10008.3.1.1.1"
# A-ASSOCIATE-RQ items (PS3.8 9.3.2): fixed fields, then items and user information sub-items.
_FIXED_FIELDS = struct.Struct(">HH16s16s32x")
_ITEM_HEADER = struct.Struct(">BxH")
_APPLICATION_CONTEXT_ITEM, _CONTEXT_RQ_ITEM, _CONTEXT_AC_ITEM = 0x10, 0x20, 0x21
_ABSTRACT_SYNTAX_ITEM, _TRANSFER_SYNTAX_ITEM, _USER_INFORMATION_ITEM = 0x30, 0x40, 0x50
_MAXIMUM_LENGTH_ITEM, _IMPLEMENTATION_UID_ITEM, _IMPLEMENTATION_VERSION_ITEM = 0x51, 0x52, 0x55
# Implicit VR little endian, explicit VR little endian, explicit VR big endian.
_UNCOMPRESSED = frozenset({"1.2.840.10008.1.2", "1.2.840.10008.1.2.1", "1.2.840.10008.1.2.2"})
# Presentation context results (PS3.8 9.3.3.2).
_ACCEPTED, _ABSTRACT_SYNTAX_NOT_SUPPORTED, _TRANSFER_SYNTAXES_NOT_SUPPORTED = 0x00, 0x03, 0x04
_PDU_HEADER = struct.Struct(">BBL")
_PDV_HEADER = struct.Struct(">LBB")
_COMMAND_BIT, _LAST_BIT = 0x01, 0x02
# A-ASSOCIATE-RQ is read before the peer is admitted: a bound on what an unknown peer may make us allocate.
_MAX_ASSOCIATE_RQ = 1 << 20
# With no maximum announced (max_pdu=0) a PDU's declared length is still bounded: a garbled length
# field must not make us allocate gigabytes. PACS send PDUs of 16 KiB to a few MiB.
_MAX_UNLIMITED_PDU = 256 << 20

C_STORE_RQ, C_ECHO_RQ = 0x0001, 0x0030
_NO_DATA_SET = 0x0101
STATUS_SUCCESS = 0x0000
STATUS_UNRECOGNIZED_OPERATION = 0x0211
STATUS_PROCESSING_FAILURE = 0x0110

# A-ASSOCIATE-RJ (result, source, diagnostic), PS3.8 9.3.4.
REJECT_CALLING_AET = (0x01, 0x01, 0x03)  # permanent; service user; calling AE title not recognized
REJECT_BUSY = (0x02, 0x03, 0x02)  # transient; service provider (presentation); local limit exceeded
REJECT_APPLICATION_CONTEXT = (0x01, 0x01, 0x02)  # permanent; service user; context name not supported
REJECT_PROTOCOL_VERSION = (0x01, 0x02, 0x02)  # permanent; service provider (ACSE); version not supported


class ProtocolError(Exception):
    """The peer broke the upper layer protocol: the association is aborted."""


@dataclass(frozen=True)
class ReceivedInstance:
    """One C-STORE request with its data set, as the bytes the peer sent."""

    sop_class_uid: str
    sop_instance_uid: str
    transfer_syntax: UID
    dataset: bytes
    source_aet: str
    peer: str


@dataclass(frozen=True)
class AssociateRequest:
    """What an A-ASSOCIATE-RQ asks for. ``contexts``: context ID -> (abstract syntax, transfer syntaxes)."""

    called_aet: bytes
    calling_aet: bytes
    protocol_version: int
    application_context: str
    contexts: dict[int, tuple[str, tuple[str, ...]]]
    maximum_length: int


StoreHandler = Callable[[ReceivedInstance], int]
# Returns why a calling AE title is refused, or None to admit it.
AdmissionPolicy = Callable[[str], "str | None"]


def iter_pdvs(body: memoryview) -> Iterator[tuple[int, int, memoryview]]:
    """(presentation context ID, message control header, fragment) for each PDV of a P-DATA-TF."""
    offset, end = 0, len(body)
    while offset < end:
        if end - offset < _PDV_HEADER.size:
            raise ProtocolError("P-DATA-TF ends inside a PDV item header")
        length, context_id, control = _PDV_HEADER.unpack_from(body, offset)
        if length < 2 or offset + 4 + length > end:
            raise ProtocolError(f"PDV item length {length} does not fit its P-DATA-TF")
        yield context_id, control, body[offset + 6 : offset + 4 + length]
        offset += 4 + length


@dataclass(frozen=True)
class Command:
    """The command set fields a storage SCP reads (PS3.7 9.3.1.1, 9.3.5.1)."""

    command_field: int
    message_id: int
    has_data_set: bool
    sop_class_uid: str
    sop_instance_uid: str


# Command set element numbers (group 0000); all are implicit VR little endian.
_AFFECTED_SOP_CLASS, _COMMAND_FIELD, _MESSAGE_ID, _MESSAGE_ID_RESPONDED = 0x0002, 0x0100, 0x0110, 0x0120
_DATA_SET_TYPE, _STATUS, _AFFECTED_SOP_INSTANCE = 0x0800, 0x0900, 0x1000
_ELEMENT_HEADER = struct.Struct("<HHL")


def decode_command(message: bytes) -> Command:
    """Read a command set; raise ProtocolError if it is malformed or lacks a required field."""
    values: dict[int, bytes] = {}
    offset = 0
    while offset < len(message):
        if len(message) - offset < _ELEMENT_HEADER.size:
            raise ProtocolError("command set ends inside an element header")
        group, element, length = _ELEMENT_HEADER.unpack_from(message, offset)
        offset += _ELEMENT_HEADER.size
        if group != 0x0000 or offset + length > len(message):
            raise ProtocolError(f"command set element ({group:04X},{element:04X}) is malformed")
        values[element] = message[offset : offset + length]
        offset += length
    try:
        (command_field,) = struct.unpack("<H", values[_COMMAND_FIELD])
        (message_id,) = struct.unpack("<H", values[_MESSAGE_ID])
        (data_set_type,) = struct.unpack("<H", values[_DATA_SET_TYPE])
    except (KeyError, struct.error) as exc:
        raise ProtocolError("command set lacks Command Field, Message ID or Command Data Set Type") from exc
    return Command(
        command_field=command_field,
        message_id=message_id,
        has_data_set=data_set_type != _NO_DATA_SET,
        sop_class_uid=_text(values.get(_AFFECTED_SOP_CLASS, b"")),
        sop_instance_uid=_text(values.get(_AFFECTED_SOP_INSTANCE, b"")),
    )


def _command_element(element: int, value: bytes) -> bytes:
    if len(value) % 2:
        value += b"\x00"  # UIDs are padded to an even length with NUL
    return _ELEMENT_HEADER.pack(0x0000, element, len(value)) + value


def encode_response(request: Command, status: int) -> bytes:
    """The command set (implicit VR little endian) answering ``request`` with ``status``."""
    elements = _command_element(_AFFECTED_SOP_CLASS, request.sop_class_uid.encode())
    elements += _command_element(_COMMAND_FIELD, struct.pack("<H", request.command_field | 0x8000))
    elements += _command_element(_MESSAGE_ID_RESPONDED, struct.pack("<H", request.message_id))
    elements += _command_element(_DATA_SET_TYPE, struct.pack("<H", _NO_DATA_SET))
    elements += _command_element(_STATUS, struct.pack("<H", status))
    if request.sop_instance_uid:
        elements += _command_element(_AFFECTED_SOP_INSTANCE, request.sop_instance_uid.encode())
    # (0000,0000) Command Group Length, UL: the length of everything after it.
    return _command_element(0x0000, struct.pack("<L", len(elements))) + elements


def p_data_tf(context_id: int, data: bytes, max_pdu: int, *, command: bool) -> bytes:
    """``data`` as P-DATA-TF PDUs no longer than the peer's ``max_pdu`` (0 = unlimited)."""
    chunk = max(len(data) if max_pdu == 0 else max_pdu - _PDV_HEADER.size, 1)
    pieces = [data[i : i + chunk] for i in range(0, len(data), chunk)] or [b""]
    out = bytearray()
    for i, piece in enumerate(pieces):
        control = (_COMMAND_BIT if command else 0) | (_LAST_BIT if i == len(pieces) - 1 else 0)
        item = _PDV_HEADER.pack(len(piece) + 2, context_id, control) + piece
        out += _PDU_HEADER.pack(_P_DATA_TF, 0, len(item)) + item
    return bytes(out)


def _items(data: bytes, where: str) -> Iterator[tuple[int, bytes]]:
    """(item type, content) for each item of a variable field (PS3.8 9.3.2)."""
    offset = 0
    while offset < len(data):
        if len(data) - offset < _ITEM_HEADER.size:
            raise ProtocolError(f"{where} ends inside an item header")
        item_type, length = _ITEM_HEADER.unpack_from(data, offset)
        start = offset + _ITEM_HEADER.size
        if start + length > len(data):
            raise ProtocolError(f"{where}: item 0x{item_type:02X} of {length} bytes overruns its PDU")
        yield item_type, data[start : start + length]
        offset = start + length


def _text(value: bytes) -> str:
    # UIDs may arrive padded with a NUL, AE titles with spaces.
    return value.decode("ascii", "replace").strip("\x00 ")


def parse_associate_rq(body: bytes) -> AssociateRequest:
    """The fields of an A-ASSOCIATE-RQ PDU body (after its 6-byte header) that an acceptor needs."""
    if len(body) < _FIXED_FIELDS.size:
        raise ProtocolError(f"A-ASSOCIATE-RQ of {len(body)} bytes is shorter than its fixed fields")
    version, _, called, calling = _FIXED_FIELDS.unpack_from(body)
    application_context, maximum_length = "", 0
    contexts: dict[int, tuple[str, tuple[str, ...]]] = {}
    for item_type, content in _items(body[_FIXED_FIELDS.size :], "A-ASSOCIATE-RQ"):
        if item_type == _APPLICATION_CONTEXT_ITEM:
            application_context = _text(content)
        elif item_type == _CONTEXT_RQ_ITEM:
            if len(content) < 4:
                raise ProtocolError("presentation context item shorter than its context ID field")
            abstract, transfer = "", []
            for sub_type, value in _items(content[4:], "presentation context item"):
                if sub_type == _ABSTRACT_SYNTAX_ITEM:
                    abstract = _text(value)
                elif sub_type == _TRANSFER_SYNTAX_ITEM:
                    transfer.append(_text(value))
            contexts[content[0]] = (abstract, tuple(transfer))
        elif item_type == _USER_INFORMATION_ITEM:
            for sub_type, value in _items(content, "user information item"):
                if sub_type == _MAXIMUM_LENGTH_ITEM and len(value) == 4:
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
            results[context_id] = (_ABSTRACT_SYNTAX_NOT_SUPPORTED, proposed[0] if proposed else "")
            continue
        chosen = next((syntax for syntax in proposed if syntax in ours), None)
        if chosen in _UNCOMPRESSED:
            chosen = next(syntax for syntax in ours if syntax in proposed and syntax in _UNCOMPRESSED)
        if chosen is None:
            results[context_id] = (_TRANSFER_SYNTAXES_NOT_SUPPORTED, proposed[0] if proposed else "")
        else:
            results[context_id] = (_ACCEPTED, chosen)
    return results


def _item(item_type: int, content: bytes) -> bytes:
    return _ITEM_HEADER.pack(item_type, len(content)) + content


def encode_associate_ac(
    request: AssociateRequest, results: dict[int, tuple[int, str]], max_pdu: int
) -> bytes:
    """The A-ASSOCIATE-AC PDU accepting ``request`` with the negotiated ``results``."""
    body = bytearray(_FIXED_FIELDS.pack(0x0001, 0, request.called_aet, request.calling_aet))
    body += _item(_APPLICATION_CONTEXT_ITEM, _APPLICATION_CONTEXT.encode())
    for context_id, (result, syntax) in sorted(results.items()):
        content = struct.pack(">BxBx", context_id, result) + _item(_TRANSFER_SYNTAX_ITEM, syntax.encode())
        body += _item(_CONTEXT_AC_ITEM, content)
    user_information = (
        _item(_MAXIMUM_LENGTH_ITEM, struct.pack(">L", max_pdu))
        + _item(_IMPLEMENTATION_UID_ITEM, IMPLEMENTATION_CLASS_UID.encode())
        + _item(_IMPLEMENTATION_VERSION_ITEM, IMPLEMENTATION_VERSION_NAME.encode())
    )
    body += _item(_USER_INFORMATION_ITEM, user_information)
    return _PDU_HEADER.pack(_ASSOCIATE_AC, 0, len(body)) + body


def encode_associate_rj(rejection: tuple[int, int, int]) -> bytes:
    """The A-ASSOCIATE-RJ PDU for a (result, source, diagnostic) triple."""
    return _PDU_HEADER.pack(_ASSOCIATE_RJ, 0, 4) + struct.pack(">xBBB", *rejection)


class _Association:
    """One accepted connection, from A-ASSOCIATE-RQ to release or abort."""

    def __init__(self, sock: socket.socket, address: tuple, server: StorageAcceptor) -> None:
        self.sock, self.server = sock, server
        self.where = f"{address[0]}:{address[1]}"
        self.calling_aet = ""
        self.contexts: dict[int, UID] = {}
        self.peer_max_pdu = 0
        self._buffer = bytearray(1 << 16)

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
            self._send_quietly(_ABORT_PDU)
        except ProtocolError as exc:
            LOGGER.warning("association from %r at %s aborted: %s", self.calling_aet, self.where, exc)
            self._send_quietly(_ABORT_PDU)
        except OSError as exc:
            LOGGER.warning("association from %r at %s lost: %s", self.calling_aet, self.where, exc)
        except Exception:  # a bug here must end this association, logged, not the server
            LOGGER.exception("association from %r at %s failed", self.calling_aet, self.where)
            self._send_quietly(_ABORT_PDU)

    def _send_quietly(self, data: bytes) -> None:
        try:
            self.sock.sendall(data)
        except OSError:
            pass

    def _recv_into(self, view: memoryview) -> None:
        received = 0
        while received < len(view):
            count = self.sock.recv_into(view[received:])
            if count == 0:
                raise ConnectionError("the peer closed the connection in the middle of a PDU")
            received += count

    def _read_pdu(self, limit: int) -> tuple[int, memoryview]:
        """The next PDU's type and body; the body is valid until the next call."""
        header = bytearray(_PDU_HEADER.size)
        received = self.sock.recv_into(header)
        if received == 0:
            raise ConnectionError("the peer closed the connection without releasing the association")
        if received < len(header):
            self._recv_into(memoryview(header)[received:])
        pdu_type, _, length = _PDU_HEADER.unpack(header)
        if length > limit:
            raise ProtocolError(f"PDU type 0x{pdu_type:02X} of {length} bytes is over the limit of {limit}")
        if length > len(self._buffer):
            self._buffer = bytearray(length)
        body = memoryview(self._buffer)[:length]
        self._recv_into(body)
        return pdu_type, body

    def _negotiate(self) -> bool:
        pdu_type, body = self._read_pdu(limit=_MAX_ASSOCIATE_RQ)
        if pdu_type != _ASSOCIATE_RQ:
            raise ProtocolError(f"expected an A-ASSOCIATE-RQ, got PDU type 0x{pdu_type:02X}")
        request = parse_associate_rq(bytes(body))
        self.calling_aet = _text(request.calling_aet)
        reason, rejection = self.server.admit(self.calling_aet), REJECT_CALLING_AET
        if reason is None and not request.protocol_version & 0x0001:
            reason, rejection = f"protocol version 0x{request.protocol_version:04X}", REJECT_PROTOCOL_VERSION
        if reason is None and request.application_context != _APPLICATION_CONTEXT:
            reason = f"application context {request.application_context!r} is not DICOM's"
            rejection = REJECT_APPLICATION_CONTEXT
        if reason is None and not self.server.take_slot():
            reason, rejection = "too many concurrent associations", REJECT_BUSY
        if reason is not None:
            LOGGER.warning("rejected association from %r at %s: %s", self.calling_aet, self.where, reason)
            self.sock.sendall(encode_associate_rj(rejection))
            return False
        results = negotiate(request, self.server.syntaxes)
        self.contexts = {cid: UID(syntax) for cid, (result, syntax) in results.items() if result == _ACCEPTED}
        self.peer_max_pdu = request.maximum_length
        self.sock.sendall(encode_associate_ac(request, results, self.server.max_pdu))
        LOGGER.debug("accepted association from %r at %s", self.calling_aet, self.where)
        return True

    def _data_phase(self) -> None:
        command: Command | None = None
        command_context = 0
        fragments: list[bytes] = []
        while True:
            pdu_type, body = self._read_pdu(limit=self.server.max_pdu or _MAX_UNLIMITED_PDU)
            if pdu_type == _RELEASE_RQ:
                if command is not None or fragments:
                    LOGGER.warning("%r released the association in the middle of a message", self.calling_aet)
                self.sock.sendall(_RELEASE_RP_PDU)
                return
            if pdu_type == _ABORT:
                if command is not None or fragments:
                    LOGGER.warning("%r aborted the association in the middle of a message", self.calling_aet)
                return
            if pdu_type != _P_DATA_TF:
                raise ProtocolError(f"unexpected PDU type 0x{pdu_type:02X} in the data transfer phase")
            for context_id, control, fragment in iter_pdvs(body):
                if context_id not in self.contexts:
                    raise ProtocolError(f"PDV on presentation context {context_id}, which was not accepted")
                if command is not None and context_id != command_context:
                    raise ProtocolError(
                        f"data set on context {context_id} for a command sent on context {command_context}"
                    )
                is_command = bool(control & _COMMAND_BIT)
                if is_command and command is not None:
                    raise ProtocolError("a command arrived before the previous command's data set")
                if not is_command and command is None:
                    raise ProtocolError("a data set fragment arrived without its command")
                fragments.append(bytes(fragment))
                if not control & _LAST_BIT:
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
            instance = ReceivedInstance(
                sop_class_uid=command.sop_class_uid,
                sop_instance_uid=command.sop_instance_uid,
                transfer_syntax=self.contexts[context_id],
                dataset=dataset,
                source_aet=self.calling_aet,
                peer=f"{self.calling_aet}@{self.where}",
            )
            try:
                status = self.server.on_store(instance)
            except Exception:
                LOGGER.exception(
                    "C-STORE %s from %r: store handler failed", instance.sop_instance_uid, self.where
                )
                status = STATUS_PROCESSING_FAILURE
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
