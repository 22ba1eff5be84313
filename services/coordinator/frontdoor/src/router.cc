// Route cache: asks the coordinator where requests of each shape go, one Route RPC per key.
#include "router.h"

#include <algorithm>
#include <cstdio>
#include <random>
#include <unordered_set>

#include "tensor.h"

namespace frontdoor {
namespace {

using cnei::frontdoor::v1::RouteReply;
constexpr size_t kMaxKeys = 4096;
constexpr auto kRetryAfter = std::chrono::seconds(1);
thread_local std::mt19937_64 rng(std::random_device{}());  // split draws and the random policy

// The eligible reply's settings, or null with `why` set when its templates do not parse.
std::shared_ptr<RouteConfig> ConfigFrom(const RouteReply& reply, std::string* why) {
  auto config = std::make_shared<RouteConfig>();
  config->route_id = reply.route_id();
  config->node_id = reply.node_id();
  config->node_address = reply.fast_address();
  config->template_bytes = reply.request_template() + '\0' + reply.response_template();
  config->max_batch_size = reply.max_batch_size();
  config->timeout_ms = reply.timeout_ms();
  config->full_path_every = reply.full_path_every();
  config->max_inflight = reply.max_inflight_batches();
  config->queue_limit = reply.max_queue_size();
  config->max_queue_delay_us = reply.max_queue_delay_us();
  config->preferred_batch_sizes.assign(reply.preferred_batch_sizes().begin(),
                                       reply.preferred_batch_sizes().end());
  config->response_cache = reply.response_cache();
  config->cache_scope = reply.request_template();
  if (!config->request_template.ParseFromString(reply.request_template()) ||
      !config->response_template.ParseFromString(reply.response_template())) {
    *why = "unparseable templates in the route reply";
    return nullptr;
  }
  if (config->node_address.empty()) {
    *why = "route reply without a fast address";
    return nullptr;
  }
  return config;
}

// The reply's node as the least_loaded policy weighs it (its heartbeat, as the coordinator saw it).
NodeLoad LoadOf(const RouteReply& reply) {
  NodeLoad node;
  node.node_id = reply.node_id();
  node.inflight = reply.node_inflight();
  node.cpus = reply.node_cpus();
  node.cpu_load = reply.node_cpu_load();
  return node;
}

bool SameRoute(const RouteConfig& a, const RouteConfig& b) {
  return a.node_id == b.node_id && a.node_address == b.node_address && a.template_bytes == b.template_bytes &&
         a.max_batch_size == b.max_batch_size && a.timeout_ms == b.timeout_ms &&
         a.full_path_every == b.full_path_every && a.max_inflight == b.max_inflight &&
         a.queue_limit == b.queue_limit && a.max_queue_delay_us == b.max_queue_delay_us &&
         a.preferred_batch_sizes == b.preferred_batch_sizes && a.response_cache == b.response_cache;
}

}  // namespace

Router::Router(Backend* backend, Reporter* reporter, BatcherOptions options)
    : backend_(backend), reporter_(reporter), options_(options) {}

class Router::Recount {
 public:
  Recount(Router* router, const Entry& entry) : router_(router), entry_(entry) {
    router_->prunable_ -= Prunable(entry_);
  }
  ~Recount() { router_->prunable_ += Prunable(entry_); }
  Recount(const Recount&) = delete;
  Recount& operator=(const Recount&) = delete;

