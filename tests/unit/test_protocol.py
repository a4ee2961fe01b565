"""Unit tests of the control-mailbox wire codec (vfiofs.abi.protocol).

Malformed requests come from arbitrary processes on the mount, so every malformation
must become one specific errno and nothing else.
"""

from __future__ import annotations

import errno
import struct

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from vfiofs.abi import protocol
from vfiofs.errors import ERRNO_MAX, ERRNO_MIN, VfioError
from vfiofs.abi.protocol import (
    ARG_BUFFER,
    ARG_NULL,
    ARG_VALUE,
    CONTROL_BASE,
    FD_FOREIGN,
    FD_HANDLE,
    FD_NOT_OPEN,
    FDREF_SIZE,
    MAX_FDS,
    MAX_MESSAGE,
    MAX_TAG,
    OP_GET_TOKEN,
    OP_IOCTL,
    REPLY_HEADER_SIZE,
    REQUEST_HEADER_SIZE,
    SLOT_SIZE,
    TOKEN_SIZE,
    FdRef,
    Reply,
    Request,
    control_offset,
    decode_reply,
    decode_request,
    encode_reply,
    encode_request,
    is_control_offset,
    slot_tag,
)

# Byte offsets of the request header fields (little-endian "<IHHIIIIQIIQ").
MAGIC_AT, VERSION_AT, HSIZE_AT, OP_AT, KIND_AT, NFDS_AT, PLEN_AT, RES0_AT, RES1_AT = 0, 4, 6, 8, 16, 20, 32, 36, 40
# Byte offsets of the reply header fields ("<IHHIIqII").
R_MAGIC_AT, R_VERSION_AT, R_HSIZE_AT, R_PLEN_AT = 0, 4, 6, 24

TOKEN_A = bytes(range(16))
TOKEN_B = bytes(range(100, 116))


def patched(message: bytes, offset: int, fmt: str, value: int) -> bytes:
    """``message`` with one header field overwritten."""
    out = bytearray(message)
    struct.pack_into(fmt, out, offset, value)
    return bytes(out)


def fdref(fd: int, kind: int, token: bytes = bytes(TOKEN_SIZE)) -> bytes:
    return struct.pack("<iI16s", fd, kind, token)


def decode_errno(message: bytes) -> int:
    with pytest.raises(VfioError) as exc:
        decode_request(message)
    return exc.value.errno


def valid_request() -> bytes:
    return encode_request(
        Request(OP_IOCTL, 0x3B76, ARG_BUFFER, payload=b"\x18\0\0\0" + bytes(20), fds={5: FdRef(FD_HANDLE, TOKEN_A)})
    )


# --- sizes and constants --------------------------------------------------------------


def test_header_sizes_match_the_specification():
    assert REQUEST_HEADER_SIZE == 48
    assert FDREF_SIZE == 24
    assert REPLY_HEADER_SIZE == 32
    assert protocol.MAGIC == int.from_bytes(b"VFFS", "little")
    assert encode_request(Request(OP_GET_TOKEN))[:4] == b"VFFS"


# --- round trips -------------------------------------------------------------------------


@pytest.mark.parametrize(
    "req",
    [
        Request(OP_GET_TOKEN),
        Request(OP_IOCTL, 0x3B6F, ARG_NULL),
        Request(OP_IOCTL, 0x3B6F, ARG_VALUE, arg_value=0xDEAD_BEEF_0123_4567),
        Request(OP_IOCTL, 0x3B6B, ARG_BUFFER, payload=b"\x10\0\0\0" + bytes(12)),
        Request(OP_IOCTL, 0x3B6B, ARG_BUFFER, payload=b""),
        Request(
            OP_IOCTL,
            0x3B76,
            ARG_BUFFER,
            payload=bytes(24),
            fds={
                3: FdRef(FD_HANDLE, TOKEN_A),
                0: FdRef(FD_FOREIGN),
                7: FdRef(FD_NOT_OPEN),
                2**31 - 1: FdRef(FD_HANDLE, TOKEN_B),
            },
        ),
        Request(OP_IOCTL, 0xFFFF_FFFF, ARG_NULL, fds={9: FdRef(FD_FOREIGN)}),
    ],
    ids=["get-token", "null", "value", "buffer", "empty-buffer", "buffer-with-fds", "null-with-fd"],
)
def test_request_round_trip(req):
    message = encode_request(req)
    assert len(message) == REQUEST_HEADER_SIZE + len(req.fds) * FDREF_SIZE + len(req.payload)
    decoded = decode_request(message)
    assert decoded == req
    assert list(decoded.fds) == list(req.fds)  # fd order survives the trip
    assert encode_request(decoded) == message


