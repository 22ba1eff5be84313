// Batch formation over one route's queue: Triton's dynamic batcher rules as pure functions.
#include "formation.h"

#include <algorithm>

namespace frontdoor {
namespace {

bool SameKey(const Queued& a, const Queued& b) { return a.key == b.key || *a.key == *b.key; }

}  // namespace

// The coordinator's batcher orders its queue the same way (services/common/batcher.py, `order`).
std::vector<size_t> ServingOrder(const Queue& queue) {
  std::vector<size_t> order(queue.size());
  for (size_t i = 0; i < order.size(); ++i) order[i] = i;
  std::stable_sort(order.begin(), order.end(),
                   [&queue](size_t a, size_t b) { return queue[a].priority < queue[b].priority; });
  return order;
}

std::vector<size_t> Same(const Queue& queue) {
  std::vector<size_t> same;
  const std::vector<size_t> order = ServingOrder(queue);
  if (order.empty()) return same;
  const Queued& head = queue[order.front()];
  for (size_t i : order) {
    if (SameKey(queue[i], head)) same.push_back(i);
  }
  return same;
}

// The most urgent request is the first of the lowest priority level: ServingOrder's head.
int64_t HeadRows(const Queue& queue) {
  const Queued& head = *std::min_element(
      queue.begin(), queue.end(), [](const Queued& a, const Queued& b) { return a.priority < b.priority; });
  int64_t rows = 0;
  for (const Queued& queued : queue) {
    if (SameKey(queued, head)) rows += queued.rows;
  }
  return rows;
}

// services/common/batcher.py, fill: one that does not fit stays queued; later ones may.
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

// services/common/batcher.py, preferred_batch.
std::vector<size_t> Preferred(const BatchRules& rules, const Queue& queue, const std::vector<size_t>& same,
                              int64_t* rows) {
  std::vector<uint32_t> sizes = rules.preferred_batch_sizes;
  std::sort(sizes.rbegin(), sizes.rend());
  for (uint32_t size : sizes) {
    if (size == 0 || size > rules.max_batch_size) continue;
    std::vector<size_t> batch = Fill(rules, queue, same, size, rows);
    if (*rows == int64_t(size)) return batch;
  }
  return {};
}

// Another batch goes only once it is as big as the last one sent (or full): it then waits at the
// node, ready to run when the node's compute frees, instead of splitting the rows a closed loop
// sends back into small batches that contend for the same cores (services/common/batcher.py,
// may_overlap).
bool MayOverlap(const BatchRules& rules, const Queue& queue, int64_t last_rows) {
  if (rules.max_batch_size == 0) return true;  // a model without a batch dimension: each request alone
  return HeadRows(queue) >= std::min(last_rows, rules.max_batch_size);
}

// services/common/batcher.py, batch_ready: once the oldest has waited max_queue_delay_us, when
// the rows that would batch with the most urgent request fill max_batch_size, make a preferred
// size or are more than every preferred size (none is reachable any more). Without a queue
// delay, what is queued goes as soon as a slot is free.
bool Ready(const BatchRules& rules, const Queue& queue, Queued::Clock::time_point now,
           Queued::Clock::time_point* wake) {
  if (rules.max_queue_delay.count() == 0 || rules.max_batch_size == 0) return true;
  *wake = queue.front().received_at + rules.max_queue_delay;
  if (now >= *wake) return true;
  const std::vector<size_t> same = Same(queue);
  int64_t rows = 0;
  for (size_t i : same) rows += queue[i].rows;
  if (rows >= rules.max_batch_size) return true;
  int64_t largest = 0;
  for (uint32_t size : rules.preferred_batch_sizes) {
    if (size <= rules.max_batch_size) largest = std::max<int64_t>(largest, size);
  }
  if (largest == 0) return false;
  int64_t preferred_rows = 0;
  return rows > largest || !Preferred(rules, queue, same, &preferred_rows).empty();
}

// services/common/batcher.py, form_batch: the most urgent request and, in serving order, the
// others with its key: the largest preferred size they make exactly while the oldest has not
// waited max_queue_delay_us, else every one that still fits under max_batch_size.
std::vector<size_t> Take(const BatchRules& rules, const Queue& queue, Queued::Clock::time_point now,
                         int64_t* rows) {
  std::vector<size_t> chosen;
  if (rules.max_batch_size == 0) {  // a model without a batch dimension: each request alone
    chosen.push_back(ServingOrder(queue).front());
    *rows = queue[chosen.front()].rows;
    return chosen;
  }
  const std::vector<size_t> same = Same(queue);
  const bool waited = rules.max_queue_delay.count() == 0 || now >= queue.front().received_at + rules.max_queue_delay;
  if (!waited) chosen = Preferred(rules, queue, same, rows);
  if (chosen.empty()) chosen = Fill(rules, queue, same, rules.max_batch_size, rows);
  return chosen;
}

}  // namespace frontdoor
