"""The shape-keys result file (kind "shape_keys"): a model's expression offsets for one face.

Binary, little-endian:
    b"FRSK" | u32 version (1) | u32 header length | header JSON (UTF-8) | per key: u32 vertex ids
    (count of them), then float32 offsets (count x 3)
Header: {"vertex_count": V, "frame": ..., "keys": [{"name", "value", "count"}, ...]}.
Offsets are in the OBJ's frame (metres, +Y up, face toward +Z), added to the neutral mesh (the
`<stem>_neutral.obj` beside it); `value` is the fitted weight, so neutral + Σ value × offsets is the
posed mesh `<stem>.obj`. Vertices a key does not move are left out of it.
"""
from __future__ import annotations

import json
import struct
import sys
from array import array
from dataclasses import dataclass

MAGIC = b"FRSK"
VERSION = 1
NEUTRAL_SUFFIX = "_neutral.obj"
SUFFIX = "_shape_keys.bin"
FRAME = "OBJ head frame: metres, +Y up, face toward +Z; offsets from the neutral mesh"


@dataclass(frozen=True)
class ShapeKey:
    name: str
    value: float
    vertex_ids: array          # 'I': vertex ids
    offsets: array             # 'f': x, y, z per vertex id, metres


def _little_endian(values: array) -> bytes:
    if sys.byteorder == "big":
        values = array(values.typecode, values)
        values.byteswap()
    return values.tobytes()


def encode_shape_keys(vertex_count: int, keys: list[ShapeKey]) -> bytes:
    header = json.dumps({"vertex_count": vertex_count, "frame": FRAME,
                         "keys": [{"name": k.name, "value": k.value, "count": len(k.vertex_ids)} for k in keys]})
    parts = [MAGIC, struct.pack("<II", VERSION, len(header.encode())), header.encode()]
    for key in keys:
        if len(key.offsets) != 3 * len(key.vertex_ids):
            raise ValueError(f"shape key {key.name!r}: {len(key.offsets)} offsets for {len(key.vertex_ids)} vertices")
        parts += [_little_endian(key.vertex_ids), _little_endian(key.offsets)]
    return b"".join(parts)


def decode_shape_keys(data: bytes) -> tuple[int, list[ShapeKey]]:
    """-> (vertex_count, keys); ValueError for anything malformed."""
    if data[:4] != MAGIC or len(data) < 12:
        raise ValueError("not a FaceRecon shape-keys file")
    version, header_length = struct.unpack_from("<II", data, 4)
    if version != VERSION:
        raise ValueError(f"shape-keys version {version}, this reader knows {VERSION}")
    try:
        header = json.loads(data[12:12 + header_length].decode())
        vertex_count = int(header["vertex_count"])
        entries = [(str(k["name"]), float(k["value"]), int(k["count"])) for k in header["keys"]]
    except (ValueError, KeyError, TypeError) as exc:
        raise ValueError(f"shape-keys header: {exc}") from None
    offset = 12 + header_length
    keys = []
    for name, value, count in entries:
        end = offset + 16 * count
        if count < 0 or end > len(data):
            raise ValueError(f"shape key {name!r} runs past the end of the file")
        ids, offsets = array("I"), array("f")
        ids.frombytes(data[offset:offset + 4 * count])
        offsets.frombytes(data[offset + 4 * count:end])
        if sys.byteorder == "big":
            ids.byteswap()
            offsets.byteswap()
        if count and max(ids) >= vertex_count:
            raise ValueError(f"shape key {name!r} names vertex {max(ids)} of {vertex_count}")
        keys.append(ShapeKey(name, value, ids, offsets))
        offset = end
    if offset != len(data):
        raise ValueError("shape-keys file has trailing bytes")
    return vertex_count, keys
