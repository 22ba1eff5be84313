// Decides, per ModelInfer request, between the fast path (batch to a node) and the coordinator.
#pragma once

#include <string>

#include "call.h"
#include "router.h"

namespace frontdoor {

class InferDoor {
 public:
  // `shm`: the coordinator's shared memory registrations (nullptr: such requests are forwarded).
  // `restrict_header` / `restrict_value`: Triton's restricted inference API (empty: open); a
  // request without that header and value is PERMISSION_DENIED.
  InferDoor(Router* router, SharedMemory* shm, std::string restrict_header = "",
            std::string restrict_value = "")
      : router_(router), shm_(shm), restrict_header_(std::move(restrict_header)),
        restrict_value_(std::move(restrict_value)) {}
  // Answers the call whose request is `bytes`: queued on its route's batcher, or forwarded to
  // the coordinator.
  void Infer(InferCall* call, grpc::ByteBuffer* bytes);

 private:
  bool Allowed(InferCall* call);
  bool Sampled(InferCall* call);
  bool TakeQueueParameters(InferCall* call);
  bool TakeSharedMemory(InferCall* call);
  Router* router_;
  SharedMemory* shm_;
  const std::string restrict_header_;
  const std::string restrict_value_;
};

}  // namespace frontdoor
