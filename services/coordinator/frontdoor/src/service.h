// The public OIP port: one generic service that picks the reactor for each method.
#pragma once

#include <grpcpp/generic/async_generic_service.h>

#include <string>
#include <unordered_map>

#include "backend.h"
#include "door.h"

namespace frontdoor {

class FrontDoorService : public grpc::CallbackGenericService {
 public:
  FrontDoorService(Backend* backend, InferDoor* door, Router* router);
  grpc::ServerGenericBidiReactor* CreateReactor(grpc::GenericCallbackServerContext* ctx) override;

 private:
  Backend* backend_;
  InferDoor* door_;
  Router* router_;
  // The methods the public port passes on, "/package.Service/Method": whether it streams.
  std::unordered_map<std::string, bool> passed_;
};

}  // namespace frontdoor
