"""An edge runtime serving mutual TLS on its OIP gRPC port and its fast lane
(CNEI_RUNTIME_TLS_*): plaintext, certificate-less and untrusting clients are refused on both, and
a coordinator given the CA and a client certificate (CNEI_COORDINATOR_NODE_TLS_*) serves through
it, over the compiled front door's fast lane (OpenSSL) and over its own (door off); a trainer
given them (CNEI_TRAINER_NODE_TLS_*) trains on it."""
from __future__ import annotations

import asyncio
import collections
import concurrent.futures
import os
import subprocess
import sys

import grpc
import numpy as np
import pytest
import tritonclient.grpc as triton

from services.cli import infra
from services.common import grpc_util, tls
from services.common.errors import Unavailable
from services.common.fastlane import FastClient
from services.common.node_control import NodeControlClients
from services.coordinator.door_process import BUILT
from services.pb.cnei import node_pb2 as npb
from services.pb.inference import grpc_service_pb2 as pb
from services.pb.cnei import trainer_pb2 as tpb
from services.pb.cnei import trainer_pb2_grpc as tpb_grpc
from services.pb.inference import grpc_service_pb2_grpc as pb_grpc
from services.trainer.convert import job_from_proto
from tests.e2e.processes import (digits_payload, push_digits_as, server_ready, spawn, start_coordinator,
                                 start_fast_runtime, who_served)


@pytest.fixture(scope="module")
def node(mesh, pki, tmp_path_factory):
    proc, address, fast = start_fast_runtime(mesh, "edge-t1", "site-t", tmp_path_factory.mktemp("tls-node"),
                                             CNEI_RUNTIME_TLS_CERT_FILE=pki["cert"], CNEI_RUNTIME_TLS_KEY_FILE=pki["key"],
                                             CNEI_RUNTIME_TLS_CLIENT_CA_FILE=pki["ca"])
    try:
        yield address, fast
    finally:
        infra.stop(proc)


@pytest.fixture(scope="module")
def named_node(mesh, pki, tmp_path_factory):
    """A TLS node whose certificate names only `runtime.test` (not the address it is dialled at)."""
    proc, address, fast = start_fast_runtime(mesh, "edge-t2", "site-u", tmp_path_factory.mktemp("named-node"),
                                             CNEI_RUNTIME_TLS_CERT_FILE=pki["named_cert"],
                                             CNEI_RUNTIME_TLS_KEY_FILE=pki["named_key"])
    try:
        yield address, fast
    finally:
        infra.stop(proc)


def _fast_call(address: str, context, server_name: str = "") -> pb.ModelInferResponse:
    async def call() -> bytes:
        client = FastClient(address, connect_timeout=5.0, ssl_context=context, server_name=server_name)
        try:
            return await client.call(digits_payload(), 10.0)
        finally:
            await client.close()
    return pb.ModelInferResponse.FromString(asyncio.run(call()))


def test_the_fast_lane_serves_only_clients_that_trust_it_and_show_a_certificate_it_trusts(node, pki):
    _, fast = node
    reply = _fast_call(fast, tls.ClientTls(pki["ca"], pki["client_cert"], pki["client_key"]).ssl_context())
    assert reply.model_name == "digits" and len(reply.raw_output_contents[0]) == 10 * 4
    for context in (None,  # plaintext: the TLS server hangs up on it
                    tls.client_ssl_context(pki["ca"]),  # no client certificate
                    tls.client_ssl_context(pki["other_ca"], pki["client_cert"], pki["client_key"])):  # untrusted
        with pytest.raises(Unavailable, match="fast lane"):
            _fast_call(fast, context)


def test_the_fast_lane_checks_the_server_name_asked_for_instead_of_the_address(node, named_node, pki):
    context = tls.client_ssl_context(pki["ca"])
    assert _fast_call(named_node[1], context, server_name="runtime.test").model_name == "digits"
    with pytest.raises(Unavailable, match="fast lane"):
        _fast_call(named_node[1], context)  # 127.0.0.1 is not in its certificate
    mutual = tls.ClientTls(pki["ca"], pki["client_cert"], pki["client_key"]).ssl_context()
    with pytest.raises(Unavailable, match="fast lane"):
        _fast_call(node[1], mutual, server_name="nobody.example")


def _grpc_ready(address: str, credentials: grpc.ChannelCredentials | None) -> bool:
    channel = grpc.secure_channel(address, credentials) if credentials else grpc.insecure_channel(address)
    with channel:
        return pb_grpc.GRPCInferenceServiceStub(channel).ServerReady(pb.ServerReadyRequest(), timeout=10).ready


