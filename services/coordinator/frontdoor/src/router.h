// Route cache: asks the coordinator where requests of each shape go, one Route RPC per key.
#pragma once

#include <chrono>
#include <memory>
#include <mutex>
#include <string>
#include <unordered_map>
#include <vector>

#include "backend.h"
#include "batcher.h"
#include "least_loaded.h"

namespace frontdoor {

class Router {
 public:
  Router(Backend* backend, Reporter* reporter, BatcherOptions options);
  struct Lookup {
    std::shared_ptr<Batcher> batcher;          // null: the coordinator's path
    bool traced = false;                       // sampled (full_path_every): to start a trace there
    std::shared_ptr<const std::string> key;
  };
  // The batcher for requests with this key (of the route's nodes, as its policy picks); asks the
  // coordinator on a miss or when stale.
  Lookup Find(std::string key, inference::ModelInferRequest* request);
  // Forgets every key routed by these routes (the next request asks again).
  void Drop(const std::vector<uint64_t>& route_ids);
  // Forgets every key of this model.
  void DropModel(const std::string& model);
  // The ids of the routes it serves requests by (the reporter asks the coordinator about them).
  std::vector<uint64_t> Held();

 private:
  using Clock = std::chrono::steady_clock;
  using Policy = cnei::frontdoor::v1::RouteReply::Policy;
  struct Entry {
    std::shared_ptr<const std::string> key;
    // The route's batchers, one per node, best first; empty until an eligible reply.
    std::vector<std::shared_ptr<Batcher>> batchers;
    std::vector<uint64_t> route_ids;
    std::vector<float> row_ms;         // each node's compute time per row (0: unknown)
    std::vector<NodeLoad> nodes;       // each node as its route reply saw it (least_loaded; nothing outstanding)
    std::vector<float> shares;         // a split (canary rollout): each route's version's share; empty: none
    std::vector<uint32_t> groups;      // with shares: each route's version group (0: its own)
    Policy policy = cnei::frontdoor::v1::RouteReply::POLICY_EDGEAI;  // how a request picks among them
    uint64_t turn = 0;                 // round robin: requests picked for so far
    bool asking = false;
    Clock::time_point ask_at;          // when to ask again
    std::string model;
    std::string reason;                // last ineligibility reason (logged once)
    uint64_t requests = 0;             // routed so far (for full_path_every)
    bool stale_reply = false;          // the pending answer was asked before DropModel: ignored
    // The model has no batch dimension: its first dimension is as fixed as the others, so its
    // requests are looked up by their exact shapes (RouteKey exact), never by this key.
    bool exact_shapes = false;
  };
  // PruneLocked lets it go: it routes nothing and is not being asked about.
  static bool Prunable(const Entry& entry) { return entry.batchers.empty() && !entry.asking; }
  // Keeps prunable_ right while one entry changes: counts it out when made, back in when gone.
  class Recount;
  using Entries = std::unordered_map<std::string, Entry>;
  Entries::iterator EraseLocked(Entries::iterator it);  // counted out of prunable_ as it goes
  void Ask(std::shared_ptr<const std::string> key, std::string request);
  void PruneLocked();
  void OnReply(const std::string& key, const grpc::Status& status,
               const cnei::frontdoor::v1::RouteReply& reply);
  std::shared_ptr<Batcher> BatcherLocked(std::shared_ptr<const RouteConfig> config);
  // What a request's pick weighs of a route's nodes, beside their batchers.
  struct Weights {
    std::vector<float> row_ms;
    std::vector<NodeLoad> nodes;  // under LEAST_LOADED only
  };
  // One request's pick among a route's batchers by the deployment's scheduler policy (`turn`: the
  // route's round-robin count, this request's included).
  static std::shared_ptr<Batcher> Pick(const std::vector<std::shared_ptr<Batcher>>& batchers,
                                       const Weights& weights, Policy policy, uint64_t turn);
  static std::shared_ptr<Batcher> LeastBusy(const std::vector<std::shared_ptr<Batcher>>& batchers,
                                            const std::vector<float>& row_ms);
  static std::shared_ptr<Batcher> LeastLoadedOf(const std::vector<std::shared_ptr<Batcher>>& batchers,
                                                const std::vector<NodeLoad>& nodes);
  static std::shared_ptr<Batcher> ByShare(const std::vector<std::shared_ptr<Batcher>>& batchers,
                                          const std::vector<float>& shares, const std::vector<uint32_t>& groups,
                                          const Weights& weights, Policy policy, uint64_t turn);

  Backend* backend_;
  Reporter* reporter_;
  const BatcherOptions options_;
  std::mutex mu_;  // guards the maps and prunable_
  Entries entries_;
  size_t prunable_ = 0;  // entries that are Prunable: a full table of live routes is not scanned for none
  std::unordered_map<uint64_t, std::weak_ptr<Batcher>> batchers_;
};

}  // namespace frontdoor
