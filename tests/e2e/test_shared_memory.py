"""Triton's system shared memory extension through tritonclient, end to end: a client on the same
host registers POSIX shared memory regions, sends inputs and receives outputs through them (unary
and streamed), against the coordinator behind its compiled front door, coordinator workers
sharing one port (a region registered through one worker is used through the other), and an edge
runtime called directly."""
from __future__ import annotations

import queue
import uuid

import numpy as np
import pytest
import tritonclient.grpc as triton
import tritonclient.utils.shared_memory as shm
from tritonclient.utils import InferenceServerException

from services.cli import infra
from services.coordinator.door_process import BUILT
from services.models.digits import load_split
from tests.e2e.processes import children, start_coordinator

ROWS = 8
OUT_BYTES = ROWS * 10 * 4


@pytest.fixture(scope="module", params=["front-door", "workers", "edge-runtime"])
def target(request, mesh):
    """(kind, address), one server of each kind for the module: each test registers regions of
    its own names and unregisters every region before it ends."""
    if request.param == "edge-runtime":
        yield request.param, mesh.runtime("edge-a1")
        return
    if request.param == "front-door":
        if not BUILT.is_file():
            pytest.skip(f"front door not built ({BUILT}): make frontdoor")
        env = {"CNEI_COORDINATOR_FRONT_DOOR": "on"}
    else:
        env = {"CNEI_COORDINATOR_WORKERS": "2", "CNEI_COORDINATOR_FRONT_DOOR": "off"}
    proc, address, _, _ = start_coordinator(mesh, export_spans=False, **env)
    try:
        if request.param == "workers":
            infra.wait_until(lambda: len(children(proc.pid)) == 2, 30, "2 workers")
        yield request.param, address
    finally:
        infra.stop(proc)


class Regions:
    """An input region holding ROWS digits images and an output region, created by the client."""

    def __init__(self):
        tag = uuid.uuid4().hex[:10]
        self.x = load_split()[1][:ROWS].astype(np.float32)
        self.names = (f"in-{tag}", f"out-{tag}")
        self.keys = (f"/cnei-e2e-{tag}-in", f"/cnei-e2e-{tag}-out")
        self.handles = [shm.create_shared_memory_region(n, k, size)
                        for n, k, size in zip(self.names, self.keys, (self.x.nbytes, OUT_BYTES))]
        shm.set_shared_memory_region(self.handles[0], [self.x])

    def request(self, out_bytes: int = OUT_BYTES):
        inp = triton.InferInput("input", list(self.x.shape), "FP32")
        inp.set_shared_memory(self.names[0], self.x.nbytes)
        out = triton.InferRequestedOutput("probabilities")
        out.set_shared_memory(self.names[1], out_bytes)
        return [inp], [out]

    def output(self, result) -> np.ndarray:
        return shm.get_contents_as_numpy(self.handles[1], np.float32, result.get_output("probabilities").shape)

    def close(self):
        for h in self.handles:
            shm.destroy_shared_memory_region(h)


_opened: list = []


@pytest.fixture(autouse=True)
def _close_clients(target):  # set up after `target`, so torn down before its server stops
    """Each test's clients closed at its end."""
    yield
    while _opened:
        _opened.pop().close()


def _fresh(address: str):
    """A client on a connection of its own (with several workers, it may land on either);
    closed after the test."""
    _opened.append(triton.InferenceServerClient(address))
    return _opened[-1]


def _expected(address: str, x: np.ndarray) -> np.ndarray:
    inp = triton.InferInput("input", list(x.shape), "FP32")
    inp.set_data_from_numpy(x)
    return _fresh(address).infer("digits", [inp], parameters={"precision": "FP32"}).as_numpy("probabilities")


