// OIP tensor rules for the fast path: eligibility checks, route keys, batch and reply wire forms.
#pragma once

#include <grpcpp/support/byte_buffer.h>

#include <memory>
#include <string>
#include <string_view>
#include <vector>

#include "inference/grpc_service.pb.h"
#include "shm.h"

namespace frontdoor {

// Bytes per element of an OIP datatype; 0 for BYTES and unknown names.
size_t DatatypeSize(const std::string& datatype);

// Why the request's tensors rule out the fast path, or nullptr when they do not.
const char* ContentProblem(const inference::ModelInferRequest& request);

// Rows of a batchable request (shape[0], equal on every input, 1..max_batch_size), or -1.
int64_t BatchRows(const inference::ModelInferRequest& request, uint32_t max_batch_size);

// The request minus id, tensor contents and batch size, serialized deterministically.
std::string RouteKey(inference::ModelInferRequest* request, bool exact = false);
// Whether a key was made with `exact` (every dimension kept).
bool IsExactKey(const std::string& key);

// The request minus tensor contents (shapes kept), for a Route RPC.
std::string WithoutContents(inference::ModelInferRequest* request);

// A batched ModelInferRequest as pieces to write in order; views point into `header`, `tags`
// and the members' raw contents, which must outlive the write.
struct BatchWire {
  std::string header;
  std::vector<std::string> tags;
  std::vector<std::string_view> pieces;
};

void BuildBatch(const inference::ModelInferRequest& request_template,
                const std::vector<const inference::ModelInferRequest*>& members,
                int64_t total_rows, bool batched, BatchWire* out);

// Why a node's reply to a batch of `total_rows` cannot be split, or nullptr.
const char* ReplyProblem(const inference::ModelInferResponse& reply, int64_t total_rows,
                         bool batched);

// The node's cnei_compute_us parameter in nanoseconds (0 when absent).
uint64_t ComputeNs(const inference::ModelInferResponse& reply);

// Cuts one node reply into per-request responses without copying tensor bytes (except outputs
// a request places in shared memory: copied there, their raw entry left empty).
class ReplySlicer {
 public:
  ReplySlicer(const inference::ModelInferResponse& response_template,
              std::shared_ptr<inference::ModelInferResponse> reply, int64_t total_rows,
              bool batched);
  // `problem` is set (and the buffer empty) when an output does not fit its place.
  grpc::ByteBuffer Slice(const std::string& id, int64_t first_row, int64_t rows,
                         const std::vector<OutputPlace>& places, std::string* problem) const;

 private:
  const inference::ModelInferResponse& template_;
  std::shared_ptr<inference::ModelInferResponse> reply_;
  int64_t total_rows_;
  bool batched_;
  std::vector<grpc::Slice> outputs_;  // one slice over each raw output, shared by all pieces
};

}  // namespace frontdoor
