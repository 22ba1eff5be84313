// The least_loaded baseline policy's rule, as the coordinator's full path applies it
// (services/coordinator/placement.py, least_loaded): pure, tested against it by
// tests/coordinator/test_door_least_loaded.py.
#pragma once

#include <cstddef>
#include <cstdint>
#include <string>
#include <vector>

namespace frontdoor {

// One node as the rule weighs it.
struct NodeLoad {
  std::string node_id;
  uint64_t inflight = 0;     // requests in flight at the node, by its last heartbeat the coordinator saw
  uint64_t outstanding = 0;  // rows the caller has queued for the node or sent it, not yet answered
  uint32_t cpus = 1;         // 0 counts as 1
  double cpu_load = 0;       // 0..1 share of the node's CPU in use (heartbeat)
};

// The index in `nodes` (not empty) of the least loaded: the fewest (inflight + outstanding) per
// CPU, then the lowest cpu_load, then the smallest node id.
size_t LeastLoaded(const std::vector<NodeLoad>& nodes);

}  // namespace frontdoor
