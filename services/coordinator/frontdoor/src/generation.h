// The coordinator's routes-generation file (--routes-generation): the number it bumps whenever it
// drops a model's routes (a model loaded, unloaded, republished or redeployed), then one line
// "number<TAB>model" per model dropped lately. The door drops its own routes of the models named
// past the number it has applied, and tells the coordinator that number in its next report.
#pragma once

#include <atomic>
#include <cstdint>
#include <functional>
#include <string>
#include <thread>
#include <utility>
#include <vector>

namespace frontdoor {

struct Generation {
  uint64_t number = 0;                                  // 0: no file (or none readable)
  std::vector<std::pair<uint64_t, std::string>> drops;  // (number, model), oldest first
  // The models named after `applied`; `complete` false when the file no longer names every
  // number after it (more drops than it keeps: the coordinator still names each route it dropped
  // when asked about the routes the door holds).
  std::vector<std::string> DroppedAfter(uint64_t applied, bool* complete) const;
};

Generation ReadGeneration(const std::string& path);

// Calls `on_change` soon after the file is replaced (inotify on its folder), on a thread of its
// own, until Stop. Without inotify it calls nothing (the reporter still reads the file every
// report interval).
class FileWatch {
 public:
  FileWatch(std::string path, std::function<void()> on_change);
  ~FileWatch();
  void Start();
  void Stop();

 private:
  void Loop(int fd);
  const std::string path_;
  std::function<void()> on_change_;
  std::atomic<bool> stopping_{false};
  std::thread thread_;
};

}  // namespace frontdoor