def test_request_arg_value_is_carried_as_u64():
    """A negative value is sent as its two's complement: the wire field is unsigned."""
    decoded = decode_request(encode_request(Request(OP_IOCTL, 1, ARG_VALUE, arg_value=-1)))
    assert decoded.arg_value == 0xFFFF_FFFF_FFFF_FFFF


def test_request_accepts_exactly_max_message():
    payload = bytes(MAX_MESSAGE - REQUEST_HEADER_SIZE)
    message = encode_request(Request(OP_IOCTL, 1, ARG_BUFFER, payload=payload))
    assert len(message) == MAX_MESSAGE
    assert decode_request(message).payload == payload


def test_request_accepts_max_fds():
    fds = {fd: FdRef(FD_NOT_OPEN) for fd in range(MAX_FDS)}
    assert decode_request(encode_request(Request(OP_IOCTL, 1, ARG_NULL, fds=fds))).fds == fds


@pytest.mark.parametrize(
    "reply",
    [
        Reply(OP_GET_TOKEN, 0, 0, TOKEN_A),
        Reply(OP_IOCTL, 0x3B6F, 0, b""),
        Reply(OP_IOCTL, 0x3B76, 7, bytes(range(24))),
        Reply(OP_IOCTL, 0xFFFF_FFFF, -1, b"x"),
        Reply(OP_IOCTL, 1, 2**63 - 1, b""),
    ],
)
def test_reply_round_trip(reply):
    message = encode_reply(reply)
    assert len(message) == REPLY_HEADER_SIZE + len(reply.payload)
    assert decode_reply(message) == reply


# --- mailbox offsets -----------------------------------------------------------------------


def test_control_offset_of_tags():
    assert control_offset(0) == CONTROL_BASE
    assert control_offset(1) == CONTROL_BASE + SLOT_SIZE
    assert control_offset(MAX_TAG) == CONTROL_BASE + MAX_TAG * SLOT_SIZE
    # Even the last slot ends below the kernel's 2**63 limit on offset + count.
    assert control_offset(MAX_TAG) + SLOT_SIZE < 2**63


@pytest.mark.parametrize("tag", [-1, MAX_TAG + 1, 2**40])
def test_control_offset_rejects_tags_out_of_range(tag):
    with pytest.raises(ValueError):
        control_offset(tag)


@pytest.mark.parametrize("tag", [0, 1, 2, 12345, MAX_TAG - 1, MAX_TAG])
def test_slot_tag_inverts_control_offset(tag):
    assert slot_tag(control_offset(tag)) == tag


@pytest.mark.parametrize(
    "offset",
    [
        CONTROL_BASE + 1,
        CONTROL_BASE + SLOT_SIZE - 1,
        CONTROL_BASE + SLOT_SIZE + 4096,
        control_offset(MAX_TAG) + 8,
        CONTROL_BASE - SLOT_SIZE,  # a slot boundary, but below the window
        CONTROL_BASE - 1,
        0,
        CONTROL_BASE + (MAX_TAG + 1) * SLOT_SIZE,  # aligned, but the tag is too large
    ],
)
def test_slot_tag_rejects_misaligned_or_outside_offsets(offset):
    with pytest.raises(VfioError) as exc:
        slot_tag(offset)
    assert exc.value.errno == errno.EINVAL


@pytest.mark.parametrize(
    ("offset", "expected"),
    [
        (0, False),
        (8 << 40, False),  # a region offset (index << 40)
        (CONTROL_BASE - 1, False),
        (CONTROL_BASE, True),
        (CONTROL_BASE + 1, True),  # in the window even though not a slot start
        (control_offset(MAX_TAG), True),
    ],
)
def test_is_control_offset(offset, expected):
    assert is_control_offset(offset) is expected


# --- malformed requests ----------------------------------------------------------------------


@pytest.mark.parametrize("length", [0, 1, 4, REQUEST_HEADER_SIZE - 1])
def test_decode_rejects_short_request(length):
    assert decode_errno(valid_request()[:length]) == errno.EBADMSG


def test_decode_rejects_wrong_magic():
    assert decode_errno(patched(valid_request(), MAGIC_AT, "<I", int.from_bytes(b"VFFT", "little"))) == errno.EBADMSG


@pytest.mark.parametrize("version", [0, 2, 0xFFFF])
def test_decode_rejects_wrong_version(version):
    assert decode_errno(patched(valid_request(), VERSION_AT, "<H", version)) == errno.EPROTO


