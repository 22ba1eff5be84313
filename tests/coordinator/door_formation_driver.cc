// Runs the front door's batch formation (frontdoor/src/formation.h) on queues read from stdin,
// one per line, for tests/coordinator/test_door_formation.py:
//   max_batch_size delay_us max_bytes last_rows now_us n_preferred size... n_queued
//   (received_us priority key rows bytes)...
// and answers each with one line, as the batcher would decide on that queue with a slot free:
//   ready wake_us may_overlap rows n_taken index...   (wake_us -1: the check did not need it)
#include <iostream>
#include <sstream>
#include <string>

#include "formation.h"

using frontdoor::Queued;

int main() {
  const Queued::Clock::time_point epoch = Queued::Clock::time_point() + std::chrono::hours(1);
  auto us = [&](Queued::Clock::time_point t) {
    return std::chrono::duration_cast<std::chrono::microseconds>(t - epoch).count();
  };
  std::string line;
  while (std::getline(std::cin, line)) {
    std::istringstream in(line);
    uint32_t max_batch_size = 0, delay_us = 0;
    size_t max_bytes = 0, n_preferred = 0, queued = 0;
    int64_t last_rows = 0, now_us = 0;
    in >> max_batch_size >> delay_us >> max_bytes >> last_rows >> now_us >> n_preferred;
    std::vector<uint32_t> preferred(n_preferred);
    for (uint32_t& size : preferred) in >> size;
    const frontdoor::BatchRules rules(max_batch_size, delay_us, preferred, max_bytes);
    in >> queued;
    std::deque<std::string> keys;  // one string per request: equal keys are compared, not shared
    frontdoor::Queue queue;
    for (size_t i = 0; i < queued; ++i) {
      Queued q;
      int64_t received_us = 0;
      keys.emplace_back();
      in >> received_us >> q.priority >> keys.back() >> q.rows >> q.bytes;
      q.received_at = epoch + std::chrono::microseconds(received_us);
      q.key = &keys.back();
      queue.push_back(q);
    }
    if (!in) {
      std::cerr << "unreadable case: " << line << "\n";
      return 2;
    }
    const Queued::Clock::time_point now = epoch + std::chrono::microseconds(now_us);
    Queued::Clock::time_point wake = Queued::Clock::time_point::min();
    // formed once and handed from check to check, as Batcher::Dispatch does
    frontdoor::Candidates candidates = frontdoor::CandidatesIn(queue);
    const bool overlap = frontdoor::MayOverlap(rules, candidates, last_rows);
    const bool ready = frontdoor::Ready(rules, queue, &candidates, now, &wake);
    int64_t rows = 0;
    const std::vector<size_t> taken = frontdoor::Take(rules, queue, &candidates, now, &rows);
    std::cout << ready << ' ' << (wake == Queued::Clock::time_point::min() ? -1 : us(wake)) << ' ' << overlap
              << ' ' << rows << ' ' << taken.size();
    for (size_t i : taken) std::cout << ' ' << i;
    std::cout << '\n';
  }
  return 0;
}