def test_the_grpc_port_serves_only_mutual_tls(node, pki):
    address, _ = node
    assert _grpc_ready(address, tls.channel_credentials(pki["ca"], pki["client_cert"], pki["client_key"]))
    for credentials in (None, tls.channel_credentials(pki["ca"]),
                        tls.channel_credentials(pki["other_ca"], pki["client_cert"], pki["client_key"])):
        with pytest.raises(grpc.RpcError) as refused:
            _grpc_ready(address, credentials)
        assert refused.value.code() is grpc.StatusCode.UNAVAILABLE


def test_node_control_goes_over_tls(node, pki):
    address, _ = node

    async def status() -> npb.NodeStatus:
        clients = NodeControlClients(grpc_util.Channels(tls=tls.ClientTls(pki["ca"], pki["client_cert"], pki["client_key"])))
        try:
            return await clients.call(address, "GetNodeStatus", npb.NodeStatusRequest(), 10)
        finally:
            await clients.close()
    assert asyncio.run(status()).node_id == "edge-t1"


@pytest.mark.parametrize("door", ["on", "off"])
def test_a_coordinator_given_the_node_ca_and_certificate_serves_through_the_tls_node(mesh, node, pki, door):
    if door == "on" and not BUILT.is_file():
        pytest.skip(f"front door not built ({BUILT}): make frontdoor")
    proc, address, _, _ = start_coordinator(
        mesh, export_spans=False, CNEI_COORDINATOR_FRONT_DOOR=door, CNEI_COORDINATOR_NODE_TLS_CA_FILE=pki["ca"],
        CNEI_COORDINATOR_NODE_TLS_CERT_FILE=pki["client_cert"], CNEI_COORDINATOR_NODE_TLS_KEY_FILE=pki["client_key"])
    client = triton.InferenceServerClient(address)
    try:
        infra.wait_until(lambda: server_ready(address), 30, "the coordinator ready")
        data = np.random.default_rng(3).random((1, 64), np.float32)
        tensor = triton.InferInput("input", [1, 64], "FP32")
        tensor.set_data_from_numpy(data)
        served, outputs = collections.Counter(), set()
        for _ in range(40):  # the site's node, over the fast lane (door on: from the door itself)
            reply = client.infer("digits", [tensor], parameters={"region": "site-t"}, client_timeout=30)
            params = reply.get_response().parameters
            served[(params["cnei_node"].string_param,
                    "cnei_front_door" in params and params["cnei_front_door"].bool_param)] += 1
            if params["cnei_node"].string_param == "edge-t1":
                outputs.add(reply.as_numpy(reply.get_response().outputs[0].name).tobytes())
        assert served[("edge-t1", door == "on")] >= 20, dict(served)
        assert len(outputs) == 1  # the same answer every time, whichever path carried it

        # concurrent callers, batched into frames of several TLS records each way
        rows = np.random.default_rng(4).random((8, 48, 64), np.float32)

        def call(i: int) -> tuple[str, np.ndarray]:
            big = triton.InferInput("input", [48, 64], "FP32")
            big.set_data_from_numpy(rows[i % 8])
            reply = client.infer("digits", [big], parameters={"region": "site-t"}, client_timeout=30)
            return reply.get_response().parameters["cnei_node"].string_param, reply.as_numpy("probabilities")
        with concurrent.futures.ThreadPoolExecutor(8) as pool:
            answers = list(pool.map(call, range(64)))
        alone = {i: call(i)[1] for i in range(8)}
        assert sum(node == "edge-t1" for node, _ in answers) >= 32
        for i, (_, probabilities) in enumerate(answers):  # each caller got its own rows' answer
            np.testing.assert_allclose(probabilities, alone[i % 8], rtol=1e-5, atol=1e-6)
    finally:
        client.close()
        infra.stop(proc)


