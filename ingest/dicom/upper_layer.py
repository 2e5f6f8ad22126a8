"""The DICOM upper layer (PS3.8 section 9) and the command sets (PS3.7) both ends of a pull share.

``ingest.dicom.acceptor`` (the Storage SCP a PACS pushes C-MOVE sub-operations to) and
``ingest.dicom.requestor`` (the associations we open to send C-MOVE and C-GET) speak the protocol
themselves on plain sockets, for the CPU cost measured in their docstrings; this module holds what
both need: PDU and item layouts, reading a PDU into a reused buffer, splitting and building
P-DATA-TF, and encoding and decoding command sets.
"""

from __future__ import annotations

import logging
import socket
import struct
from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass

from pydicom.uid import UID

LOGGER = logging.getLogger("ingest.dicom.upper_layer")

# Identifies this implementation in association negotiation and in the file meta of what it stores.
IMPLEMENTATION_CLASS_UID = UID("2.25.124424956662067966831314624402673137886")
IMPLEMENTATION_VERSION_NAME = "PEDXRAY_1"

# PDU types (PS3.8 9.3.1).
ASSOCIATE_RQ, ASSOCIATE_AC, ASSOCIATE_RJ = 0x01, 0x02, 0x03
P_DATA_TF, RELEASE_RQ, RELEASE_RP, ABORT = 0x04, 0x05, 0x06, 0x07
RELEASE_RQ_PDU = b"\x05\x00\x00\x00\x00\x04\x00\x00\x00\x00"
RELEASE_RP_PDU = b"\x06\x00\x00\x00\x00\x04\x00\x00\x00\x00"
ABORT_PDU = b"\x07\x00\x00\x00\x00\x04\x00\x00\x02\x00"  # source: service provider, reason not given
ABORT_BY_USER_PDU = b"\x07\x00\x00\x00\x00\x04\x00\x00\x00\x00"  # source: service user
APPLICATION_CONTEXT = "1.2.840.10008.3.1.1.1"
# A-ASSOCIATE-RQ/AC (PS3.8 9.3.2, 9.3.3): fixed fields, then items and user information sub-items.
FIXED_FIELDS = struct.Struct(">HH16s16s32x")
ITEM_HEADER = struct.Struct(">BxH")
APPLICATION_CONTEXT_ITEM, CONTEXT_RQ_ITEM, CONTEXT_AC_ITEM = 0x10, 0x20, 0x21
ABSTRACT_SYNTAX_ITEM, TRANSFER_SYNTAX_ITEM, USER_INFORMATION_ITEM = 0x30, 0x40, 0x50
MAXIMUM_LENGTH_ITEM, IMPLEMENTATION_UID_ITEM, IMPLEMENTATION_VERSION_ITEM = 0x51, 0x52, 0x55
ROLE_SELECTION_ITEM = 0x54
# Presentation context results (PS3.8 9.3.3.2).
ACCEPTED, ABSTRACT_SYNTAX_NOT_SUPPORTED, TRANSFER_SYNTAXES_NOT_SUPPORTED = 0x00, 0x03, 0x04
PDU_HEADER = struct.Struct(">BBL")
PDV_HEADER = struct.Struct(">LBB")
COMMAND_BIT, LAST_BIT = 0x01, 0x02
# With no maximum announced (max_pdu=0) a PDU's declared length is still bounded: a garbled length
# field must not make us allocate gigabytes. PACS send PDUs of 16 KiB to a few MiB.
MAX_UNLIMITED_PDU = 256 << 20

# DIMSE command fields (PS3.7 E.1); a response is its request's field | 0x8000.
C_STORE_RQ, C_GET_RQ, C_MOVE_RQ, C_ECHO_RQ = 0x0001, 0x0010, 0x0021, 0x0030
C_CANCEL_RQ = 0x0FFF
RESPONSE_BIT = 0x8000
NO_DATA_SET = 0x0101
STATUS_PROCESSING_FAILURE = 0x0110
# Command set element numbers (group 0000); command sets are implicit VR little endian.
AFFECTED_SOP_CLASS, COMMAND_FIELD, MESSAGE_ID, MESSAGE_ID_RESPONDED = 0x0002, 0x0100, 0x0110, 0x0120
MOVE_DESTINATION, PRIORITY, DATA_SET_TYPE, STATUS = 0x0600, 0x0700, 0x0800, 0x0900
AFFECTED_SOP_INSTANCE = 0x1000
_ELEMENT_HEADER = struct.Struct("<HHL")


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


