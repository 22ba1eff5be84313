// A ModelStreamInfer stream: each message is a ModelInfer request that the door batches or
// forwards on its own (so requests of one stream batch together), answered in request order.
#pragma once

#include <grpcpp/generic/async_generic_service.h>

#include <atomic>
#include <cstdint>
#include <deque>
#include <mutex>
#include <optional>
#include <set>

#include "backend.h"
#include "call.h"

namespace frontdoor {

class InferDoor;

// Triton's stream semantics for models that are not decoupled: one ModelStreamInferResponse
// per request, in request order; a failed request answers with `error_message` (and the
// request's model name and id) while the stream goes on. At most `window` requests are
// unanswered at once; beyond that the stream is not read until the oldest is written.
class InferStream : public grpc::ServerGenericBidiReactor {
 public:
  InferStream(grpc::GenericCallbackServerContext* ctx, Backend* backend, InferDoor* door,
              size_t window);
  void OnReadDone(bool ok) override;
  void OnWriteDone(bool ok) override;
  void OnCancel() override;
  void OnDone() override { delete this; }

 private:
  class Message;
  // Message `seq` is answered with `reply` (a serialized ModelStreamInferResponse).
  void Answer(uint64_t seq, grpc::ByteBuffer reply);
  // What to start once the lock is released; the stream may be gone after Start.
  struct Next {
    bool write = false;
    bool read = false;
    bool finish = false;
  };
  Next NextLocked();
  void Start(Next next);

  grpc::GenericCallbackServerContext* ctx_;
  Backend* backend_;
  InferDoor* door_;
  const size_t window_;
  std::atomic<bool> cancelled_{false};
  grpc::ByteBuffer incoming_;   // the read in progress
  grpc::ByteBuffer outgoing_;   // the write in progress
  std::mutex mu_;               // guards the fields below
  uint64_t next_seq_ = 0;       // the number of the next message read
  uint64_t first_seq_ = 0;      // the number of pending_.front()
  std::deque<std::optional<grpc::ByteBuffer>> pending_;  // unwritten replies, in request order
  std::set<grpc::ClientContext*> forwarded_;             // messages at the coordinator now
  bool reading_ = true;         // a read is outstanding
  bool read_done_ = false;      // the client half-closed (or the stream broke)
  bool writing_ = false;        // a write is outstanding
  bool write_failed_ = false;   // the client is gone: replies are dropped
  bool finished_ = false;
};

}  // namespace frontdoor
