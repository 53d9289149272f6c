"""shared_protocol: every message type round-trips; every defect is rejected with its own code."""
from __future__ import annotations

import json
import subprocess
import sys

import pytest
from hypothesis import given, settings, strategies as st

from shared_protocol import (Accepted, Cancel, Error, ErrorCode, PersonPhoto, Ping, Pong, Progress, ProtocolError,
                             PROTOCOL_VERSION, ReconstructOptions, ReconstructRequest, Result, ResultFile, Status,
                             StatusRequest, decode, encode, limits, MESSAGE_TYPES)
from tests.conftest import ROOT

EXAMPLES = [
    ReconstructRequest("r1", "me.jpg", b"\xff\xd8jpegbytes", ReconstructOptions(face=-1, texture_size=1024)),
    ReconstructRequest("r2", "me.jpg", b"\xff\xd8", ReconstructOptions(outputs=("glb", "usdc", "png", "json"))),
    Accepted("r1", "j1", 3),
    Accepted("r1", "j1", 3, server_id="5f1c0e"),
    ReconstructRequest("r2", "front.jpg", b"\xff\xd8front", ReconstructOptions(),
                       (PersonPhoto("left.jpg", b"\xff\xd8left"), PersonPhoto("right.png", b"\x89PNGright"))),
    Progress("j1", "bake", 0.5),
    Progress("j1", "landmarks", 0.2, photo=2),
    Result("j1", (ResultFile("me.obj", "obj", b"v 0 0 0\n"), ResultFile("me.png", "png", b"\x89PNG")),
           {"faces": 1}),
    Result("j2", (ResultFile("me.glb", "glb", b"glTF"), ResultFile("me.usdc", "usdc", b"PXR-USDC")), {"faces": 1}),
    Error(ErrorCode.NO_FACE, "no face", job_id="j1", request_id="r1"),
    Error(ErrorCode.BAD_HEADER, "bad"),
    Error(ErrorCode.BAD_IMAGE, "photo 2 of 3 (left.jpg): not an image", job_id="j1", photo_name="left.jpg"),
    Cancel("j1"),
    Ping(7),
    Pong(7),
    Pong(7, server_id="5f1c0e"),
    StatusRequest(),
    Status("0.1.0", ("cpu",), ("builtin",), ({"device": "cpu", "state": "idle"},), 2, 10, 1, 12.5),
    Status("0.1.0", ("cpu",), ("builtin",), (), 0, 0, 0, 1.0, server_id="5f1c0e"),
]


def test_examples_cover_every_message_type():
    assert {type(m).TYPE for m in EXAMPLES} == set(MESSAGE_TYPES)


@pytest.mark.parametrize("message", EXAMPLES, ids=lambda m: type(m).__name__)
def test_round_trip(message):
    assert decode(encode(message)) == message


def header_of(message) -> dict:
    return json.loads(encode(message)[0])


def frames_with(header: dict, *payloads: bytes) -> list[bytes]:
    return [json.dumps(header).encode(), *payloads]


def rejected(frames) -> ErrorCode:
    with pytest.raises(ProtocolError) as info:
        decode(frames)
    return info.value.code


def test_outputs_default_to_today_s_set_and_stay_strict():
    from shared_protocol import DEFAULT_OUTPUTS, OUTPUT_KINDS
    assert ReconstructOptions().outputs == DEFAULT_OUTPUTS == ("obj", "mtl", "png", "json", "neutral_obj", "shape_keys")
    assert OUTPUT_KINDS == (*DEFAULT_OUTPUTS, "glb", "usdc")           # asked for only
    request = header_of(EXAMPLES[0])
    for outputs in (["glb", "fbx"], ["GLB"], ["usdz"], "glb", [["glb"]]):
        broken = request | {"options": request["options"] | {"outputs": outputs}}
        assert rejected(frames_with(broken, EXAMPLES[0].photo)) == ErrorCode.BAD_FIELD
    result = header_of(EXAMPLES[7])          # the Result with .obj and .png
    assert rejected(frames_with(result | {"kinds": ["glb", "fbx"]}, b"v 0 0 0\n", b"\x89PNG")) == ErrorCode.BAD_FIELD


