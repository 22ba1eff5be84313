// OIP tensor rules for the fast path: eligibility checks, route keys, batch and reply wire forms.
#include "tensor.h"

#include <google/protobuf/io/coded_stream.h>
#include <google/protobuf/io/zero_copy_stream_impl_lite.h>

#include <cmath>
#include <cstdlib>
#include <cstring>
#include <limits>

namespace frontdoor {
namespace {

using inference::ModelInferRequest;
using inference::ModelInferResponse;

constexpr char kRawInputTag = (7 << 3) | 2;   // ModelInferRequest.raw_input_contents
constexpr char kRawOutputTag = (6 << 3) | 2;  // ModelInferResponse.raw_output_contents

void AppendVarint(std::string* out, uint64_t value) {
  while (value >= 0x80) {
    out->push_back(static_cast<char>((value & 0x7f) | 0x80));
    value >>= 7;
  }
  out->push_back(static_cast<char>(value));
}

std::string Deterministic(const ModelInferRequest& request) {
  std::string out;
  {
    google::protobuf::io::StringOutputStream stream(&out);
    google::protobuf::io::CodedOutputStream coded(&stream);
    coded.SetSerializationDeterministic(true);
    request.SerializeToCodedStream(&coded);
  }
  return out;
}

// Element count of a shape, or -1 when a dimension is negative or the count overflows.
int64_t Elements(const google::protobuf::RepeatedField<int64_t>& shape) {
  int64_t count = 1;
  for (int64_t dim : shape) {
    if (dim < 0) return -1;
    if (dim != 0 && count > std::numeric_limits<int64_t>::max() / dim) return -1;
    count *= dim;
  }
  return count;
}

void ReleaseReply(void* holder) {
  delete static_cast<std::shared_ptr<ModelInferResponse>*>(holder);
}

}  // namespace

size_t DatatypeSize(const std::string& datatype) {
  static const std::pair<const char*, size_t> kSizes[] = {
      {"FP32", 4}, {"INT64", 8}, {"INT32", 4}, {"FP16", 2}, {"UINT8", 1}, {"INT8", 1},
      {"BOOL", 1}, {"FP64", 8}, {"BF16", 2}, {"UINT16", 2}, {"INT16", 2}, {"UINT32", 4},
      {"UINT64", 8}};
  for (const auto& [name, size] : kSizes) {
    if (datatype == name) return size;
  }
  return 0;
}

const char* ContentProblem(const ModelInferRequest& request) {
  if (request.inputs_size() == 0) return "no inputs";
  if (request.raw_input_contents_size() != request.inputs_size()) return "inputs without raw contents";
  // Tensors in the client's shared memory are read and written by the coordinator, on this host.
  for (const auto& output : request.outputs()) {
    if (output.parameters().count("shared_memory_region")) return "output in shared memory";
  }
  for (int i = 0; i < request.inputs_size(); ++i) {
    const auto& input = request.inputs(i);
    if (input.parameters().count("shared_memory_region")) return "input in shared memory";
    size_t size = DatatypeSize(input.datatype());
    if (size == 0) return "BYTES or unknown datatype";
    if (input.has_contents()) return "typed contents";
    int64_t elements = Elements(input.shape());
    if (elements < 0 || elements > std::numeric_limits<int64_t>::max() / int64_t(size)) {
      return "bad shape";
    }
    if (uint64_t(elements) * size != request.raw_input_contents(i).size()) return "size mismatch";
  }
  return nullptr;
}

int64_t BatchRows(const ModelInferRequest& request, uint32_t max_batch_size) {
  if (max_batch_size == 0) return 1;
  int64_t rows = -1;
  for (const auto& input : request.inputs()) {
    if (input.shape_size() == 0) return -1;
    if (rows >= 0 && input.shape(0) != rows) return -1;
    rows = input.shape(0);
  }
  return rows >= 1 && rows <= int64_t(max_batch_size) ? rows : -1;
}

// Exact keys start with a byte no serialized request starts with (field 0 does not exist).
constexpr char kExactKey = '\0';

bool IsExactKey(const std::string& key) { return !key.empty() && key[0] == kExactKey; }

std::string RouteKey(ModelInferRequest* request, bool exact) {
  google::protobuf::RepeatedPtrField<std::string> raw;
  raw.Swap(request->mutable_raw_input_contents());
  std::string id;
  id.swap(*request->mutable_id());
  std::vector<int64_t> rows;
  if (!exact) {  // requests of any batch size share a key (and a batcher)
    for (auto& input : *request->mutable_inputs()) {
      rows.push_back(input.shape_size() > 0 ? input.shape(0) : 0);
      if (input.shape_size() > 0) input.set_shape(0, 0);
    }
  }
  std::string key = exact ? kExactKey + Deterministic(*request) : Deterministic(*request);
  for (size_t i = 0; i < rows.size(); ++i) {
    if (request->inputs(int(i)).shape_size() > 0) request->mutable_inputs(int(i))->set_shape(0, rows[i]);
  }
  id.swap(*request->mutable_id());
  raw.Swap(request->mutable_raw_input_contents());
  return key;
}

std::string WithoutContents(ModelInferRequest* request) {
  google::protobuf::RepeatedPtrField<std::string> raw;
  raw.Swap(request->mutable_raw_input_contents());
  std::string bytes = request->SerializeAsString();
  raw.Swap(request->mutable_raw_input_contents());
  return bytes;
}

void BuildBatch(const ModelInferRequest& request_template,
                const std::vector<const ModelInferRequest*>& members, int64_t total_rows,
                bool batched, BatchWire* out) {
  const ModelInferRequest& first = *members.front();
  ModelInferRequest head;
  head.set_model_name(request_template.model_name());
  head.set_model_version(request_template.model_version());
  *head.mutable_parameters() = request_template.parameters();
  for (const auto& input : first.inputs()) {
    auto* added = head.add_inputs();
    added->set_name(input.name());
    added->set_datatype(input.datatype());
    *added->mutable_shape() = input.shape();
    if (batched) added->set_shape(0, total_rows);
  }
  *head.mutable_outputs() = first.outputs();
  out->header = head.SerializeAsString();
  out->tags.assign(first.inputs_size(), std::string(1, kRawInputTag));
  for (int i = 0; i < first.inputs_size(); ++i) {
    uint64_t bytes = 0;
    for (const ModelInferRequest* member : members) bytes += member->raw_input_contents(i).size();
    AppendVarint(&out->tags[i], bytes);
  }
  out->pieces.clear();
  out->pieces.push_back(out->header);
  for (int i = 0; i < first.inputs_size(); ++i) {
    out->pieces.push_back(out->tags[i]);
    for (const ModelInferRequest* member : members) {
      out->pieces.push_back(member->raw_input_contents(i));
    }
  }
}

const char* ReplyProblem(const ModelInferResponse& reply, int64_t total_rows, bool batched) {
  if (reply.raw_output_contents_size() != reply.outputs_size()) {
    return "reply outputs lack raw contents";
  }
  if (!batched) return nullptr;
  for (int i = 0; i < reply.outputs_size(); ++i) {
    const auto& output = reply.outputs(i);
    if (output.shape_size() == 0 || output.shape(0) != total_rows) {
      return "reply output rows differ from the batch's";
    }
    if (DatatypeSize(output.datatype()) == 0) {  // BYTES: elements of their own lengths
      return "reply output has no fixed element size to split rows by";
    }
    if (reply.raw_output_contents(i).size() % uint64_t(total_rows) != 0) {
      return "reply output size is not a multiple of the batch's rows";
    }
  }
  return nullptr;
}

uint64_t ComputeNs(const ModelInferResponse& reply) {
  auto it = reply.parameters().find("cnei_compute_us");
  if (it == reply.parameters().end()) return 0;
  const auto& param = it->second;
  double us = 0;
  switch (param.parameter_choice_case()) {
    case inference::InferParameter::kInt64Param: us = double(param.int64_param()); break;
    case inference::InferParameter::kUint64Param: us = double(param.uint64_param()); break;
    case inference::InferParameter::kDoubleParam: us = param.double_param(); break;
    case inference::InferParameter::kStringParam: us = std::strtod(param.string_param().c_str(), nullptr); break;
    default: break;
  }
  return std::isfinite(us) && us > 0 ? uint64_t(std::llround(us * 1000)) : 0;
}

ReplySlicer::ReplySlicer(const ModelInferResponse& response_template,
                         std::shared_ptr<ModelInferResponse> reply, int64_t total_rows,
                         bool batched)
    : template_(response_template), reply_(std::move(reply)), total_rows_(total_rows),
      batched_(batched) {
  for (std::string& raw : *reply_->mutable_raw_output_contents()) {
    outputs_.emplace_back(raw.data(), raw.size(), &ReleaseReply,
                          new std::shared_ptr<ModelInferResponse>(reply_));
  }
}

grpc::ByteBuffer ReplySlicer::Slice(const std::string& id, int64_t first_row, int64_t rows,
                                    const std::vector<OutputPlace>& places, std::string* problem) const {
  ModelInferResponse head;
  head.set_model_name(template_.model_name());
  head.set_model_version(template_.model_version());
  *head.mutable_parameters() = template_.parameters();
  head.set_id(id);
  std::vector<grpc::Slice> parts;
  std::vector<const OutputPlace*> placed(outputs_.size(), nullptr);
  parts.reserve(outputs_.size());
  for (size_t k = 0; k < outputs_.size(); ++k) {
    const auto& output = reply_->outputs(int(k));
    auto* added = head.add_outputs();
    added->set_name(output.name());
    added->set_datatype(output.datatype());
    *added->mutable_shape() = output.shape();
    if (batched_) added->set_shape(0, rows);
    size_t row_bytes = batched_ ? outputs_[k].size() / size_t(total_rows_) : 0;
    parts.push_back(batched_ ? outputs_[k].sub(first_row * row_bytes, (first_row + rows) * row_bytes)
                             : outputs_[k]);
    for (const OutputPlace& place : places) {
      if (place.output != output.name()) continue;
      if (parts[k].size() > place.capacity) {
        *problem = "output '" + output.name() + "' is " + std::to_string(parts[k].size()) +
                   " bytes, more than the " + std::to_string(place.capacity) +
                   " bytes given to it in shared memory region '" + place.region + "'";
        return grpc::ByteBuffer();
      }
      placed[k] = &place;
      auto& params = *added->mutable_parameters();
      params["shared_memory_region"].set_string_param(place.region);
      params["shared_memory_byte_size"].set_int64_param(int64_t(parts[k].size()));
      params["shared_memory_offset"].set_int64_param(int64_t(place.offset));
    }
  }
  std::string prefix = head.SerializeAsString();
  std::vector<grpc::Slice> slices;
  slices.reserve(2 * outputs_.size() + 1);
  for (size_t k = 0; k < outputs_.size(); ++k) {
    prefix.push_back(kRawOutputTag);
    if (placed[k] != nullptr) {  // written where the client said; the entry stays, empty
      if (!placed[k]->opened->Write(placed[k]->offset, reinterpret_cast<const char*>(parts[k].begin()),
                                    parts[k].size(), problem)) {
        return grpc::ByteBuffer();
      }
      AppendVarint(&prefix, 0);
      continue;
    }
    AppendVarint(&prefix, parts[k].size());
    slices.emplace_back(prefix);
    slices.push_back(std::move(parts[k]));
    prefix.clear();
  }
  if (!prefix.empty() || slices.empty()) slices.emplace_back(prefix);
  return grpc::ByteBuffer(slices.data(), slices.size());
}

}  // namespace frontdoor
