// Rows queued for and in flight to each node across every route (node_rows.h).
#include "node_rows.h"

namespace frontdoor {

std::shared_ptr<NodeCount> NodeRows::For(const std::string& node) {
  std::lock_guard<std::mutex> lock(mu_);
  std::shared_ptr<NodeCount>& count = counts_[node];
  if (!count) count = std::make_shared<NodeCount>();
  return count;
}

std::map<std::string, NodeTotals> NodeRows::Snapshot() {
  std::lock_guard<std::mutex> lock(mu_);
  std::map<std::string, NodeTotals> totals;
  for (const auto& [node, count] : counts_) {
    totals[node] = {count->rows.load(std::memory_order_relaxed), count->given_back.load(std::memory_order_relaxed)};
  }
  return totals;
}

NodeShare::NodeShare(std::shared_ptr<NodeCount> count) : count_(std::move(count)) {}

NodeShare::~NodeShare() {
  if (held_ != 0) count_->given_back.fetch_add(held_, std::memory_order_relaxed);
  Add(-held_);
}

void NodeShare::Add(int64_t rows) {
  if (rows == 0) return;
  held_ += rows;
  count_->rows.fetch_add(rows, std::memory_order_relaxed);
}

}  // namespace frontdoor
