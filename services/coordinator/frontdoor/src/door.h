// Decides, per ModelInfer request, between the fast path (batch to a node) and the coordinator.
#pragma once

#include "call.h"
#include "router.h"

namespace frontdoor {

class InferDoor {
 public:
  explicit InferDoor(Router* router) : router_(router) {}
  // Answers the call whose request is `bytes`: queued on its route's batcher, or forwarded to
  // the coordinator.
  void Infer(InferCall* call, grpc::ByteBuffer* bytes);

 private:
  bool Sampled(InferCall* call);
  bool TakeQueueParameters(InferCall* call);
  Router* router_;
};

}  // namespace frontdoor
