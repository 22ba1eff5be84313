#include "least_loaded.h"

#include <algorithm>
#include <tuple>

namespace frontdoor {

namespace {

// What the rule orders nodes by, least first (placement.py: the key of least_loaded's min).
std::tuple<double, double, const std::string&> Key(const NodeLoad& node) {
  const double per_cpu = double(node.inflight + node.outstanding) / double(std::max<uint32_t>(1, node.cpus));
  return {per_cpu, node.cpu_load, node.node_id};
}

}  // namespace

size_t LeastLoaded(const std::vector<NodeLoad>& nodes) {
  size_t best = 0;
  for (size_t i = 1; i < nodes.size(); ++i) {
    if (Key(nodes[i]) < Key(nodes[best])) best = i;
  }
  return best;
}

}  // namespace frontdoor
