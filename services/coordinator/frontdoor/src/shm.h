// Triton's system shared memory on the fast path: the coordinator keeps each registration as a
// file in a directory it shares with the door (services/common/shm.py); the door opens the
// regions it meets in requests, reads inputs from them and writes outputs into them, so such
// requests batch like any other. Anything it cannot resolve goes to the coordinator, which
// answers with the precise error.
#pragma once

#include <sys/types.h>

#include <cstdint>
#include <memory>
#include <mutex>
#include <string>
#include <unordered_map>
#include <vector>

#include "inference/grpc_service.pb.h"

namespace frontdoor {

// A region's registration as the coordinator wrote it (read once, again when its file changes).
struct Registration {
  std::string object;  // /dev/shm path of its key
  uint64_t offset = 0, byte_size = 0;
  ino_t inode = 0;  // of the registration file, to notice a region registered again
  int64_t mtime_ns = 0;
};

// One registered region opened for one request (the object as it is now: one the client made
// afresh under the same key is the one read); closed when the request's users let go. Its bytes
// are read and written with pread/pwrite, never through a mapping: a client that shrinks its
// object makes a request fail, not the door fault (SIGBUS). No descriptor outlives its request.
struct OpenRegion {
  OpenRegion() = default;
  OpenRegion(const OpenRegion&) = delete;
  OpenRegion& operator=(const OpenRegion&) = delete;
  ~OpenRegion();
  // The region's bytes [offset, offset + size) into `out`; false (with `error`) when the object
  // no longer holds them.
  bool Read(uint64_t offset, uint64_t size, std::string* out, std::string* error) const;
  // `size` bytes at the region's `offset`; false (with `error`) when the object no longer holds them.
  bool Write(uint64_t offset, const char* data, uint64_t size, std::string* error) const;
  std::string name;
  uint64_t offset = 0, byte_size = 0;
  int fd = -1;
};

// Where one output of a request goes: `capacity` bytes at `offset` of `region`.
struct OutputPlace {
  std::string output, region;
  uint64_t offset = 0;
  uint64_t capacity = 0;
  std::shared_ptr<OpenRegion> opened;  // keeps the region open until the reply is written
};

class SharedMemory {
 public:
  explicit SharedMemory(std::string dir) : dir_(std::move(dir)) {}
  // Replaces inputs placed in shared memory by their bytes (raw_input_contents) and takes the
  // placements off inputs and outputs, noting where outputs go. False when the request names a
  // region, range or layout the door does not resolve; the request may then be half changed,
  // and the caller forwards the bytes it received instead.
  bool Take(inference::ModelInferRequest* request, std::vector<OutputPlace>* outputs);

 private:
  std::shared_ptr<OpenRegion> Find(const std::string& name);
  const std::string dir_;
  std::mutex mu_;
  std::unordered_map<std::string, Registration> regions_;  // by region name
};

// Whether a tensor's parameters place it in shared memory.
bool InSharedMemory(const google::protobuf::Map<std::string, inference::InferParameter>& params);

}  // namespace frontdoor
