"""TensorBoard event files, written without TensorBoard.

Training logs scalars where ``tensorboard --logdir RUN`` finds them, yet TensorBoard
(with protobuf and crc32c) is no dependency: for scalars the format is small enough to
write by hand. An event file is a sequence of TFRecords (the length as a little-endian
uint64, the masked CRC-32C of those 8 bytes, the data, the masked CRC-32C of the data),
each holding one serialized ``tensorflow.Event`` protocol buffer: the first names the
file version, the next a session start, each later one a step's ``Summary`` of scalar
values.
"""

from __future__ import annotations

import itertools
import math
import os
import socket
import struct
import time
from collections.abc import Mapping
from pathlib import Path

FILE_VERSION = "brain.Event:2"


def _crc32c_table() -> tuple[int, ...]:
    table = []
    for byte in range(256):
        crc = byte
        for _ in range(8):
            crc = (crc >> 1) ^ (0x82F63B78 if crc & 1 else 0)  # the Castagnoli polynomial, bit-reversed
        table.append(crc)
    return tuple(table)


_CRC32C_TABLE = _crc32c_table()


def crc32c(data: bytes) -> int:
    """CRC-32C (Castagnoli) of ``data``, the checksum TFRecords use (not zlib's CRC-32)."""
    crc = 0xFFFFFFFF
    for byte in data:
        crc = _CRC32C_TABLE[(crc ^ byte) & 0xFF] ^ (crc >> 8)
    return crc ^ 0xFFFFFFFF


def masked_crc32c(data: bytes) -> int:
    """The CRC as TFRecords store it: rotated and offset, so that data holding CRCs still checks well."""
    crc = crc32c(data)
    return (((crc >> 15) | (crc << 17)) + 0xA282EAD8) & 0xFFFFFFFF


def tfrecord(data: bytes) -> bytes:
    """``data`` framed as one TFRecord."""
    length = struct.pack("<Q", len(data))
    return length + struct.pack("<I", masked_crc32c(length)) + data + struct.pack("<I", masked_crc32c(data))


# Protocol buffer encoding: each field is a key (field number << 3 | wire type) and its value.
_VARINT, _FIXED64, _LENGTH_DELIMITED, _FIXED32 = 0, 1, 2, 5
_SESSION_START = 1  # SessionLog.SessionStatus.START


def _varint(value: int) -> bytes:
    value &= 0xFFFFFFFFFFFFFFFF  # a negative int64 is sent as its two's complement
    out = bytearray()
    while value > 0x7F:
        out.append(value & 0x7F | 0x80)
        value >>= 7
    out.append(value)
    return bytes(out)


def _key(field: int, wire_type: int) -> bytes:
    return _varint(field << 3 | wire_type)


def _length_delimited(field: int, payload: bytes) -> bytes:
    return _key(field, _LENGTH_DELIMITED) + _varint(len(payload)) + payload


def _float32(value: float) -> float:
    """``value`` as float32 holds it: beyond its range an infinity (``struct`` would raise instead)."""
    return value if math.isnan(value) or abs(value) <= 3.4028234663852886e38 else math.copysign(math.inf, value)


def _summary_value(tag: str, value: float) -> bytes:
    """A ``Summary.Value``: tag (1) and simple_value (2)."""
    return _length_delimited(1, tag.encode()) + _key(2, _FIXED32) + struct.pack("<f", _float32(value))


def event(wall_time: float, step: int, *, file_version: str | None = None,
          scalars: Mapping[str, float] | None = None, session_start: bool = False) -> bytes:
    """A serialized ``Event``: wall_time (1), step (2), file_version (3), summary (5), and
    session_log (7) with its status (1) START."""
    out = _key(1, _FIXED64) + struct.pack("<d", wall_time) + _key(2, _VARINT) + _varint(step)
    if file_version is not None:
        out += _length_delimited(3, file_version.encode())
    if scalars is not None:
        summary = b"".join(_length_delimited(1, _summary_value(tag, float(v))) for tag, v in scalars.items())
        out += _length_delimited(5, summary)
    if session_start:
        out += _length_delimited(7, _key(1, _VARINT) + _varint(_SESSION_START))
    return out


_file_numbers = itertools.count()  # tells apart files one process opens within a second


class EventFileWriter:
    """A new event file ``events.out.tfevents.<time>.<host>.<pid>.<n>`` in ``directory``,
    to which ``add_scalars`` appends one step at a time.

    The file opens with its version and a session start at ``start_step``: a run resumed
    at step k starts at k, and TensorBoard then drops what the folder's earlier files
    logged at k and after (for version 2 files it drops on that mark only, not when a step
    comes again; some of its readers take the first mark of a folder for the first run's
    start, so every file gets one)."""

    def __init__(self, directory: Path, *, start_step: int = 0) -> None:
        now = time.time()
        name = f"events.out.tfevents.{int(now)}.{socket.gethostname()}.{os.getpid()}.{next(_file_numbers)}"
        self.path = Path(directory) / name
        with open(self.path, "xb") as handle:  # "x": never append to or replace another writer's file
            handle.write(tfrecord(event(now, 0, file_version=FILE_VERSION)))
            handle.write(tfrecord(event(now, start_step, session_start=True)))

    def add_scalars(self, step: int, scalars: Mapping[str, float], wall_time: float | None = None) -> None:
        """Appends ``scalars`` (tag to value) at ``step``, closing the file again so that what is
        logged survives a kill and TensorBoard sees it at once."""
        record = tfrecord(event(time.time() if wall_time is None else wall_time, step, scalars=scalars))
        with open(self.path, "ab") as handle:
            handle.write(record)
