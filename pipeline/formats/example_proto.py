"""Just enough protobuf to read a `tf.train.Example`, without importing TensorFlow.

    message Example  { Features features = 1; }
    message Features { map<string, Feature> feature = 1; }   // entries: key = 1, value = 2
    message Feature  { oneof kind { BytesList bytes_list = 1; FloatList float_list = 2; Int64List int64_list = 3; } }
    message BytesList { repeated bytes value = 1; }
    message Int64List { repeated int64 value = 1 [packed = true]; }

Only the features asked for are decoded; the others are skipped by length, so
parsing a record costs one pass over its field headers, not over its bytes.
"""

from __future__ import annotations

import struct

_VARINT, _I64, _LEN, _I32 = 0, 1, 2, 5


class ExampleParseError(ValueError):
    """The bytes are not a well-formed tf.train.Example."""


def _varint(buf: memoryview, pos: int) -> tuple[int, int]:
    result = shift = 0
    while True:
        if pos >= len(buf):
            raise ExampleParseError("varint runs past the end of the message")
        byte = buf[pos]
        pos += 1
        result |= (byte & 0x7F) << shift
        if not byte & 0x80:
            return result, pos
        shift += 7
        if shift >= 70:
            raise ExampleParseError("varint longer than 10 bytes")


def _fields(buf: memoryview):
    """(field number, wire type, value) of every field; LEN values are memoryviews, others ints."""
    pos = 0
    end = len(buf)
    while pos < end:
        tag, pos = _varint(buf, pos)
        number, wire = tag >> 3, tag & 7
        if wire == _VARINT:
            value, pos = _varint(buf, pos)
        elif wire == _LEN:
            size, pos = _varint(buf, pos)
            if pos + size > end:
                raise ExampleParseError(f"field {number} claims {size} bytes, {end - pos} left")
            value, pos = buf[pos : pos + size], pos + size
        elif wire == _I64:
            value, pos = int.from_bytes(buf[pos : pos + 8], "little"), pos + 8
        elif wire == _I32:
            value, pos = int.from_bytes(buf[pos : pos + 4], "little"), pos + 4
        else:
            raise ExampleParseError(f"unsupported wire type {wire} (field {number})")
        if pos > end:
            raise ExampleParseError("message ends inside a field")
        yield number, wire, value


def _feature_values(feature: memoryview) -> list:
    """Values of one Feature: bytes, ints or floats."""
    values: list = []
    for number, wire, kind in _fields(feature):
        if wire != _LEN:
            raise ExampleParseError(f"Feature field {number} is not a list")
        for item_number, item_wire, item in _fields(kind):
            if item_number != 1:
                continue
            # Each list kind has one wire type per item (packed lists: LEN): anything else is damage,
            # and trusting it would let a 10-byte varint make bytes() allocate gigabytes.
            if number == 1:  # BytesList
                if item_wire != _LEN:
                    raise ExampleParseError(f"BytesList item has wire type {item_wire}, not a byte string")
                values.append(bytes(item))
            elif number == 3:  # Int64List: packed (LEN) or one varint per value
                if item_wire == _LEN:
                    pos = 0
                    while pos < len(item):
                        value, pos = _varint(item, pos)
                        values.append(value - (1 << 64) if value >= 1 << 63 else value)
                elif item_wire == _VARINT:
                    values.append(item - (1 << 64) if item >= 1 << 63 else item)
                else:
                    raise ExampleParseError(f"Int64List item has wire type {item_wire}")
            elif number == 2:  # FloatList: packed (LEN) or one fixed32 per value
                if item_wire == _LEN and len(item) % 4 == 0:
                    values.extend(struct.unpack(f"<{len(item) // 4}f", item))
                elif item_wire == _I32:
                    values.append(struct.unpack("<f", item.to_bytes(4, "little"))[0])
                else:
                    raise ExampleParseError(f"FloatList item has wire type {item_wire} or a length not a multiple of 4")
    return values


def parse_example(data: bytes, wanted: frozenset[str] | set[str]) -> dict[str, list]:
    """feature name -> list of values (bytes, int or float) for the `wanted` features present.

    Raises:
        ExampleParseError: `data` is not a well-formed tf.train.Example.
    """
    found: dict[str, list] = {}
    buf = memoryview(data)
    for number, wire, features in _fields(buf):
        if number != 1 or wire != _LEN:
            continue
        for entry_number, entry_wire, entry in _fields(features):
            if entry_number != 1 or entry_wire != _LEN:
                continue
            name = value = None
            for part_number, part_wire, part in _fields(entry):
                if part_wire != _LEN:
                    continue
                if part_number == 1:
                    name = bytes(part).decode("utf-8", errors="replace")
                elif part_number == 2:
                    value = part
            if name in wanted and value is not None:
                found[name] = _feature_values(value)  # a map key seen twice: the last wins, as in protobuf
    return found
