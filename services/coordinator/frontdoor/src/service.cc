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
// Services the public port passes on whose protos the door is not built with (gRPC's own, not
// in protos/): their methods as gRPC's health and reflection protos define them. Reflection v1
// too: the coordinator answers it UNIMPLEMENTED, so grpcurl falls back to v1alpha.
struct GrpcMethod {
  const char* path;
  bool streamed;
};
constexpr GrpcMethod kGrpcMethods[] = {
    {"/grpc.health.v1.Health/Check", false},
    {"/grpc.health.v1.Health/Watch", true},
    {"/grpc.reflection.v1alpha.ServerReflection/ServerReflectionInfo", true},
    {"/grpc.reflection.v1.ServerReflection/ServerReflectionInfo", true},
};
// What the public port answers for a method of no service it passes on: what the coordinator
// (grpcio) answers for an unknown method, so a private service looks like no service at all.
constexpr char kNotFound[] = "Method not found!";

// A call answered UNIMPLEMENTED at once, its request unread.
class Unimplemented : public grpc::ServerGenericBidiReactor {
 public:
  Unimplemented() { Finish(grpc::Status(grpc::StatusCode::UNIMPLEMENTED, kNotFound)); }
  void OnDone() override { delete this; }
};

// Every method of every service in a proto file, as request paths: whether it streams.
void AddMethods(const google::protobuf::FileDescriptor* file,
                std::unordered_map<std::string, bool>* out) {
  for (int s = 0; s < file->service_count(); ++s) {
    const auto* service = file->service(s);
    for (int m = 0; m < service->method_count(); ++m) {
      const auto* method = service->method(m);
      (*out)["/" + service->full_name() + "/" + method->name()] =
          method->client_streaming() || method->server_streaming();
    }
  }
}

}  // namespace

FrontDoorService::FrontDoorService(Backend* backend, InferDoor* door, Router* router)
    : backend_(backend), door_(door), router_(router) {
  AddMethods(inference::ModelInferRequest::descriptor()->file(), &passed_);
  for (const auto& method : kGrpcMethods) passed_[method.path] = method.streamed;
}

grpc::ServerGenericBidiReactor* FrontDoorService::CreateReactor(
    grpc::GenericCallbackServerContext* ctx) {
  const std::string& method = ctx->method();
  const auto passed = passed_.find(method);
  // Default deny: what the coordinator's internal port serves besides (FrontDoorControl, the
  // door's own link to it, or any service added there later) is no service at all here.
  if (passed == passed_.end()) return new Unimplemented();
  if (method == kModelInfer) return new UnaryInferCall(ctx, backend_, door_);
  if (method == kModelStreamInfer) return new InferStream(ctx, backend_, door_, kStreamWindow);
  if (method == kModelLoad || method == kModelUnload) return new RepositoryCall(ctx, backend_, router_);
  if (!passed->second) return new UnaryCall(ctx, backend_);
  return new BidiPump(ctx, backend_);  // a streaming method: a pump is right on the wire
}

}  // namespace frontdoor
