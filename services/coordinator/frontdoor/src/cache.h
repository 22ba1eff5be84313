// The door's response cache (Triton's response cache, for deployments with response_cache: true):
// answers kept by key, least recently used leaving first to stay within a byte budget.
#pragma once

#include <cstddef>
#include <list>
#include <memory>
#include <mutex>
#include <string>
#include <unordered_map>
#include <utility>

#include "inference/grpc_service.pb.h"

namespace frontdoor {

class InferCall;

class ResponseCache {
 public:
  using Answer = std::shared_ptr<const inference::ModelInferResponse>;
  explicit ResponseCache(size_t max_bytes) : max_bytes_(max_bytes) {}
  // The key of a call's request for the variant named by `scope`: its inputs (names, datatypes,
  // shapes, raw contents) and requested outputs.
  static std::string Key(const std::string& scope, const inference::ModelInferRequest& request);
  // The answer kept for `key` (its id cleared), or null.
  Answer Get(const std::string& key);
  // Keeps `answer` (an answer larger than the whole budget is not kept).
  void Put(const std::string& key, Answer answer);

 private:
  using Entry = std::pair<std::string, Answer>;
  const size_t max_bytes_;
  std::mutex mu_;  // guards the fields below
  std::list<Entry> lru_;  // most recently used first
  std::unordered_map<std::string, std::list<Entry>::iterator> index_;
  size_t bytes_ = 0;
};

}  // namespace frontdoor
