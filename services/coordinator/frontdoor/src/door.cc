// Decides, per ModelInfer request, between the fast path (batch to a node) and the coordinator.
#include "door.h"

#include "tensor.h"

namespace frontdoor {

void InferDoor::Infer(InferCall* call) {
  if (!call->Parse() || Sampled(call) || ContentProblem(call->request()) != nullptr) {
    return call->Forward();
  }
  Router::Lookup route = router_->Find(RouteKey(&call->mutable_request()), &call->mutable_request());
  if (!route.batcher) return call->Forward();
  int64_t rows = BatchRows(call->request(), route.batcher->config().max_batch_size);
  if (rows < 0) return call->Forward();
  call->rows = rows;
  call->route_key = std::move(route.key);
  route.batcher->Enqueue(call);
}

// A sampled trace (traceparent flags with bit 0 set) takes the fully traced coordinator path.
bool InferDoor::Sampled(InferCall* call) {
  const auto& metadata = call->context().client_metadata();
  auto it = metadata.find("traceparent");
  if (it == metadata.end() || it->second.size() < 2) return false;
  const char* flags = it->second.data() + it->second.size() - 2;
  auto hex = [](char c) {
    return c >= '0' && c <= '9' ? c - '0' : (c | 0x20) >= 'a' && (c | 0x20) <= 'f' ? (c | 0x20) - 'a' + 10 : 0;
  };
  return ((hex(flags[0]) << 4 | hex(flags[1])) & 1) != 0;
}

}  // namespace frontdoor
