#include "timer.h"

#include <utility>
#include <vector>

namespace frontdoor {

Timers& Timers::Get() {
  static Timers* timers = new Timers();  // never destroyed: callbacks may still be queued at exit
  return *timers;
}

Timers::Timers() { std::thread([this] { Loop(); }).detach(); }

void Timers::At(Clock::time_point when, std::function<void()> fn) {
  bool earliest;
  {
    std::lock_guard<std::mutex> lock(mu_);
    earliest = due_.empty() || when < due_.begin()->first;
    due_.emplace(when, std::move(fn));
  }
  if (earliest) changed_.notify_one();
}

void Timers::Loop() {
  std::unique_lock<std::mutex> lock(mu_);
  for (;;) {
    if (due_.empty()) {
      changed_.wait(lock);
      continue;
    }
    auto first = due_.begin()->first;
    if (Clock::now() < first) {
      changed_.wait_until(lock, first);
      continue;
    }
    std::vector<std::function<void()>> run;
    auto end = due_.upper_bound(Clock::now());
    for (auto it = due_.begin(); it != end; ++it) run.push_back(std::move(it->second));
    due_.erase(due_.begin(), end);
    lock.unlock();
    for (auto& fn : run) fn();
    lock.lock();
  }
}

}  // namespace frontdoor
