"""Triton's classification extension as tritonclient asks for it (`InferRequestedOutput(...,
class_count=k)`): the output comes back as BYTES [rows, k] of "value:index:label", highest value
first, over gRPC (through the front door, on a stream, and straight to a runtime) and REST."""
from __future__ import annotations

import queue

import numpy as np
import pytest
import tritonclient.grpc as grpcclient
import tritonclient.http as http
from tritonclient.utils import InferenceServerException

from services.models.digits import load_split

COUNT = 3


@pytest.fixture(scope="module")
def images():
    return load_split()[1][:5].astype(np.float32)


def _expected(probabilities: np.ndarray) -> list[list[str]]:
    """What Triton answers for the full tensor: the top COUNT of each row, "%f:index:label"
    (the digits model's labels are its indices)."""
    order = np.argsort(-probabilities, axis=1, kind="stable")[:, :COUNT]
    return [[f"{row[i]:f}:{i}:{i}" for i in top] for row, top in zip(probabilities, order)]


def _texts(array: np.ndarray) -> list[list[str]]:
    return [[v.decode() if isinstance(v, bytes) else v for v in row] for row in array]


def _classify(lib, address: str, images: np.ndarray, **output_args) -> tuple[np.ndarray, np.ndarray]:
    """(the full tensor, the classes) of one FP32 request each."""
    client = lib.InferenceServerClient(address)
    try:
        tensor = lib.InferInput("input", list(images.shape), "FP32")
        tensor.set_data_from_numpy(images)
        params = {"precision": "FP32"}
        full = client.infer("digits", [tensor], parameters=params).as_numpy("probabilities")
        asked = lib.InferRequestedOutput("probabilities", class_count=COUNT, **output_args)
        reply = client.infer("digits", [tensor], outputs=[asked], parameters=params)
        output = reply.get_output("probabilities")
        datatype = output["datatype"] if isinstance(output, dict) else output.datatype
        assert datatype == "BYTES"
        return full, reply.as_numpy("probabilities")
    finally:
        client.close()


@pytest.mark.parametrize(("protocol", "output_args"), [
    ("grpc", {}), ("rest", {}), ("rest", {"binary_data": False}),
], ids=["grpc", "rest-binary", "rest-json"])
def test_class_count_answers_the_top_classes_with_their_labels(mesh, images, protocol, output_args):
    lib, address = (grpcclient, mesh.coordinator) if protocol == "grpc" else (http, mesh.rest.removeprefix("http://"))
    full, classes = _classify(lib, address, images, **output_args)
    assert classes.shape == (len(images), COUNT)
    assert _texts(classes) == _expected(full)


def test_a_runtime_answers_classes_itself(mesh, images):
    full, classes = _classify(grpcclient, mesh.runtime("edge-a1"), images)
    assert _texts(classes) == _expected(full)


def test_classes_on_a_stream_and_more_classes_than_the_output_has(mesh, images):
    client = grpcclient.InferenceServerClient(mesh.coordinator)
    replies: queue.Queue = queue.Queue()
    client.start_stream(callback=lambda result, error: replies.put((result, error)))
    try:
        tensor = grpcclient.InferInput("input", list(images.shape), "FP32")
        tensor.set_data_from_numpy(images)
        for count in (COUNT, 20):
            client.async_stream_infer("digits", [tensor], request_id=f"c{count}", parameters={"precision": "FP32"},
                                      outputs=[grpcclient.InferRequestedOutput("probabilities", class_count=count)])
        shapes = []
        for _ in range(2):
            result, error = replies.get(timeout=30)
            assert error is None
            shapes.append(result.as_numpy("probabilities").shape)
        assert shapes == [(len(images), COUNT), (len(images), 10)]  # at most the output's 10 classes
    finally:
        client.stop_stream()
        client.close()


@pytest.mark.parametrize(("protocol", "status"), [("rest", "400"), ("grpc", "StatusCode.INVALID_ARGUMENT")])
def test_a_negative_class_count_is_refused_naming_the_output(mesh, protocol, status):
    lib, address = (http, mesh.rest.removeprefix("http://")) if protocol == "rest" else (grpcclient, mesh.coordinator)
    client = lib.InferenceServerClient(address)
    try:
        tensor = lib.InferInput("input", [1, 64], "FP32")
        tensor.set_data_from_numpy(np.zeros((1, 64), np.float32))
        with pytest.raises(InferenceServerException, match="output 'probabilities': parameter 'classification' "
                                                           "must be a non-negative integer") as caught:
            client.infer("digits", [tensor], outputs=[lib.InferRequestedOutput("probabilities", class_count=-1)])
        assert caught.value.status() == status
    finally:
        client.close()


def test_server_metadata_lists_the_classification_extension(mesh):
    client = http.InferenceServerClient(mesh.rest.removeprefix("http://"))
    try:
        assert "classification" in client.get_server_metadata()["extensions"]
    finally:
        client.close()
