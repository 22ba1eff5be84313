// Per-route queue that forms batches while the node is busy and sends them on its fast lane.
#include "batcher.h"

#include <algorithm>
#include <cstdio>
#include <deque>
#include <vector>

#include "codes.h"
#include "tensor.h"
#include "timer.h"

namespace frontdoor {
namespace {

using Clock = std::chrono::steady_clock;
// Tensor bytes a batch takes at most, under the fast lane's 64 MiB frame with room for its
// header and meta: rows alone could make a frame the node must refuse (a node failure).
constexpr size_t kBatchBytes = 60u * 1024 * 1024;

uint64_t Nanos(Clock::duration d) {
  return uint64_t(std::chrono::duration_cast<std::chrono::nanoseconds>(d).count());
}

void AppendJsonString(std::string* out, grpc::string_ref value) {
  out->push_back('"');
  for (char c : value) {
    unsigned char u = static_cast<unsigned char>(c);
    if (c == '"' || c == '\\') {
      out->push_back('\\');
      out->push_back(c);
    } else if (u < 0x20 || u >= 0x80) {
      char escaped[8];
      snprintf(escaped, sizeof escaped, "\\u%04x", u);
      out->append(escaped);
    } else {
      out->push_back(c);
    }
  }
  out->push_back('"');
}

// {"timeout": seconds, "trace": {"traceparent": ..., "tracestate": ...}} for the fast lane.
std::string MetaJson(double timeout_s, const grpc::ServerContextBase& ctx) {
  char number[32];
  snprintf(number, sizeof number, "%.6f", timeout_s);
  std::string meta = std::string("{\"timeout\": ") + number + ", \"trace\": {";
  const auto& metadata = ctx.client_metadata();
  bool first = true;
  for (const char* key : {"traceparent", "tracestate"}) {
    auto it = metadata.find(key);
    if (it == metadata.end()) continue;
    meta += first ? "\"" : ", \"";
    meta += key;
    meta += "\": ";
    AppendJsonString(&meta, it->second);
    first = false;
  }
  return meta + "}}";
}

// The door's defaults, overridden by what the route's deployment says.
BatcherOptions WithRoute(BatcherOptions options, const RouteConfig& config) {
  if (config.max_inflight > 0) options.max_inflight = int(config.max_inflight);
  if (config.queue_limit > 0) options.queue_limit = config.queue_limit;
  return options;
}

std::shared_ptr<NodeCount> CountFor(const BatcherOptions& options, const RouteConfig& config) {
  if (options.node_rows == nullptr) return std::make_shared<NodeCount>();
  return options.node_rows->For(config.node_id.empty() ? config.node_address : config.node_id);
}

size_t InputBytes(const InferCall& call) {
  size_t bytes = 0;
  for (const std::string& raw : call.request().raw_input_contents()) bytes += raw.size();
  return bytes;
}

// Keeps, in order, the queued requests `keep` (called with each index once) says to; true when
// it let any go.
template <typename Keep>
bool KeepOnly(Queue* queue, Keep keep) {
  size_t kept = 0;
  for (size_t i = 0; i < queue->size(); ++i) {
    if (keep(i)) (*queue)[kept++] = (*queue)[i];
  }
  if (kept == queue->size()) return false;
  queue->erase(queue->begin() + ptrdiff_t(kept), queue->end());
  return true;
}

}  // namespace

struct Batcher::Batch {
  std::vector<InferCall*> members;
  int64_t rows = 0;
  bool client_bound = false;  // its timeout was a member's deadline, not the route's
  Clock::time_point sent_at;
};

Batcher::Batcher(std::shared_ptr<const RouteConfig> config, BatcherOptions options,
                 Reporter* reporter, OnFailure on_failure)
    : config_(std::move(config)), options_(WithRoute(options, *config_)),
      rules_(config_->max_batch_size, config_->max_queue_delay_us, config_->preferred_batch_sizes, kBatchBytes),
      reporter_(reporter), on_failure_(std::move(on_failure)), lane_(LaneFor(config_->node_address)),
      share_(CountFor(options, *config_)) {}

// Every row queued or sent was let go of when its request left (answered, failed, forwarded); one
// still held is a counting error, given back by share_ and reported (node_rows.h).
Batcher::~Batcher() {
  if (share_.held() != 0) {
    fprintf(stderr, "cnei-frontdoor: error: route %llu ended with %lld rows still counted at node %s\n",
            (unsigned long long)config_->route_id, (long long)share_.held(), config_->node_address.c_str());
  }
}

bool Batcher::failed() {
  std::lock_guard<std::mutex> lock(mu_);
  return failed_;
}

size_t Batcher::Busy() {
  std::lock_guard<std::mutex> lock(mu_);
  return queue_.size() + size_t(inflight_);
}

// A deployment with a response cache: the answer kept for these inputs, if any, goes back at once
// (with the call's id); otherwise the call takes its key along, for its answer to be kept.
bool Batcher::AnsweredFromCache(InferCall* call) {
  if (!config_->response_cache || options_.cache == nullptr || !call->output_places.empty()) return false;
  const auto start = Clock::now();
  std::string key = ResponseCache::Key(config_->cache_scope, call->request());
  ResponseCache::Answer answer = options_.cache->Get(key);
  if (!answer) {
    call->cache_key = std::move(key);
    call->cache_lookup_ns = Nanos(Clock::now() - start);
    return false;
  }
  inference::ModelInferResponse reply = *answer;
  reply.set_id(call->request().id());
  std::string bytes = reply.SerializeAsString();
  grpc::Slice slice(bytes);
  const auto lookup_ns = Nanos(Clock::now() - start);
  const auto total_ns = Nanos(Clock::now() - call->received_at);
  const auto rows = uint32_t(call->rows);
  call->Reply(grpc::ByteBuffer(&slice, 1));  // the call may be gone after it
  reporter_->CacheHit(config_->route_id, total_ns, rows, lookup_ns);
  return true;
}

// Keeps a node's answer to a call whose lookup missed (marked as coming from the cache).
void Batcher::KeepAnswer(InferCall* call, const grpc::ByteBuffer& response) {
  const auto start = Clock::now();
  std::vector<grpc::Slice> slices;
  if (!response.Dump(&slices).ok()) return;
  std::string bytes;
  for (const auto& s : slices) bytes.append(reinterpret_cast<const char*>(s.begin()), s.size());
  auto answer = std::make_shared<inference::ModelInferResponse>();
  if (!answer->ParseFromString(bytes)) return;
  answer->clear_id();
  (*answer->mutable_parameters())["cnei_response_cache"].set_bool_param(true);
  options_.cache->Put(call->cache_key, std::move(answer));
  reporter_->CacheMiss(config_->route_id, call->cache_lookup_ns + Nanos(Clock::now() - start));
}

void Batcher::Enqueue(InferCall* call) {
  if (AnsweredFromCache(call)) return;
  const auto timeout_at = call->timeout_at;  // once queued, the call may be answered and gone
  const Queued queued{call, call->received_at, call->priority, call->route_key.get(), call->rows, InputBytes(*call)};
  size_t full = 0;
  bool forward = false, arm_expiry = false;
  std::vector<InferCall*> expired, cancelled;
  {
    std::lock_guard<std::mutex> lock(mu_);
    // Each priority level's queue is bounded on its own (Triton's default_queue_policy): queued
    // work never refuses a more urgent request. A full level first lets go of what no longer
    // waits (cancelled, expired) and would only leave it at the next batch.
    auto at_level = [this, &queued] {
      return size_t(std::count_if(queue_.begin(), queue_.end(),
                                  [&queued](const Queued& q) { return q.priority == queued.priority; }));
    };
    if (!failed_ && at_level() >= options_.queue_limit) DropLocked(&expired, &cancelled);
    if (failed_) {
      forward = true;
    } else if (at_level() >= options_.queue_limit) {
      full = options_.queue_limit;
    } else {
      queue_.push_back(queued);
      share_.Add(queued.rows);
      if (timeout_at != InferCall::Clock::time_point::max() && (!expiry_armed_ || timeout_at < expiry_at_)) {
        arm_expiry = expiry_armed_ = true;
        expiry_at_ = timeout_at;
      }
    }
  }
  FailDropped(expired, cancelled);
  if (forward) return call->Forward();
  if (arm_expiry) {
    Timers::Get().At(timeout_at, [self = shared_from_this(), timeout_at] { self->ExpireQueued(timeout_at); });
  }
  if (full > 0) {
    const std::string level = queued.priority == InferCall::kDefaultPriority
                                  ? "the default priority" : "priority " + std::to_string(queued.priority);
    return Refuse(call, grpc::Status(grpc::StatusCode::RESOURCE_EXHAUSTED,
                                   "front door queue for model '" + call->request().model_name() +
                                       "' is full (" + std::to_string(full) + " requests) at " + level),
                  "queue_full");
  }
  Dispatch();
}

void Batcher::Dispatch() {
  for (;;) {
    std::vector<InferCall*> expired, cancelled;
    std::shared_ptr<Batch> batch;
    bool arm = false;
    Clock::time_point wake;
    {
      std::lock_guard<std::mutex> lock(mu_);
      if (failed_ || inflight_ >= options_.max_inflight || queue_.empty()) return;
      Candidates candidates = CandidatesIn(queue_);
      if (inflight_ > 0 && !MayOverlap(rules_, candidates, last_rows_)) return;  // Finished() dispatches it
      if (!Ready(rules_, queue_, &candidates, Clock::now(), &wake)) {
        arm = !armed_ || wake < wake_at_;
        if (arm) armed_ = true, wake_at_ = wake;
      } else {
        batch = TakeLocked(&candidates, &expired, &cancelled);
        if (batch) ++inflight_, last_rows_ = batch->rows;  // its rows stay counted (share_) until it is answered
      }
    }
    if (arm) {
      // A strong reference: a route replaced meanwhile drops its batcher, whose queued
      // requests still have to leave when their delay is up.
      Timers::Get().At(wake, [self = shared_from_this()] { self->Woken(); });
    }
    FailDropped(expired, cancelled);
    if (!batch) return;
    Send(std::move(batch));
  }
}

void Batcher::Woken() {
  {
    std::lock_guard<std::mutex> lock(mu_);
    armed_ = false;
  }
  Dispatch();
}

std::shared_ptr<Batcher::Batch> Batcher::TakeLocked(Candidates* candidates, std::vector<InferCall*>* expired,
                                                   std::vector<InferCall*>* cancelled) {
  if (DropLocked(expired, cancelled)) {
    if (queue_.empty()) return nullptr;
    *candidates = CandidatesIn(queue_);
  }
  auto batch = std::make_shared<Batch>();
  const std::vector<size_t> chosen = Take(rules_, queue_, candidates, Clock::now(), &batch->rows);
  std::vector<bool> taken(queue_.size(), false);
  for (size_t i : chosen) {
    batch->members.push_back(queue_[i].call);
    taken[i] = true;
  }
  KeepOnly(&queue_, [&taken](size_t i) { return !taken[i]; });
  return batch;
}

// Takes expired requests, and cancelled ones when asked, out of the queue.
bool Batcher::DropLocked(std::vector<InferCall*>* expired, std::vector<InferCall*>* cancelled) {
  int64_t dropped_rows = 0;
  const bool dropped = KeepOnly(&queue_, [this, expired, cancelled, &dropped_rows](size_t i) {
    InferCall* call = queue_[i].call;
    if (call->DeadlinePassed()) {
      expired->push_back(call);
    } else if (cancelled != nullptr && call->cancelled()) {
      cancelled->push_back(call);
    } else {
      return true;
    }
    dropped_rows += queue_[i].rows;
    return false;
  });
  share_.Add(-dropped_rows);
  return dropped;
}

// A request's own timeout ended while it was queued: it fails now, without waiting for a batch
// slot, and is never sent.
void Batcher::ExpireQueued(Clock::time_point armed_for) {
  std::vector<InferCall*> expired;
  Clock::time_point next = Clock::time_point::max();
  {
    std::lock_guard<std::mutex> lock(mu_);
    if (expiry_armed_ && expiry_at_ == armed_for) expiry_armed_ = false;  // else a sooner one is armed
    DropLocked(&expired, nullptr);
    if (!expiry_armed_) {
      for (const Queued& queued : queue_) next = std::min(next, queued.call->timeout_at);
      if (next != Clock::time_point::max()) expiry_armed_ = true, expiry_at_ = next;
    }
  }
  if (next != Clock::time_point::max()) {
    Timers::Get().At(next, [self = shared_from_this(), next] { self->ExpireQueued(next); });
  }
  FailDropped(expired);
}

// The node as messages name it: by the coordinator's id (its fast-lane address is internal).
std::string Batcher::NodeName() const {
  return "node " + (config_->node_id.empty() ? config_->node_address : config_->node_id);
}

void Batcher::Refuse(InferCall* call, const grpc::Status& status, const char* dropped) {
  reporter_->Refused(config_->route_id, Nanos(Clock::now() - call->received_at), CodeName(status.error_code()),
                     dropped);
  call->Fail(status);  // the call may be gone after it
}

void Batcher::FailDropped(const std::vector<InferCall*>& expired, const std::vector<InferCall*>& cancelled) {
  for (InferCall* call : expired) {
    Refuse(call, grpc::Status(grpc::StatusCode::DEADLINE_EXCEEDED,
                              "deadline passed while queued in the front door for model '" +
                                call->request().model_name() + "'"),
           "deadline");
  }
  for (InferCall* call : cancelled) {
    Refuse(call, grpc::Status(grpc::StatusCode::CANCELLED, "cancelled while queued"), "cancelled");
  }
}

void Batcher::Send(std::shared_ptr<Batch> batch) {
  const bool batched = config_->max_batch_size > 0;
  std::vector<const inference::ModelInferRequest*> requests;
  requests.reserve(batch->members.size());
  const double route_timeout_s = config_->timeout_ms > 0 ? config_->timeout_ms / 1000.0 : 60.0;
  double timeout_s = route_timeout_s;
  for (InferCall* call : batch->members) {
    requests.push_back(&call->request());
    timeout_s = std::min(timeout_s, call->SecondsLeft());
  }
  batch->client_bound = timeout_s < route_timeout_s;
  timeout_s = std::max(timeout_s, 0.001);
  BatchWire wire;
  BuildBatch(config_->request_template, requests, batch->rows, batched, &wire);
  std::string meta = MetaJson(timeout_s, batch->members.front()->context());
  batch->sent_at = Clock::now();
  lane_->Call(meta, wire.pieces, timeout_s,
              [self = shared_from_this(), batch](const grpc::Status& status, std::string body,
                                                 size_t offset) {
                self->OnReply(batch, status, body, offset);
              });
}

void Batcher::OnReply(const std::shared_ptr<Batch>& batch, grpc::Status status,
                      const std::string& body, size_t offset) {
  auto reply = std::make_shared<inference::ModelInferResponse>();
  if (status.ok()) {
    if (!reply->ParseFromArray(body.data() + offset, int(body.size() - offset))) {
      status = grpc::Status(grpc::StatusCode::INTERNAL, "unparseable reply from " + NodeName());
    } else if (const char* problem = ReplyProblem(*reply, batch->rows, config_->max_batch_size > 0)) {
      status = grpc::Status(grpc::StatusCode::INTERNAL,
                            std::string(problem) + " (" + NodeName() + ")");
    }
  }
  if (status.error_code() == grpc::StatusCode::DEADLINE_EXCEEDED && batch->client_bound) {
    Finished(batch->rows);
    ClientDeadline(*batch);
  } else if (status.error_code() == grpc::StatusCode::INVALID_ARGUMENT) {
    RequestsRefused(*batch, status);
  } else if (!status.ok()) {
    HandOver(*batch, status);
  } else {
    Finished(batch->rows);  // the next batch leaves before this one's answers: the node is not kept waiting
    Answer(*batch, std::move(reply));
  }
}

// A client's own deadline ended the node call: not the node's failure. Expired members get
// DEADLINE_EXCEEDED; the others still have time and go to the coordinator.
void Batcher::ClientDeadline(const Batch& batch) {
  for (InferCall* call : batch.members) {
    if (call->DeadlinePassed()) {
      Refuse(call, grpc::Status(grpc::StatusCode::DEADLINE_EXCEEDED,
                                "deadline passed while waiting for " + NodeName()));
    } else {
      call->Forward();
    }
  }
}

void Batcher::Answer(const Batch& batch, std::shared_ptr<inference::ModelInferResponse> reply) {
  cnei::frontdoor::v1::Batch stats;
  stats.set_rows(uint32_t(batch.rows));
  stats.set_requests(uint32_t(batch.members.size()));
  stats.set_duration_ns(Nanos(Clock::now() - batch.sent_at));
  stats.set_compute_ns(ComputeNs(*reply));
  const bool batched = config_->max_batch_size > 0;
  ReplySlicer slicer(config_->response_template, std::move(reply), batch.rows, batched);
  std::vector<ServedRequest> served;
  served.reserve(batch.members.size());
  int64_t row = 0;
  for (InferCall* call : batch.members) {
    std::string problem;
    grpc::ByteBuffer response = slicer.Slice(call->request().id(), row, call->rows, call->output_places, &problem);
    row += call->rows;
    if (!problem.empty()) {  // the call may be gone after either
      Refuse(call, grpc::Status(grpc::StatusCode::INVALID_ARGUMENT, problem));
    } else {
      served.push_back({Nanos(Clock::now() - call->received_at), Nanos(batch.sent_at - call->received_at),
                        uint32_t(call->rows)});
      if (!call->cache_key.empty()) KeepAnswer(call, response);
      call->Reply(std::move(response));
    }
  }
  reporter_->Served(config_->route_id, served, stats);
}

// The node refused the batch's requests themselves (INVALID_ARGUMENT: a value ONNX Runtime will
// not take, say), not the node's failure: the route stays. A request alone is answered with the
// node's error, reported as its own failure; a batch's members go again one at a time, on the
// batch's in-flight slot and one more each, so that only the bad one fails (as Triton does).
void Batcher::RequestsRefused(const Batch& batch, const grpc::Status& status) {
  if (batch.members.size() == 1) {
    Finished(batch.rows);
    return Refuse(batch.members.front(), status);  // the call may be gone after it
  }
  std::vector<std::shared_ptr<Batch>> singles;
  for (InferCall* call : batch.members) {
    auto single = std::make_shared<Batch>();
    single->members.push_back(call);
    single->rows = call->rows;
    singles.push_back(std::move(single));
  }
  {
    std::lock_guard<std::mutex> lock(mu_);
    inflight_ += int(singles.size()) - 1;
  }
  for (auto& single : singles) Send(std::move(single));
}

// A failed node call: the route is dropped, reported at once, and every member forwarded.
void Batcher::HandOver(const Batch& batch, const grpc::Status& status) {
  std::vector<InferCall*> members = batch.members;
  {
    std::lock_guard<std::mutex> lock(mu_);
    failed_ = true;
    --inflight_;
    int64_t rows = batch.rows;
    for (const Queued& queued : queue_) members.push_back(queued.call), rows += queued.rows;
    queue_.clear();
    share_.Add(-rows);
  }
  fprintf(stderr, "cnei-frontdoor: route %llu to %s failed (%s); %zu requests go to the coordinator\n",
          (unsigned long long)config_->route_id, config_->node_address.c_str(),
          Describe(status).c_str(), members.size());
  on_failure_(config_->route_id);
  reporter_->Failed(config_->route_id, uint32_t(members.size()), Describe(status),
                    [members] {
                      for (InferCall* call : members) call->Forward();
                    });
}

void Batcher::Finished(int64_t rows) {
  {
    std::lock_guard<std::mutex> lock(mu_);
    --inflight_;
    share_.Add(-rows);
  }
  Dispatch();
}

}  // namespace frontdoor
