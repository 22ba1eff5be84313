// Collects what the door served per route and sends it to the coordinator as FrontDoorReports.
#pragma once

#include <atomic>
#include <condition_variable>
#include <cstdint>
#include <functional>
#include <map>
#include <memory>
#include <mutex>
#include <string>
#include <thread>
#include <unordered_map>
#include <utility>
#include <vector>

#include "backend.h"
#include "generation.h"
#include "node_rows.h"

namespace frontdoor {

// One request a batch answered: receive → response and receive → node call, in ns; its rows.
struct ServedRequest {
  uint64_t total_ns;
  uint64_t queue_ns;
  uint32_t rows;
};

class Reporter {
 public:
  using UnknownRoutes = std::function<void(const std::vector<uint64_t>&)>;
  using HeldRoutes = std::function<std::vector<uint64_t>()>;
  using DroppedModels = std::function<void(const std::vector<std::string>&)>;
  // Every interval it reports what was served. When the coordinator has dropped a model's routes
  // (a model loaded, unloaded, redeployed or republished: it bumps the number in
  // `generation_file`, see generation.h) the reporter, woken by the change, hands the models to
  // `on_dropped` and reports at once with the number applied, which the coordinator waits for
  // before it answers a load or unload. That report, and one every kListEvery intervals, also
  // lists every route in `held`, served from or not, so the coordinator names those it dropped
  // otherwise: they go to `on_unknown`. Each report carries the rows queued and in flight per node
  // (`node_rows`), and a change of them is reported by itself. An idle door with nothing dropped
  // sends nothing.
  Reporter(Backend* backend, int interval_ms, UnknownRoutes on_unknown, HeldRoutes held,
           std::string generation_file = "", DroppedModels on_dropped = nullptr,
           NodeRows* node_rows = nullptr);
  void Start();
  // Requests answered by one batch, and the node call.
  void Served(uint64_t route_id, const std::vector<ServedRequest>& requests,
              const cnei::frontdoor::v1::Batch& batch);
  // A request answered from the response cache (receive to reply, its rows, the lookup's time).
  void CacheHit(uint64_t route_id, uint64_t total_ns, uint32_t rows, uint64_t lookup_ns);
  // A lookup that found nothing, with the insert of the node's answer.
  void CacheMiss(uint64_t route_id, uint64_t ns);
  // A request the door answered with an error of its own (`code`: the status code's name).
  void Refused(uint64_t route_id, uint64_t total_ns, const std::string& code, const std::string& dropped);
  // A failed node call: reports at once, then runs `then` (whether or not the report got through).
  void Failed(uint64_t route_id, uint32_t handed_over, const std::string& failure,
              std::function<void()> then);
  // Stops the periodic reports and sends the last one (waits up to 2 s).
  void Stop();

 private:
  cnei::frontdoor::v1::RouteReport* RouteLocked(uint64_t route_id, bool even_when_full = false);
  // What was gathered, and the rows per node now (`rows_due`: they changed since the last report
  // taken, or some node has rows, which are then reported every interval).
  cnei::frontdoor::v1::FrontDoorReport Take(const std::vector<uint64_t>& held = {}, bool* rows_due = nullptr);
  void Send(cnei::frontdoor::v1::FrontDoorReport report, std::function<void()> then);
  void Loop();
  bool ListHeldNow();  // applies a new generation; true: the routes are to be listed now

  Backend* backend_;
  const int interval_ms_;
  UnknownRoutes on_unknown_;
  HeldRoutes held_;
  const std::string generation_file_;
  DroppedModels on_dropped_;
  NodeRows* node_rows_;
  std::atomic<uint64_t> applied_{0};  // the generation whose models' routes are dropped
  std::atomic<uint64_t> acked_{0};    // the generation a report the coordinator answered said
  int since_listed_ = 0;              // intervals since routes were last listed
  std::unique_ptr<FileWatch> watch_;
  bool changed_ = false;              // the watch saw the file change (guarded by mu_)
  std::mutex mu_;  // guards the fields below
  std::unordered_map<uint64_t, cnei::frontdoor::v1::RouteReport> routes_;
  std::map<std::string, NodeTotals> rows_taken_;  // the rows per node the last report taken carried
  bool stopping_ = false;
  std::condition_variable wake_;
  std::thread thread_;
};

}  // namespace frontdoor
