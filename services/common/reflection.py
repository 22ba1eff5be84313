"""gRPC server reflection (what grpcurl lists, describes and calls by): the services a server
registers, described from the descriptor pools their stubs were generated into."""
from __future__ import annotations

import logging

import grpc
from google.protobuf import descriptor_pb2, descriptor_pool
from google.protobuf.descriptor import FileDescriptor, ServiceDescriptor
from grpc_reflection.v1alpha import reflection

from services.pb.inference import grpc_service_pb2 as oip_pb

log = logging.getLogger(__name__)
SERVICE_NAME = reflection.SERVICE_NAME
# CNEI's OIP stubs live in a pool of their own (scripts/gen-protos.sh: tritonclient puts Triton's
# `inference.*` in the default pool); theirs first, so a server describes its own OIP proto.
SOURCE_POOLS = (oip_pb.DESCRIPTOR.pool, descriptor_pool.Default())


def service_descriptor(name: str) -> ServiceDescriptor | None:
    """The service `name` from the first pool that has it; None when none does."""
    for pool in SOURCE_POOLS:
        try:
            return pool.FindServiceByName(name)
        except KeyError:
            continue
    return None


def _add_file(pool: descriptor_pool.DescriptorPool, file: FileDescriptor, added: set[str]) -> None:
    """`file` into `pool`, its imports first, each once."""
    if file.name in added:
        return
    for dependency in file.dependencies:
        _add_file(pool, dependency, added)
    proto = descriptor_pb2.FileDescriptorProto()
    file.CopyToProto(proto)
    pool.AddSerializedFile(proto.SerializeToString())
    added.add(file.name)


def pool_of(services: list[ServiceDescriptor]) -> descriptor_pool.DescriptorPool:
    """A pool holding exactly the files that define `services`, with their imports."""
    pool, added = descriptor_pool.DescriptorPool(), set()
    for service in services:
        _add_file(pool, service.file, added)
    return pool


class _MethodsToo:
    """A pool as reflection reads it, that also finds the file of a method by its full name
    (`inference.GRPCInferenceService.ModelInfer`: what `grpcurl describe` asks for); protobuf's
    upb pools find services, messages, enums and fields by name, not methods."""

    def __init__(self, pool: descriptor_pool.DescriptorPool):
        self._pool = pool

    def __getattr__(self, name: str):
        return getattr(self._pool, name)

    def FindFileContainingSymbol(self, symbol: str) -> FileDescriptor:  # noqa: N802 - the pool's API
        try:
            return self._pool.FindFileContainingSymbol(symbol)
        except KeyError:
            service, _, method = symbol.rpartition(".")
            try:
                found = self._pool.FindServiceByName(service)
            except KeyError:
                raise KeyError(symbol) from None
            if method not in found.methods_by_name:
                raise KeyError(symbol) from None
            return found.file


def enable(server: grpc.aio.Server, names: list[str]) -> list[str]:
    """Serve reflection on `server` (not yet started) for the services `names` and itself: the
    names it lists, sorted. A service no generated stubs describe is left out, with a warning."""
    found = {name: service_descriptor(name) for name in {*names, SERVICE_NAME}}
    if missing := sorted(name for name, service in found.items() if service is None):
        log.warning("gRPC reflection leaves out %s: no generated stubs describe it", ", ".join(missing))
    listed = sorted(name for name, service in found.items() if service is not None)
    reflection.enable_server_reflection(listed, server,
                                       pool=_MethodsToo(pool_of([found[name] for name in listed])))
    return listed