def test_rejects_empty_and_too_many_frames():
    assert rejected([]) == ErrorCode.BAD_FRAMES
    assert rejected(encode(Ping(1)) + [b""] * limits.MAX_FRAMES) == ErrorCode.BAD_FRAMES


def test_rejects_non_json_and_non_object_headers():
    assert rejected([b"\xff\xfe"]) == ErrorCode.BAD_HEADER
    assert rejected([b"{not json"]) == ErrorCode.BAD_HEADER
    assert rejected([b"[1, 2]"]) == ErrorCode.BAD_HEADER
    assert rejected([b"x" * (limits.MAX_HEADER_BYTES + 1)]) == ErrorCode.PAYLOAD_TOO_LARGE


def test_rejects_other_major_version_with_protocol_mismatch():
    header = header_of(Ping(1)) | {"protocol_version": "2.0"}
    assert rejected(frames_with(header)) == ErrorCode.PROTOCOL_MISMATCH
    assert rejected(frames_with(header_of(Ping(1)) | {"protocol_version": "x"})) == ErrorCode.BAD_HEADER
    # A newer minor version of the same major is accepted.
    assert decode(frames_with(header_of(Ping(1)) | {"protocol_version": "1.9"})) == Ping(1)


def test_version_1_1_and_1_2_add_only_optional_fields_and_unknown_fields_are_ignored():
    assert PROTOCOL_VERSION == "1.2"                                   # 1.2: several photos of one person
    # A 1.0 peer's messages (no server_id) still decode; so do fields this side does not know.
    old = header_of(Accepted("r", "j", 0)) | {"protocol_version": "1.0"}
    assert decode(frames_with(old)) == Accepted("r", "j", 0, server_id=None)
    assert decode(frames_with(header_of(Pong(3, "s")) | {"uptime_ms": 5, "server_id": None})) == Pong(3)
    assert "server_id" not in header_of(Pong(3))                      # absent, not null, when unknown
    for bad in (5, "x" * 65, ["s"]):
        assert rejected(frames_with(header_of(Pong(3)) | {"server_id": bad})) == ErrorCode.BAD_FIELD
        assert rejected(frames_with(header_of(Accepted("r", "j", 0)) | {"server_id": bad})) == ErrorCode.BAD_FIELD


def test_job_lost_is_a_new_stable_code():
    assert ErrorCode("job_lost") == ErrorCode.JOB_LOST
    assert decode(encode(Error(ErrorCode.JOB_LOST, "the backend restarted"))).code == ErrorCode.JOB_LOST


def test_rejects_unknown_type():
    assert rejected(frames_with(header_of(Ping(1)) | {"type": "teleport"})) == ErrorCode.UNKNOWN_TYPE
    assert rejected(frames_with(header_of(Ping(1)) | {"type": 5})) == ErrorCode.UNKNOWN_TYPE


def test_rejects_missing_and_mistyped_fields():
    header = header_of(Progress("j", "bake", 0.5))
    for broken in ({k: v for k, v in header.items() if k != "job_id"}, header | {"fraction": "half"},
                   header | {"fraction": 1.5}, header | {"stage": "dance"}, header | {"job_id": 3}):
        assert rejected(frames_with(broken)) == ErrorCode.BAD_FIELD
    request = header_of(EXAMPLES[0])
    for options in ({"texture_size": 1000}, {"texture_size": 1 << 20}, {"face": True},
                    {"outputs": ["exe"]}, {"model": None}):
        broken = request | {"options": request["options"] | options}
        assert rejected(frames_with(broken, EXAMPLES[0].photo)) == ErrorCode.BAD_FIELD