@pytest.mark.parametrize(
    ("offset", "fmt", "value"),
    [
        (HSIZE_AT, "<H", 0),
        (HSIZE_AT, "<H", REQUEST_HEADER_SIZE + 8),
        (RES0_AT, "<I", 1),
        (RES1_AT, "<Q", 1 << 63),
    ],
    ids=["hsize-0", "hsize-56", "reserved0", "reserved1"],
)
def test_decode_rejects_bad_header_size_or_reserved(offset, fmt, value):
    assert decode_errno(patched(valid_request(), offset, fmt, value)) == errno.EBADMSG


@pytest.mark.parametrize("op", [0, 6, 0xFFFF_FFFF])
def test_decode_rejects_unknown_op(op):
    assert decode_errno(patched(valid_request(), OP_AT, "<I", op)) == errno.EPROTO


@pytest.mark.parametrize("kind", [3, 0xFFFF_FFFF])
def test_decode_rejects_unknown_arg_kind(kind):
    assert decode_errno(patched(valid_request(), KIND_AT, "<I", kind)) == errno.EBADMSG


def test_decode_rejects_too_many_fds():
    """MAX_FDS + 1 well-formed references, lengths consistent: only the count is wrong."""
    fds = {fd: FdRef(FD_NOT_OPEN) for fd in range(MAX_FDS + 1)}
    message = encode_request(Request(OP_IOCTL, 1, ARG_NULL, fds=fds))
    assert len(message) == REQUEST_HEADER_SIZE + (MAX_FDS + 1) * FDREF_SIZE
    assert decode_errno(message) == errno.EBADMSG


def test_decode_rejects_huge_fd_count_without_reading_past_the_end():
    assert decode_errno(patched(valid_request(), NFDS_AT, "<I", 0xFFFF_FFFF)) == errno.EBADMSG


@pytest.mark.parametrize(
    "mangle",
    [
        lambda m: m[:-1],  # truncated payload
        lambda m: m + b"\0",  # trailing byte
        lambda m: patched(m, PLEN_AT, "<I", 25),  # payload length one too large
        lambda m: patched(m, PLEN_AT, "<I", 0xFFFF_FFFF),
        lambda m: patched(m, NFDS_AT, "<I", 2),  # one fd reference too many
        lambda m: patched(m, NFDS_AT, "<I", 0),  # fd reference counted as payload
    ],
    ids=["truncated", "trailing", "plen+1", "plen-max", "nfds+1", "nfds-0"],
)
def test_decode_rejects_lengths_that_do_not_add_up(mangle):
    assert decode_errno(mangle(valid_request())) == errno.EBADMSG


@pytest.mark.parametrize("kind", [ARG_NULL, ARG_VALUE])
def test_decode_rejects_payload_for_non_buffer_arg(kind):
    message = encode_request(Request(OP_IOCTL, 1, kind, payload=b"abcd"))
    assert decode_errno(message) == errno.EBADMSG


@pytest.mark.parametrize("op", [OP_GET_TOKEN, OP_IOCTL])
def test_decode_accepts_empty_payload_for_non_buffer_arg(op):
    assert decode_request(encode_request(Request(op, 1, ARG_VALUE, arg_value=3))).arg_value == 3


