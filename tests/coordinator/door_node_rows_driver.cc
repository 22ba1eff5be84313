// Runs the front door's rows per node (frontdoor/src/node_rows.h) on steps read from stdin, one
// per line, for tests/coordinator/test_door_node_rows.py:
//   hold HOLDER NODE     a holder (a route's batcher) of rows at NODE
//   add HOLDER ROWS      it takes rows on (> 0) or lets go of them (< 0)
//   end HOLDER           it goes away
//   race THREADS STEPS   THREADS holders at nodes n0, n1, n2 (by turn), each on a thread of its
//                        own, add and let go of 1 to 8 rows at a time STEPS times, all at once
//                        while another thread picks by the counts, and end holding 1 row each
//   show                 prints every node counted, its rows and the rows given back (held by a
//                        holder when it ended): "node=rows/given_back ..." (one line)
#include <atomic>
#include <iostream>
#include <map>
#include <memory>
#include <random>
#include <sstream>
#include <string>
#include <thread>
#include <vector>

#include "node_rows.h"

using frontdoor::NodeRows;
using frontdoor::NodeShare;

namespace {

void Race(NodeRows* table, std::map<std::string, std::unique_ptr<NodeShare>>* holders, int threads, int steps) {
  std::vector<std::unique_ptr<NodeShare>> racers;
  for (int i = 0; i < threads; ++i) racers.push_back(std::make_unique<NodeShare>(table->For("n" + std::to_string(i % 3))));
  std::vector<std::thread> running;
  for (int i = 0; i < threads; ++i) {
    running.emplace_back([share = racers[size_t(i)].get(), steps, i] {
      std::mt19937 rng{unsigned(i)};
      for (int step = 0; step < steps; ++step) {
        const int64_t rows = 1 + int64_t(rng() % 8);
        share->Add(rows);
        share->Add(-rows);
      }
      share->Add(1);
    });
  }
  std::atomic<bool> done{false};
  std::thread reader([table, &done] {  // what a pick reads meanwhile, under no batcher's lock
    while (!done.load()) {
      for (const char* node : {"n0", "n1", "n2"}) table->For(node)->rows.load(std::memory_order_relaxed);
    }
  });
  for (auto& thread : running) thread.join();
  done = true;
  reader.join();
  for (int i = 0; i < threads; ++i) (*holders)["race" + std::to_string(i)] = std::move(racers[size_t(i)]);
}

}  // namespace

int main() {
  NodeRows table;
  std::map<std::string, std::unique_ptr<NodeShare>> holders;
  std::string line, step;
  while (std::getline(std::cin, line)) {
    std::istringstream in(line);
    in >> step;
    std::string holder, node;
    int64_t rows = 0;
    if (step == "hold" && in >> holder >> node) {
      holders[holder] = std::make_unique<NodeShare>(table.For(node));
    } else if (step == "add" && in >> holder >> rows && holders.count(holder)) {
      holders[holder]->Add(rows);
    } else if (step == "end" && in >> holder && holders.count(holder)) {
      holders.erase(holder);
    } else if (int threads = 0, steps = 0; step == "race" && in >> threads >> steps) {
      Race(&table, &holders, threads, steps);
    } else if (step == "show") {
      const char* space = "";
      for (const auto& [name, totals] : table.Snapshot()) {
        std::cout << space << name << '=' << totals.rows << '/' << totals.given_back;
        space = " ";
      }
      std::cout << '\n';
    } else {
      std::cerr << "unreadable step: " << line << "\n";
      return 2;
    }
  }
  return 0;
}
