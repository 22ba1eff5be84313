// Decides, per ModelInfer request, between the fast path (batch to a node) and the coordinator.
#pragma once

#include "call.h"
#include "router.h"

namespace frontdoor {

class InferDoor {
 public:
  // `shm`: the coordinator's shared memory registrations (nullptr: such requests are forwarded).
  InferDoor(Router* router, SharedMemory* shm) : router_(router), shm_(shm) {}
  // Answers the call whose request is `bytes`: queued on its route's batcher, or forwarded to
  // the coordinator.
  void Infer(InferCall* call, grpc::ByteBuffer* bytes);

 private:
  bool Sampled(InferCall* call);
  bool TakeQueueParameters(InferCall* call);
  bool TakeSharedMemory(InferCall* call);
  Router* router_;
  SharedMemory* shm_;
};

}  // namespace frontdoor
