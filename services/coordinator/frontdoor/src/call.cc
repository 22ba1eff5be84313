// One unary call on the public port: reads the request, then the door or the backend answers it.
#include "call.h"

#include <grpcpp/support/proto_buffer_reader.h>

#include <algorithm>
#include <limits>

#include "door.h"
#include "router.h"

namespace frontdoor {

UnaryCall::UnaryCall(grpc::GenericCallbackServerContext* ctx, Backend* backend)
    : ctx_(ctx), backend_(backend) {
  StartRead(&request_bytes_);
}

void UnaryCall::OnReadDone(bool ok) {
  if (!ok) return Fail(grpc::Status(grpc::StatusCode::CANCELLED, "no request message"));
  OnRequest();
}

void UnaryCall::OnCancel() {
  cancelled_.store(true, std::memory_order_relaxed);
  std::lock_guard<std::mutex> lock(mu_);
  if (upstream_) upstream_->TryCancel();
}

void UnaryCall::Forward(bool trace_picked) {
  {
    std::lock_guard<std::mutex> lock(mu_);
    upstream_ = std::make_unique<grpc::ClientContext>();
    CopyRequestMetadata(*ctx_, upstream_.get(), trace_picked);
    if (cancelled()) upstream_->TryCancel();
  }
  backend_->generic.UnaryCall(upstream_.get(), ctx_->method(), grpc::StubOptions(),
                              &request_bytes_, &response_,
                              [this](grpc::Status status) { OnBackendDone(status); });
}

void UnaryCall::OnBackendDone(const grpc::Status& status) {
  OnForwarded(status);
  CopyInitialMetadata(*upstream_, ctx_);
  CopyTrailingMetadata(*upstream_, ctx_);
  if (status.ok()) {
    StartWriteAndFinish(&response_, grpc::WriteOptions(), grpc::Status::OK);
  } else {
    Finish(ClientStatus(status, *upstream_, *backend_));
  }
}

void UnaryCall::Reply(grpc::ByteBuffer response) {
  response_ = std::move(response);
  StartWriteAndFinish(&response_, grpc::WriteOptions(), grpc::Status::OK);
}

void UnaryCall::Fail(const grpc::Status& status) { Finish(status); }

bool InferCall::Parse(grpc::ByteBuffer* bytes) {
  grpc::ProtoBufferReader reader(bytes);
  return request_.ParseFromZeroCopyStream(&reader) && reader.status().ok();
}

bool InferCall::DeadlinePassed() { return SecondsLeft() <= 0; }

double InferCall::SecondsLeft() {
  double left = std::numeric_limits<double>::infinity();
  auto deadline = context().deadline();
  if (deadline != std::chrono::system_clock::time_point::max()) {
    left = std::chrono::duration<double>(deadline - std::chrono::system_clock::now()).count();
  }
  if (timeout_at != Clock::time_point::max()) {
    left = std::min(left, std::chrono::duration<double>(timeout_at - Clock::now()).count());
  }
  return left;
}

void RepositoryCall::OnRequest() {
  // Load and unload requests have the same fields (repository_name, model_name, parameters).
  inference::RepositoryModelUnloadRequest request;
  grpc::ProtoBufferReader reader(&request_bytes_);
  if (request.ParseFromZeroCopyStream(&reader)) model_ = request.model_name();
  Forward();
}

void RepositoryCall::OnForwarded(const grpc::Status& status) {
  // Also when it failed: a load or unload may have taken effect in part.
  if (!model_.empty()) router_->DropModel(model_);
}

void UnaryInferCall::OnRequest() { door_->Infer(this, &request_bytes_); }

}  // namespace frontdoor
