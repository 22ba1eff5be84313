// Streaming proxy: pumps messages both ways between a client's stream and the backend's.
#include "pump.h"

namespace frontdoor {

BidiPump::BidiPump(grpc::GenericCallbackServerContext* ctx, Backend* backend)
    : ctx_(ctx), backend_(backend), upstream_(this) {
  CopyRequestMetadata(*ctx_, &upstream_ctx_);
  backend_->generic.PrepareBidiStreamingCall(&upstream_ctx_, ctx_->method(), grpc::StubOptions(),
                                             &upstream_);
  upstream_.AddMultipleHolds(2);
  upstream_.StartRead(&from_backend_);
  upstream_.StartCall();
  StartRead(&from_client_);
}

void BidiPump::OnReadDone(bool ok) {
  bool write = false, release = false;
  {
    std::lock_guard<std::mutex> lock(mu_);
    if (!writes_open_) return;
    if (ok) {
      write = writing_ = true;
    } else {
      writes_open_ = false;
      release = CloseWritesLocked();
    }
  }
  if (write) return upstream_.StartWrite(&from_client_);
  if (release) {
    upstream_.StartWritesDone();
    upstream_.RemoveHold();
  }
}

void BidiPump::UpstreamWrote(bool ok) {
  bool next = false, release = false;
  {
    std::lock_guard<std::mutex> lock(mu_);
    writing_ = false;
    if (!ok) writes_open_ = false;
    if (writes_open_) {
      next = true;
    } else {
      release = CloseWritesLocked();
    }
  }
  if (next) StartRead(&from_client_);
  if (release) upstream_.RemoveHold();
}

bool BidiPump::CloseWritesLocked() {
  if (writing_ || !write_hold_) return false;
  write_hold_ = false;
  return true;
}

void BidiPump::UpstreamMetadata(bool ok) {
  if (ok) SendInitialMetadataOnce(true);
}

// Under the lock, so a concurrent first write never overtakes the copied metadata.
void BidiPump::SendInitialMetadataOnce(bool start) {
  std::lock_guard<std::mutex> lock(mu_);
  if (metadata_sent_) return;
  metadata_sent_ = true;
  CopyInitialMetadata(upstream_ctx_, ctx_);
  if (start) StartSendInitialMetadata();
}

void BidiPump::UpstreamRead(bool ok) {
  if (ok) {
    SendInitialMetadataOnce(true);
    return StartWrite(&from_backend_);
  }
  bool release = false;
  {
    std::lock_guard<std::mutex> lock(mu_);
    writes_open_ = false;  // the backend has ended its stream
    release = CloseWritesLocked();
  }
  if (release) upstream_.RemoveHold();
  upstream_.RemoveHold();  // the read hold
}

void BidiPump::OnWriteDone(bool ok) {
  if (ok) return upstream_.StartRead(&from_backend_);
  upstream_ctx_.TryCancel();
  upstream_.RemoveHold();  // the read hold
}

void BidiPump::UpstreamDone(const grpc::Status& status) {
  SendInitialMetadataOnce(false);
  CopyTrailingMetadata(upstream_ctx_, ctx_);
  Finish(ClientStatus(status, upstream_ctx_, *backend_));
  Release();
}

void BidiPump::Release() {
  if (sides_done_.fetch_add(1) == 1) delete this;
}

}  // namespace frontdoor
