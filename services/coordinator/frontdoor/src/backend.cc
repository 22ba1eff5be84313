// The coordinator behind the door: its channel, stubs and the metadata rules for passing calls on.
#include "backend.h"

namespace frontdoor {
namespace {

bool Forwardable(const grpc::string_ref& key) {
  if (key.starts_with(":") || key.starts_with("grpc-")) return false;
  return key != "content-type" && key != "user-agent" && key != "te";
}

std::string Str(const grpc::string_ref& ref) { return std::string(ref.data(), ref.size()); }

std::shared_ptr<grpc::Channel> MakeChannel(const std::string& address, int max_message_bytes) {
  grpc::ChannelArguments args;
  args.SetMaxReceiveMessageSize(max_message_bytes);
  args.SetMaxSendMessageSize(max_message_bytes);
  return grpc::CreateCustomChannel(address, grpc::InsecureChannelCredentials(), args);
}

}  // namespace

Backend::Backend(const std::string& addr, int max_message_bytes)
    : address(addr),
      channel(MakeChannel(addr, max_message_bytes)),
      generic(channel),
      control(cnei::frontdoor::v1::FrontDoorControl::NewStub(channel)) {}

void CopyRequestMetadata(const grpc::ServerContextBase& from, grpc::ClientContext* to,
                         bool trace_picked) {
  for (const auto& [key, value] : from.client_metadata()) {
    if (Forwardable(key) && key != kTracePickedHeader) to->AddMetadata(Str(key), Str(value));
  }
  if (trace_picked) to->AddMetadata(kTracePickedHeader, "1");
  to->set_deadline(from.raw_deadline());
}

void CopyInitialMetadata(const grpc::ClientContext& from, grpc::ServerContextBase* to) {
  for (const auto& [key, value] : from.GetServerInitialMetadata()) {
    if (Forwardable(key)) to->AddInitialMetadata(Str(key), Str(value));
  }
}

void CopyTrailingMetadata(const grpc::ClientContext& from, grpc::ServerContextBase* to) {
  for (const auto& [key, value] : from.GetServerTrailingMetadata()) {
    if (Forwardable(key)) to->AddTrailingMetadata(Str(key), Str(value));
  }
}

grpc::Status ClientStatus(const grpc::Status& status, const grpc::ClientContext& call,
                          const Backend& backend) {
  if (status.error_code() != grpc::StatusCode::UNAVAILABLE ||
      !call.GetServerInitialMetadata().empty() ||
      backend.channel->GetState(false) == GRPC_CHANNEL_READY) {
    return status;
  }
  return grpc::Status(grpc::StatusCode::UNAVAILABLE,
                      "coordinator at " + backend.address + " unavailable: " + status.error_message(),
                      status.error_details());
}

}  // namespace frontdoor
