#include "generation.h"

#include <poll.h>
#include <sys/inotify.h>
#include <unistd.h>

#include <cerrno>
#include <cstdio>
#include <cstring>
#include <fstream>

namespace frontdoor {

std::vector<std::string> Generation::DroppedAfter(uint64_t applied, bool* complete) const {
  std::vector<std::string> models;
  uint64_t oldest = 0;
  for (const auto& [number, model] : drops) {
    if (oldest == 0 || number < oldest) oldest = number;
    if (number > applied) models.push_back(model);
  }
  // every number after `applied` is named when the oldest named is at most applied + 1
  *complete = this->number <= applied || (oldest != 0 && oldest <= applied + 1);
  return models;
}

Generation ReadGeneration(const std::string& path) {
  Generation read;
  std::ifstream in(path);
  std::string line;
  if (!std::getline(in, line)) return read;
  read.number = std::strtoull(line.c_str(), nullptr, 10);
  while (std::getline(in, line)) {
    size_t tab = line.find('\t');
    if (tab == std::string::npos || tab + 1 >= line.size()) continue;
    read.drops.emplace_back(std::strtoull(line.substr(0, tab).c_str(), nullptr, 10), line.substr(tab + 1));
  }
  return read;
}

FileWatch::FileWatch(std::string path, std::function<void()> on_change)
    : path_(std::move(path)), on_change_(std::move(on_change)) {}

FileWatch::~FileWatch() { Stop(); }

void FileWatch::Start() {
  size_t slash = path_.rfind('/');
  std::string folder = slash == std::string::npos ? "." : slash == 0 ? "/" : path_.substr(0, slash);
  int fd = inotify_init1(IN_CLOEXEC | IN_NONBLOCK);
  // the coordinator writes the file aside and renames it over the old one: IN_MOVED_TO
  if (fd < 0 || inotify_add_watch(fd, folder.c_str(), IN_MOVED_TO | IN_CLOSE_WRITE) < 0) {
    fprintf(stderr, "cnei-frontdoor: cannot watch %s (%s): routes drop at the next report\n",
            folder.c_str(), strerror(errno));
    if (fd >= 0) close(fd);
    return;
  }
  thread_ = std::thread([this, fd] { Loop(fd); });
}

void FileWatch::Stop() {
  stopping_ = true;
  if (thread_.joinable()) thread_.join();
}

void FileWatch::Loop(int fd) {
  const std::string name = path_.substr(path_.rfind('/') + 1);
  alignas(inotify_event) char buffer[4096];
  while (!stopping_) {
    pollfd ready{fd, POLLIN, 0};
    if (poll(&ready, 1, 200) <= 0) continue;  // wakes to look at stopping_
    bool changed = false;
    ssize_t length;
    while ((length = read(fd, buffer, sizeof buffer)) > 0) {
      for (char* at = buffer; at < buffer + length;) {
        auto* event = reinterpret_cast<inotify_event*>(at);
        if (event->len > 0 && name == event->name) changed = true;
        at += sizeof(inotify_event) + event->len;
      }
    }
    if (changed) on_change_();
  }
  close(fd);
}

}  // namespace frontdoor
