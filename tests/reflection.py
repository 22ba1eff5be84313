"""A server as grpcurl sees it, through grpcio-reflection's client (the protocol grpcurl speaks):
the services it lists, a method it describes, and a call made from JSON by reflected descriptors
alone, as `grpcurl -d '{...}' ADDRESS SERVICE/METHOD` makes it. Blocking: from async tests, run
these in a thread (`asyncio.to_thread`) so an in-process server keeps serving."""
from __future__ import annotations

import contextlib
from collections.abc import Iterator

import grpc
from google.protobuf import descriptor_pool, json_format, message_factory
from google.protobuf.descriptor import MethodDescriptor
from grpc_reflection.v1alpha.proto_reflection_descriptor_database import ProtoReflectionDescriptorDatabase


@contextlib.contextmanager
def _reflected(address: str) -> Iterator[tuple[grpc.Channel, ProtoReflectionDescriptorDatabase]]:
    channel = grpc.insecure_channel(address)
    try:
        yield channel, ProtoReflectionDescriptorDatabase(channel)
    finally:
        channel.close()


def listed(address: str) -> list[str]:
    """`grpcurl -plaintext ADDRESS list`: the services the server names, sorted."""
    with _reflected(address) as (_, database):
        return sorted(database.get_services())


def describe(address: str, symbol: str):
    """`grpcurl -plaintext ADDRESS describe SYMBOL`: the descriptor of the service
    (`inference.GRPCInferenceService`), method (`inference.GRPCInferenceService.ModelInfer`) or
    message (`inference.ModelInferRequest`) named, its types resolved; KeyError when none is."""
    with _reflected(address) as (_, database):
        pool = descriptor_pool.DescriptorPool(database)  # asks the server for the file of the symbol itself, as grpcurl
        for find in (pool.FindServiceByName, pool.FindMessageTypeByName, pool.FindMethodByName):
            try:
                return find(symbol)
            except KeyError:
                continue
    raise KeyError(f"{address} describes no symbol '{symbol}'")


def _method(pool: descriptor_pool.DescriptorPool, full_name: str) -> MethodDescriptor:
    service, _, name = full_name.rpartition(".")
    return pool.FindServiceByName(service).methods_by_name[name]


def call_json(address: str, full_name: str, body: str = "{}", timeout: float = 30.0) -> dict:
    """`grpcurl -plaintext -d BODY ADDRESS SERVICE/METHOD` of a unary method: the request parsed
    from JSON into the reflected input type, the reply in protobuf's JSON mapping (as a dict)."""
    with _reflected(address) as (channel, database):
        found = _method(descriptor_pool.DescriptorPool(database), full_name)
        request_type = message_factory.GetMessageClass(found.input_type)
        reply_type = message_factory.GetMessageClass(found.output_type)
        call = channel.unary_unary(f"/{found.containing_service.full_name}/{found.name}",
                                   request_serializer=request_type.SerializeToString,
                                   response_deserializer=reply_type.FromString)
        reply = call(json_format.Parse(body, request_type()), timeout=timeout)
        return json_format.MessageToDict(reply)