def test_rejects_payload_count_and_size_mismatch():
    frames = encode(EXAMPLES[0])
    assert rejected(frames[:1]) == ErrorCode.BAD_FRAMES                      # payload missing
    assert rejected(frames + [b"extra"]) == ErrorCode.BAD_FRAMES             # one too many
    assert rejected([frames[0], frames[1][:-1]]) == ErrorCode.PAYLOAD_SIZE_MISMATCH
    header = header_of(EXAMPLES[0])
    header["payloads"][0]["size"] = 10 ** 12
    assert rejected(frames_with(header, frames[1])) == ErrorCode.PAYLOAD_TOO_LARGE
    header["payloads"][0]["size"] = -1
    assert rejected(frames_with(header, frames[1])) == ErrorCode.BAD_HEADER
    assert rejected(encode(Ping(1)) + [b"x"]) == ErrorCode.BAD_FRAMES         # ping carries none


def test_rejects_oversize_photo_and_unsafe_file_names():
    big = ReconstructRequest("r", "big.jpg", b"x" * (limits.MAX_PHOTO_BYTES + 1))
    assert rejected(encode(big)) == ErrorCode.PAYLOAD_TOO_LARGE
    for name in ("../evil.obj", "a/b.png", "..", "c:\\x.png", ""):
        result = Result("j", (ResultFile(name, "obj", b"v"),))
        assert rejected(encode(result)) == ErrorCode.BAD_FIELD
        request = ReconstructRequest("r", name, b"photo")
        assert rejected(encode(request)) == ErrorCode.BAD_FIELD


@settings(max_examples=400, deadline=None)
@given(st.lists(st.binary(max_size=200), min_size=0, max_size=6))
def test_random_frames_raise_only_protocol_errors(frames):
    try:
        decode(frames)
    except ProtocolError:
        pass


@settings(max_examples=300, deadline=None)
@given(st.sampled_from(EXAMPLES), st.data())
def test_truncated_or_mutated_frames_raise_only_protocol_errors(message, data):
    frames = encode(message)
    index = data.draw(st.integers(0, len(frames) - 1))
    cut = data.draw(st.integers(0, len(frames[index])))
    frames[index] = frames[index][:cut] + data.draw(st.binary(max_size=8))
    frames = frames[:data.draw(st.integers(1, len(frames)))]
    try:
        decode(frames)
    except ProtocolError:
        pass


@settings(max_examples=200, deadline=None)
@given(st.dictionaries(st.sampled_from(["type", "protocol_version", "payloads", "job_id", "nonce",
                                        "options", "code", "message", "files", "kinds", "stage", "server_id"]),
                       st.recursive(st.none() | st.booleans() | st.integers() | st.floats() | st.text(max_size=10),
                                    lambda inner: (st.lists(inner, max_size=3)
                                                   | st.dictionaries(st.text(max_size=5), inner, max_size=3)),
                                    max_leaves=8)))
def test_random_json_headers_raise_only_protocol_errors(header):
    try:
        decode([json.dumps(header).encode()])
    except ProtocolError:
        pass


def test_imports_with_the_standard_library_only():
    code = ("import sys; sys.path.insert(0, %r); import shared_protocol as p; "
            "assert 'numpy' not in sys.modules and 'zmq' not in sys.modules; "
            "print(p.decode(p.encode(p.Ping(1))))" % str(ROOT))
    done = subprocess.run([sys.executable, "-S", "-I", "-c", code], capture_output=True, text=True)
    assert done.returncode == 0, done.stderr
    assert "Ping(nonce=1)" in done.stdout


def test_shape_keys_file_round_trips_and_refuses_damage():
    from array import array
    from shared_protocol.shape_keys import ShapeKey, decode_shape_keys, encode_shape_keys
    keys = [ShapeKey("jawOpen", 0.25, array("I", [0, 5, 9]), array("f", [0.0, -0.01, 0.002] * 3)),
            ShapeKey("eyeBlink_L", 1.0, array("I"), array("f"))]
    data = encode_shape_keys(10, keys)
    count, decoded = decode_shape_keys(data)
    assert count == 10 and [k.name for k in decoded] == ["jawOpen", "eyeBlink_L"]
    assert decoded[0].value == 0.25 and list(decoded[0].vertex_ids) == [0, 5, 9]
    assert list(decoded[0].offsets) == pytest.approx([0.0, -0.01, 0.002] * 3)
    for damaged in (data[:-4], data + b"x", b"FRSX" + data[4:],
                    data.replace(b'"vertex_count": 10', b'"vertex_count": 5 ')):
        with pytest.raises(ValueError):
            decode_shape_keys(damaged)
    with pytest.raises(ValueError, match="offsets"):
        encode_shape_keys(10, [ShapeKey("x", 0.0, array("I", [1]), array("f", [0.0]))])


