"""The response cache's key and its byte budget."""
from __future__ import annotations

import numpy as np

from services.common import oip
from services.coordinator.response_cache import ResponseCache, request_key

X = {"input": np.arange(64, dtype=np.float32).reshape(1, 64)}


def _answer(value: float, size: int = 10) -> oip.InferResponse:
    return oip.InferResponse(model_name="digits", model_version="1",
                             outputs={"probabilities": np.full((1, size), value, np.float32)},
                             parameters={"cnei_node": "edge-a1"})


def test_the_key_tells_apart_everything_that_changes_the_answer():
    base = request_key("digits/1/FP32", X, [])
    assert request_key("digits/1/FP32", {"input": X["input"].copy()}, []) == base  # equal inputs, equal key
    others = [
        request_key("digits/2/FP32", X, []),  # another version
        request_key("digits/1/INT8", X, []),  # another precision policy
        request_key("digits/1/FP32", {"input": X["input"] + 1}, []),  # other values
        request_key("digits/1/FP32", {"input": X["input"].reshape(2, 32)}, []),  # other shape, same bytes
        request_key("digits/1/FP32", {"input": X["input"].view(np.int32)}, []),  # other datatype, same bytes
        request_key("digits/1/FP32", {"other": X["input"]}, []),  # another input name
        request_key("digits/1/FP32", X, ["probabilities"]),  # only some outputs
    ]
    assert len({base, *others}) == len(others) + 1
    square = X["input"].reshape(8, 8)  # the same values laid out column-major: the same request
    assert request_key("m", {"input": np.asfortranarray(square)}, []) == request_key("m", {"input": square}, [])
    words = np.array([b"ab", b"c"], dtype=object)
    assert request_key("m", {"s": words}, []) != request_key("m", {"s": np.array([b"a", b"bc"], dtype=object)}, [])


def test_least_recently_used_answers_leave_first_to_keep_the_byte_budget():
    cache = ResponseCache(max_bytes=100)  # two answers of 40 bytes fit, three do not
    assert cache.put(b"a", _answer(1.0)) and cache.put(b"b", _answer(2.0))
    assert cache.get(b"a") is not None  # a is now the more recently used
    assert cache.put(b"c", _answer(3.0))
    assert cache.get(b"b") is None and cache.get(b"a") is not None and cache.get(b"c") is not None
    assert cache.bytes == 80 and len(cache) == 2
    assert not cache.put(b"huge", _answer(4.0, size=100))  # larger than the whole budget: not kept
    assert len(cache) == 2 and cache.bytes == 80
    assert cache.put(b"a", _answer(5.0)) and cache.bytes == 80  # replaced, not counted twice
    assert ResponseCache(0).put(b"a", _answer(1.0)) is False


def test_a_kept_answer_is_a_copy():
    cache = ResponseCache(max_bytes=1 << 20)
    batch = np.zeros((4, 10), np.float32)
    response = oip.InferResponse(model_name="digits", model_version="1", outputs={"probabilities": batch[1:2]})
    cache.put(b"k", response)
    batch[:] = 7.0  # the batch the answer was a view of is reused
    kept = cache.get(b"k")
    assert kept.outputs["probabilities"].tolist() == [[0.0] * 10] and kept.nbytes == 40


def test_statistics_count_cache_hits_as_successes_that_ran_no_model():
    """perf_analyzer aborts unless compute_input, compute_infer and compute_output counts agree."""
    from services.common.oip_convert import stats_to_proto
    from services.common.stats import ModelStats

    stats = ModelStats("digits", "1")
    for _ in range(3):
        stats.record(True, 1_000_000, 1, queue_ns=100, compute_ns=500_000)
    for _ in range(2):
        stats.record(True, 50_000, 1, executed=False, cache_hit=True)
        stats.cache_hit.add(10_000)
    proto = stats_to_proto(stats)
    s = proto.inference_stats
    assert (s.success.count, s.queue.count, s.cache_hit.count) == (5, 5, 2)
    assert s.compute_input.count == s.compute_infer.count == s.compute_output.count == 3
    # Triton: inference_count and execution_count do not include cache hits
    assert (proto.inference_count, proto.execution_count) == (3, 3)