# Spools one received instance and returns the C-STORE status to answer (never raises).
StoreHandler = Callable[[ReceivedInstance], int]


class PduReader:
    """Reads whole PDUs from a socket.

    It receives as much as the socket holds into one reused buffer and cuts PDUs out of it, so a
    radiograph sent as many 16 KiB-1 MiB PDUs costs a few ``recv`` calls, not two or more per PDU.
    """

    def __init__(self, sock: socket.socket, buffer_size: int = 1 << 18) -> None:
        self.sock = sock
        self._buffer = bytearray(buffer_size)
        self._start = 0  # first byte not yet handed out
        self._end = 0  # end of the bytes received

    def _fill(self, needed: int) -> None:
        """Receive until ``needed`` bytes from ``_start`` on are in the buffer."""
        if self._end - self._start >= needed:
            return
        if self._start + needed > len(self._buffer):
            # Move what is left to the front (the last PDU handed out is given up now), growing the
            # buffer for a PDU larger than it.
            pending = self._buffer[self._start : self._end]
            if needed > len(self._buffer):
                self._buffer = bytearray(needed)
            self._buffer[: len(pending)] = pending
            self._start, self._end = 0, len(pending)
        view = memoryview(self._buffer)
        while self._end - self._start < needed:
            count = self.sock.recv_into(view[self._end :])
            if count == 0:
                if self._end == self._start:
                    raise ConnectionError("the peer closed the connection without releasing the association")
                raise ConnectionError("the peer closed the connection in the middle of a PDU")
            self._end += count

    def read(self, limit: int) -> tuple[int, memoryview]:
        """The next PDU's type and body; the body is valid until the next call."""
        self._fill(PDU_HEADER.size)
        pdu_type, _, length = PDU_HEADER.unpack_from(self._buffer, self._start)
        if length > limit:
            raise ProtocolError(f"PDU type 0x{pdu_type:02X} of {length} bytes is over the limit of {limit}")
        self._fill(PDU_HEADER.size + length)
        body_start = self._start + PDU_HEADER.size
        self._start = body_start + length
        return pdu_type, memoryview(self._buffer)[body_start : self._start]


def send_quietly(sock: socket.socket, data: bytes) -> None:
    """Send an A-ABORT or A-RELEASE-RP on a connection that may already be gone."""
    try:
        sock.sendall(data)
    except OSError:
        pass


def iter_pdvs(body: memoryview) -> Iterator[tuple[int, int, memoryview]]:
    """(presentation context ID, message control header, fragment) for each PDV of a P-DATA-TF."""
    offset, end = 0, len(body)
    while offset < end:
        if end - offset < PDV_HEADER.size:
            raise ProtocolError("P-DATA-TF ends inside a PDV item header")
        length, context_id, control = PDV_HEADER.unpack_from(body, offset)
        if length < 2 or offset + 4 + length > end:
            raise ProtocolError(f"PDV item length {length} does not fit its P-DATA-TF")
        yield context_id, control, body[offset + 6 : offset + 4 + length]
        offset += 4 + length


def p_data_tf(context_id: int, data: bytes, max_pdu: int, *, command: bool) -> bytes:
    """``data`` as P-DATA-TF PDUs no longer than the peer's ``max_pdu`` (0 = unlimited)."""
    chunk = max(len(data) if max_pdu == 0 else max_pdu - PDV_HEADER.size, 1)
    pieces = [data[i : i + chunk] for i in range(0, len(data), chunk)] or [b""]
    out = bytearray()
    for i, piece in enumerate(pieces):
        control = (COMMAND_BIT if command else 0) | (LAST_BIT if i == len(pieces) - 1 else 0)
        pdv = PDV_HEADER.pack(len(piece) + 2, context_id, control) + piece
        out += PDU_HEADER.pack(P_DATA_TF, 0, len(pdv)) + pdv
    return bytes(out)


def iter_items(data: bytes, where: str) -> Iterator[tuple[int, bytes]]:
    """(item type, content) for each item of a variable field (PS3.8 9.3.2)."""
    offset = 0
    while offset < len(data):
        if len(data) - offset < ITEM_HEADER.size:
            raise ProtocolError(f"{where} ends inside an item header")
        item_type, length = ITEM_HEADER.unpack_from(data, offset)
        start = offset + ITEM_HEADER.size
        if start + length > len(data):
            raise ProtocolError(f"{where}: item 0x{item_type:02X} of {length} bytes overruns its PDU")
        yield item_type, data[start : start + length]
        offset = start + length


