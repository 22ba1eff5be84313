// One unary call on the public port: reads the request, then the door or the backend answers it.
#pragma once

#include <grpcpp/generic/async_generic_service.h>

#include <atomic>
#include <chrono>
#include <memory>
#include <mutex>
#include <string>

#include "backend.h"
#include "inference/grpc_service.pb.h"

namespace frontdoor {

class UnaryCall : public grpc::ServerGenericBidiReactor {
 public:
  UnaryCall(grpc::GenericCallbackServerContext* ctx, Backend* backend);
  void OnReadDone(bool ok) override;
  void OnCancel() override;
  void OnDone() override { delete this; }

  // Passes the original request to the backend and its answer back to the client.
  void Forward();
  void Reply(grpc::ByteBuffer response);
  void Fail(const grpc::Status& status);
  bool cancelled() const { return cancelled_.load(std::memory_order_relaxed); }
  grpc::GenericCallbackServerContext& context() { return *ctx_; }

 protected:
  virtual void OnRequest() { Forward(); }
  grpc::ByteBuffer request_bytes_;

 private:
  void OnBackendDone(const grpc::Status& status);
  grpc::GenericCallbackServerContext* ctx_;
  Backend* backend_;
  grpc::ByteBuffer response_;
  std::mutex mu_;                                   // guards upstream_ against OnCancel
  std::unique_ptr<grpc::ClientContext> upstream_;
  std::atomic<bool> cancelled_{false};
};

class InferDoor;

// A ModelInfer call: parsed once, then batched by the door or forwarded.
class InferCall : public UnaryCall {
 public:
  using Clock = std::chrono::steady_clock;
  InferCall(grpc::GenericCallbackServerContext* ctx, Backend* backend, InferDoor* door);
  bool Parse();
  const inference::ModelInferRequest& request() const { return request_; }
  inference::ModelInferRequest& mutable_request() { return request_; }
  bool DeadlinePassed() const;
  double SecondsLeft() const;  // +inf without a deadline

  Clock::time_point received_at;
  int64_t rows = 0;
  // Triton's per-request queue parameters, taken off the request by the door: the priority
  // level (lower is served first; 0 and absent mean the default level, after every explicit
  // one) and the end of its `timeout_us` (max: none).
  static constexpr uint64_t kDefaultPriority = uint64_t(1) << 30;
  uint64_t priority = kDefaultPriority;
  Clock::time_point timeout_at = Clock::time_point::max();
  std::shared_ptr<const std::string> route_key;  // requests batch together only with equal keys

 private:
  void OnRequest() override;
  InferDoor* door_;
  inference::ModelInferRequest request_;
};

}  // namespace frontdoor
