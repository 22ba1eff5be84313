"""Triton's restricted APIs: the specification, the category of each REST path and gRPC method,
and who is refused."""
from __future__ import annotations

import pytest

from services.common.restricted import (GRPC_METHODS, NODE_METHODS, OIP_API, REGISTRY_METHODS, RUNTIME_API,
                                        TRAINER_METHODS, Key, categories_of, parse, refusal, rest_categories,
                                        rest_category)
from services.pb.cnei import node_pb2, registry_pb2, trainer_pb2
from services.pb.inference import grpc_service_pb2 as pb


def test_a_specification_gives_each_category_its_header_and_value():
    restricted = parse("model-repository, trace,logging:Admin-Key=s3cret=1; inference:infer-key=abc")
    assert restricted == {"model-repository": Key("admin-key", "s3cret=1"), "trace": Key("admin-key", "s3cret=1"),
                          "logging": Key("admin-key", "s3cret=1"), "inference": Key("infer-key", "abc")}
    assert parse("") == {} and parse(" ; ") == {}


@pytest.mark.parametrize("spec, message", [
    ("trace", "must read <category>"),
    ("trace:admin-key", "must read <category>"),
    ("trace:=x", "must read <category>"),
    ("trace:k=", "must read <category>"),
    ("repository:k=v", "unknown category 'repository'"),
    ("trace:a=1;trace,logging:b=2", "category 'trace' is restricted twice"),
])
def test_a_bad_specification_says_what_is_wrong(spec, message):
    with pytest.raises(ValueError, match=message):
        parse(spec)


@pytest.mark.parametrize("spec", ["reg-key=TopSecret123", "metadata:=TopSecret123", "trace:a=1;TopSecret123"])
def test_a_malformed_group_is_named_by_its_place_never_by_what_may_be_a_secret(spec):
    with pytest.raises(ValueError) as caught:
        parse(spec)
    assert "TopSecret123" not in str(caught.value)
    assert f"group {spec.count(';') + 1} (of those joined with ';') must read <category>" in str(caught.value)


@pytest.mark.parametrize("path, categories", [
    ("/api/status", ("metadata", "statistics")), ("/api/status/", ("metadata", "statistics")),
    ("/", ()), ("/metrics", ()), ("/v2/models/digits/stats", ("statistics",)), ("/v2/health/live", ("health",)),
])
def test_the_status_json_beside_the_api_needs_the_keys_of_what_it_shows(path, categories):
    assert rest_categories(path) == categories


def test_every_oip_method_has_a_category():
    methods = pb.DESCRIPTOR.services_by_name["GRPCInferenceService"].methods_by_name
    assert set(methods) == set(GRPC_METHODS)


@pytest.mark.parametrize(("module", "service", "categories"), [
    (registry_pb2, "ModelRegistry", REGISTRY_METHODS), (trainer_pb2, "Trainer", TRAINER_METHODS),
    (node_pb2, "NodeControl", NODE_METHODS)], ids=["registry", "trainer", "node-control"])
def test_every_method_of_the_meshs_own_services_has_a_category(module, service, categories):
    """A method left out would be open to every client however its API is restricted."""
    assert set(module.DESCRIPTOR.services_by_name[service].methods_by_name) == set(categories)


@pytest.mark.parametrize("path, category", [
    ("/v2", "metadata"), ("/v2/", "metadata"), ("/v2/health/live", "health"), ("/v2/health/ready", "health"),
    ("/v2/models/digits", "metadata"), ("/v2/models/digits/versions/2", "metadata"),
    ("/v2/models/digits/ready", "health"), ("/v2/models/digits/versions/2/ready", "health"),
    ("/v2/models/digits/infer", "inference"), ("/v2/models/digits/versions/1/infer", "inference"),
    ("/v2/models/infer", "metadata"),  # a model named "infer"
    ("/v2/models/digits/config", "model-config"), ("/v2/models/digits/stats", "statistics"),
    ("/v2/models/stats", "statistics"), ("/v2/repository/index", "model-repository"),
    ("/v2/repository/models/digits/unload", "model-repository"),
    ("/v2/systemsharedmemory/region/r/register", "shared-memory"), ("/v2/cudasharedmemory/status", "shared-memory"),
    ("/v2/trace/setting", "trace"), ("/v2/models/digits/trace/setting", "trace"), ("/v2/logging", "logging"),
    ("/", None), ("/api/status", None), ("/metrics", None),
])
def test_rest_paths_fall_in_tritons_categories(path, category):
    assert rest_category(path) == category


def test_only_requests_of_a_restricted_category_without_the_right_value_are_refused():
    restricted = parse("trace,logging:admin-key=s3cret")
    assert refusal(restricted, "inference", {}) == ""
    assert refusal(restricted, None, {}) == ""
    assert refusal(restricted, "trace", {"admin-key": "s3cret"}) == ""
    for headers in ({}, {"admin-key": "wrong"}, {"admin-key": "s3cret "}, {"other": "s3cret"}):
        reason = refusal(restricted, "trace", headers)
        assert reason == "the trace API is restricted: send header 'admin-key' with its value"
        assert "s3cret" not in reason


@pytest.mark.parametrize("sent", [b"\xff".decode("utf-8", "surrogateescape"), "\ud800", "s3cr\u00e9t"],
                         ids=["non-utf8-byte", "lone-surrogate", "non-ascii"])
def test_a_header_value_that_is_no_utf8_text_is_refused_not_an_error(sent):
    restricted = parse("inference:infer-key=s3cret")
    assert refusal(restricted, "inference", {"infer-key": sent}) == (
        "the inference API is restricted: send header 'infer-key' with its value")


def test_a_key_configured_with_bytes_that_are_no_utf8_matches_those_bytes():
    value = b"k\xff".decode("utf-8", "surrogateescape")  # as os.environ gives it
    restricted = parse(f"inference:infer-key={value}")
    assert refusal(restricted, "inference", {"infer-key": value}) == ""
    assert refusal(restricted, "inference", {"infer-key": "k"}) != ""


def test_client_headers_parse_from_flags_or_one_string_and_a_bad_pair_is_named():
    from services.common.restricted import headers, own_headers

    assert headers(["Admin-Key=s3cret", "infer-key=a=b"]) == [("admin-key", "s3cret"), ("infer-key", "a=b")]
    assert headers("admin-key=s3cret; infer-key=abc;") == [("admin-key", "s3cret"), ("infer-key", "abc")]
    assert headers("") == []
    with pytest.raises(ValueError, match="header 2 must read KEY=VALUE") as bad:
        headers(["infer-key=abc", "admin-key:s3cret"])  # a mistyped pair: named by its place, never echoed
    assert "s3cret" not in str(bad.value)
    assert own_headers("trace,logging:admin-key=s3cret;inference:infer-key=abc") == \
        [("admin-key", "s3cret"), ("infer-key", "abc")]


def test_a_runtime_restricts_its_node_control_service_and_a_coordinator_has_no_such_category():
    assert set(NODE_METHODS) == set(node_pb2.DESCRIPTOR.services_by_name["NodeControl"].methods_by_name)
    assert parse("inference,node-control:node-key=k", categories_of(RUNTIME_API))["node-control"] == Key("node-key", "k")
    with pytest.raises(ValueError, match="unknown category 'node-control'"):
        parse("node-control:node-key=k", categories_of(OIP_API))
