"""Associations we open to a PACS to send C-MOVE and C-GET, on plain sockets.

Why not pynetdicom's requestor for these two: while a PACS works through a retrieve, pynetdicom's
two threads per association poll every millisecond and each pending response is decoded through
its primitive and state machine objects; on a C-GET every instance also crosses its PDU objects.
On a 2-core machine that cost ~1 ms (C-MOVE) and ~10 ms (C-GET) of GIL-bound CPU per instance on
top of receiving it, which halved a C-MOVE pull's rate against dcmtk's ``movescu`` sending the same
requests to the same receiver (bench/retrieval_throughput.py). This module speaks the upper
layer protocol itself, as ``ingest.dicom.acceptor`` does for the receiving side: it proposes the
presentation contexts (and, for C-GET, the SCP role for the storage classes), sends one request at
a time, and reads the responses on the calling thread, answering the C-STORE sub-operations of a
C-GET through the same ``on_store`` handler the Storage SCP uses. C-ECHO and C-FIND stay on
pynetdicom: they move no pixel data.
"""

from __future__ import annotations

import io
import logging
import socket
import struct
import time
from collections.abc import Sequence
from dataclasses import dataclass

from pydicom.dataset import Dataset
from pydicom.uid import UID, ExplicitVRLittleEndian, ImplicitVRLittleEndian
from pynetdicom.dsutils import decode, encode

