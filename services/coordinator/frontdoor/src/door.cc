// Decides, per ModelInfer request, between the fast path (batch to a node) and the coordinator.
#include "door.h"

#include <algorithm>
#include <cstdint>

#include "tensor.h"

namespace frontdoor {

void InferDoor::Infer(InferCall* call, grpc::ByteBuffer* bytes) {
  if (!Allowed(call)) {
    return call->Fail(grpc::Status(grpc::StatusCode::PERMISSION_DENIED,
                                   "the inference API is restricted: send header '" +
                                       restrict_header_ + "' with its value"));
  }
  if (!call->Parse(bytes) || Sampled(call) || !TakeSharedMemory(call) ||
      ContentProblem(call->request()) != nullptr ||
      !TakeQueueParameters(call)) {
    return call->Forward();
  }
  Router::Lookup route = router_->Find(RouteKey(&call->mutable_request()), &call->mutable_request());
  if (!route.batcher) {
    call->trace_picked = route.traced;
    return call->Forward();
  }
  int64_t rows = BatchRows(call->request(), route.batcher->config().max_batch_size);
  if (rows < 0) return call->Forward();
  call->rows = rows;
  call->route_key = std::move(route.key);
  route.batcher->Enqueue(call);
}

// Moves `priority` and the timeout in microseconds (`timeout_us`, or `timeout` as tritonclient
// and Triton's gRPC protocol name it) off the request onto the call, so requests that differ
// only in them share a route (and the Route ask never carries them). Values the door does not
// read (not an integer, a negative priority or timeout) leave the request to the coordinator,
// which parses them the same way or answers with a clear error (INVALID_ARGUMENT).
bool InferDoor::TakeQueueParameters(InferCall* call) {
  auto* params = call->mutable_request().mutable_parameters();
  auto integer = [](const inference::InferParameter& p, int64_t* out) {
    switch (p.parameter_choice_case()) {
      case inference::InferParameter::kInt64Param: *out = p.int64_param(); return true;
      case inference::InferParameter::kUint64Param:
        *out = int64_t(std::min<uint64_t>(p.uint64_param(), uint64_t(INT64_MAX)));
        return true;
      default: return false;
    }
  };
  auto read = [params, &integer](const char* name, bool non_negative, int64_t* out) {
    auto it = params->find(name);
    if (it == params->end()) return true;
    return integer(it->second, out) && (!non_negative || *out >= 0);
  };
  int64_t priority = 0, timeout_us = 0, timeout = 0;
  if (!read("priority", true, &priority) || !read("timeout_us", true, &timeout_us) ||
      !read("timeout", true, &timeout)) {
    return false;
  }
  if (timeout_us == 0) timeout_us = timeout;  // as the coordinator: timeout_us first
  if (priority > 0) call->priority = uint64_t(priority);
  // a timeout beyond what the clock holds (~292 years in ns) is no timeout, not an overflow into the past
  const int64_t most_us = std::chrono::duration_cast<std::chrono::microseconds>(
                              InferCall::Clock::time_point::max() - call->received_at).count();
  if (timeout_us > 0 && timeout_us < most_us) {
    call->timeout_at = call->received_at + std::chrono::microseconds(timeout_us);
  }
  for (const char* name : {"priority", "timeout_us", "timeout"}) params->erase(name);
  return true;
}

// Tensors in the client's shared memory: inputs read into the request, outputs noted for the
// reply; the request then looks like any other and batches with them.
bool InferDoor::TakeSharedMemory(InferCall* call) {
  const auto& request = call->request();
  bool placed = false;
  for (const auto& input : request.inputs()) placed |= InSharedMemory(input.parameters());
  for (const auto& output : request.outputs()) placed |= InSharedMemory(output.parameters());
  if (!placed) return true;
  return shm_ != nullptr && shm_->Take(&call->mutable_request(), &call->output_places);
}

// Triton's restricted API: the client sent the header with the value (compared in full, so the
// time taken says nothing of how much of it matched).
bool InferDoor::Allowed(InferCall* call) {
  if (restrict_header_.empty()) return true;
  const auto& metadata = call->context().client_metadata();
  auto it = metadata.find(restrict_header_);
  if (it == metadata.end() || it->second.size() != restrict_value_.size()) return false;
  unsigned char differ = 0;
  for (size_t i = 0; i < restrict_value_.size(); ++i) differ |= it->second.data()[i] ^ restrict_value_[i];
  return differ == 0;
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