@pytest.mark.parametrize(
    "refs",
    [
        fdref(3, 0),  # kind 0 is not a kind
        fdref(3, 6),
        fdref(3, 0xFFFF_FFFF),
        fdref(-1, FD_FOREIGN),
        fdref(-(2**31), FD_HANDLE, TOKEN_A),
        fdref(3, FD_HANDLE, TOKEN_A) + fdref(3, FD_FOREIGN),  # duplicate fd
        fdref(4, FD_NOT_OPEN) + fdref(4, FD_NOT_OPEN),
    ],
    ids=["kind-0", "kind-6", "kind-max", "fd-minus-1", "fd-int-min", "dup-fd", "dup-identical"],
)
def test_decode_rejects_bad_fd_reference(refs):
    header = encode_request(Request(OP_IOCTL, 1, ARG_NULL))
    header = patched(header, NFDS_AT, "<I", len(refs) // FDREF_SIZE)
    assert decode_errno(header + refs) == errno.EBADMSG


@pytest.mark.parametrize(
    "message",
    [
        bytes(MAX_MESSAGE + 1),
        b"\xff" * (MAX_MESSAGE + 1000),
        valid_request() + bytes(MAX_MESSAGE),  # a valid header does not help
    ],
    ids=["zeros", "garbage", "valid-prefix"],
)
def test_decode_rejects_oversized_request(message):
    assert decode_errno(message) == errno.EMSGSIZE


def test_decode_rejects_oversized_request_with_consistent_lengths():
    payload = bytes(MAX_MESSAGE - REQUEST_HEADER_SIZE + 1)
    message = patched(encode_request(Request(OP_IOCTL, 1, ARG_BUFFER)), PLEN_AT, "<I", len(payload)) + payload
    assert decode_errno(message) == errno.EMSGSIZE


@pytest.mark.parametrize(
    "req",
    [
        Request(OP_IOCTL, 1, ARG_BUFFER, payload=bytes(MAX_MESSAGE - REQUEST_HEADER_SIZE + 1)),
        Request(OP_IOCTL, 1, ARG_BUFFER, payload=bytes(MAX_MESSAGE - REQUEST_HEADER_SIZE), fds={0: FdRef(FD_FOREIGN)}),
    ],
    ids=["payload", "payload-plus-fd"],
)
def test_encode_refuses_oversized_request(req):
    with pytest.raises(ValueError):
        encode_request(req)


# --- malformed replies ------------------------------------------------------------------------

GOOD_REPLY = encode_reply(Reply(OP_IOCTL, 0x3B76, 0, bytes(24)))


@pytest.mark.parametrize(
    "message",
    [
        b"",
        GOOD_REPLY[: REPLY_HEADER_SIZE - 1],
        patched(GOOD_REPLY, R_MAGIC_AT, "<I", 0),
        patched(GOOD_REPLY, R_VERSION_AT, "<H", 2),
        patched(GOOD_REPLY, R_HSIZE_AT, "<H", REQUEST_HEADER_SIZE),
        GOOD_REPLY[:-1],
        GOOD_REPLY + b"\0",
        patched(GOOD_REPLY, R_PLEN_AT, "<I", 0xFFFF_FFFF),
        valid_request(),  # a request is not a reply
    ],
    ids=["empty", "short", "magic", "version", "hsize", "truncated", "trailing", "plen-max", "request"],
)
def test_decode_reply_rejects_bad_replies(message):
    with pytest.raises(VfioError) as exc:
        decode_reply(message)
    assert exc.value.errno == errno.EBADMSG


# --- fuzzing -----------------------------------------------------------------------------------

fd_refs = st.builds(
    FdRef,
    kind=st.sampled_from([FD_NOT_OPEN, FD_FOREIGN, FD_HANDLE]),
    token=st.binary(min_size=TOKEN_SIZE, max_size=TOKEN_SIZE),
)
requests = st.builds(
    Request,
    op=st.sampled_from([OP_IOCTL, OP_GET_TOKEN]),
    request=st.integers(0, 2**32 - 1),
    arg_kind=st.sampled_from([ARG_NULL, ARG_VALUE]),
    arg_value=st.integers(0, 2**64 - 1),
    fds=st.dictionaries(st.integers(0, 2**31 - 1), fd_refs, max_size=4),
) | st.builds(
    Request,
    op=st.just(OP_IOCTL),
    request=st.integers(0, 2**32 - 1),
    arg_kind=st.just(ARG_BUFFER),
    payload=st.binary(max_size=64),
    fds=st.dictionaries(st.integers(0, 2**31 - 1), fd_refs, max_size=4),
)


@st.composite
def flipped_requests(draw) -> bytes:
    """A valid request with a few bytes replaced, and maybe cut short or extended."""
    message = bytearray(encode_request(draw(requests)))
    for _ in range(draw(st.integers(1, 4))):
        message[draw(st.integers(0, len(message) - 1))] = draw(st.integers(0, 255))
    end = draw(st.integers(0, len(message) + 8))
    return bytes(message[:end]) + bytes(max(0, end - len(message)))


@settings(max_examples=500, deadline=None)
@given(st.binary(max_size=512) | flipped_requests() | st.builds(encode_request, requests))
def test_decode_request_never_fails_unexpectedly(message):
    """Any input is either a request or a VfioError with a deliverable errno."""
    try:
        decoded = decode_request(message)
    except VfioError as exc:
        assert ERRNO_MIN <= exc.errno <= ERRNO_MAX
        assert exc.errno in (errno.EBADMSG, errno.EPROTO, errno.EMSGSIZE)
    else:
        assert isinstance(decoded, Request)
        assert encode_request(decoded) == message  # what was accepted is canonical
