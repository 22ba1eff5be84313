// The coordinator behind the door: its channel, stubs and the metadata rules for passing calls on.
#pragma once

#include <grpcpp/generic/generic_stub.h>
#include <grpcpp/grpcpp.h>

#include <memory>
#include <string>

#include "cnei/frontdoor.grpc.pb.h"

namespace frontdoor {

struct Backend {
  Backend(const std::string& address, int max_message_bytes);
  std::string address;
  std::shared_ptr<grpc::Channel> channel;
  grpc::GenericStub generic;
  std::unique_ptr<cnei::frontdoor::v1::FrontDoorControl::Stub> control;
};

// Metadata the door adds to a request it sampled for tracing (services/common/trace_settings.py).
constexpr char kTracePickedHeader[] = "cnei-trace-picked";
// Client metadata (minus transport keys and the door's own) and deadline, onto a call to the
// backend; `trace_picked` adds kTracePickedHeader.
void CopyRequestMetadata(const grpc::ServerContextBase& from, grpc::ClientContext* to,
                         bool trace_picked = false);
// The backend's initial or trailing metadata, onto the client's call.
void CopyInitialMetadata(const grpc::ClientContext& from, grpc::ServerContextBase* to);
void CopyTrailingMetadata(const grpc::ClientContext& from, grpc::ServerContextBase* to);
// The backend's status for the client; a backend that cannot be reached says so.
grpc::Status ClientStatus(const grpc::Status& status, const grpc::ClientContext& call,
                          const Backend& backend);

}  // namespace frontdoor
