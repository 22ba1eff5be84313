"""Triton's classification extension as pure functions: top classes per row, their text, labels."""
from __future__ import annotations

import numpy as np
import pytest

from services.common import classification
from services.common.errors import InvalidArgument


def _texts(array: np.ndarray) -> list:
    return [v.decode() for v in array.reshape(-1)]


def test_the_example_of_triton_s_documentation():
    classes = classification.top_classes("output0", np.array([1.1, 3.3, 0.5, 2.4], np.float32), 2, [], batched=False)
    assert classes.shape == (2,) and _texts(classes) == ["3.300000:1", "2.400000:3"]


def test_each_row_of_a_batch_gets_its_own_classes_with_labels():
    probabilities = np.array([[0.1, 0.7, 0.2], [0.5, 0.2, 0.3]], np.float32)
    classes = classification.top_classes("p", probabilities, 2, ["cat", "dog"], batched=True)
    assert classes.shape == (2, 2)
    assert _texts(classes) == ["0.700000:1:dog", "0.200000:2", "0.500000:0:cat", "0.300000:2"]


@pytest.mark.parametrize("dtype", [np.int8, np.uint8, np.int32, np.int64, np.uint64])
def test_integer_outputs_are_written_as_integers(dtype):
    classes = classification.top_classes("y", np.array([[1, 5, 10, 4]], dtype), 3, [], batched=True)
    assert _texts(classes) == ["10:2", "5:1", "4:3"]


def test_a_count_beyond_the_classes_gives_every_class_and_ties_keep_index_order():
    classes = classification.top_classes("y", np.array([[2.0, 2.0, 1.0]], np.float16), 10, [], batched=True)
    assert classes.shape == (1, 3) and _texts(classes) == ["2.000000:0", "2.000000:1", "1.000000:2"]


def test_an_empty_batch_gives_no_rows():
    assert classification.top_classes("y", np.zeros((0, 4), np.float32), 2, [], batched=True).shape == (0, 2)


@pytest.mark.parametrize("array", [np.array([True, False]), np.array([b"a", b"b"], dtype=np.object_)])
def test_outputs_that_are_not_numbers_are_refused(array):
    with pytest.raises(InvalidArgument, match="output 'y': classification needs a numeric output"):
        classification.top_classes("y", array, 1, [], batched=False)


@pytest.mark.parametrize(("value", "count"), [(3, 3), (0, 0), (np.int64(2), 2)])
def test_the_parameter_gives_the_count(value, count):
    assert classification.class_count("y", {"classification": value}) == count


@pytest.mark.parametrize("value", [-1, "3", 1.5, True])
def test_a_parameter_that_is_no_count_is_refused(value):
    with pytest.raises(InvalidArgument, match="output 'y': parameter 'classification' must be a non-negative integer"):
        classification.class_count("y", {"classification": value})


def test_outputs_asking_for_classes_in_shared_memory_are_refused():
    assert classification.requested({"a": {"classification": 2}, "b": {}, "c": {"classification": 0}}, {}) == {"a": 2}
    with pytest.raises(InvalidArgument, match="output 'a': classification cannot be written into shared memory"):
        classification.requested({"a": {"classification": 2}}, {"a": object()})


@pytest.mark.parametrize(("metadata", "labels"), [
    ({"labels": '["zero", "one"]'}, ["zero", "one"]), ({}, []), ({"labels": "not json"}, []), ({"labels": '{"a": 1}'}, []),
])
def test_labels_come_from_the_model_s_metadata(metadata, labels):
    assert classification.labels_of(metadata) == labels
