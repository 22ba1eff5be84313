// Batch formation over one route's queue: Triton's dynamic batcher rules as pure functions (the
// coordinator's batcher, services/common/batcher.py, applies the same ones on the full path).
#pragma once

#include <chrono>
#include <cstddef>
#include <cstdint>
#include <deque>
#include <string>
#include <vector>

namespace frontdoor {

class InferCall;

// A request in a batcher's queue: the call, and what batch formation reads of it, taken once
// when it is queued.
struct Queued {
  using Clock = std::chrono::steady_clock;
  InferCall* call = nullptr;
  Clock::time_point received_at;
  uint64_t priority = 0;             // the level: lower is served first
  const std::string* key = nullptr;  // requests batch together only with equal keys
  int64_t rows = 0;
  size_t bytes = 0;                  // its input tensors' bytes
};
// Oldest first.
using Queue = std::deque<Queued>;

// A route's batching rules.
struct BatchRules {
  int64_t max_batch_size = 0;  // 0: no batch dimension, each request alone
  std::chrono::microseconds max_queue_delay{0};  // 0: a batch leaves as soon as a slot is free
  std::vector<uint32_t> preferred_batch_sizes;   // as the deployment lists them
  size_t max_bytes = 0;                          // tensor bytes a batch takes at most
};

// The queue in serving order (queue indices): priority level (lower first), then arrival.
std::vector<size_t> ServingOrder(const Queue& queue);
// The requests that batch with the most urgent one, in serving order.
std::vector<size_t> Same(const Queue& queue);
// Rows queued that would batch with the most urgent request.
int64_t HeadRows(const Queue& queue);
// The head of `same` and every later one that still fits under `limit` rows and the byte cap
// (*rows: their rows).
std::vector<size_t> Fill(const BatchRules& rules, const Queue& queue, const std::vector<size_t>& same,
                         int64_t limit, int64_t* rows);
// The batch of the largest preferred size that Fill makes exactly (empty: none).
std::vector<size_t> Preferred(const BatchRules& rules, const Queue& queue, const std::vector<size_t>& same,
                              int64_t* rows);
// With a batch of `last_rows` in flight, may another go?
bool MayOverlap(const BatchRules& rules, const Queue& queue, int64_t last_rows);
// Send now (a non-empty queue)? Else *wake: when the oldest has waited the queue delay.
bool Ready(const BatchRules& rules, const Queue& queue, Queued::Clock::time_point now,
           Queued::Clock::time_point* wake);
// The next batch of a non-empty queue (queue indices, in the order they go; *rows: their rows).
std::vector<size_t> Take(const BatchRules& rules, const Queue& queue, Queued::Clock::time_point now,
                         int64_t* rows);

}  // namespace frontdoor
