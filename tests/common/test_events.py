"""Event envelopes: pure encode/decode."""
from __future__ import annotations

import json

import pytest

from services.common import events


def test_an_envelope_survives_encode_and_decode_unchanged():
    sent = events.Envelope(
        type=events.MODEL_PUBLISHED, source="registry",
        payload={"name": "digits", "version": "1", "size_bytes": 19634, "tags": ["a", "b"]},
        trace={"traceparent": "00-0af7651916cd43dd8448eb211c80319c-b7ad6b7169203331-01"},
    )
    got = events.decode(events.encode(sent))
    assert got == sent


def test_each_envelope_gets_its_own_id_and_the_current_time():
    first = events.Envelope(type=events.NODE_UP, source="edge-1", payload={})
    second = events.Envelope(type=events.NODE_UP, source="edge-1", payload={})
    assert first.id != second.id
    assert len(first.id) == 32
    assert first.time > 1.6e9


def test_an_encoded_envelope_is_compact_json_with_every_field():
    encoded = events.encode(events.Envelope(type=events.NODE_DOWN, source="edge-2", payload={"k": 1}))
    obj = json.loads(encoded)
    assert set(obj) == {"type", "source", "payload", "id", "time", "trace"}
    assert obj["type"] == "cnei.node.down"
    assert b" " not in encoded


def test_an_envelope_without_trace_decodes_with_an_empty_trace():
    data = json.dumps({"type": "cnei.node.up", "source": "s", "payload": {}, "id": "i", "time": 5}).encode()
    got = events.decode(data)
    assert got.trace == {}
    assert got.time == 5.0


@pytest.mark.parametrize("subject", [events.MODEL_PUBLISHED, events.NODE_UP, events.NODE_DOWN])
def test_every_event_subject_falls_inside_the_event_stream(subject):
    assert events.STREAM_SUBJECTS == ["cnei.>"]
    assert subject.startswith("cnei.") and subject.count(".") >= 2


_GOOD = {"type": "cnei.node.up", "source": "s", "payload": {}, "id": "i", "time": 1.0}


@pytest.mark.parametrize(
    ("data", "message"),
    [
        (b"not json", "event is not JSON"),
        (b"\xff\xfe\x00", "event is not JSON"),
        (b"", "event is not JSON"),
        (b"42", "not a JSON object"),
        (b"null", "not a JSON object"),
        (b"[1, 2]", "not a JSON object"),
        (b'"cnei.node.up"', "not a JSON object"),
        (json.dumps({k: v for k, v in _GOOD.items() if k != "payload"}).encode(),
         r"event lacks fields \['payload'\]"),
        (b"{}", r"event lacks fields \['id', 'payload', 'source', 'time', 'type'\]"),
        (json.dumps({**_GOOD, "time": "soon"}).encode(), "time"),
        (json.dumps({**_GOOD, "time": None}).encode(), "time"),
    ],
    ids=["text", "not-utf8", "empty", "number", "null", "list", "string", "no-payload",
         "empty-object", "time-not-number", "time-null"],
)
def test_malformed_event_data_raises_value_error(data, message):
    with pytest.raises(ValueError, match=message):
        events.decode(data)
