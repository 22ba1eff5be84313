// Rows the door has queued for each node or sent it and not yet had answered, across every route
// (every model) to that node: the least_loaded policy's rows outstanding, counted as the
// coordinator counts its own (services/coordinator/attempts.py, outstanding). Pure (no gRPC), tested by
// tests/coordinator/test_door_node_rows.py.
#pragma once

#include <atomic>
#include <cstdint>
#include <map>
#include <memory>
#include <mutex>
#include <string>

namespace frontdoor {

// One node's counts. Atomics: batchers change them under their own locks (one per route), and a
// pick reads them under none.
struct NodeCount {
  std::atomic<int64_t> rows{0};        // queued and in flight now
  std::atomic<int64_t> given_back{0};  // rows holders still held when they ended (counting errors)
};

// What a report says of one node.
struct NodeTotals {
  int64_t rows = 0;
  int64_t given_back = 0;
  bool operator==(const NodeTotals& other) const { return rows == other.rows && given_back == other.given_back; }
  bool operator!=(const NodeTotals& other) const { return !(*this == other); }
};

// Each node's counts, shared by the batchers of every route to it.
class NodeRows {
 public:
  // The node's counts, made at 0 on first use and kept while the table lives.
  std::shared_ptr<NodeCount> For(const std::string& node);
  // Every node counted so far and its counts now (a node once counted stays listed, at 0 when idle).
  std::map<std::string, NodeTotals> Snapshot();

 private:
  std::mutex mu_;  // guards counts_ (not the counts themselves)
  std::map<std::string, std::shared_ptr<NodeCount>> counts_;
};

// One holder's part of a node's rows (a batcher's rows queued and in flight at its node). Its
// holder serializes the calls (the batcher's lock). Every row it takes on is let go of when its
// request leaves; what it still holds when it ends is a counting error: given back (else the
// node would look busy for good) and counted as such (given_back), so tests and reports see it.
class NodeShare {
 public:
  explicit NodeShare(std::shared_ptr<NodeCount> count);
  ~NodeShare();
  NodeShare(const NodeShare&) = delete;
  NodeShare& operator=(const NodeShare&) = delete;
  void Add(int64_t rows);  // rows taken on (> 0) or let go of (< 0)
  int64_t held() const { return held_; }
  // The node's rows now, of every holder (no lock needed).
  int64_t node_rows() const { return count_->rows.load(std::memory_order_relaxed); }

 private:
  std::shared_ptr<NodeCount> count_;
  int64_t held_ = 0;
};

}  // namespace frontdoor
