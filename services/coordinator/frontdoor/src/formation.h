// Batch formation over one route's queue: Triton's dynamic batcher rules as pure functions (the
// coordinator's batcher applies the same ones on the full path: services/common/batch_formation.py).
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
// In arrival order.
using Queue = std::deque<Queued>;

// A route's batching rules, prepared once.
struct BatchRules {
  BatchRules(uint32_t max_batch_size, uint32_t max_queue_delay_us,
             const std::vector<uint32_t>& preferred_batch_sizes, size_t max_bytes);
  int64_t max_batch_size;                     // 0: no batch dimension, each request alone
  std::chrono::microseconds max_queue_delay;  // 0: a batch leaves as soon as a slot is free
  std::vector<int64_t> preferred;  // the preferred batch sizes within max_batch_size, largest first, once each
  size_t max_bytes;                // tensor bytes a batch takes at most
};

// What one dispatch decides on, formed from the queue once and handed from check to check: the
// most urgent request (the first of the lowest priority level) and those that batch with it.
struct Candidates {
  size_t head = 0;                // queue index
  int64_t rows = 0;               // the rows of every request of its key
  std::vector<size_t> same;       // those requests, in serving order (priority level, then arrival)
  bool preferred_formed = false;  // `preferred` holds Preferred's answer
  std::vector<size_t> preferred;
  int64_t preferred_rows = 0;
};

// The candidates of a non-empty queue, but `same`: Same forms it once, when first needed.
Candidates CandidatesIn(const Queue& queue);
const std::vector<size_t>& Same(const Queue& queue, Candidates* candidates);
// The head of `same` and every later one that still fits under `limit` rows and the byte cap
// (*rows: their rows).
std::vector<size_t> Fill(const BatchRules& rules, const Queue& queue, const std::vector<size_t>& same,
                         int64_t limit, int64_t* rows);
// The batch of the largest preferred size that Fill makes exactly (empty: none); formed once.
const std::vector<size_t>& Preferred(const BatchRules& rules, const Queue& queue, Candidates* candidates);
// With a batch of `last_rows` in flight, may another go?
bool MayOverlap(const BatchRules& rules, const Candidates& candidates, int64_t last_rows);
// Send now? Else *wake: when the oldest has waited the queue delay.
bool Ready(const BatchRules& rules, const Queue& queue, Candidates* candidates, Queued::Clock::time_point now,
           Queued::Clock::time_point* wake);
// The next batch (queue indices, in the order they go; *rows: their rows).
std::vector<size_t> Take(const BatchRules& rules, const Queue& queue, Candidates* candidates,
                         Queued::Clock::time_point now, int64_t* rows);

}  // namespace frontdoor
