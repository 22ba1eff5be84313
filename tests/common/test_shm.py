"""System shared memory regions (Triton's extension) and the OIP codec reading/writing them,
over real POSIX shared memory objects in /dev/shm."""
from __future__ import annotations

import mmap
import os
import uuid

import numpy as np
import pytest

from services.common import oip
from services.common.errors import AlreadyExists, InvalidArgument, NotFound, TensorError
from services.common.shm import SharedMemoryRegions, TensorPlace
from services.pb.inference import grpc_service_pb2 as pb


@pytest.fixture
def shm_object():
    """A fresh 4 KiB POSIX shared memory object: (key, path)."""
    key = f"/cnei-test-{uuid.uuid4().hex[:12]}"
    path = f"/dev/shm{key}"
    with open(path, "wb") as f:
        f.truncate(4096)
    yield key, path
    os.unlink(path)


def _peek(path: str, start: int, size: int) -> bytes:
    with open(path, "rb") as f:
        f.seek(start)
        return f.read(size)


def _poke(path: str, start: int, data: bytes) -> None:
    with open(path, "r+b") as f, mmap.mmap(f.fileno(), 0) as m:
        m[start:start + len(data)] = data


def test_register_status_unregister(shm_object):
    key, _ = shm_object
    regions = SharedMemoryRegions()
    regions.register("in", key, 0, 1024)
    regions.register("out", key, 1024, 2048)
    assert [(r.name, r.key, r.offset, r.byte_size) for r in regions.status()] == [
        ("in", key, 0, 1024), ("out", key, 1024, 2048)]
    assert regions.status("out")[0].offset == 1024
    with pytest.raises(AlreadyExists, match="'in' is already registered"):
        regions.register("in", key, 0, 16)
    regions.unregister("in")
    assert [r.name for r in regions.status()] == ["out"]
    with pytest.raises(NotFound, match="no shared memory region named 'in'"):
        regions.status("in")
    regions.unregister("never-registered")  # as Triton: nothing to do
    regions.unregister()
    assert regions.status() == []
    regions.close()


def test_registering_what_is_not_there_is_refused_clearly(shm_object):
    key, _ = shm_object
    regions = SharedMemoryRegions()
    with pytest.raises(NotFound, match="does not exist on this host"):
        regions.register("r", "/cnei-no-such-object", 0, 16)
    with pytest.raises(InvalidArgument, match="beyond the 4096 bytes"):
        regions.register("r", key, 4000, 200)
    with pytest.raises(InvalidArgument, match="not a POSIX shared memory name"):
        regions.register("r", "/../etc/passwd", 0, 16)
    with pytest.raises(InvalidArgument, match="byte_size must be positive"):
        regions.register("r", key, 0, 0)
    with pytest.raises(InvalidArgument, match="needs a name"):
        regions.register("", key, 0, 16)
    assert regions.status() == []


def test_reads_and_writes_stay_inside_their_region(shm_object):
    key, path = shm_object
    regions = SharedMemoryRegions()
    regions.register("r", key, 100, 64)
    _poke(path, 108, b"abcd")
    assert regions.read(TensorPlace("r", 4, 8), "input 'x'") == b"abcd"
    regions.write(TensorPlace("r", 16, 32), b"0123456789", "output 'y'")
    assert _peek(path, 132, 10) == b"0123456789"
    with pytest.raises(InvalidArgument, match="input 'x': offset 60 \\+ byte_size 8 is beyond the 64 bytes"):
        regions.read(TensorPlace("r", 8, 60), "input 'x'")
    with pytest.raises(InvalidArgument, match="output 'y' is 10 bytes, more than the 4 bytes"):
        regions.write(TensorPlace("r", 4, 0), b"0123456789", "output 'y'")
    with pytest.raises(NotFound, match="input 'x': no shared memory region named 'other'"):
        regions.read(TensorPlace("other", 4), "input 'x'")
    regions.close()


