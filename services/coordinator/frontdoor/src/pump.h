// Streaming proxy: pumps messages both ways between a client's stream and the backend's.
#pragma once

#include <grpcpp/generic/async_generic_service.h>

#include <atomic>
#include <mutex>

#include "backend.h"

namespace frontdoor {

class BidiPump : public grpc::ServerGenericBidiReactor {
 public:
  BidiPump(grpc::GenericCallbackServerContext* ctx, Backend* backend);
  void OnReadDone(bool ok) override;   // a client message, or its half-close
  void OnWriteDone(bool ok) override;  // a backend message delivered to the client
  void OnCancel() override { upstream_ctx_.TryCancel(); }
  void OnDone() override { Release(); }

 private:
  // The client side of the backend call; two holds keep it open while the server side
  // may still start operations on it (one per direction).
  class Upstream : public grpc::ClientBidiReactor<grpc::ByteBuffer, grpc::ByteBuffer> {
   public:
    explicit Upstream(BidiPump* pump) : pump_(pump) {}
    void OnReadInitialMetadataDone(bool ok) override { pump_->UpstreamMetadata(ok); }
    void OnReadDone(bool ok) override { pump_->UpstreamRead(ok); }
    void OnWriteDone(bool ok) override { pump_->UpstreamWrote(ok); }
    void OnDone(const grpc::Status& status) override { pump_->UpstreamDone(status); }

   private:
    BidiPump* pump_;
  };
  void UpstreamMetadata(bool ok);
  void UpstreamRead(bool ok);
  void UpstreamWrote(bool ok);
  void UpstreamDone(const grpc::Status& status);
  void SendInitialMetadataOnce(bool start);
  bool CloseWritesLocked();  // true: the caller releases the write hold
  void Release();

  grpc::GenericCallbackServerContext* ctx_;
  Backend* backend_;
  grpc::ClientContext upstream_ctx_;
  Upstream upstream_;
  grpc::ByteBuffer from_client_, from_backend_;
  std::mutex mu_;               // guards the flags below
  bool writes_open_ = true;     // client messages still go to the backend
  bool writing_ = false;        // a write to the backend is outstanding
  bool write_hold_ = true;
  bool metadata_sent_ = false;
  std::atomic<int> sides_done_{0};
};

}  // namespace frontdoor
