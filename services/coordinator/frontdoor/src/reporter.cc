// Collects what the door served per route and sends it to the coordinator as FrontDoorReports.
#include "reporter.h"

#include <algorithm>
#include <chrono>
#include <cstdio>

namespace frontdoor {
namespace {

using cnei::frontdoor::v1::FrontDoorReport;
using cnei::frontdoor::v1::ReportReply;
constexpr int kMaxRequestsPerRoute = 100000;  // per report; beyond this, samples are dropped
constexpr int kMaxBatchesPerRoute = 20000;
constexpr size_t kMaxRoutes = 4096;
constexpr int kListEvery = 50;  // intervals between listings of the held routes without a change

std::vector<uint64_t> Unknown(const ReportReply& reply) {
  return std::vector<uint64_t>(reply.unknown_routes().begin(), reply.unknown_routes().end());
}

}  // namespace

Reporter::Reporter(Backend* backend, int interval_ms, UnknownRoutes on_unknown, HeldRoutes held,
                   std::string generation_file, DroppedModels on_dropped, NodeRows* node_rows)
    : backend_(backend), interval_ms_(interval_ms), on_unknown_(std::move(on_unknown)),
      held_(std::move(held)), generation_file_(std::move(generation_file)), on_dropped_(std::move(on_dropped)),
      node_rows_(node_rows) {}

bool Reporter::ListHeldNow() {
  bool changed = false;
  if (!generation_file_.empty()) {
    Generation generation = ReadGeneration(generation_file_);
    const uint64_t applied = applied_;
    if (generation.number > applied) {  // never back (an unreadable file reads 0)
      bool complete = true;
      std::vector<std::string> models = generation.DroppedAfter(applied, &complete);
      if (on_dropped_ && !models.empty()) on_dropped_(models);
      if (!complete && held_) {  // drops were missed: every route goes (the next requests ask again)
        fprintf(stderr, "cnei-frontdoor: routes generation %llu after %llu: dropping every route\n",
                (unsigned long long)generation.number, (unsigned long long)applied);
        on_unknown_(held_());
      }
      applied_ = generation.number;
      changed = true;
    }
  }
  if (!held_) return false;
  if (changed || ++since_listed_ >= kListEvery) {
    since_listed_ = 0;
    return true;
  }
  return false;
}

void Reporter::Start() {
  // a door that starts holds no routes: what the file names is applied already
  if (!generation_file_.empty()) {
    applied_ = ReadGeneration(generation_file_).number;
    watch_ = std::make_unique<FileWatch>(generation_file_, [this] {
      {
        std::lock_guard<std::mutex> lock(mu_);
        changed_ = true;
      }
      wake_.notify_all();
    });
    watch_->Start();
  }
  thread_ = std::thread([this] { Loop(); });
}

// The route's report being gathered (created on first use), or null when the table already holds
// kMaxRoutes others (`even_when_full`: created all the same).
cnei::frontdoor::v1::RouteReport* Reporter::RouteLocked(uint64_t route_id, bool even_when_full) {
  if (!even_when_full && routes_.size() >= kMaxRoutes && routes_.count(route_id) == 0) return nullptr;
  auto& route = routes_[route_id];
  route.set_route_id(route_id);
  return &route;
}

void Reporter::Served(uint64_t route_id, const std::vector<ServedRequest>& requests,
                      const cnei::frontdoor::v1::Batch& batch) {
  std::lock_guard<std::mutex> lock(mu_);
  auto* found = RouteLocked(route_id);
  if (found == nullptr) return;
  auto& route = *found;
  if (route.request_ns_size() + requests.size() <= size_t(kMaxRequestsPerRoute)) {
    for (const ServedRequest& served : requests) {
      route.add_request_ns(served.total_ns);
      route.add_queue_ns(served.queue_ns);
      route.add_request_rows(served.rows);
    }
  }
  if (route.batches_size() < kMaxBatchesPerRoute) *route.add_batches() = batch;
}

void Reporter::CacheHit(uint64_t route_id, uint64_t total_ns, uint32_t rows, uint64_t lookup_ns) {
  std::lock_guard<std::mutex> lock(mu_);
  auto* route = RouteLocked(route_id);
  if (route != nullptr && route->cache_hit_request_ns_size() < kMaxRequestsPerRoute) {
    route->add_cache_hit_request_ns(total_ns);
    route->add_cache_hit_rows(rows);
    route->set_cache_hit_ns(route->cache_hit_ns() + lookup_ns);
  }
}

void Reporter::CacheMiss(uint64_t route_id, uint64_t ns) {
  std::lock_guard<std::mutex> lock(mu_);
  auto* route = RouteLocked(route_id);
  if (route == nullptr) return;
  route->set_cache_misses(route->cache_misses() + 1);
  route->set_cache_miss_ns(route->cache_miss_ns() + ns);
}

void Reporter::Refused(uint64_t route_id, uint64_t total_ns, const std::string& code, const std::string& dropped) {
  std::lock_guard<std::mutex> lock(mu_);
  auto* route = RouteLocked(route_id);
  if (route == nullptr) return;
  route->add_failed_request_ns(total_ns);
  route->add_failed_code(code);
  route->add_failed_dropped(dropped);
}

void Reporter::Failed(uint64_t route_id, uint32_t handed_over, const std::string& failure,
                      std::function<void()> then) {
  {
    std::lock_guard<std::mutex> lock(mu_);
    auto* route = RouteLocked(route_id, /*even_when_full=*/true);
    route->set_handed_over(route->handed_over() + handed_over);
    route->set_failure(failure);
  }
  Send(Take(), std::move(then));
}

FrontDoorReport Reporter::Take(const std::vector<uint64_t>& held, bool* rows_due) {
  FrontDoorReport report;
  std::map<std::string, NodeTotals> rows;
  if (node_rows_ != nullptr) rows = node_rows_->Snapshot();
  std::lock_guard<std::mutex> lock(mu_);
  for (uint64_t route_id : held) RouteLocked(route_id);  // an empty report: is it still known?
  for (auto& entry : routes_) report.add_routes()->Swap(&entry.second);
  routes_.clear();
  report.set_generation(applied_);
  for (const auto& [node, totals] : rows) {
    auto* node_rows = report.add_node_rows();
    node_rows->set_node_id(node);
    node_rows->set_rows(totals.rows);
    node_rows->set_given_back(totals.given_back);
  }
  // due when they changed, and every interval while any node has rows: the coordinator weighs
  // them in its placement only while its last report is fresh
  const bool some = std::any_of(rows.begin(), rows.end(), [](const auto& node) { return node.second.rows > 0; });
  if (rows_due != nullptr) *rows_due = some || rows != rows_taken_;
  rows_taken_ = std::move(rows);
  return report;
}

void Reporter::Send(FrontDoorReport report, std::function<void()> then) {
  struct Rpc {
    grpc::ClientContext ctx;
    FrontDoorReport request;
    ReportReply reply;
    std::function<void()> then;
  };
  auto* rpc = new Rpc;
  rpc->ctx.set_deadline(std::chrono::system_clock::now() + std::chrono::seconds(5));
  rpc->request = std::move(report);
  rpc->then = std::move(then);
  backend_->control->async()->Report(&rpc->ctx, &rpc->request, &rpc->reply,
                                     [this, rpc](grpc::Status status) {
    if (!status.ok()) {
      fprintf(stderr, "cnei-frontdoor: report of %d routes dropped: %s\n",
              rpc->request.routes_size(), status.error_message().c_str());
    } else {
      uint64_t acked = acked_;
      while (rpc->request.generation() > acked && !acked_.compare_exchange_weak(acked, rpc->request.generation())) {
      }
      if (rpc->reply.unknown_routes_size() > 0) on_unknown_(Unknown(rpc->reply));
    }
    if (rpc->then) rpc->then();
    delete rpc;
  });
}

void Reporter::Loop() {
  std::unique_lock<std::mutex> lock(mu_);
  while (!stopping_) {
    wake_.wait_for(lock, std::chrono::milliseconds(interval_ms_), [this] { return stopping_ || changed_; });
    changed_ = false;
    if (stopping_) continue;
    lock.unlock();
    bool rows_due = false;
    FrontDoorReport report = Take(ListHeldNow() ? held_() : std::vector<uint64_t>(), &rows_due);
    // a generation the coordinator has not acknowledged is reported even with no route to speak
    // of (again next interval, should this report be lost): the coordinator waits for it
    if (report.routes_size() > 0 || report.generation() > acked_ || rows_due) Send(std::move(report), nullptr);
    lock.lock();
  }
}

void Reporter::Stop() {
  if (watch_) watch_->Stop();
  {
    std::lock_guard<std::mutex> lock(mu_);
    stopping_ = true;
  }
  wake_.notify_all();
  if (thread_.joinable()) thread_.join();
  grpc::ClientContext ctx;
  ctx.set_deadline(std::chrono::system_clock::now() + std::chrono::seconds(2));
  ReportReply reply;
  grpc::Status status = backend_->control->Report(&ctx, Take(), &reply);
  if (!status.ok()) {
    fprintf(stderr, "cnei-frontdoor: last report dropped: %s\n", status.error_message().c_str());
  }
}

}  // namespace frontdoor
