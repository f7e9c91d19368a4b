from __future__ import annotations

import struct
from pathlib import Path
from typing import Any

import numpy as np

from fundus_restore.tfevents import EventFileWriter, crc32c, masked_crc32c
from fundus_restore.train import ScalarLog


def read_records(path: Path) -> list[bytes]:
    """The TFRecords of ``path``, each checked against both of its CRCs."""
    data, records, at = path.read_bytes(), [], 0
    while at < len(data):
        length_bytes = data[at:at + 8]
        (length,) = struct.unpack("<Q", length_bytes)
        (length_crc,) = struct.unpack("<I", data[at + 8:at + 12])
        assert length_crc == masked_crc32c(length_bytes)
        payload = data[at + 12:at + 12 + length]
        (payload_crc,) = struct.unpack("<I", data[at + 12 + length:at + 16 + length])
        assert payload_crc == masked_crc32c(payload)
        records.append(payload)
        at += 16 + length
    assert at == len(data)
    return records


def read_varint(data: bytes, at: int) -> tuple[int, int]:
    value, shift = 0, 0
    while True:
        byte = data[at]
        value |= (byte & 0x7F) << shift
        at, shift = at + 1, shift + 7
        if byte < 0x80:
            return value, at


def read_fields(data: bytes) -> list[tuple[int, Any]]:
    """(field number, value) pairs of a protocol buffer: ints, raw bytes, or the 4 or 8 fixed bytes."""
    fields, at = [], 0
    while at < len(data):
        key, at = read_varint(data, at)
        field, wire_type = key >> 3, key & 7
        if wire_type == 0:
            value, at = read_varint(data, at)
        elif wire_type == 2:
            length, at = read_varint(data, at)
            value, at = data[at:at + length], at + length
        else:
            size = {1: 8, 5: 4}[wire_type]
            value, at = data[at:at + size], at + size
        fields.append((field, value))
    return fields


def decode_event(record: bytes) -> dict[str, Any]:
    event: dict[str, Any] = {"scalars": {}}
    for field, value in read_fields(record):
        if field == 1:
            (event["wall_time"],) = struct.unpack("<d", value)
        elif field == 2:
            event["step"] = value
        elif field == 3:
            event["file_version"] = value.decode()
        elif field == 7:
            event["session_status"] = dict(read_fields(value))[1]
        elif field == 5:
            for summary_field, summary_value in read_fields(value):
                assert summary_field == 1
                tag_and_value = dict(read_fields(summary_value))
                (event["scalars"][tag_and_value[1].decode()],) = struct.unpack("<f", tag_and_value[2])
    return event


def read_events(path: Path) -> list[dict[str, Any]]:
    return [decode_event(record) for record in read_records(path)]


def test_crc32c_is_the_castagnoli_checksum() -> None:
    assert crc32c(b"123456789") == 0xE3069283
    assert crc32c(b"") == 0


def test_writer_round_trip(tmp_path: Path) -> None:
    writer = EventFileWriter(tmp_path, start_step=7)
    assert writer.path.name.startswith("events.out.tfevents.")
    writer.add_scalars(0, {"val/psnr": 31.234567, "val/ssim": 0.912345}, wall_time=1700000000.25)
    writer.add_scalars(300, {"train/loss": 1.5e-3, "train/lr": -2.0}, wall_time=1700000001.5)
    writer.add_scalars(2**40, {"train/loss": 1e39})  # a step beyond 32 bits; a value beyond float32

    first, start, *steps = read_events(writer.path)
    assert first["file_version"] == "brain.Event:2" and first["scalars"] == {}
    assert start["step"] == 7 and start["session_status"] == 1 and start["scalars"] == {}  # SessionLog START
    assert [event["step"] for event in steps] == [0, 300, 2**40]
    assert [event["wall_time"] for event in steps[:2]] == [1700000000.25, 1700000001.5]
    assert steps[0]["scalars"] == {"val/psnr": np.float32(31.234567), "val/ssim": np.float32(0.912345)}
    assert steps[1]["scalars"] == {"train/loss": np.float32(1.5e-3), "train/lr": -2.0}
    assert steps[2]["scalars"] == {"train/loss": np.inf}
    assert all("file_version" not in event and "session_status" not in event for event in steps)


def test_each_writer_opens_its_own_file(tmp_path: Path) -> None:
    first, second = EventFileWriter(tmp_path), EventFileWriter(tmp_path)  # within one second
    first.add_scalars(1, {"a": 1.0})
    second.add_scalars(1, {"a": 2.0})
    assert first.path != second.path
    assert [event["scalars"] for event in read_events(first.path)[2:]] == [{"a": 1.0}]
    assert [event["scalars"] for event in read_events(second.path)[2:]] == [{"a": 2.0}]


def test_scalar_log_writes_an_event_file_and_a_new_one_on_resume(tmp_path: Path) -> None:
    log = ScalarLog(tmp_path)
    log.write(1, {"train/loss": 0.5})
    log.write(2, {"train/loss": 0.25})
    resumed = ScalarLog(tmp_path, resume_step=1)
    resumed.write(2, {"train/loss": 0.125})

    files = sorted(tmp_path.glob("events.out.tfevents.*"))
    assert files == sorted([log.events.path, resumed.events.path]) and len(files) == 2
    start, *old = read_events(log.events.path)[1:]
    assert (start["step"], start["session_status"]) == (0, 1)
    logged = [(event["step"], event["scalars"]) for event in old]
    assert logged == [(1, {"train/loss": 0.5}), (2, {"train/loss": 0.25})]  # the old file is left as it was
    restart, again = read_events(resumed.events.path)[1:]
    assert (restart["step"], restart["session_status"]) == (2, 1)  # TensorBoard drops the old file's step 2
    assert (again["step"], again["scalars"]) == (2, {"train/loss": 0.125})