 private:
  Router* router_;
  const Entry& entry_;
};

Router::Entries::iterator Router::EraseLocked(Entries::iterator it) {
  prunable_ -= Prunable(it->second);
  return entries_.erase(it);
}

Router::Lookup Router::Find(std::string key, inference::ModelInferRequest* request) {
  Lookup found;
  bool ask = false, exact = false;
  std::vector<std::shared_ptr<Batcher>> batchers;
  Weights weights;
  std::vector<float> shares;
  std::vector<uint32_t> groups;
  Policy policy = cnei::frontdoor::v1::RouteReply::POLICY_EDGEAI;
  uint64_t turn = 0;
  {
    std::lock_guard<std::mutex> lock(mu_);
    auto it = entries_.find(key);
    if (it == entries_.end()) {
      if (entries_.size() >= kMaxKeys && prunable_ > 0) PruneLocked();
      if (entries_.size() >= kMaxKeys) return found;
      auto interned = std::make_shared<const std::string>(key);
      it = entries_.emplace(std::move(key), Entry()).first;
      it->second.key = std::move(interned);
      it->second.model = request->model_name();
      it->second.ask_at = Clock::now();
      ++prunable_;  // routes nothing yet
    }
    Entry& entry = it->second;
    exact = entry.exact_shapes;
    if (!exact && !entry.asking && Clock::now() >= entry.ask_at) {
      Recount recount(this, entry);
      ask = entry.asking = true;
    }
    found.key = entry.key;
    uint32_t every = exact || entry.batchers.empty() ? 0 : entry.batchers.front()->config().full_path_every;
    const bool traced = every > 0 && ++entry.requests % every == 0;  // takes the traced full path
    found.traced = traced;
    if (!traced && entry.batchers.size() == 1) {
      found.batcher = entry.batchers.front();  // the common case: nothing to copy or weigh
    } else if (!traced && entry.batchers.size() > 1) {
      batchers = entry.batchers;
      weights.row_ms = entry.row_ms;
      if (entry.policy == cnei::frontdoor::v1::RouteReply::POLICY_LEAST_LOADED) weights.nodes = entry.nodes;
      shares = entry.shares;
      groups = entry.groups;
      policy = entry.policy;
      turn = ++entry.turn;
    }
  }
  if (exact) return Find(RouteKey(request, true), request);  // an entry with no batchers: once
  if (ask) Ask(found.key, WithoutContents(request));
  if (!batchers.empty()) {
    found.batcher = shares.size() == batchers.size() ? ByShare(batchers, shares, groups, weights, policy, turn)
                                                     : Pick(batchers, weights, policy, turn);
  }
  return found;
}

// A version drawn at random by share (a canary rollout), then one of its routes by the policy.
std::shared_ptr<Batcher> Router::ByShare(const std::vector<std::shared_ptr<Batcher>>& batchers,
                                         const std::vector<float>& shares, const std::vector<uint32_t>& groups,
                                         const Weights& weights, Policy policy, uint64_t turn) {
  auto group_of = [&](size_t i) {  // a route of group 0 (or of an old coordinator) is a group alone
    return i < groups.size() && groups[i] != 0 ? uint64_t(groups[i]) : (uint64_t(1) << 32) + i;
  };
  std::vector<std::pair<uint64_t, float>> versions;  // (group, share), in the order they come
  double total = 0;
  for (size_t i = 0; i < batchers.size(); ++i) {
    uint64_t group = group_of(i);
    if (std::none_of(versions.begin(), versions.end(), [&](const auto& v) { return v.first == group; })) {
      versions.emplace_back(group, shares[i]);
      total += shares[i];
    }
  }
  double draw = std::uniform_real_distribution<double>(0.0, total)(rng);
  uint64_t chosen = versions.back().first;
  for (const auto& [group, share] : versions) {
    draw -= share;
    if (draw < 0) {
      chosen = group;
      break;
    }
  }
  std::vector<std::shared_ptr<Batcher>> members;
  Weights of_members;
  for (size_t i = 0; i < batchers.size(); ++i) {
    if (group_of(i) != chosen) continue;
    members.push_back(batchers[i]);
    of_members.row_ms.push_back(i < weights.row_ms.size() ? weights.row_ms[i] : 0.0f);
    if (i < weights.nodes.size()) of_members.nodes.push_back(weights.nodes[i]);
  }
  return Pick(members, of_members, policy, turn);
}

std::shared_ptr<Batcher> Router::Pick(const std::vector<std::shared_ptr<Batcher>>& batchers,
                                      const Weights& weights, Policy policy, uint64_t turn) {
  using cnei::frontdoor::v1::RouteReply;
  if (batchers.size() <= 1) return batchers.empty() ? nullptr : batchers.front();
  switch (policy) {
    case RouteReply::POLICY_ROUND_ROBIN:
      return batchers[turn % batchers.size()];
    case RouteReply::POLICY_RANDOM:
      return batchers[std::uniform_int_distribution<size_t>(0, batchers.size() - 1)(rng)];
    case RouteReply::POLICY_LEAST_LOADED:
      return LeastLoadedOf(batchers, weights.nodes);
    default:
      return LeastBusy(batchers, weights.row_ms);
  }
}

// The full path's least_loaded (least_loaded.h): each node's heartbeat as its route reply gave it,
// with the rows this door has queued for it and sent it, by every route (every model) to that node,
// as the rows outstanding there (node_rows.h).
std::shared_ptr<Batcher> Router::LeastLoadedOf(const std::vector<std::shared_ptr<Batcher>>& batchers,
                                               const std::vector<NodeLoad>& nodes) {
  if (nodes.size() != batchers.size()) return LeastBusy(batchers, {});
  std::vector<NodeLoad> loads = nodes;
  for (size_t i = 0; i < batchers.size(); ++i) {
    loads[i].outstanding = uint64_t(std::max<int64_t>(0, batchers[i]->NodeRowsNow()));
  }
  return batchers[LeastLoaded(loads)];
}

// The batcher whose node would answer soonest: the fewest requests queued and node calls in
// flight, counting the new one, each weighed by the node's compute time per row when every node's
// is known; the earliest (the best-scored node) on a tie.
std::shared_ptr<Batcher> Router::LeastBusy(const std::vector<std::shared_ptr<Batcher>>& batchers,
                                           const std::vector<float>& row_ms) {
  if (batchers.size() <= 1) return batchers.empty() ? nullptr : batchers.front();
  const bool weighed = row_ms.size() == batchers.size() &&
                       std::all_of(row_ms.begin(), row_ms.end(), [](float ms) { return ms > 0; });
  std::shared_ptr<Batcher> best;
  double least = 0;
  for (size_t i = 0; i < batchers.size(); ++i) {
    double cost = double(batchers[i]->Busy() + 1) * (weighed ? row_ms[i] : 1.0);
    if (!best || cost < least) least = cost, best = batchers[i];
  }
  return best;
}

void Router::Ask(std::shared_ptr<const std::string> key, std::string request) {
  struct Rpc {
    grpc::ClientContext ctx;
    cnei::frontdoor::v1::RouteRequest request;
    RouteReply reply;
  };
  auto* rpc = new Rpc;
  rpc->ctx.set_deadline(std::chrono::system_clock::now() + std::chrono::seconds(5));
  rpc->request.set_infer_request(std::move(request));
  backend_->control->async()->Route(&rpc->ctx, &rpc->request, &rpc->reply,
                                    [this, rpc, key](grpc::Status status) {
                                      OnReply(*key, status, rpc->reply);
                                      delete rpc;
                                    });
}

void Router::OnReply(const std::string& key, const grpc::Status& status, const RouteReply& reply) {
  std::string why = reply.reason();
  std::shared_ptr<RouteConfig> config;
  std::vector<std::shared_ptr<RouteConfig>> alternatives;
  std::vector<float> alternative_ms, alternative_shares;
  std::vector<uint32_t> alternative_groups;
  std::vector<NodeLoad> alternative_nodes;
  if (status.ok() && reply.eligible()) config = ConfigFrom(reply, &why);
  if (config) {
    for (const RouteReply& alternative : reply.alternatives()) {
      std::string ignored;
      if (auto parsed = ConfigFrom(alternative, &ignored)) {
        alternatives.push_back(std::move(parsed));
        alternative_ms.push_back(alternative.row_ms());
        alternative_nodes.push_back(LoadOf(alternative));
        alternative_shares.push_back(alternative.share());
        alternative_groups.push_back(alternative.split_group());
      }
    }
  }
  std::lock_guard<std::mutex> lock(mu_);
  auto it = entries_.find(key);
  if (it == entries_.end()) return;  // dropped meanwhile; the next request asks again
  Entry& entry = it->second;
  Recount recount(this, entry);
  entry.asking = false;
  if (entry.stale_reply) {  // asked before the model was loaded or unloaded: the next request asks again
    entry.stale_reply = false;
    return;
  }
  if (!status.ok()) {
    fprintf(stderr, "cnei-frontdoor: Route failed, retrying in 1 s: %s\n", status.error_message().c_str());
    entry.ask_at = Clock::now() + kRetryAfter;
    return;
  }
  entry.ask_at = Clock::now() + std::chrono::milliseconds(reply.ttl_ms());
  entry.route_ids.assign(1, reply.route_id());
  entry.row_ms.assign(1, reply.row_ms());
  entry.nodes.assign(1, LoadOf(reply));
  entry.shares.clear();
  entry.groups.clear();
  entry.policy = reply.policy();
  if (!config) {
    if (!entry.batchers.empty() || entry.reason != why) {
      fprintf(stderr, "cnei-frontdoor: model '%s' takes the coordinator's path: %s\n",
              entry.model.c_str(), why.c_str());
    }
    entry.batchers.clear();
    entry.reason = why;
    return;
  }
  if (config->max_batch_size == 0 && !IsExactKey(key)) {
    // no batch dimension: a request's first dimension is not its rows, and this key (made
    // without it) would send requests of another shape to the node; exact keys from now on
    entry.exact_shapes = true;
    entry.batchers.clear();
    return;
  }
  entry.reason.clear();
  entry.batchers.assign(1, BatcherLocked(std::move(config)));
  for (size_t i = 0; i < alternatives.size(); ++i) {
    entry.route_ids.push_back(alternatives[i]->route_id);
    entry.row_ms.push_back(alternative_ms[i]);
    entry.nodes.push_back(alternative_nodes[i]);
    entry.batchers.push_back(BatcherLocked(std::move(alternatives[i])));
  }
  if (reply.share() > 0) {  // a split: every route has its share, or the coordinator splits them
    if (alternatives.size() != size_t(reply.alternatives_size())) {
      fprintf(stderr, "cnei-frontdoor: model '%s' takes the coordinator's path: a split route did not parse\n",
              entry.model.c_str());
      entry.batchers.clear();
      return;
    }
    entry.shares.assign(1, reply.share());
    entry.shares.insert(entry.shares.end(), alternative_shares.begin(), alternative_shares.end());
    entry.groups.assign(1, reply.split_group());
    entry.groups.insert(entry.groups.end(), alternative_groups.begin(), alternative_groups.end());
  }
}

// The live batcher of this route when its settings are unchanged, else a new one.
std::shared_ptr<Batcher> Router::BatcherLocked(std::shared_ptr<const RouteConfig> config) {
  std::weak_ptr<Batcher>& slot = batchers_[config->route_id];
  std::shared_ptr<Batcher> batcher = slot.lock();
  if (batcher && !batcher->failed() && SameRoute(batcher->config(), *config)) return batcher;
  batcher = std::make_shared<Batcher>(std::move(config), options_, reporter_,
                                      [this](uint64_t route_id) { Drop({route_id}); });
  slot = batcher;
  if (batchers_.size() > 2 * kMaxKeys) {
    for (auto it = batchers_.begin(); it != batchers_.end();) {
      it = it->second.expired() ? batchers_.erase(it) : std::next(it);
    }
  }
  return batcher;
}

// A full table lets go of the keys that route nothing (refused, ineligible, marked for whole
// shapes) and are not being asked about: a client sending ever new shapes would otherwise fill
// it, and every new key of every model would then take the coordinator's path.
void Router::PruneLocked() {
  for (auto it = entries_.begin(); it != entries_.end();) {
    it = Prunable(it->second) ? EraseLocked(it) : std::next(it);
  }
}

void Router::Drop(const std::vector<uint64_t>& route_ids) {
  std::lock_guard<std::mutex> lock(mu_);
  for (auto it = entries_.begin(); it != entries_.end();) {
    Entry& entry = it->second;
    bool listed = !entry.batchers.empty() &&
                  std::any_of(entry.route_ids.begin(), entry.route_ids.end(), [&](uint64_t id) {
                    return std::find(route_ids.begin(), route_ids.end(), id) != route_ids.end();
                  });
    if (listed && entry.asking) {  // the pending reply refills them
      Recount recount(this, entry);
      entry.batchers.clear();
    }
    it = listed && !entry.asking ? EraseLocked(it) : std::next(it);
  }
}

std::vector<uint64_t> Router::Held() {
  std::lock_guard<std::mutex> lock(mu_);
  std::unordered_set<uint64_t> ids;
  for (const auto& [key, entry] : entries_) {
    if (!entry.batchers.empty()) ids.insert(entry.route_ids.begin(), entry.route_ids.end());
  }
  return std::vector<uint64_t>(ids.begin(), ids.end());
}

void Router::DropModel(const std::string& model) {
  std::lock_guard<std::mutex> lock(mu_);
  for (auto it = entries_.begin(); it != entries_.end();) {
    if (it->second.model != model) {
      ++it;
    } else if (it->second.asking) {  // the pending reply, asked before, must not refill them
      Recount recount(this, it->second);
      it->second.batchers.clear();
      it->second.stale_reply = true;
      ++it;
    } else {
      it = EraseLocked(it);
    }
  }
}

}  // namespace frontdoor
