// One thread that runs callbacks at given times (the batchers' queue-delay wake-ups).
#pragma once

#include <chrono>
#include <condition_variable>
#include <functional>
#include <map>
#include <mutex>
#include <thread>

namespace frontdoor {

class Timers {
 public:
  using Clock = std::chrono::steady_clock;
  // The process-wide instance; its thread starts on first use and is never joined (the door
  // leaves with _exit).
  static Timers& Get();
  // Runs `fn` on the timer thread at `when` (at once if that has passed). Callbacks must not
  // block: they run one after another.
  void At(Clock::time_point when, std::function<void()> fn);

 private:
  Timers();
  void Loop();
  std::mutex mu_;
  std::condition_variable changed_;
  std::multimap<Clock::time_point, std::function<void()>> due_;
};

}  // namespace frontdoor
