// The door's response cache: keys, lookups and the byte budget.
#include "cache.h"

namespace frontdoor {
namespace {

void Field(std::string* key, const std::string& value) {
  uint64_t size = value.size();
  key->append(reinterpret_cast<const char*>(&size), sizeof(size));
  key->append(value);
}

size_t Cost(const std::string& key, const inference::ModelInferResponse& answer) {
  return key.size() + answer.ByteSizeLong();
}

}  // namespace

std::string ResponseCache::Key(const std::string& scope, const inference::ModelInferRequest& request) {
  std::string key;
  Field(&key, scope);
  for (const auto& input : request.inputs()) {
    Field(&key, input.name());
    Field(&key, input.datatype());
    std::string shape;
    for (int64_t dim : input.shape()) shape.append(reinterpret_cast<const char*>(&dim), sizeof(dim));
    Field(&key, shape);
  }
  for (const auto& raw : request.raw_input_contents()) Field(&key, raw);
  for (const auto& output : request.outputs()) Field(&key, output.name());
  return key;
}

ResponseCache::Answer ResponseCache::Get(const std::string& key) {
  std::lock_guard<std::mutex> lock(mu_);
  auto it = index_.find(key);
  if (it == index_.end()) return nullptr;
  lru_.splice(lru_.begin(), lru_, it->second);
  return it->second->second;
}

void ResponseCache::Put(const std::string& key, Answer answer) {
  const size_t cost = Cost(key, *answer);
  if (cost > max_bytes_) return;
  std::lock_guard<std::mutex> lock(mu_);
  auto it = index_.find(key);
  if (it != index_.end()) {
    bytes_ -= Cost(it->second->first, *it->second->second);
    lru_.erase(it->second);
    index_.erase(it);
  }
  while (!lru_.empty() && bytes_ + cost > max_bytes_) {
    const Entry& oldest = lru_.back();
    bytes_ -= Cost(oldest.first, *oldest.second);
    index_.erase(oldest.first);
    lru_.pop_back();
  }
  lru_.emplace_front(key, std::move(answer));
  index_[key] = lru_.begin();
  bytes_ += cost;
}

}  // namespace frontdoor
