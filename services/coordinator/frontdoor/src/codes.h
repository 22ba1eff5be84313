// gRPC status code names, both ways (fast-lane error frames and report failures use names).
#pragma once

#include <grpcpp/support/status.h>

#include <string>

namespace frontdoor {

inline const char* const kCodeNames[] = {
    "OK", "CANCELLED", "UNKNOWN", "INVALID_ARGUMENT", "DEADLINE_EXCEEDED", "NOT_FOUND",
    "ALREADY_EXISTS", "PERMISSION_DENIED", "RESOURCE_EXHAUSTED", "FAILED_PRECONDITION",
    "ABORTED", "OUT_OF_RANGE", "UNIMPLEMENTED", "INTERNAL", "UNAVAILABLE", "DATA_LOSS",
    "UNAUTHENTICATED"};

inline std::string CodeName(grpc::StatusCode code) {
  int i = static_cast<int>(code);
  return i >= 0 && i <= 16 ? kCodeNames[i] : "UNKNOWN";
}

inline grpc::StatusCode CodeFromName(const std::string& name) {
  for (int i = 0; i <= 16; ++i) {
    if (name == kCodeNames[i]) return static_cast<grpc::StatusCode>(i);
  }
  return grpc::StatusCode::INTERNAL;
}

// "CODE: message", the form reports carry.
inline std::string Describe(const grpc::Status& status) {
  return CodeName(status.error_code()) + ": " + status.error_message();
}

}  // namespace frontdoor
