// Runs the front door's least_loaded rule (frontdoor/src/least_loaded.h) on nodes read from stdin,
// one case per line, for tests/coordinator/test_door_least_loaded.py:
//   n_nodes (node_id inflight outstanding cpus cpu_load)...
// and answers each with the index of the node it picks, one per line.
#include <iostream>
#include <sstream>
#include <string>

#include "least_loaded.h"

int main() {
  std::string line;
  while (std::getline(std::cin, line)) {
    std::istringstream in(line);
    size_t count = 0;
    in >> count;
    std::vector<frontdoor::NodeLoad> nodes(count);
    for (frontdoor::NodeLoad& node : nodes) {
      in >> node.node_id >> node.inflight >> node.outstanding >> node.cpus >> node.cpu_load;
    }
    if (!in || count == 0) {
      std::cerr << "unreadable case: " << line << "\n";
      return 2;
    }
    std::cout << frontdoor::LeastLoaded(nodes) << '\n';
  }
  return 0;
}
