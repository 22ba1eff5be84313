// The public OIP port: one generic service that picks the reactor for each method.
#include "service.h"

#include <google/protobuf/descriptor.h>

#include "call.h"
#include "pump.h"
#include "stream.h"

namespace frontdoor {
namespace {

constexpr char kModelInfer[] = "/inference.GRPCInferenceService/ModelInfer";
constexpr char kModelStreamInfer[] = "/inference.GRPCInferenceService/ModelStreamInfer";
constexpr char kModelLoad[] = "/inference.GRPCInferenceService/RepositoryModelLoad";
constexpr char kModelUnload[] = "/inference.GRPCInferenceService/RepositoryModelUnload";
// Requests of one stream unanswered at once (the coordinator's STREAM_WINDOW is the same).
constexpr size_t kStreamWindow = 256;
// The door's own link to the coordinator (Route, Report): private to the loopback, never
// passed on from the public port.
const std::string kControlPrefix =
    std::string("/") + cnei::frontdoor::v1::FrontDoorControl::service_full_name() + "/";
// What the public port answers for a method of no service it passes on: what the coordinator
// (grpcio) answers for an unknown method, so a private service looks like no service at all.
constexpr char kNotFound[] = "Method not found!";

// A call answered UNIMPLEMENTED at once, its request unread.
class Unimplemented : public grpc::ServerGenericBidiReactor {
 public:
  Unimplemented() { Finish(grpc::Status(grpc::StatusCode::UNIMPLEMENTED, kNotFound)); }
  void OnDone() override { delete this; }
};

// Unary methods of every service in a proto file, as request paths.
void AddUnaryMethods(const google::protobuf::FileDescriptor* file,
                     std::unordered_set<std::string>* out) {
  for (int s = 0; s < file->service_count(); ++s) {
    const auto* service = file->service(s);
    for (int m = 0; m < service->method_count(); ++m) {
      const auto* method = service->method(m);
      if (method->client_streaming() || method->server_streaming()) continue;
      out->insert("/" + service->full_name() + "/" + method->name());
    }
  }
}

}  // namespace

FrontDoorService::FrontDoorService(Backend* backend, InferDoor* door, Router* router)
    : backend_(backend), door_(door), router_(router) {
  AddUnaryMethods(inference::ModelInferRequest::descriptor()->file(), &unary_methods_);
  unary_methods_.insert("/grpc.health.v1.Health/Check");
}

grpc::ServerGenericBidiReactor* FrontDoorService::CreateReactor(
    grpc::GenericCallbackServerContext* ctx) {
  const std::string& method = ctx->method();
  if (method.compare(0, kControlPrefix.size(), kControlPrefix) == 0) return new Unimplemented();
  if (method == kModelInfer) return new UnaryInferCall(ctx, backend_, door_);
  if (method == kModelStreamInfer) return new InferStream(ctx, backend_, door_, kStreamWindow);
  if (method == kModelLoad || method == kModelUnload) return new RepositoryCall(ctx, backend_, router_);
  if (unary_methods_.count(method) > 0) return new UnaryCall(ctx, backend_);
  return new BidiPump(ctx, backend_);  // streaming or unknown: a pump is right on the wire
}

}  // namespace frontdoor
