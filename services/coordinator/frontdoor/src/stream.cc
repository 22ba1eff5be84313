// A ModelStreamInfer stream: each message is a ModelInfer request that the door batches or
// forwards on its own (so requests of one stream batch together), answered in request order.
#include "stream.h"

#include <grpcpp/support/byte_buffer.h>

#include <string>
#include <vector>

#include "codes.h"
#include "door.h"

namespace frontdoor {
namespace {

constexpr char kModelInfer[] = "/inference.GRPCInferenceService/ModelInfer";

// A serialized ModelInferResponse as the `infer_response` (field 2) of a
// ModelStreamInferResponse: a tag and a length in front, the reply's slices not copied.
grpc::ByteBuffer WrapReply(grpc::ByteBuffer response) {
  std::vector<grpc::Slice> slices;
  size_t length = response.Length();
  std::string head(1, char(0x12));  // field 2, length-delimited
  do {
    head.push_back(char((length & 0x7f) | (length > 0x7f ? 0x80 : 0)));
    length >>= 7;
  } while (length > 0);
  slices.emplace_back(head);
  std::vector<grpc::Slice> body;
  if (response.Length() > 0) (void)response.Dump(&body);
  slices.insert(slices.end(), body.begin(), body.end());
  return grpc::ByteBuffer(slices.data(), slices.size());
}

grpc::ByteBuffer ErrorReply(const grpc::Status& status, const inference::ModelInferRequest& request) {
  inference::ModelStreamInferResponse reply;
  reply.set_error_message(Describe(status));
  reply.mutable_infer_response()->set_model_name(request.model_name());
  reply.mutable_infer_response()->set_id(request.id());
  std::string bytes = reply.SerializeAsString();
  grpc::Slice slice(bytes);
  return grpc::ByteBuffer(&slice, 1);
}

}  // namespace

// One request of the stream. Answering it hands the reply to the stream and deletes it.
class InferStream::Message : public InferCall {
 public:
  Message(InferStream* stream, uint64_t seq, grpc::ByteBuffer bytes)
      : bytes(std::move(bytes)), stream_(stream), seq_(seq) {}
  void Forward() override;
  void Reply(grpc::ByteBuffer response) override {
    InferStream* stream = stream_;
    uint64_t seq = seq_;
    delete this;
    stream->Answer(seq, WrapReply(std::move(response)));
  }
  void Fail(const grpc::Status& status) override {
    InferStream* stream = stream_;
    uint64_t seq = seq_;
    grpc::ByteBuffer reply = ErrorReply(status, request());
    delete this;
    stream->Answer(seq, std::move(reply));
  }
  bool cancelled() const override { return stream_->cancelled_.load(std::memory_order_relaxed); }
  grpc::GenericCallbackServerContext& context() override { return *stream_->ctx_; }

  grpc::ByteBuffer bytes;  // as received: what a forward sends

 private:
  void OnBackendDone(const grpc::Status& status);
  InferStream* stream_;
  const uint64_t seq_;
  grpc::ClientContext upstream_;
  grpc::ByteBuffer response_;
};

// A request the door does not batch goes to the coordinator as a unary ModelInfer with the
// stream's metadata and deadline; its answer takes the request's place in the stream.
void InferStream::Message::Forward() {
  if (cancelled()) return Fail(grpc::Status(grpc::StatusCode::CANCELLED, "stream cancelled"));
  CopyRequestMetadata(*stream_->ctx_, &upstream_, trace_picked);
  {
    std::lock_guard<std::mutex> lock(stream_->mu_);
    stream_->forwarded_.insert(&upstream_);
  }
  if (cancelled()) upstream_.TryCancel();
  stream_->backend_->generic.UnaryCall(&upstream_, kModelInfer, grpc::StubOptions(), &bytes,
                                       &response_,
                                       [this](grpc::Status status) { OnBackendDone(status); });
}

void InferStream::Message::OnBackendDone(const grpc::Status& status) {
  {
    std::lock_guard<std::mutex> lock(stream_->mu_);
    stream_->forwarded_.erase(&upstream_);
  }
  if (status.ok()) return Reply(std::move(response_));
  Fail(ClientStatus(status, upstream_, *stream_->backend_));
}

InferStream::InferStream(grpc::GenericCallbackServerContext* ctx, Backend* backend,
                         InferDoor* door, size_t window)
    : ctx_(ctx), backend_(backend), door_(door), window_(window) {
  StartRead(&incoming_);
}

void InferStream::OnReadDone(bool ok) {
  Next next;
  if (!ok) {
    std::lock_guard<std::mutex> lock(mu_);
    reading_ = false;
    read_done_ = true;
    next = NextLocked();
  } else {
    Message* message;
    {
      std::lock_guard<std::mutex> lock(mu_);
      message = new Message(this, next_seq_++, std::move(incoming_));
      pending_.emplace_back();
      reading_ = false;
      next = NextLocked();  // reads on while the window has room
    }
    // The message holds a slot in pending_, so the stream outlives its answer.
    door_->Infer(message, &message->bytes);
  }
  Start(next);
}

void InferStream::OnWriteDone(bool ok) {
  Next next;
  {
    std::lock_guard<std::mutex> lock(mu_);
    writing_ = false;
    if (!ok) write_failed_ = true;
    next = NextLocked();
  }
  Start(next);
}

void InferStream::OnCancel() {
  cancelled_.store(true, std::memory_order_relaxed);
  std::lock_guard<std::mutex> lock(mu_);
  for (grpc::ClientContext* upstream : forwarded_) upstream->TryCancel();
}

void InferStream::Answer(uint64_t seq, grpc::ByteBuffer reply) {
  Next next;
  {
    std::lock_guard<std::mutex> lock(mu_);
    pending_[seq - first_seq_] = std::move(reply);
    next = NextLocked();
  }
  Start(next);
}

InferStream::Next InferStream::NextLocked() {
  Next next;
  while (!writing_ && !pending_.empty() && pending_.front().has_value()) {
    grpc::ByteBuffer reply = std::move(*pending_.front());
    pending_.pop_front();
    ++first_seq_;
    if (write_failed_) continue;  // nobody to write to; the slot is free all the same
    outgoing_ = std::move(reply);
    writing_ = next.write = true;
  }
  if (!reading_ && !read_done_ && pending_.size() < window_) reading_ = next.read = true;
  if (read_done_ && pending_.empty() && !writing_ && !finished_) finished_ = next.finish = true;
  return next;
}

void InferStream::Start(Next next) {
  if (next.read) StartRead(&incoming_);
  if (next.write) StartWrite(&outgoing_);
  if (next.finish) Finish(grpc::Status::OK);  // last: OnDone may delete the stream
}

}  // namespace frontdoor
