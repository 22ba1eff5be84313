// Per-route queue that forms batches while the node is busy and sends them on its fast lane.
#pragma once

#include <chrono>
#include <deque>
#include <functional>
#include <memory>
#include <mutex>
#include <string>
#include <vector>

#include "cache.h"
#include "call.h"
#include "fastlane.h"
#include "formation.h"
#include "node_rows.h"
#include "reporter.h"

namespace frontdoor {

// What a RouteReply says about eligible requests, parsed once.
struct RouteConfig {
  uint64_t route_id = 0;
  std::string node_id;       // the node as the coordinator names it (its rows are counted under it)
  std::string node_address;
  std::string template_bytes;  // request and response templates as received, for comparison
  inference::ModelInferRequest request_template;
  inference::ModelInferResponse response_template;
  uint32_t max_batch_size = 0;
  uint32_t timeout_ms = 0;
  uint32_t full_path_every = 0;  // one request in N takes the coordinator's (traced) path
  uint32_t max_inflight = 0;     // the deployment's; 0: the door's --max-inflight
  uint32_t queue_limit = 0;      // the deployment's; 0: the door's --queue-limit
  uint32_t max_queue_delay_us = 0;               // hold a batch back this long for more rows
  std::vector<uint32_t> preferred_batch_sizes;   // ... unless it has one of these sizes
  bool response_cache = false;   // the deployment caches responses
  std::string cache_scope;       // the variant, as cache keys name it (the request template)
};

struct BatcherOptions {
  int max_inflight = 2;
  size_t queue_limit = 2048;
  ResponseCache* cache = nullptr;  // the door's response cache (null: none)
  NodeRows* node_rows = nullptr;   // the door's rows per node, every route's (null: this route's alone)
};

class Batcher : public std::enable_shared_from_this<Batcher> {
 public:
  using OnFailure = std::function<void(uint64_t route_id)>;
  Batcher(std::shared_ptr<const RouteConfig> config, BatcherOptions options, Reporter* reporter,
          OnFailure on_failure);
  ~Batcher();
  // Answers the call from the response cache, queues it (it is answered later) or forwards it
  // when this batcher has failed.
  void Enqueue(InferCall* call);
  const RouteConfig& config() const { return *config_; }
  bool failed();
  // Requests queued plus node calls in flight: how busy this route's node is kept by the door.
  size_t Busy();
  // Rows queued for this route's node plus rows of the node calls in flight to it, of every route
  // to that node (the least_loaded policy's rows outstanding; node_rows.h).
  int64_t NodeRowsNow() const { return share_.node_rows(); }

 private:
  struct Batch;
  void Dispatch();
  void Woken();
  // The queue's timeout wake-up (armed for `armed_for`): fails the expired, arms the next.
  void ExpireQueued(std::chrono::steady_clock::time_point armed_for);
  // True when it took any out.
  bool DropLocked(std::vector<InferCall*>* expired, std::vector<InferCall*>* cancelled);
  // Answers what DropLocked took out of the queue: DEADLINE_EXCEEDED, CANCELLED.
  void FailDropped(const std::vector<InferCall*>& expired, const std::vector<InferCall*>& cancelled = {});
  // The route's node as messages name it: "node <id>" (its fast-lane address is internal).
  std::string NodeName() const;
  // Answers `call` with an error of the door's own, reported so the coordinator counts it;
  // `dropped`: why it left the queue unsent (cnei_batch_dropped_total's reason), "" once sent.
  void Refuse(InferCall* call, const grpc::Status& status, const char* dropped = "");
  // Drops cancelled and expired requests, then takes the next batch (formation.h, Take) of
  // `candidates`, formed again when it dropped any.
  std::shared_ptr<Batch> TakeLocked(Candidates* candidates, std::vector<InferCall*>* expired,
                                    std::vector<InferCall*>* cancelled);
  bool AnsweredFromCache(InferCall* call);
  void KeepAnswer(InferCall* call, const grpc::ByteBuffer& response);
  void Send(std::shared_ptr<Batch> batch);
  void OnReply(const std::shared_ptr<Batch>& batch, grpc::Status status, const std::string& body,
               size_t offset);
  void Answer(const Batch& batch, std::shared_ptr<inference::ModelInferResponse> reply);
  void ClientDeadline(const Batch& batch);
  // A batch the node answered INVALID_ARGUMENT: the request alone fails, a batch's members go again singly.
  void RequestsRefused(const Batch& batch, const grpc::Status& status);
  void HandOver(const Batch& batch, const grpc::Status& status);
  void Finished(int64_t rows);

  const std::shared_ptr<const RouteConfig> config_;
  const BatcherOptions options_;
  const BatchRules rules_;
  Reporter* reporter_;
  OnFailure on_failure_;
  std::shared_ptr<FastLane> lane_;
  std::mutex mu_;  // guards the fields below
  Queue queue_;
  int inflight_ = 0;
  NodeShare share_;        // this route's rows queued and in flight, counted at its node
  int64_t last_rows_ = 0;  // rows of the batch sent last
  bool failed_ = false;
  // One timeout wake-up at a time, at the earliest timeout queued (not one per request: each
  // would hold the batcher and its entry until its timeout, answered or not).
  bool expiry_armed_ = false;
  std::chrono::steady_clock::time_point expiry_at_;
  bool armed_ = false;                              // a queue-delay wake-up is pending
  std::chrono::steady_clock::time_point wake_at_;  // ... at this time
};

}  // namespace frontdoor