def test_inputs_and_outputs_travel_through_the_clients_shared_memory(target):
    kind, target = target
    regions = Regions()
    try:
        expected = _expected(target, regions.x)
        admin = _fresh(target)
        admin.register_system_shared_memory(regions.names[0], regions.keys[0], regions.x.nbytes)
        admin.register_system_shared_memory(regions.names[1], regions.keys[1], OUT_BYTES)
        status = {r.name: r for r in _fresh(target).get_system_shared_memory_status().regions.values()}
        assert status[regions.names[0]].key == regions.keys[0]
        assert status[regions.names[1]].byte_size == OUT_BYTES
        with pytest.raises(InferenceServerException, match="already registered") as exists:
            _fresh(target).register_system_shared_memory(regions.names[0], regions.keys[0], 64)
        assert exists.value.status() == "StatusCode.ALREADY_EXISTS"

        by_door = 0
        for _ in range(20):  # connections of their own: with workers, both serve the regions
            inputs, outputs = regions.request()
            shm.set_shared_memory_region(regions.handles[1], [np.zeros(ROWS * 10, np.float32)])
            result = _fresh(target).infer("digits", inputs, outputs=outputs, parameters={"precision": "FP32"})
            assert result.get_output("probabilities").shape == [ROWS, 10]
            np.testing.assert_allclose(regions.output(result), expected, rtol=1e-5, atol=1e-6)
            by_door += "cnei_front_door" in result.get_response().parameters
        if kind == "front-door":  # inputs read from the region by the door itself, batched to a node
            assert by_door >= 10, by_door

        # input sent in the request, output into shared memory: the front door, which would batch
        # such requests to a node once their route is known, leaves them to the coordinator
        raw_input = triton.InferInput("input", list(regions.x.shape), "FP32")
        raw_input.set_data_from_numpy(regions.x)
        _, outputs = regions.request()
        client = _fresh(target)
        by_door = 0
        for _ in range(30):
            shm.set_shared_memory_region(regions.handles[1], [np.zeros(ROWS * 10, np.float32)])
            result = client.infer("digits", [raw_input], outputs=outputs, parameters={"precision": "FP32"})
            np.testing.assert_allclose(regions.output(result), expected, rtol=1e-5, atol=1e-6)
            by_door += "cnei_front_door" in result.get_response().parameters
        if kind == "front-door":  # the door writes outputs itself once the route is known
            assert by_door >= 20, by_door

        # a stream: each reply's output was written before the reply left
        replies: queue.Queue = queue.Queue()
        client = _fresh(target)
        client.start_stream(callback=lambda result, error: replies.put((result, error)))
        try:
            inputs, outputs = regions.request()
            shm.set_shared_memory_region(regions.handles[1], [np.zeros(ROWS * 10, np.float32)])
            client.async_stream_infer("digits", inputs, outputs=outputs, parameters={"precision": "FP32"})
            result, error = replies.get(timeout=30)
            assert error is None, error
            np.testing.assert_allclose(regions.output(result), expected, rtol=1e-5, atol=1e-6)
        finally:
            client.stop_stream()

        # the client makes its input object afresh under the same key (no new registration):
        # what is read is the new object's content, not a stale mapping of the old one
        shm.destroy_shared_memory_region(regions.handles[0])
        flipped = regions.x[::-1].copy()
        regions.handles[0] = shm.create_shared_memory_region(regions.names[0], regions.keys[0], flipped.nbytes)
        shm.set_shared_memory_region(regions.handles[0], [flipped])
        expected_flipped = _expected(target, flipped)
        client = _fresh(target)
        for _ in range(5):
            inputs, outputs = regions.request()
            result = client.infer("digits", inputs, outputs=outputs, parameters={"precision": "FP32"})
            np.testing.assert_allclose(regions.output(result), expected_flipped, rtol=1e-5, atol=1e-6)

        inputs, outputs = regions.request(out_bytes=16)
        with pytest.raises(InferenceServerException, match="more than the 16 bytes") as small:
            _fresh(target).infer("digits", inputs, outputs=outputs)
        assert small.value.status() == "StatusCode.INVALID_ARGUMENT"

        _fresh(target).unregister_system_shared_memory(regions.names[0])
        assert regions.names[0] not in _fresh(target).get_system_shared_memory_status().regions
        for _ in range(2):
            inputs, outputs = regions.request()
            with pytest.raises(InferenceServerException, match=f"no shared memory region named '{regions.names[0]}'") as gone:
                _fresh(target).infer("digits", inputs, outputs=outputs)
            assert gone.value.status() == "StatusCode.NOT_FOUND"
    finally:
        _fresh(target).unregister_system_shared_memory()
        regions.close()
    assert not _fresh(target).get_system_shared_memory_status().regions


def test_registrations_that_cannot_be_served_are_refused_clearly(target):
    client = _fresh(target[1])
    with pytest.raises(InferenceServerException, match="does not exist on this host") as missing:
        client.register_system_shared_memory("r", f"/cnei-e2e-missing-{uuid.uuid4().hex[:8]}", 64)
    assert missing.value.status() == "StatusCode.NOT_FOUND"
    # CUDA shared memory: none is held, registering is refused, tidying up (perf_analyzer does) works
    assert not client.get_cuda_shared_memory_status().regions
    with pytest.raises(InferenceServerException, match="use system shared memory") as cuda:
        client.register_cuda_shared_memory("gpu", b"\0" * 64, 0, 64)
    assert cuda.value.status() == "StatusCode.FAILED_PRECONDITION"
    client.unregister_cuda_shared_memory()


def test_a_region_the_client_shrinks_fails_its_requests_and_nothing_else(target):
    """A client that truncates its object after registering it (a bug or malice on the same
    host) gets INVALID_ARGUMENT; the server, which reads and writes regions without mapping them,
    never faults (SIGBUS) and goes on serving."""
    import os

    kind, target = target
    regions = Regions()
    try:
        admin = _fresh(target)
        admin.register_system_shared_memory(regions.names[0], regions.keys[0], regions.x.nbytes)
        admin.register_system_shared_memory(regions.names[1], regions.keys[1], OUT_BYTES)
        client = _fresh(target)
        for _ in range(10):  # the front door learns the route and serves from the regions itself
            inputs, outputs = regions.request()
            assert client.infer("digits", inputs, outputs=outputs).get_output("probabilities").shape == [ROWS, 10]

        for region, size in ((1, 16), (0, 64)):  # the output region shrinks, then the input region
            os.truncate(f"/dev/shm{regions.keys[region]}", size)
            for _ in range(3):
                inputs, outputs = regions.request()
                with pytest.raises(InferenceServerException, match=regions.names[region]) as shrunk:
                    client.infer("digits", inputs, outputs=outputs)
                assert shrunk.value.status() == "StatusCode.INVALID_ARGUMENT", shrunk.value

        assert _expected(target, regions.x).shape == (ROWS, 10)  # still serving
    finally:
        _fresh(target).unregister_system_shared_memory()
        regions.close()