@pytest.mark.parametrize("directory", [False, True], ids=["one-process", "shared-directory"])
def test_an_object_shrunk_after_registration_is_refused_and_never_faults(shm_object, tmp_path, directory):
    key, path = shm_object
    os.truncate(path, 16384)
    regions = SharedMemoryRegions(str(tmp_path) if directory else "")
    regions.register("r", key, 0, 16384)
    _poke(path, 8192, b"abcd")
    assert regions.read(TensorPlace("r", 4, 8192), "input 'a'") == b"abcd"
    os.truncate(path, 4096)  # the client shrinks its object: same inode, still registered
    with pytest.raises(InvalidArgument, match="input 'a': shared memory region 'r' is smaller than the range "
                                              "asked for: bytes 8192 to 8196 .* now holds 4096 bytes"):
        regions.read(TensorPlace("r", 4, 8192), "input 'a'")
    with pytest.raises(InvalidArgument, match="input 'b': .* bytes 4000 to 4200 .* now holds 4096 bytes"):
        regions.read(TensorPlace("r", 200, 4000), "input 'b'")  # straddles the new end
    with pytest.raises(InvalidArgument, match="output 'y': .* bytes 8192 to 8202 .* now holds 4096 bytes"):
        regions.write(TensorPlace("r", 16, 8192), b"0123456789", "output 'y'")
    assert os.path.getsize(path) == 4096  # a refused write does not grow the object
    regions.write(TensorPlace("r", 16, 16), b"0123456789", "output 'y'")  # what is still there is served
    assert _peek(path, 16, 10) == b"0123456789"
    os.truncate(path, 16384)  # grown back: the whole region serves again
    assert regions.read(TensorPlace("r", 4, 8192), "input 'a'") == bytes(4)
    regions.close()


def test_workers_sharing_a_directory_see_each_others_regions(shm_object, tmp_path):
    key, path = shm_object
    one, two = SharedMemoryRegions(str(tmp_path)), SharedMemoryRegions(str(tmp_path))
    one.register("r", key, 0, 256)
    with pytest.raises(AlreadyExists):
        two.register("r", key, 0, 16)
    _poke(path, 0, b"hello")
    assert two.read(TensorPlace("r", 5), "input 'x'") == b"hello"
    assert [r.name for r in two.status()] == ["r"]
    two.unregister("r")
    with pytest.raises(NotFound):
        one.read(TensorPlace("r", 5), "input 'x'")
    one.register("r", key, 128, 64)  # registered again elsewhere in the object: mapped afresh
    _poke(path, 128, b"world")
    assert two.read(TensorPlace("r", 5), "input 'x'") == b"world"
    one.close()
    two.close()


def _request(shm_inputs: dict, raw_inputs: dict, outputs: dict) -> pb.ModelInferRequest:
    msg = pb.ModelInferRequest(model_name="m")
    for name, (array, region, offset) in shm_inputs.items():
        t = msg.inputs.add(name=name, datatype="FP32", shape=array.shape)
        t.parameters["shared_memory_region"].string_param = region
        t.parameters["shared_memory_byte_size"].int64_param = array.nbytes
        t.parameters["shared_memory_offset"].int64_param = offset
    for name, array in raw_inputs.items():
        msg.inputs.add(name=name, datatype="FP32", shape=array.shape)
        msg.raw_input_contents.append(array.tobytes())
    for name, place in outputs.items():
        o = msg.outputs.add(name=name)
        if place is not None:
            o.parameters["shared_memory_region"].string_param = place[0]
            o.parameters["shared_memory_byte_size"].int64_param = place[1]
    return msg


