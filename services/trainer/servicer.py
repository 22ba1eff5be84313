"""Trainer gRPC adapter over the federated core."""
from __future__ import annotations

from services.common.grpc_util import rpc
from services.pb.cnei import trainer_pb2 as tpb
from services.pb.cnei import trainer_pb2_grpc as tpb_grpc
from services.trainer.convert import job_to_proto, spec_from_proto
from services.trainer.core import FederatedTrainer


class TrainerServicer(tpb_grpc.TrainerServicer):
    def __init__(self, trainer: FederatedTrainer):
        self.trainer = trainer

    @rpc
    async def StartJob(self, request, context):
        return job_to_proto(await self.trainer.start_job(spec_from_proto(request)))

    @rpc
    async def GetJob(self, request, context):
        return job_to_proto(await self.trainer.get(request.id))

    @rpc
    async def ListJobs(self, request, context):
        return tpb.ListJobsResponse(jobs=[job_to_proto(j) for j in await self.trainer.list()])

    @rpc
    async def WatchJob(self, request, context):
        async for job in self.trainer.watch(request.id):
            yield job_to_proto(job)