def item(item_type: int, content: bytes) -> bytes:
    return ITEM_HEADER.pack(item_type, len(content)) + content


def implementation_items(max_pdu: int) -> bytes:
    """The user information sub-items both ends send: maximum length, implementation UID and name."""
    return (
        item(MAXIMUM_LENGTH_ITEM, struct.pack(">L", max_pdu))
        + item(IMPLEMENTATION_UID_ITEM, IMPLEMENTATION_CLASS_UID.encode())
        + item(IMPLEMENTATION_VERSION_ITEM, IMPLEMENTATION_VERSION_NAME.encode())
    )


def text(value: bytes) -> str:
    # UIDs may arrive padded with a NUL, AE titles with spaces.
    return value.decode("ascii", "replace").strip("\x00 ")


@dataclass(frozen=True)
class Command:
    """The command set fields a C-STORE or C-ECHO receiver reads (PS3.7 9.3.1.1, 9.3.5.1)."""

    command_field: int
    message_id: int
    has_data_set: bool
    sop_class_uid: str
    sop_instance_uid: str


def command_elements(message: bytes) -> dict[int, bytes]:
    """Element number -> raw value of a command set; ProtocolError if it is malformed."""
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
    return values


def decode_command(message: bytes) -> Command:
    """Read a request's command set; raise ProtocolError if it is malformed or lacks a required field."""
    return command_from_elements(command_elements(message))


def command_from_elements(values: dict[int, bytes]) -> Command:
    """The request fields of a command set already split by ``command_elements``."""
    try:
        (command_field,) = struct.unpack("<H", values[COMMAND_FIELD])
        (message_id,) = struct.unpack("<H", values[MESSAGE_ID])
        (data_set_type,) = struct.unpack("<H", values[DATA_SET_TYPE])
    except (KeyError, struct.error) as exc:
        raise ProtocolError("command set lacks Command Field, Message ID or Command Data Set Type") from exc
    return Command(
        command_field=command_field,
        message_id=message_id,
        has_data_set=data_set_type != NO_DATA_SET,
        sop_class_uid=text(values.get(AFFECTED_SOP_CLASS, b"")),
        sop_instance_uid=text(values.get(AFFECTED_SOP_INSTANCE, b"")),
    )


def store_received(
    on_store: StoreHandler, request: Command, syntax: UID, data_set: bytes, source_aet: str, peer: str
) -> int:
    """Hand one C-STORE request to ``on_store``; the status to answer, 0x0110 if the handler fails
    (logged: a bug there must fail that instance, not the association)."""
    instance = ReceivedInstance(
        sop_class_uid=request.sop_class_uid,
        sop_instance_uid=request.sop_instance_uid,
        transfer_syntax=syntax,
        dataset=data_set,
        source_aet=source_aet,
        peer=peer,
    )
    try:
        return on_store(instance)
    except Exception:
        LOGGER.exception("C-STORE %s from %s: store handler failed", request.sop_instance_uid, peer)
        return STATUS_PROCESSING_FAILURE


def encode_command(elements: Sequence[tuple[int, bytes]]) -> bytes:
    """A command set (implicit VR little endian) of (element number, value) pairs, in that order,
    behind its (0000,0000) Command Group Length."""
    encoded = b"".join(_command_element(number, value) for number, value in elements)
    return _command_element(0x0000, struct.pack("<L", len(encoded))) + encoded


def _command_element(element: int, value: bytes) -> bytes:
    if len(value) % 2:
        value += b"\x00"  # UIDs are padded to an even length with NUL
    return _ELEMENT_HEADER.pack(0x0000, element, len(value)) + value


def encode_response(request: Command, status: int) -> bytes:
    """The command set answering ``request`` with ``status``."""
    elements = [
        (AFFECTED_SOP_CLASS, request.sop_class_uid.encode()),
        (COMMAND_FIELD, struct.pack("<H", request.command_field | RESPONSE_BIT)),
        (MESSAGE_ID_RESPONDED, struct.pack("<H", request.message_id)),
        (DATA_SET_TYPE, struct.pack("<H", NO_DATA_SET)),
        (STATUS, struct.pack("<H", status)),
    ]
    if request.sop_instance_uid:
        elements.append((AFFECTED_SOP_INSTANCE, request.sop_instance_uid.encode()))
    return encode_command(elements)
