"""NodeControl gRPC adapter: load, unload and report models of this runtime; federated rounds."""
from __future__ import annotations

from services.common.federated_convert import task_from_proto, update_to_proto
from services.common.grpc_util import rpc
from services.edge_runtime.core import EdgeRuntime
from services.edge_runtime.federated import LocalTrainer
from services.edge_runtime.loading import LoadedModel
from services.pb.cnei import node_pb2 as npb
from services.pb.cnei import node_pb2_grpc as npb_grpc


def loaded_to_proto(m: LoadedModel) -> npb.LoadedModel:
    v = m.variant
    return npb.LoadedModel(name=v.name, version=v.version, precision=v.precision, sha256=v.sha256,
                           load_seconds=m.load_seconds, provider=m.model.provider)


class NodeControlServicer(npb_grpc.NodeControlServicer):
    def __init__(self, runtime: EdgeRuntime, trainer: LocalTrainer):
        self.runtime = runtime
        self.trainer = trainer

    @rpc
    async def LoadModel(self, request, context):
        variant = await self.runtime.resolve(request.name, request.version, request.precision)
        return loaded_to_proto(await self.runtime.load(variant))

    @rpc
    async def UnloadModel(self, request, context):
        variant = await self.runtime.resolve(request.name, request.version, request.precision)
        return npb.UnloadModelResponse(unloaded=self.runtime.unload(variant.key))

    @rpc
    async def GetNodeStatus(self, request, context):
        s = self.runtime.settings
        return npb.NodeStatus(
            node_id=s.node_id, tier=s.tier, region=s.region, inflight=self.runtime.inflight,
            cache_bytes=self.runtime.l1.bytes_used,
            models=[loaded_to_proto(m) for m in self.runtime.loaded()],
        )

    @rpc
    async def TrainRound(self, request, context):
        task = task_from_proto(request)
        return update_to_proto(await self.trainer.train_round(task, context.time_remaining()))