def test_node_tls_settings_that_cannot_work_stop_the_services_naming_the_variable(pki):
    cases = []  # (module, environment, what its error must say)
    for module, prefix in (("services.coordinator", "CNEI_COORDINATOR_"), ("services.trainer", "CNEI_TRAINER_")):
        for env, message in (({f"{prefix}NODE_TLS_CERT_FILE": pki["client_cert"],
                               f"{prefix}NODE_TLS_KEY_FILE": pki["client_key"]},
                              f"{prefix}NODE_TLS_CA_FILE is needed with a client certificate"),
                             ({f"{prefix}NODE_TLS_CA_FILE": pki["ca"], f"{prefix}NODE_TLS_CERT_FILE": pki["client_cert"]},
                              f"{prefix}NODE_TLS_CERT_FILE and {prefix}NODE_TLS_KEY_FILE go together"),
                             ({f"{prefix}NODE_TLS_CA_FILE": "/nonexistent.pem"},
                              f"{prefix}NODE_TLS_CA_FILE: no such file '/nonexistent.pem'"),
                             ({f"{prefix}NODE_TLS_SERVER_NAME": "runtime"},
                              f"{prefix}NODE_TLS_SERVER_NAME needs {prefix}NODE_TLS_CA_FILE"),
                             ({f"{prefix}NODE_TLS_CA_FILE": pki["client_key"]},  # not a certificate
                              f"{prefix}NODE_TLS_CA_FILE / _CERT_FILE / _KEY_FILE do not load")):
            cases.append((module, env, message))
    for env, message in (({"CNEI_RUNTIME_TLS_CERT_FILE": pki["cert"]}, "CNEI_RUNTIME_TLS_KEY_FILE is needed"),
                         ({"CNEI_RUNTIME_TLS_CERT_FILE": pki["cert"], "CNEI_RUNTIME_TLS_KEY_FILE": pki["client_key"]},
                          "CNEI_RUNTIME_TLS_CERT_FILE / _KEY_FILE / _CLIENT_CA_FILE do not load")):  # not its key
        cases.append(("services.edge_runtime", env, message))

    def start(case):  # each service started on its own, several at a time
        module, env, _ = case
        return subprocess.run([sys.executable, "-m", module], env={**os.environ, **env},
                              capture_output=True, text=True, timeout=60)
    with concurrent.futures.ThreadPoolExecutor(4) as pool:
        outs = list(pool.map(start, cases))
    for (module, _, message), out in zip(cases, outs):
        assert out.returncode != 0 and message in out.stderr, (module, out.stderr)


@pytest.mark.skipif(not BUILT.is_file(), reason="front door not built: make frontdoor")
@pytest.mark.parametrize("flags, message", [
    (["--node-tls-ca", "/nonexistent.pem"], "cannot load the CA /nonexistent.pem"),
    (["--node-tls-cert", "c.pem"], "--node-tls-cert and --node-tls-key go together"),
    (["--node-tls-cert", "c.pem", "--node-tls-key", "k.pem"], "need --node-tls-ca"),
    (["--node-tls-server-name", "runtime"], "need --node-tls-ca"),
])
def test_the_door_refuses_node_tls_flags_that_cannot_work(flags, message):
    out = subprocess.run([str(BUILT), "--listen", "127.0.0.1:0", "--backend", "127.0.0.1:1", *flags],
                         capture_output=True, text=True, timeout=30)
    assert out.returncode == 2 and message in out.stderr, out.stderr


@pytest.mark.parametrize("door", ["on", "off"])
def test_a_coordinator_checks_the_server_name_it_is_given_in_every_nodes_certificate(mesh, named_node, pki, door):
    """The node's certificate names runtime.test only: served by it (the door's fast lane, or the
    coordinator's own) once the coordinator checks that name instead of the address."""
    if door == "on" and not BUILT.is_file():
        pytest.skip(f"front door not built ({BUILT}): make frontdoor")
    proc, address, _, _ = start_coordinator(mesh, export_spans=False, CNEI_COORDINATOR_FRONT_DOOR=door,
                                            CNEI_COORDINATOR_NODE_TLS_CA_FILE=pki["ca"],
                                            CNEI_COORDINATOR_NODE_TLS_SERVER_NAME="runtime.test")
    client = triton.InferenceServerClient(address)
    try:
        infra.wait_until(lambda: server_ready(address), 30, "the coordinator ready")
        served = who_served(client, "site-u", 30)
        assert served[("edge-t2", door == "on")] >= 15, dict(served)
    finally:
        client.close()
        infra.stop(proc)


@pytest.mark.parametrize("door, trust", [("on", "other_ca"), ("off", "other_ca"), ("on", "wrong_name"),
                                         ("off", "wrong_name")])
