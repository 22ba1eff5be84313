// Fast-lane client: framed ModelInfer calls over one multiplexed TCP connection per node.
#pragma once

#include <grpcpp/support/status.h>

#include <atomic>
#include <chrono>
#include <functional>
#include <map>
#include <memory>
#include <mutex>
#include <string>
#include <string_view>
#include <utility>
#include <vector>

namespace frontdoor {

// Called once per call, on the lane's reader thread (or the caller's on an immediate failure).
// On success `body` holds meta + payload; the payload starts at `payload_offset`.
using FastDone = std::function<void(const grpc::Status&, std::string body, size_t payload_offset)>;

class FastLane : public std::enable_shared_from_this<FastLane> {
 public:
  explicit FastLane(std::string address);
  // Sends one request frame whose payload is the concatenation of `payload` pieces.
  void Call(const std::string& meta, const std::vector<std::string_view>& payload,
            double timeout_s, FastDone done);
  const std::string& address() const { return address_; }

 private:
  struct Conn;
  std::shared_ptr<Conn> Connection(std::string* error);
  std::string address_;
  std::mutex mu_;          // guards conn_; also serializes connects
  std::shared_ptr<Conn> conn_;
  std::atomic<uint64_t> next_id_{1};
};

// The lane for a node address, created on first use and shared afterwards.
std::shared_ptr<FastLane> LaneFor(const std::string& address);

// TLS for every fast-lane connection (runtimes serving it: CNEI_RUNTIME_TLS_CERT_FILE): trust
// `ca_file`, check the node's certificate names its host or IP address, and present `cert_file`
// with `key_file` to nodes that ask (mutual TLS; both empty: none). Set once at start, before any
// lane connects; false with `error` set when the files do not load. `server_name`: the name every
// node's certificate must hold instead of the host it is dialled at (empty: that host).
bool SetNodeTls(const std::string& ca_file, const std::string& cert_file, const std::string& key_file,
                const std::string& server_name, std::string* error);

// Headers every new connection sends first, in a hello frame (the keys of runtimes whose
// inference API is restricted); set once at start, before any lane connects. False when they do
// not fit a frame's meta (64 KiB).
bool SetHelloHeaders(const std::vector<std::pair<std::string, std::string>>& headers);

}  // namespace frontdoor
