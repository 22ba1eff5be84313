// Batch formation over one route's queue: Triton's dynamic batcher rules as pure functions.
#include "formation.h"

#include <algorithm>

namespace frontdoor {
namespace {

bool SameKey(const Queued& a, const Queued& b) { return a.key == b.key || *a.key == *b.key; }

}  // namespace

BatchRules::BatchRules(uint32_t max_batch_size, uint32_t max_queue_delay_us,
                       const std::vector<uint32_t>& preferred_batch_sizes, size_t max_bytes)
    : max_batch_size(max_batch_size), max_queue_delay(max_queue_delay_us), max_bytes(max_bytes) {
  for (uint32_t size : preferred_batch_sizes) {
    if (size > 0 && size <= max_batch_size) preferred.push_back(size);
  }
  std::sort(preferred.rbegin(), preferred.rend());
  preferred.erase(std::unique(preferred.begin(), preferred.end()), preferred.end());
}

// The most urgent request is the first of the lowest priority level: the head of the serving
// order (services/common/batch_formation.py, `order`, `candidates`).
Candidates CandidatesIn(const Queue& queue) {
  auto most_urgent = std::min_element(
      queue.begin(), queue.end(), [](const Queued& a, const Queued& b) { return a.priority < b.priority; });
  const Queued& head = *most_urgent;
  int64_t rows = 0;
  for (const Queued& queued : queue) {
    if (SameKey(queued, head)) rows += queued.rows;
  }
  Candidates candidates;
  candidates.head = size_t(most_urgent - queue.begin());
  candidates.rows = rows;
  return candidates;
}

// Arrival order, sorted by level only when the requests of the head's key are not all on one.
const std::vector<size_t>& Same(const Queue& queue, Candidates* candidates) {
  std::vector<size_t>& same = candidates->same;
  if (!same.empty()) return same;  // it holds the head at least once formed
  same.reserve(queue.size());
  const Queued& head = queue[candidates->head];
  for (size_t i = 0; i < queue.size(); ++i) {
    if (SameKey(queue[i], head)) same.push_back(i);
  }
  auto by_level = [&queue](size_t a, size_t b) { return queue[a].priority < queue[b].priority; };
  if (!std::is_sorted(same.begin(), same.end(), by_level)) std::stable_sort(same.begin(), same.end(), by_level);
  return same;
}

// services/common/batch_formation.py, fill: one that does not fit stays queued; later ones may.
std::vector<size_t> Fill(const BatchRules& rules, const Queue& queue, const std::vector<size_t>& same,
                         int64_t limit, int64_t* rows) {
  std::vector<size_t> batch{same.front()};
  int64_t total = queue[same.front()].rows;
  size_t bytes = queue[same.front()].bytes;
  for (size_t k = 1; k < same.size(); ++k) {
    const Queued& queued = queue[same[k]];
    if (total + queued.rows > limit || bytes + queued.bytes > rules.max_bytes) continue;
    batch.push_back(same[k]);
    total += queued.rows;
    bytes += queued.bytes;
  }
  *rows = total;
  return batch;
}

// services/common/batch_formation.py, preferred_batch.
const std::vector<size_t>& Preferred(const BatchRules& rules, const Queue& queue, Candidates* candidates) {
  if (candidates->preferred_formed) return candidates->preferred;
  candidates->preferred_formed = true;
  for (int64_t size : rules.preferred) {
    if (size > candidates->rows) continue;  // more than are queued: Fill cannot make it
    std::vector<size_t> batch = Fill(rules, queue, Same(queue, candidates), size, &candidates->preferred_rows);
    if (candidates->preferred_rows == size) {
      candidates->preferred = std::move(batch);
      break;
    }
  }
  return candidates->preferred;
}

// Another batch goes only once it is as big as the last one sent (or full): it then waits at the
// node, ready to run when the node's compute frees, instead of splitting the rows a closed loop
// sends back into small batches that contend for the same cores (services/common/batch_formation.py,
// may_overlap).
bool MayOverlap(const BatchRules& rules, const Candidates& candidates, int64_t last_rows) {
  if (rules.max_batch_size == 0) return true;  // a model without a batch dimension: each request alone
  return candidates.rows >= std::min(last_rows, rules.max_batch_size);
}

// services/common/batch_formation.py, batch_ready: once the oldest has waited max_queue_delay_us, when
// the rows that would batch with the most urgent request fill max_batch_size, make a preferred
// size or are more than every preferred size (none is reachable any more). Without a queue
// delay, what is queued goes as soon as a slot is free.
bool Ready(const BatchRules& rules, const Queue& queue, Candidates* candidates, Queued::Clock::time_point now,
           Queued::Clock::time_point* wake) {
  if (rules.max_queue_delay.count() == 0 || rules.max_batch_size == 0) return true;
  *wake = queue.front().received_at + rules.max_queue_delay;
  if (now >= *wake || candidates->rows >= rules.max_batch_size) return true;
  if (rules.preferred.empty()) return false;
  return candidates->rows > rules.preferred.front() || !Preferred(rules, queue, candidates).empty();
}

// services/common/batch_formation.py, form_batch: the most urgent request and, in serving order, the
// others with its key: the largest preferred size they make exactly while the oldest has not
// waited max_queue_delay_us, else every one that still fits under max_batch_size.
std::vector<size_t> Take(const BatchRules& rules, const Queue& queue, Candidates* candidates,
                         Queued::Clock::time_point now, int64_t* rows) {
  if (rules.max_batch_size == 0) {  // a model without a batch dimension: each request alone
    *rows = queue[candidates->head].rows;
    return {candidates->head};
  }
  const bool waited = rules.max_queue_delay.count() == 0 || now >= queue.front().received_at + rules.max_queue_delay;
  if (!waited && !Preferred(rules, queue, candidates).empty()) {
    *rows = candidates->preferred_rows;
    return candidates->preferred;
  }
  return Fill(rules, queue, Same(queue, candidates), rules.max_batch_size, rows);
}

}  // namespace frontdoor