def test_a_coordinator_that_does_not_trust_the_node_answers_unavailable_saying_why(mesh, node, pki, door, trust):
    if door == "on" and not BUILT.is_file():
        pytest.skip(f"front door not built ({BUILT}): make frontdoor")
    # every node of the mesh is out of its reach: the TLS node's certificate is not trusted (another CA
    # signed it, or it does not name the server name asked for), the others speak plaintext
    env = ({"CNEI_COORDINATOR_NODE_TLS_CA_FILE": pki["other_ca"]} if trust == "other_ca" else
           {"CNEI_COORDINATOR_NODE_TLS_CA_FILE": pki["ca"], "CNEI_COORDINATOR_NODE_TLS_SERVER_NAME": "nobody.example",
            "CNEI_COORDINATOR_NODE_TLS_CERT_FILE": pki["client_cert"],
            "CNEI_COORDINATOR_NODE_TLS_KEY_FILE": pki["client_key"]})
    proc, address, _, _ = start_coordinator(mesh, export_spans=False, CNEI_COORDINATOR_FRONT_DOOR=door, **env)
    client = triton.InferenceServerClient(address)
    try:
        infra.wait_until(lambda: server_ready(address), 30, "the coordinator ready")
        tensor = triton.InferInput("input", [1, 64], "FP32")
        tensor.set_data_from_numpy(np.ones((1, 64), np.float32))
        for _ in range(3):
            with pytest.raises(triton.InferenceServerException) as failed:
                client.infer("digits", [tensor], parameters={"region": "site-t"}, client_timeout=30)
            assert failed.value.status() == "StatusCode.UNAVAILABLE", failed.value
            message = failed.value.message()
            # the request's region's node first, with why: an untrusted certificate, or one without the name
            why = message.split("edge-t1 (", 1)[1] if "edge-t1 (" in message else ""
            assert any(word in why for word in ("certificate", "CERTIFICATE", "Hostname")), message
    finally:
        client.close()
        infra.stop(proc)


def test_a_trainer_given_the_node_ca_and_certificate_trains_on_the_tls_node(mesh, node, pki, digits_models,
                                                                            tmp_path_factory):
    """A federated round over mutual TLS: the TLS node takes part and the mesh's plaintext edges,
    out of the trainer's reach, are dropped as stragglers."""
    model = push_digits_as(mesh, digits_models, "digits-tls")
    port = infra.free_port()
    proc = spawn("services.trainer", {
        **os.environ, "CNEI_TRAINER_PORT": str(port), "CNEI_TRAINER_METRICS_PORT": "0",
        "CNEI_TRAINER_REGISTRY_TARGET": mesh.registry, "CNEI_TRAINER_REDIS_URL": mesh.settings.redis_url,
        "CNEI_TRAINER_NATS_URL": mesh.settings.nats_url, "CNEI_TRAINER_DATA_DIR": str(tmp_path_factory.mktemp("t")),
        "CNEI_TRAINER_NODE_TLS_CA_FILE": pki["ca"], "CNEI_TRAINER_NODE_TLS_CERT_FILE": pki["client_cert"],
        "CNEI_TRAINER_NODE_TLS_KEY_FILE": pki["client_key"]}, port)

    async def run_job():
        async with grpc.aio.insecure_channel(f"127.0.0.1:{port}") as channel:
            stub = tpb_grpc.TrainerStub(channel)
            started = await stub.StartJob(tpb.StartJobRequest(
                model=model, rounds=1, min_clients=1, fraction=1.0, local_epochs=1, lr=0.05, batch_size=32,
                round_timeout_s=20), timeout=10)
            return [job_from_proto(j) async for j in stub.WatchJob(tpb.GetJobRequest(id=started.id), timeout=120)][-1]
    try:
        job = asyncio.run(run_job())
    finally:
        infra.stop(proc)
    assert job.state == "completed", job.error
    (round_1,) = job.history
    assert round_1.participants == ["edge-t1"]
    assert {"edge-a1", "edge-b1"} <= set(round_1.failed)
    assert job.new_version


def test_the_container_healthcheck_checks_the_name_the_certificate_holds_when_told(named_node, pki):
    """A certificate for a public name (not the 127.0.0.1 a container healthcheck dials) passes
    the check once the check is given that name."""
    address, _ = named_node
    plain = subprocess.run([sys.executable, "-m", "services.cli.healthcheck", address, "--tls-ca", pki["ca"]],
                           capture_output=True, text=True, timeout=30)
    assert plain.returncode == 1, plain.stdout
    named = subprocess.run([sys.executable, "-m", "services.cli.healthcheck", address, "--tls-ca", pki["ca"]],
                           capture_output=True, text=True, timeout=30,
                           env={**os.environ, "CNEI_HEALTHCHECK_TLS_SERVER_NAME": "runtime.test"})
    assert named.returncode == 0 and "SERVING" in named.stdout, named.stderr
