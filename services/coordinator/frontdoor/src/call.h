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
#include "shm.h"

namespace frontdoor {

class UnaryCall : public grpc::ServerGenericBidiReactor {
 public:
  UnaryCall(grpc::GenericCallbackServerContext* ctx, Backend* backend);
  void OnReadDone(bool ok) override;
  void OnCancel() override;
  void OnDone() override { delete this; }

  // Passes the original request to the backend and its answer back to the client
  // (`trace_picked`: marked as sampled by the door for tracing).
  void Forward(bool trace_picked = false);
  void Reply(grpc::ByteBuffer response);
  void Fail(const grpc::Status& status);
  bool cancelled() const { return cancelled_.load(std::memory_order_relaxed); }
  grpc::GenericCallbackServerContext& context() { return *ctx_; }

 protected:
  virtual void OnRequest() { Forward(); }
  // The backend's answer, before it goes to the client.
  virtual void OnForwarded(const grpc::Status& status) {}
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
class Router;

// RepositoryModelLoad / RepositoryModelUnload: forwarded; once the coordinator has done it, the
// door forgets the model's routes, so the next request is placed afresh (an unloaded model is
// never served from a route learnt before).
class RepositoryCall : public UnaryCall {
 public:
  RepositoryCall(grpc::GenericCallbackServerContext* ctx, Backend* backend, Router* router)
      : UnaryCall(ctx, backend), router_(router) {}

 private:
  void OnRequest() override;
  void OnForwarded(const grpc::Status& status) override;
  Router* router_;
  std::string model_;
};

// One ModelInfer request the door decides on: parsed once, then batched or forwarded. A unary
// ModelInfer call is one; so is each message of a ModelStreamInfer stream (stream.h).
class InferCall {
 public:
  using Clock = std::chrono::steady_clock;
  InferCall() : received_at(Clock::now()) {}
  virtual ~InferCall() = default;
  // The answer: passed to the coordinator, a reply (a serialized ModelInferResponse) or a
  // status. Exactly one of them, once; the call may be gone after it.
  virtual void Forward() = 0;
  virtual void Reply(grpc::ByteBuffer response) = 0;
  virtual void Fail(const grpc::Status& status) = 0;
  virtual bool cancelled() const = 0;
  // The client's call (its metadata and deadline).
  virtual grpc::GenericCallbackServerContext& context() = 0;

  bool Parse(grpc::ByteBuffer* bytes);
  const inference::ModelInferRequest& request() const { return request_; }
  inference::ModelInferRequest& mutable_request() { return request_; }
  bool DeadlinePassed();
  double SecondsLeft();  // +inf without a deadline

  Clock::time_point received_at;
  int64_t rows = 0;
  // Triton's per-request queue parameters, taken off the request by the door: the priority
  // level (lower is served first; 0 and absent mean the default level, after every explicit
  // one) and the end of its `timeout_us` (max: none).
  static constexpr uint64_t kDefaultPriority = uint64_t(1) << 30;
  uint64_t priority = kDefaultPriority;
  Clock::time_point timeout_at = Clock::time_point::max();
  std::shared_ptr<const std::string> route_key;  // requests batch together only with equal keys
  std::vector<OutputPlace> output_places;  // outputs the client wants in its shared memory
  // Sampled by the door to start a trace: forwarded with kTracePickedHeader, so the coordinator
  // traces it without sampling it again.
  bool trace_picked = false;
  // Its response cache key when the answer is to be kept (empty: not), and the lookup's time.
  std::string cache_key;
  uint64_t cache_lookup_ns = 0;

 private:
  inference::ModelInferRequest request_;
};

// A unary ModelInfer call.
class UnaryInferCall : public UnaryCall, public InferCall {
 public:
  UnaryInferCall(grpc::GenericCallbackServerContext* ctx, Backend* backend, InferDoor* door)
      : UnaryCall(ctx, backend), door_(door) {}
  void Forward() override { UnaryCall::Forward(trace_picked); }
  void Reply(grpc::ByteBuffer response) override { UnaryCall::Reply(std::move(response)); }
  void Fail(const grpc::Status& status) override { UnaryCall::Fail(status); }
  bool cancelled() const override { return UnaryCall::cancelled(); }
  grpc::GenericCallbackServerContext& context() override { return UnaryCall::context(); }

 private:
  void OnRequest() override;
  InferDoor* door_;
};

}  // namespace frontdoor
