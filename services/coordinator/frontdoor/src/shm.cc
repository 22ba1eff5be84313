#include "shm.h"

#include <fcntl.h>
#include <sys/stat.h>
#include <unistd.h>

#include <cerrno>
#include <cstring>
#include <fstream>

namespace frontdoor {

namespace {

constexpr char kRegion[] = "shared_memory_region";
constexpr char kByteSize[] = "shared_memory_byte_size";
constexpr char kOffset[] = "shared_memory_offset";
constexpr char kFilePrefix[] = "shm-region-";

using Params = google::protobuf::Map<std::string, inference::InferParameter>;

bool Integer(const Params& params, const char* name, uint64_t* out) {
  auto it = params.find(name);
  if (it == params.end()) return false;
  switch (it->second.parameter_choice_case()) {
    case inference::InferParameter::kInt64Param:
      if (it->second.int64_param() < 0) return false;
      *out = uint64_t(it->second.int64_param());
      return true;
    case inference::InferParameter::kUint64Param: *out = it->second.uint64_param(); return true;
    default: return false;
  }
}

// (region name, offset, byte_size) of a tensor placed in shared memory.
bool Place(const Params& params, std::string* region, uint64_t* offset, uint64_t* size) {
  auto it = params.find(kRegion);
  if (it == params.end() || it->second.parameter_choice_case() != inference::InferParameter::kStringParam) {
    return false;
  }
  *region = it->second.string_param();
  *offset = 0;
  if (params.count(kOffset) && !Integer(params, kOffset, offset)) return false;
  return Integer(params, kByteSize, size);
}

void Unplace(Params* params) {
  params->erase(kRegion);
  params->erase(kByteSize);
  params->erase(kOffset);
}

std::string Hex(const std::string& text) {
  static const char digits[] = "0123456789abcdef";
  std::string out;
  out.reserve(2 * text.size());
  for (unsigned char c : text) {
    out.push_back(digits[c >> 4]);
    out.push_back(digits[c & 15]);
  }
  return out;
}

}  // namespace

bool InSharedMemory(const Params& params) { return !params.empty() && params.count(kRegion) > 0; }

OpenRegion::~OpenRegion() {
  if (fd >= 0) close(fd);
}

bool OpenRegion::Read(uint64_t at, uint64_t size, std::string* out, std::string* error) const {
  out->resize(size);
  uint64_t done = 0;
  while (done < size) {
    ssize_t n = pread(fd, out->data() + done, size - done, off_t(offset + at + done));
    if (n < 0 && errno == EINTR) continue;
    if (n <= 0) {
      *error = "shared memory region '" + name + "' no longer holds bytes " + std::to_string(at) + ".." +
               std::to_string(at + size) + (n < 0 ? std::string(": ") + strerror(errno) : " (the object shrank)");
      return false;
    }
    done += uint64_t(n);
  }
  return true;
}

bool OpenRegion::Write(uint64_t at, const char* data, uint64_t size, std::string* error) const {
  struct stat st;
  if (fstat(fd, &st) != 0 || uint64_t(st.st_size) < offset + at + size) {
    *error = "shared memory region '" + name + "' no longer holds bytes " + std::to_string(at) + ".." +
             std::to_string(at + size) + " (the object shrank)";
    return false;
  }
  uint64_t done = 0;
  while (done < size) {
    ssize_t n = pwrite(fd, data + done, size - done, off_t(offset + at + done));
    if (n < 0 && errno == EINTR) continue;
    if (n <= 0) {
      *error = "shared memory region '" + name + "' cannot be written: " + strerror(errno);
      return false;
    }
    done += uint64_t(n);
  }
  return true;
}

std::shared_ptr<OpenRegion> SharedMemory::Find(const std::string& name) {
  const std::string path = dir_ + "/" + kFilePrefix + Hex(name);
  struct stat registration;
  Registration known;  // a copy: the object is opened below without holding the lock
  {
    std::lock_guard<std::mutex> lock(mu_);
    if (stat(path.c_str(), &registration) != 0) {  // not registered (or no longer)
      regions_.erase(name);
      return nullptr;
    }
    int64_t mtime_ns = int64_t(registration.st_mtim.tv_sec) * 1000000000 + registration.st_mtim.tv_nsec;
    auto it = regions_.find(name);
    if (it == regions_.end() || it->second.inode != registration.st_ino || it->second.mtime_ns != mtime_ns) {
      Registration read;
      std::string key;
      read.inode = registration.st_ino;
      read.mtime_ns = mtime_ns;
      std::ifstream file(path);
      if (!(std::getline(file, key) && file >> read.offset >> read.byte_size) || key.empty()) {
        regions_.erase(name);
        return nullptr;
      }
      read.object = "/dev/shm/" + (key[0] == '/' ? key.substr(1) : key);
      it = regions_.insert_or_assign(name, std::move(read)).first;
    }
    known = it->second;
  }
  auto region = std::make_shared<OpenRegion>();
  region->name = name;
  region->offset = known.offset;
  region->byte_size = known.byte_size;
  region->fd = open(known.object.c_str(), O_RDWR | O_CLOEXEC);
  if (region->fd < 0) return nullptr;
  struct stat st;
  if (fstat(region->fd, &st) != 0 || uint64_t(st.st_size) < known.offset + known.byte_size) return nullptr;
  return region;
}

bool SharedMemory::Take(inference::ModelInferRequest* request, std::vector<OutputPlace>* outputs) {
  std::unordered_map<std::string, std::shared_ptr<OpenRegion>> opened;  // once per request, however many tensors
  auto find = [&](const std::string& name) {
    std::shared_ptr<OpenRegion>& region = opened[name];
    if (!region) region = Find(name);
    return region;
  };
  bool any_input = false;
  for (const auto& input : request->inputs()) any_input |= InSharedMemory(input.parameters());
  if (any_input) {
    int sent = 0;
    for (const auto& input : request->inputs()) sent += !InSharedMemory(input.parameters());
    if (request->raw_input_contents_size() != sent) return false;
    google::protobuf::RepeatedPtrField<std::string> raw;
    int next = 0;
    for (auto& input : *request->mutable_inputs()) {
      if (!InSharedMemory(input.parameters())) {
        raw.Add()->swap(*request->mutable_raw_input_contents(next++));
        continue;
      }
      std::string name;
      uint64_t offset, size;
      if (!Place(input.parameters(), &name, &offset, &size)) return false;
      std::shared_ptr<OpenRegion> region = find(name);
      if (!region || offset > region->byte_size || size > region->byte_size - offset) return false;
      std::string error;  // the coordinator, given the request, answers why
      if (!region->Read(offset, size, raw.Add(), &error)) return false;  // a copy: the client may reuse the region
      Unplace(input.mutable_parameters());
    }
    request->mutable_raw_input_contents()->Swap(&raw);
  }
  for (auto& output : *request->mutable_outputs()) {
    if (!InSharedMemory(output.parameters())) continue;
    OutputPlace place;
    uint64_t size;
    if (!Place(output.parameters(), &place.region, &place.offset, &size)) return false;
    place.opened = find(place.region);
    if (!place.opened || place.offset > place.opened->byte_size ||
        size > place.opened->byte_size - place.offset) {
      return false;
    }
    place.output = output.name();
    place.capacity = size;
    outputs->push_back(std::move(place));
    Unplace(output.mutable_parameters());
  }
  return true;
}

}  // namespace frontdoor