def test_codec_reads_inputs_from_and_writes_outputs_to_shared_memory(shm_object):
    key, path = shm_object
    regions = SharedMemoryRegions()
    regions.register("in", key, 0, 1024)
    regions.register("out", key, 2048, 1024)
    a = np.arange(6, dtype=np.float32).reshape(2, 3)
    b = np.full((2, 2), 7, np.float32)
    _poke(path, 16, a.tobytes())
    req = oip.request_from_proto(_request({"a": (a, "in", 16)}, {"b": b}, {"y": ("out", 64), "z": None}), regions)
    np.testing.assert_array_equal(req.inputs["a"], a)
    np.testing.assert_array_equal(req.inputs["b"], b)
    assert req.outputs == ["y", "z"] and list(req.output_places) == ["y"]

    y, z = np.linspace(0, 1, 8, dtype=np.float32).reshape(2, 4), np.ones(3, np.float32)
    resp = oip.InferResponse("m", {"y": y, "z": z})
    msg = oip.response_to_proto(resp, raw=req.raw, places=req.output_places, shm=regions)
    assert list(msg.raw_output_contents) == [b"", z.tobytes()]  # aligned with the outputs, as clients index
    assert [list(o.shape) for o in msg.outputs] == [[2, 4], [3]]
    assert msg.outputs[0].parameters["shared_memory_byte_size"].int64_param == y.nbytes
    assert _peek(path, 2048, y.nbytes) == y.tobytes()

    small = oip.request_from_proto(_request({}, {"b": b}, {"y": ("out", 8)}), regions)
    with pytest.raises(InvalidArgument, match="output 'y' is 32 bytes, more than the 8 bytes"):
        oip.response_to_proto(resp, places=small.output_places, shm=regions)
    regions.close()


def test_codec_refuses_bad_shared_memory_requests_clearly(shm_object):
    key, _ = shm_object
    regions = SharedMemoryRegions()
    regions.register("in", key, 0, 64)
    a = np.zeros((2, 3), np.float32)
    with pytest.raises(InvalidArgument, match="does not take tensors in shared memory"):
        oip.request_from_proto(_request({"a": (a, "in", 0)}, {}, {}), None)
    with pytest.raises(NotFound, match="input 'a': no shared memory region named 'nope'"):
        oip.request_from_proto(_request({"a": (a, "nope", 0)}, {}, {}), regions)
    with pytest.raises(InvalidArgument, match="beyond the 64 bytes"):
        oip.request_from_proto(_request({"a": (a, "in", 48)}, {}, {}), regions)
    wrong_size = _request({"a": (a, "in", 0)}, {}, {})
    wrong_size.inputs[0].parameters["shared_memory_byte_size"].int64_param = 20
    with pytest.raises(TensorError):
        oip.request_from_proto(wrong_size, regions)
    no_size = _request({"a": (a, "in", 0)}, {}, {})
    del no_size.inputs[0].parameters["shared_memory_byte_size"]
    with pytest.raises(InvalidArgument, match="'shared_memory_byte_size' .* is required"):
        oip.request_from_proto(no_size, regions)
    extra_raw = _request({"a": (a, "in", 0)}, {}, {})
    extra_raw.raw_input_contents.append(a.tobytes())
    with pytest.raises(InvalidArgument, match="raw_input_contents has 1 entries but the request has 0 inputs not in"):
        oip.request_from_proto(extra_raw, regions)
    regions.close()


def test_an_object_made_afresh_under_the_same_key_is_mapped_afresh(shm_object, tmp_path):
    key, path = shm_object
    regions = SharedMemoryRegions(str(tmp_path))
    regions.register("r", key, 0, 64)
    _poke(path, 0, b"old!")
    assert regions.read(TensorPlace("r", 4), "input 'x'") == b"old!"
    os.unlink(path)  # the client destroys its region and creates it again, same key and size
    with open(path, "wb") as f:
        f.truncate(4096)
    _poke(path, 0, b"new!")
    assert regions.read(TensorPlace("r", 4), "input 'x'") == b"new!"
    regions.close()


def test_turned_off_nothing_is_registered_or_read(shm_object):
    from services.common.errors import FailedPrecondition
    key, _ = shm_object
    regions = SharedMemoryRegions(enabled=False)
    with pytest.raises(FailedPrecondition, match="turned off"):
        regions.register("r", key, 0, 64)
    assert regions.status() == []
    with pytest.raises(InvalidArgument, match="input 'x' is placed in shared memory, which is turned off"):
        regions.read(TensorPlace("r", 4), "input 'x'")