PERSON = ReconstructRequest("r", "a.jpg", b"aa", ReconstructOptions(),
                            (PersonPhoto("b.jpg", b"bb"), PersonPhoto("c.jpg", b"cc")))


def test_several_photos_keep_the_single_photo_request_and_add_optional_fields_only():
    single = header_of(ReconstructRequest("r", "a.jpg", b"aa"))
    person = header_of(PERSON)
    assert "photo_names" not in single and person["photo_names"] == ["a.jpg", "b.jpg", "c.jpg"]
    assert person["photo_name"] == "a.jpg"                       # a 1.x peer reads the first photo's name
    assert {k: v for k, v in person.items() if k not in ("photo_names", "payloads", "request_id")} == \
        {k: v for k, v in single.items() if k not in ("payloads", "request_id")}
    assert decode(encode(PERSON)).photos == PERSON.photos and decode(encode(PERSON)).is_person
    assert "photo" not in header_of(Progress("j", "fit", 0.3)) and "photo_name" not in header_of(Error(
        ErrorCode.NO_FACE, "x"))
    assert ErrorCode.NO_USABLE_PHOTO.value == "no_usable_photo"
    assert PROTOCOL_VERSION.split(".")[0] == "1"


def test_several_photos_are_checked_each_and_errors_name_the_photo():
    frames = encode(PERSON)
    header = json.loads(frames[0])
    assert rejected(frames[:-1] + [b""]) == ErrorCode.PAYLOAD_SIZE_MISMATCH
    empty = {**header, "payloads": [*header["payloads"][:2], {"name": "photo", "size": 0}]}
    with pytest.raises(ProtocolError) as info:
        decode(frames_with(empty, b"aa", b"bb", b""))
    assert info.value.code == ErrorCode.BAD_FIELD and "photo 3 (c.jpg)" in info.value.message
    big = b"x" * (limits.MAX_PHOTO_BYTES + 1)
    oversize = {**header, "payloads": [*header["payloads"][:1], {"name": "photo", "size": len(big)},
                                       header["payloads"][2]]}
    with pytest.raises(ProtocolError) as info:
        decode(frames_with(oversize, b"aa", big, b"cc"))
    assert info.value.code == ErrorCode.PAYLOAD_TOO_LARGE and "photo 2 (b.jpg)" in info.value.message
    assert rejected(frames_with({**header, "photo_names": ["a.jpg", "b.jpg"]}, *frames[1:])) == ErrorCode.BAD_FRAMES
    assert rejected(frames_with({**header, "photo_names": ["x.jpg", "b.jpg", "c.jpg"]}, *frames[1:])) \
        == ErrorCode.BAD_FIELD
    assert rejected(frames_with({**header, "photo_names": ["a.jpg", "../b.jpg", "c.jpg"]}, *frames[1:])) \
        == ErrorCode.BAD_FIELD
    many = limits.MAX_PERSON_PHOTOS + 1
    too_many = {**header, "photo_names": ["a.jpg"] + [f"p{k}.jpg" for k in range(1, many)],
                "payloads": [{"name": "photo", "size": 2}] * many}
    assert rejected(frames_with(too_many, *[b"aa"] * many)) == ErrorCode.BAD_FIELD
    every_face = {**header, "options": {**header["options"], "face": -1}}
    assert rejected(frames_with(every_face, *frames[1:])) == ErrorCode.BAD_FIELD
    assert rejected(frames_with({**json.loads(encode(Progress("j", "fit", 0.3))[0]),
                                 "photo": limits.MAX_PERSON_PHOTOS})) == ErrorCode.BAD_FIELD