from ingest.dicom.upper_layer import (
    ABORT,
    ABORT_BY_USER_PDU,
    ABSTRACT_SYNTAX_ITEM,
    ACCEPTED,
    AFFECTED_SOP_CLASS,
    APPLICATION_CONTEXT,
    APPLICATION_CONTEXT_ITEM,
    ASSOCIATE_AC,
    ASSOCIATE_RJ,
    ASSOCIATE_RQ,
    C_CANCEL_RQ,
    C_GET_RQ,
    C_MOVE_RQ,
    C_STORE_RQ,
    COMMAND_BIT,
    COMMAND_FIELD,
    CONTEXT_AC_ITEM,
    CONTEXT_RQ_ITEM,
    DATA_SET_TYPE,
    FIXED_FIELDS,
    LAST_BIT,
    MAX_UNLIMITED_PDU,
    MAXIMUM_LENGTH_ITEM,
    MESSAGE_ID,
    MESSAGE_ID_RESPONDED,
    MOVE_DESTINATION,
    NO_DATA_SET,
    P_DATA_TF,
    PDU_HEADER,
    PRIORITY,
    RELEASE_RP,
    RELEASE_RP_PDU,
    RELEASE_RQ,
    RELEASE_RQ_PDU,
    RESPONSE_BIT,
    ROLE_SELECTION_ITEM,
    STATUS,
    TRANSFER_SYNTAX_ITEM,
    USER_INFORMATION_ITEM,
    Command,
    PduReader,
    ProtocolError,
    StoreHandler,
    command_elements,
    command_from_elements,
    encode_command,
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

LOGGER = logging.getLogger("ingest.dicom.requestor")

# The syntaxes proposed for the query/retrieve context; its command sets are implicit VR anyway.
REQUEST_SYNTAXES = (ExplicitVRLittleEndian, ImplicitVRLittleEndian)
_PENDING = frozenset({struct.pack("<H", 0xFF00), struct.pack("<H", 0xFF01)})  # raw Status values
# A-ASSOCIATE-RJ fields in words (PS3.8 9.3.4).
_REJECT_RESULTS = {0x01: "Rejected (Permanent)", 0x02: "Rejected (Transient)"}
_REJECT_SOURCES = {
    0x01: "Service User",
    0x02: "Service Provider (ACSE)",
    0x03: "Service Provider (Presentation)",
}
_REJECT_REASONS = {
    (0x01, 0x01): "No reason given",
    (0x01, 0x02): "Application context name not supported",
    (0x01, 0x03): "Calling AE title not recognised",
    (0x01, 0x07): "Called AE title not recognised",
    (0x02, 0x01): "No reason given",
    (0x02, 0x02): "Protocol version not supported",
    (0x03, 0x01): "Temporary congestion",
    (0x03, 0x02): "Local limit exceeded",
}


class AssociationRejected(Exception):
    """The PACS answered our A-ASSOCIATE-RQ with an A-ASSOCIATE-RJ."""

    def __init__(self, result: int, source: int, reason: int) -> None:
        self.result, self.source, self.reason = result, source, reason
        super().__init__(self.describe())

    @property
    def permanent(self) -> bool:
        return self.result == 0x01

    def describe(self) -> str:
        result = _REJECT_RESULTS.get(self.result, f"result 0x{self.result:02X}")
        source = _REJECT_SOURCES.get(self.source, f"0x{self.source:02X}")
        reason = _REJECT_REASONS.get((self.source, self.reason), f"0x{self.reason:02X}")
        return f"{result}, source: {source}, reason: {reason}"


def _ae_field(title: str) -> bytes:
    return title.encode("ascii").ljust(16)


def encode_associate_rq(
    calling_aet: str,
    called_aet: str,
    contexts: Sequence[tuple[str, Sequence[str]]],
    max_pdu: int,
    scp_role_classes: Sequence[str] = (),
) -> bytes:
    """An A-ASSOCIATE-RQ proposing ``contexts`` (IDs 1, 3, 5, ...), asking the SCP role for
    ``scp_role_classes`` (the storage classes a C-GET receives, PS3.7 D.3.3.4)."""
    if len(contexts) > 128:
        raise ValueError(f"{len(contexts)} presentation contexts: an association carries at most 128")
    body = bytearray(FIXED_FIELDS.pack(0x0001, 0, _ae_field(called_aet), _ae_field(calling_aet)))
    body += item(APPLICATION_CONTEXT_ITEM, APPLICATION_CONTEXT.encode())
    for index, (abstract, syntaxes) in enumerate(contexts):
        content = struct.pack(">BBBB", 2 * index + 1, 0, 0, 0) + item(ABSTRACT_SYNTAX_ITEM, abstract.encode())
        content += b"".join(item(TRANSFER_SYNTAX_ITEM, syntax.encode()) for syntax in syntaxes)
        body += item(CONTEXT_RQ_ITEM, content)
    user_information = implementation_items(max_pdu)
    for sop_class in dict.fromkeys(scp_role_classes):
        uid = sop_class.encode()
        # SCU role 0 with SCP role 1: we only receive this class's C-STOREs.
        user_information += item(ROLE_SELECTION_ITEM, struct.pack(">H", len(uid)) + uid + b"\x00\x01")
    body += item(USER_INFORMATION_ITEM, user_information)
    return PDU_HEADER.pack(ASSOCIATE_RQ, 0, len(body)) + body


def parse_associate_ac(body: bytes) -> tuple[dict[int, tuple[int, str]], int]:
    """(context ID -> (result, transfer syntax), the acceptor's maximum PDU length) of an A-ASSOCIATE-AC."""
    if len(body) < FIXED_FIELDS.size:
        raise ProtocolError(f"A-ASSOCIATE-AC of {len(body)} bytes is shorter than its fixed fields")
    results: dict[int, tuple[int, str]] = {}
    maximum_length = 0
    for item_type, content in iter_items(body[FIXED_FIELDS.size :], "A-ASSOCIATE-AC"):
        if item_type == CONTEXT_AC_ITEM:
            if len(content) < 4:
                raise ProtocolError("presentation context item shorter than its result field")
            syntax = next(
                (
                    text(value)
                    for sub, value in iter_items(content[4:], "context item")
                    if sub == TRANSFER_SYNTAX_ITEM
                ),
                "",
            )
            results[content[0]] = (content[2], syntax)
        elif item_type == USER_INFORMATION_ITEM:
            for sub_type, value in iter_items(content, "user information item"):
                if sub_type == MAXIMUM_LENGTH_ITEM and len(value) == 4:
                    (maximum_length,) = struct.unpack(">L", value)
    return results, maximum_length


@dataclass(frozen=True)
class Timeouts:
    """Seconds: ``connect`` for TCP, ``acse`` for A-ASSOCIATE and A-RELEASE answers, ``dimse`` for
    each PDU of a response (a PACS working through a large retrieve sends one per sub-operation),
    ``retrieve`` (None: none) for a whole C-MOVE or C-GET: past it the request is cancelled
    (C-CANCEL) and its final response, Cancel, awaited for up to ``dimse`` more."""

    connect: float
    acse: float
    dimse: float
    retrieve: float | None = None


class RequestorAssociation:
    """One established association: send C-MOVE / C-GET requests one at a time, then release.

    ``send_c_move`` and ``send_c_get`` return the final ``(status, identifier)``: ``status`` is the
    final response's command set as a Dataset (Status, NumberOf...Suboperations, ErrorComment),
    ``identifier`` the data set sent with it (Failed SOP Instance UID List) or None. When the
    association is lost, aborted or silent past the DIMSE timeout they return ``(Dataset(), None)``,
    the association is no longer established, and ``lost_reason`` says what happened.
    """

    def __init__(
        self,
        sock: socket.socket,
        pdus: PduReader,
        accepted: dict[int, tuple[str, UID]],
        peer_max_pdu: int,
        max_pdu: int,
        timeouts: Timeouts,
        peer: str,
        peer_aet: str,
        on_store: StoreHandler | None,
    ) -> None:
        self.sock = sock
        self.accepted = accepted
        self.peer_max_pdu, self.max_pdu = peer_max_pdu, max_pdu
        self.timeouts = timeouts
        self.peer, self.peer_aet = peer, peer_aet
        self.on_store = on_store
        self.pdus = pdus
        self.is_established = True
        self.lost_reason: str | None = None
        self.cancelled = False  # the last request ran past timeouts.retrieve and was cancelled
        self._deadline: float | None = None

    @classmethod
    def open(
        cls,
        host: str,
        port: int,
        *,
        calling_aet: str,
        called_aet: str,
        contexts: Sequence[tuple[str, Sequence[str]]],
        max_pdu: int,
        timeouts: Timeouts,
        scp_role_classes: Sequence[str] = (),
        on_store: StoreHandler | None = None,
    ) -> RequestorAssociation:
        """Connect and negotiate. Raises OSError (no connection), AssociationRejected, ProtocolError."""
        request = encode_associate_rq(calling_aet, called_aet, contexts, max_pdu, scp_role_classes)
        sock = socket.create_connection((host, port), timeout=timeouts.connect)
        pdus = PduReader(sock)
        try:
            sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
            sock.settimeout(timeouts.acse)
            sock.sendall(request)
            pdu_type, body = pdus.read(limit=1 << 20)
            if pdu_type == ASSOCIATE_RJ:
                if len(body) < 4:
                    raise ProtocolError("A-ASSOCIATE-RJ shorter than its fields")
                raise AssociationRejected(body[1], body[2], body[3])
            if pdu_type == ABORT:
                raise ConnectionError("the peer aborted the association request")
            if pdu_type != ASSOCIATE_AC:
                raise ProtocolError(f"expected an A-ASSOCIATE-AC, got PDU type 0x{pdu_type:02X}")
            results, peer_max_pdu = parse_associate_ac(bytes(body))
        except BaseException:
            sock.close()
            raise
        accepted = {
            context_id: (contexts[(context_id - 1) // 2][0], UID(syntax))
            for context_id, (result, syntax) in results.items()
            if result == ACCEPTED and context_id % 2 == 1 and (context_id - 1) // 2 < len(contexts)
        }
        return cls(
            sock,
            pdus,
            accepted,
            peer_max_pdu,
            max_pdu,
            timeouts,
            f"{called_aet}@{host}:{port}",
            called_aet,
            on_store,
        )

    def accepts(self, abstract_syntax: str) -> bool:
        return any(abstract == abstract_syntax for abstract, _ in self.accepted.values())

    def _context_for(self, abstract_syntax: str) -> tuple[int, UID]:
        for context_id, (abstract, syntax) in self.accepted.items():
            if abstract == abstract_syntax:
                return context_id, syntax
        raise ValueError(f"the PACS accepted no presentation context for {abstract_syntax}")

    def send_c_move(
        self, identifier: Dataset, move_aet: str, query_model: str, msg_id: int
    ) -> tuple[Dataset, Dataset | None]:
        destination = move_aet.encode("ascii")
        if len(destination) % 2:
            destination += b" "  # AE titles are padded with a space, not a NUL
        return self._retrieve(C_MOVE_RQ, identifier, query_model, msg_id, [(MOVE_DESTINATION, destination)])

    def send_c_get(
        self, identifier: Dataset, query_model: str, msg_id: int
    ) -> tuple[Dataset, Dataset | None]:
        return self._retrieve(C_GET_RQ, identifier, query_model, msg_id, [])

    def _retrieve(
        self,
        command_field: int,
        identifier: Dataset,
        query_model: str,
        msg_id: int,
        extra: list[tuple[int, bytes]],
    ) -> tuple[Dataset, Dataset | None]:
        context_id, syntax = self._context_for(query_model)
        encoded = encode(identifier, syntax.is_implicit_VR, syntax.is_little_endian)
        if encoded is None:
            raise ValueError(f"the identifier cannot be encoded in {syntax.name}")
        command = encode_command(
            [
                (AFFECTED_SOP_CLASS, query_model.encode()),
                (COMMAND_FIELD, struct.pack("<H", command_field)),
                (MESSAGE_ID, struct.pack("<H", msg_id)),
                *extra,
                (PRIORITY, struct.pack("<H", 0)),  # medium
                (DATA_SET_TYPE, struct.pack("<H", 0x0000)),  # an identifier follows
            ]
        )
        self.cancelled = False
        self._deadline = None if self.timeouts.retrieve is None else time.monotonic() + self.timeouts.retrieve
        try:
            self.sock.settimeout(self.timeouts.dimse)
            self.sock.sendall(
                p_data_tf(context_id, command, self.peer_max_pdu, command=True)
                + p_data_tf(context_id, encoded, self.peer_max_pdu, command=False)
            )
            return self._final_response(command_field | RESPONSE_BIT, msg_id, context_id)
        except TimeoutError:
            self._lose(f"no response within dimse_timeout={self.timeouts.dimse:g} s")
        except (OSError, ProtocolError) as exc:
            self._lose(str(exc))
        return Dataset(), None

    def _lose(self, reason: str) -> None:
        # The caller's retry logs the reason; an abort also ends what the PACS may still be sending.
        LOGGER.debug("association with %s lost: %s", self.peer, reason)
        self.lost_reason = reason
        self.abort()

    def _read_pdu(self, msg_id: int, context_id: int) -> tuple[int, memoryview]:
        """The next PDU of a retrieve's answer; past the retrieve deadline, cancel the request first."""
        limit = self.max_pdu or MAX_UNLIMITED_PDU
        if self._deadline is not None and not self.cancelled:
            remaining = self._deadline - time.monotonic()
            if remaining > 0:
                self.sock.settimeout(min(self.timeouts.dimse, remaining))
                try:
                    return self.pdus.read(limit=limit)  # resumable: a timeout keeps what arrived
                except TimeoutError:
                    if time.monotonic() < self._deadline:
                        raise
            self._cancel(msg_id, context_id)
        self.sock.settimeout(self.timeouts.dimse)
        return self.pdus.read(limit=limit)

    def _cancel(self, msg_id: int, context_id: int) -> None:
        LOGGER.warning(
            "retrieve %d on %s still running after retrieve_timeout=%g s: sending C-CANCEL",
            msg_id,
            self.peer,
            self.timeouts.retrieve,
        )
        self.cancelled = True
        command = encode_command(
            [
                (COMMAND_FIELD, struct.pack("<H", C_CANCEL_RQ)),
                (MESSAGE_ID_RESPONDED, struct.pack("<H", msg_id)),
                (DATA_SET_TYPE, struct.pack("<H", NO_DATA_SET)),
            ]
        )
        self.sock.settimeout(self.timeouts.dimse)
        self.sock.sendall(p_data_tf(context_id, command, self.peer_max_pdu, command=True))

    def _final_response(
        self, response_field: int, msg_id: int, request_context: int
    ) -> tuple[Dataset, Dataset | None]:
        """Read messages until the final response, answering C-STORE sub-operations on the way.

        Pending responses (one per sub-operation) are checked from their raw elements, not decoded:
        nothing here uses their counters, and decoding them was a tenth of a C-GET's CPU time."""
        fragments: list[bytes] = []
        command: bytes | None = None  # a command whose data set is still arriving
        command_context = 0
        while True:
            pdu_type, body = self._read_pdu(msg_id, request_context)
            if pdu_type == ABORT:
                raise ConnectionError("association aborted by the PACS")
            if pdu_type == RELEASE_RQ:
                send_quietly(self.sock, RELEASE_RP_PDU)
                raise ConnectionError("the PACS released the association in the middle of a retrieve")
            if pdu_type != P_DATA_TF:
                raise ProtocolError(f"unexpected PDU type 0x{pdu_type:02X} in the data transfer phase")
            for context_id, control, fragment in iter_pdvs(body):
                if context_id not in self.accepted:
                    raise ProtocolError(f"PDV on presentation context {context_id}, which was not accepted")
                fragments.append(bytes(fragment))
                if not control & LAST_BIT:
                    continue
                message, fragments = b"".join(fragments), []
                if control & COMMAND_BIT:
                    if command is not None:
                        raise ProtocolError("a command arrived before the previous command's data set")
                    values = command_elements(message)
                    if values.get(DATA_SET_TYPE) != struct.pack("<H", NO_DATA_SET):
                        command, command_context = message, context_id
                        continue  # its data set follows
                    data_set = None
                else:
                    if command is None or context_id != command_context:
                        raise ProtocolError("a data set arrived without its command")
                    data_set, message, command = message, command, None
                    values = command_elements(message)
                field = struct.unpack("<H", values.get(COMMAND_FIELD, b"\0\0"))[0]
                if field == C_STORE_RQ:
                    if data_set is None:
                        raise ProtocolError("a C-STORE request without a data set")
                    self._store(command_context, command_from_elements(values), data_set)
                    continue
                if field != response_field:
                    raise ProtocolError(f"unexpected command 0x{field:04X} during a retrieve")
                if values.get(MESSAGE_ID_RESPONDED) != struct.pack("<H", msg_id):
                    raise ProtocolError(f"a response to another message than {msg_id}")
                if values.get(STATUS) in _PENDING:
                    continue
                status = decode(io.BytesIO(message), True, True)
                identifier = None
                if data_set is not None:
                    syntax = self.accepted[command_context][1]
                    identifier = decode(io.BytesIO(data_set), syntax.is_implicit_VR, syntax.is_little_endian)
                return status, identifier

    def _store(self, context_id: int, request: Command, data_set: bytes) -> None:
        """Answer one C-STORE sub-operation of a C-GET."""
        if self.on_store is None:
            raise ProtocolError("a C-STORE request on an association that does not store (C-MOVE)")
        syntax = self.accepted[context_id][1]
        status = store_received(self.on_store, request, syntax, data_set, self.peer_aet, self.peer)
        self.sock.sendall(
            p_data_tf(context_id, encode_response(request, status), self.peer_max_pdu, command=True)
        )

    def abort(self) -> None:
        if self.is_established:
            send_quietly(self.sock, ABORT_BY_USER_PDU)
        self._close()

    def release(self) -> None:
        """A-RELEASE-RQ, then wait (ACSE timeout) for the A-RELEASE-RP; abort if it does not come."""
        if not self.is_established:
            return
        try:
            self.sock.settimeout(self.timeouts.acse)
            self.sock.sendall(RELEASE_RQ_PDU)
            while True:
                pdu_type, _ = self.pdus.read(limit=self.max_pdu or MAX_UNLIMITED_PDU)
                if pdu_type in (RELEASE_RP, ABORT):
                    break
        except (OSError, ProtocolError) as exc:
            LOGGER.debug("release of the association with %s: %s; aborting", self.peer, exc)
            send_quietly(self.sock, ABORT_BY_USER_PDU)
        self._close()

    def _close(self) -> None:
        self.is_established = False
        try:
            self.sock.close()
        except OSError:
            pass
