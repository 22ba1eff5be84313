// Fast-lane client: framed ModelInfer calls over one multiplexed TCP connection per node.
#include "fastlane.h"

#include <fcntl.h>
#include <netdb.h>
#include <netinet/in.h>
#include <arpa/inet.h>
#include <netinet/tcp.h>
#include <openssl/err.h>
#include <openssl/ssl.h>
#include <openssl/x509v3.h>
#include <poll.h>
#include <sys/eventfd.h>
#include <sys/socket.h>
#include <sys/stat.h>
#include <unistd.h>

#include <climits>
#include <cerrno>
#include <cstdio>
#include <cstring>
#include <thread>
#include <unordered_map>

#include "codes.h"

namespace frontdoor {
namespace {

// How long a send may make no progress (the node's receive window shut) before the connection
// is given up: its calls fail over like those of a lost connection.
constexpr int kSendStallMs = 1000;

using Clock = std::chrono::steady_clock;
constexpr uint8_t kRequest = 1, kReply = 2, kError = 3, kHello = 4;
constexpr size_t kHeader = 15;                     // u32 length | u64 id | u8 kind | u16 meta
constexpr size_t kMaxFrame = 65u * 1024 * 1024;    // as services/common/fastlane.py: 64 MiB and meta

void PutLE(char* out, uint64_t value, int bytes) {
  for (int i = 0; i < bytes; ++i) out[i] = static_cast<char>((value >> (8 * i)) & 0xff);
}

std::string& HelloFrame() {  // empty: no hello
  static std::string frame;
  return frame;
}

void AppendJson(std::string* out, const std::string& text) {
  *out += '"';
  for (unsigned char c : text) {
    if (c == '"' || c == '\\') {
      *out += '\\';
      *out += static_cast<char>(c);
    } else if (c < 0x20) {
      char escaped[8];
      snprintf(escaped, sizeof escaped, "\\u%04x", c);
      *out += escaped;
    } else {
      *out += static_cast<char>(c);
    }
  }
  *out += '"';
}

uint64_t GetLE(const char* in, int bytes) {
  uint64_t value = 0;
  for (int i = 0; i < bytes; ++i) value |= uint64_t(static_cast<uint8_t>(in[i])) << (8 * i);
  return value;
}

bool SplitAddress(const std::string& address, std::string* host, std::string* port) {
  size_t colon = address.rfind(':');
  if (colon == std::string::npos || colon + 1 == address.size()) return false;
  *host = address.substr(0, colon);
  *port = address.substr(colon + 1);
  if (host->size() >= 2 && host->front() == '[' && host->back() == ']') {
    *host = host->substr(1, host->size() - 2);
  }
  return true;
}

// Connects with a 1 s timeout; returns a blocking TCP_NODELAY socket or -1 with `error` set.
int ConnectTcp(const std::string& address, std::string* error) {
  std::string host, port;
  if (!SplitAddress(address, &host, &port)) return *error = "bad address", -1;
  addrinfo hints{}, *found = nullptr;
  hints.ai_socktype = SOCK_STREAM;
  int rc = getaddrinfo(host.c_str(), port.c_str(), &hints, &found);
  if (rc != 0) return *error = gai_strerror(rc), -1;
  int fd = -1;
  *error = "no address";
  for (addrinfo* ai = found; ai != nullptr && fd < 0; ai = ai->ai_next) {
    fd = socket(ai->ai_family, SOCK_STREAM | SOCK_NONBLOCK | SOCK_CLOEXEC, 0);
    if (fd < 0) continue;
    if (connect(fd, ai->ai_addr, ai->ai_addrlen) != 0 && errno != EINPROGRESS) {
      *error = strerror(errno), close(fd), fd = -1;
      continue;
    }
    pollfd p{fd, POLLOUT, 0};
    int soerr = 0;
    socklen_t len = sizeof soerr;
    if (poll(&p, 1, 1000) != 1) {
      *error = "connect timed out", close(fd), fd = -1;
    } else if (getsockopt(fd, SOL_SOCKET, SO_ERROR, &soerr, &len) != 0 || soerr != 0) {
      *error = strerror(soerr ? soerr : errno), close(fd), fd = -1;
    }
  }
  freeaddrinfo(found);
  if (fd < 0) return -1;
  fcntl(fd, F_SETFL, fcntl(fd, F_GETFL) & ~O_NONBLOCK);
  int one = 1;
  setsockopt(fd, IPPROTO_TCP, TCP_NODELAY, &one, sizeof one);
  // a node that stops reading (stopped, partitioned) fails the send instead of holding the
  // writing thread (a gRPC handler's, the timer's) and every writer queued behind it for ever
  timeval stall{kSendStallMs / 1000, (kSendStallMs % 1000) * 1000};
  setsockopt(fd, SOL_SOCKET, SO_SNDTIMEO, &stall, sizeof stall);
  return fd;
}

bool SendAll(int fd, std::vector<iovec> iov) {
  size_t at = 0;
  while (at < iov.size()) {
    msghdr msg{};
    msg.msg_iov = &iov[at];
    msg.msg_iovlen = std::min<size_t>(iov.size() - at, 512);
    ssize_t sent = sendmsg(fd, &msg, MSG_NOSIGNAL);
    if (sent < 0 && errno == EINTR) continue;
    if (sent < 0) return false;
    while (at < iov.size() && size_t(sent) >= iov[at].iov_len) sent -= iov[at++].iov_len;
    if (at < iov.size()) {
      iov[at].iov_base = static_cast<char*>(iov[at].iov_base) + sent;
      iov[at].iov_len -= sent;
    }
  }
  return true;
}

// TLS to the nodes (--node-tls-*): the files, and the context made of them as they were when
// last looked at; renewed files are taken for later connections without a restart.
struct NodeTlsFiles {
  bool on = false;  // set before any lane connects; plaintext otherwise
  std::string ca, cert, key;
  std::mutex mu;  // guards what follows
  SSL_CTX* context = nullptr;
  std::string seen, failed;  // the files' state `context` was made of; one that did not load
  Clock::time_point next_look;
};

NodeTlsFiles& NodeTls() {
  static NodeTlsFiles files;
  return files;
}

// Inode, size and modification time of each file: any change (a rewrite, a Kubernetes Secret
// volume swapping its link) shows.
std::string FilesState(const NodeTlsFiles& tls) {
  std::string state;
  for (const std::string* path : {&tls.ca, &tls.cert, &tls.key}) {
    if (path->empty()) continue;
    struct stat st;
    if (stat(path->c_str(), &st) != 0) {
      state += "-;";
      continue;
    }
    state += std::to_string(st.st_ino) + "," + std::to_string(st.st_size) + "," +
             std::to_string(st.st_mtim.tv_sec) + "." + std::to_string(st.st_mtim.tv_nsec) + ";";
  }
  return state;
}

// The reason OpenSSL gave for the last failure on this thread (its error queue, emptied).
std::string TlsError(const char* fallback) {
  unsigned long code = ERR_get_error();
  ERR_clear_error();
  if (code == 0) return fallback;
  char text[256];
  ERR_error_string_n(code, text, sizeof text);
  return text;
}

// A client context of the files, or null with `error` set.
SSL_CTX* MakeNodeContext(const std::string& ca_file, const std::string& cert_file, const std::string& key_file,
                         std::string* error) {
  SSL_CTX* context = SSL_CTX_new(TLS_client_method());
  if (context == nullptr) return *error = TlsError("cannot create a TLS context"), nullptr;
  SSL_CTX_set_min_proto_version(context, TLS1_2_VERSION);
  SSL_CTX_set_verify(context, SSL_VERIFY_PEER, nullptr);
  SSL_CTX_set_mode(context, SSL_MODE_ENABLE_PARTIAL_WRITE | SSL_MODE_ACCEPT_MOVING_WRITE_BUFFER);
  bool ok = true;
  if (SSL_CTX_load_verify_locations(context, ca_file.c_str(), nullptr) != 1) {
    ok = false, *error = "cannot load the CA " + ca_file + ": " + TlsError("unreadable");
  } else if (!cert_file.empty() &&
             (SSL_CTX_use_certificate_chain_file(context, cert_file.c_str()) != 1 ||
              SSL_CTX_use_PrivateKey_file(context, key_file.c_str(), SSL_FILETYPE_PEM) != 1 ||
              SSL_CTX_check_private_key(context) != 1)) {
    ok = false, *error = "cannot load the client certificate " + cert_file + " with key " + key_file + ": " +
                         TlsError("unreadable");
  }
  if (!ok) {
    SSL_CTX_free(context);
    return nullptr;
  }
  return context;
}

// The context of the node TLS files as they are now (looked at most once a second): a reference
// the caller frees; files that changed but do not load leave the last good context in use.
SSL_CTX* NodeTlsContext() {
  NodeTlsFiles& tls = NodeTls();
  std::lock_guard<std::mutex> lock(tls.mu);
  Clock::time_point now = Clock::now();
  if (now >= tls.next_look) {
    tls.next_look = now + std::chrono::seconds(1);
    std::string state = FilesState(tls);
    if (state != tls.seen) {
      std::string error;
      if (SSL_CTX* renewed = MakeNodeContext(tls.ca, tls.cert, tls.key, &error)) {
        SSL_CTX_free(tls.context);  // sessions made with it keep it until they end
        tls.context = renewed;
        tls.seen = state;
        fprintf(stderr, "cnei-frontdoor: renewed node TLS files loaded\n");
      } else if (state != tls.failed) {
        tls.failed = state;
        fprintf(stderr, "cnei-frontdoor: node TLS files changed but do not load (%s); the previous ones stay in use\n",
                error.c_str());
      }
    }
  }
  SSL_CTX_up_ref(tls.context);
  return tls.context;
}

std::string& NodeServerName() {  // empty: the host dialled
  static std::string name;
  return name;
}


bool IsIpAddress(const std::string& host) {
  unsigned char buffer[sizeof(in6_addr)];
  return inet_pton(AF_INET, host.c_str(), buffer) == 1 || inet_pton(AF_INET6, host.c_str(), buffer) == 1;
}

// Waits until `fd` is ready for what OpenSSL asked (`want`: SSL_ERROR_WANT_READ or _WRITE), at
// most `timeout_ms`; false on a poll error.
bool WaitFor(int fd, int want, int timeout_ms) {
  pollfd p{fd, short(want == SSL_ERROR_WANT_WRITE ? POLLOUT : POLLIN), 0};
  int ready = poll(&p, 1, timeout_ms);
  return ready >= 0 || errno == EINTR;
}

// As the TCP connect: a lane connects on the thread of the call that needs it (a gRPC handler, the
// batcher's timer), which must not wait long on a node that never answers the handshake (one that
// speaks plaintext reads a ClientHello as the head of a ~20 MB frame and waits for the rest).
constexpr int kHandshakeMs = 1000;

// TLS client handshake on the connected socket `fd` (made non-blocking) with the node at `host`:
// the SSL object, or null with `error` set.
SSL* Handshake(int fd, const std::string& host, std::string* error) {
  SSL_CTX* context = NodeTlsContext();
  SSL* ssl = SSL_new(context);
  SSL_CTX_free(context);  // the session holds its own reference
  if (ssl == nullptr) return *error = TlsError("cannot create a TLS session"), nullptr;
  bool named = IsIpAddress(host) ? X509_VERIFY_PARAM_set1_ip_asc(SSL_get0_param(ssl), host.c_str()) == 1
                                 : (SSL_set_tlsext_host_name(ssl, host.c_str()) == 1 &&
                                    SSL_set1_host(ssl, host.c_str()) == 1);
  if (!named || SSL_set_fd(ssl, fd) != 1) {
    *error = TlsError("cannot set up the TLS session");
    SSL_free(ssl);
    return nullptr;
  }
  fcntl(fd, F_SETFL, fcntl(fd, F_GETFL) | O_NONBLOCK);
  auto deadline = Clock::now() + std::chrono::milliseconds(kHandshakeMs);
  while (true) {
    ERR_clear_error();  // SSL_get_error reads this thread's error queue: only this call's errors in it
    int rc = SSL_connect(ssl);
    if (rc == 1) return ssl;
    int err = SSL_get_error(ssl, rc);
    int saved_errno = errno;
    auto left = std::chrono::duration_cast<std::chrono::milliseconds>(deadline - Clock::now()).count();
    if ((err == SSL_ERROR_WANT_READ || err == SSL_ERROR_WANT_WRITE) && left > 0) {
      if (WaitFor(fd, err, int(left))) continue;
      *error = std::string("TLS handshake: ") + strerror(errno);
    } else if (err == SSL_ERROR_WANT_READ || err == SSL_ERROR_WANT_WRITE) {
      *error = "TLS handshake timed out";
    } else {
      long verify = SSL_get_verify_result(ssl);
      std::string reason = TlsError(err == SSL_ERROR_SYSCALL && saved_errno != 0 ? strerror(saved_errno)
                                    : err == SSL_ERROR_SYSCALL                 ? "connection closed"
                                                                               : "refused");
      *error = verify != X509_V_OK
                   ? std::string("TLS handshake: certificate not trusted: ") + X509_verify_cert_error_string(verify)
                   : "TLS handshake failed: " + reason;
    }
    SSL_free(ssl);
    return nullptr;
  }
}

// Writes all of `data` through `ssl` (non-blocking socket `fd`), each OpenSSL call under `mu`
// (the reader thread uses the same session).
bool TlsSendAll(SSL* ssl, std::mutex& mu, int fd, const char* data, size_t size) {
  int waits_for_peer = 0;
  while (size > 0) {
    int wrote, err = SSL_ERROR_NONE;
    {
      std::lock_guard<std::mutex> lock(mu);
      ERR_clear_error();
      wrote = SSL_write(ssl, data, int(std::min<size_t>(size, INT_MAX)));
      if (wrote <= 0) err = SSL_get_error(ssl, wrote), ERR_clear_error();
    }
    if (wrote > 0) {
      data += wrote, size -= size_t(wrote);
    } else if (err == SSL_ERROR_WANT_WRITE) {
      pollfd p{fd, POLLOUT, 0};
      int ready = poll(&p, 1, kSendStallMs);
      if (ready == 0 || (ready < 0 && errno != EINTR)) return false;  // the node stopped reading
    } else if (err == SSL_ERROR_WANT_READ) {  // the session needs the peer first (renegotiation):
      // the reader reads, unless this is the reader's own thread (a reply's batch sending the next)
      if (++waits_for_peer > 5000) return false;  // 1 s
      std::this_thread::sleep_for(std::chrono::microseconds(200));
    } else {
      return false;
    }
  }
  return true;
}

}  // namespace

struct FastLane::Conn {
  struct Pending {
    FastDone done;
    Clock::time_point deadline;
    double timeout_s;
    // While the request frame is being written its payload points into the callers' requests,
    // which answering the call may free: an answer that comes meanwhile (the connection failed,
    // the deadline passed) waits here, and the writer runs it once the write is over.
    bool sending = true;
    std::function<void()> finish;
  };
  Conn(int socket, SSL* session, std::string addr)
      : fd(socket), wake_fd(eventfd(0, EFD_NONBLOCK | EFD_CLOEXEC)), ssl(session), address(std::move(addr)) {}
  ~Conn() {
    if (ssl != nullptr) SSL_free(ssl);
    close(fd);
    if (wake_fd >= 0) close(wake_fd);
  }
  void ReadLoop();
  bool ReadFull(char* out, size_t n, std::string* error);
  bool TlsReadFull(char* out, size_t n, std::string* error);
  bool Send(std::vector<iovec> iov);  // the whole frame, under write_mu; false when the connection failed
  int ExpireAndWaitMs();
  void Deliver(uint64_t id, uint8_t kind, size_t meta_len, std::string body);
  void FailAll(const std::string& error);
  // Answers the pending call `it` with `finish`: returned to run now (outside the lock) and the
  // entry erased, or kept for the writer while its frame is still being sent.
  std::function<void()> CompleteLocked(std::map<uint64_t, Pending>::iterator it, std::function<void()> finish);
  // CompleteLocked with a failure status.
  std::function<void()> FailLocked(std::map<uint64_t, Pending>::iterator it, grpc::Status status);
  void Sent(uint64_t id);

  const int fd;
  const int wake_fd;
  SSL* const ssl;                // TLS session (null: plaintext, `fd` blocking)
  std::mutex ssl_mu;             // one OpenSSL call at a time on `ssl` (reader and writers)
  const std::string address;
  std::mutex write_mu;
  std::mutex mu;                 // guards the fields below
  bool dead = false;
  Clock::time_point wake_at = Clock::time_point::max();
  std::map<uint64_t, Pending> pending;
};

void FastLane::Conn::ReadLoop() {
  std::string error = "closed by the node";
  char head[kHeader];
  while (ReadFull(head, kHeader, &error)) {
    uint64_t length = GetLE(head, 4), id = GetLE(head + 4, 8), meta_len = GetLE(head + 13, 2);
    uint8_t kind = static_cast<uint8_t>(head[12]);
    if (length < kHeader - 4 || length > kMaxFrame || meta_len > length - (kHeader - 4)) {
      error = "bad frame of length " + std::to_string(length);
      break;
    }
    std::string body(length - (kHeader - 4), '\0');
    if (!ReadFull(body.data(), body.size(), &error)) break;
    Deliver(id, kind, meta_len, std::move(body));
  }
  ::shutdown(fd, SHUT_RDWR);
  FailAll("fast lane " + address + " connection lost: " + error);
}

bool FastLane::Conn::ReadFull(char* out, size_t n, std::string* error) {
  if (ssl != nullptr) return TlsReadFull(out, n, error);
  while (n > 0) {
    pollfd fds[2] = {{fd, POLLIN, 0}, {wake_fd, POLLIN, 0}};
    int ready = poll(fds, wake_fd >= 0 ? 2 : 1, ExpireAndWaitMs());
    if (ready < 0 && errno != EINTR) return *error = strerror(errno), false;
    if (ready <= 0) continue;
    if (fds[1].revents & POLLIN) {
      uint64_t drained;
      if (read(wake_fd, &drained, sizeof drained) < 0) { /* nothing to drain */ }
    }
    if (!(fds[0].revents & (POLLIN | POLLHUP | POLLERR))) continue;
    ssize_t got = recv(fd, out, n, 0);
    if (got == 0) return *error = "closed by the node", false;
    if (got < 0 && (errno == EINTR || errno == EAGAIN)) continue;
    if (got < 0) return *error = strerror(errno), false;
    out += got;
    n -= size_t(got);
  }
  return true;
}

bool FastLane::Conn::TlsReadFull(char* out, size_t n, std::string* error) {
  // Deadlines are checked whenever reading would wait; under a steady stream of records (which
  // rarely makes it wait) also every 10 ms, as the plaintext loop does before each recv.
  Clock::time_point next_check = Clock::now() + std::chrono::milliseconds(10);
  while (n > 0) {
    int got, err = SSL_ERROR_NONE;
    std::string reason;
    {
      std::lock_guard<std::mutex> lock(ssl_mu);
      ERR_clear_error();
      got = SSL_read(ssl, out, int(std::min<size_t>(n, INT_MAX)));
      if (got <= 0) {
        err = SSL_get_error(ssl, got);
        reason = TlsError(err == SSL_ERROR_SYSCALL && errno != 0 ? strerror(errno) : "closed by the node");
      }
    }
    if (got > 0) {
      out += got, n -= size_t(got);
      if (Clock::now() >= next_check) {
        ExpireAndWaitMs();
        next_check = Clock::now() + std::chrono::milliseconds(10);
      }
      continue;
    }
    if (err != SSL_ERROR_WANT_READ && err != SSL_ERROR_WANT_WRITE) {
      return *error = err == SSL_ERROR_ZERO_RETURN ? "closed by the node" : "TLS: " + reason, false;
    }
    pollfd fds[2] = {{fd, short(err == SSL_ERROR_WANT_READ ? POLLIN : POLLOUT), 0}, {wake_fd, POLLIN, 0}};
    int ready = poll(fds, wake_fd >= 0 ? 2 : 1, ExpireAndWaitMs());
    if (ready < 0 && errno != EINTR) return *error = strerror(errno), false;
    if (ready > 0 && (fds[1].revents & POLLIN)) {
      uint64_t drained;
      if (read(wake_fd, &drained, sizeof drained) < 0) { /* nothing to drain */ }
    }
  }
  return true;
}

bool FastLane::Conn::Send(std::vector<iovec> iov) {
  std::lock_guard<std::mutex> lock(write_mu);
  if (ssl == nullptr) return SendAll(fd, std::move(iov));
  // one buffer, so a frame goes in as few TLS records as it fits
  size_t size = 0;
  for (const iovec& piece : iov) size += piece.iov_len;
  std::string frame;
  frame.reserve(size);
  for (const iovec& piece : iov) frame.append(static_cast<const char*>(piece.iov_base), piece.iov_len);
  return TlsSendAll(ssl, ssl_mu, fd, frame.data(), frame.size());
}

std::function<void()> FastLane::Conn::CompleteLocked(std::map<uint64_t, Pending>::iterator it,
                                                    std::function<void()> finish) {
  if (it->second.sending) {
    it->second.finish = std::move(finish);
    return nullptr;
  }
  pending.erase(it);
  return finish;
}

std::function<void()> FastLane::Conn::FailLocked(std::map<uint64_t, Pending>::iterator it,
                                                grpc::Status status) {
  return CompleteLocked(it, [done = std::move(it->second.done), status = std::move(status)]() {
    done(status, std::string(), 0);
  });
}

// The call's frame is written: runs its answer if one came meanwhile.
void FastLane::Conn::Sent(uint64_t id) {
  std::function<void()> finish;
  {
    std::lock_guard<std::mutex> lock(mu);
    auto it = pending.find(id);
    if (it == pending.end()) return;
    it->second.sending = false;
    if (!it->second.finish) return;
    finish = std::move(it->second.finish);
    pending.erase(it);
  }
  finish();
}

// Fails calls whose time is up; returns how long poll may sleep.
int FastLane::Conn::ExpireAndWaitMs() {
  std::vector<std::function<void()>> expired;
  Clock::time_point now = Clock::now(), next = Clock::time_point::max();
  {
    std::lock_guard<std::mutex> lock(mu);
    for (auto it = pending.begin(); it != pending.end();) {
      auto current = it++;
      Pending& p = current->second;
      if (p.finish) continue;  // answered; waits for its writer
      if (p.deadline > now) {
        next = std::min(next, p.deadline);
        continue;
      }
      char text[64];
      snprintf(text, sizeof text, " within %.3fs", p.timeout_s);
      auto finish = FailLocked(current, grpc::Status(grpc::StatusCode::DEADLINE_EXCEEDED,
                                                     "no reply from " + address + text));
      if (finish) expired.push_back(std::move(finish));
    }
    wake_at = next;
  }
  for (auto& finish : expired) finish();
  if (next == Clock::time_point::max()) return 1000;
  auto ms = std::chrono::duration_cast<std::chrono::milliseconds>(next - now).count() + 1;
  return int(std::min<long long>(ms, 1000));
}

void FastLane::Conn::Deliver(uint64_t id, uint8_t kind, size_t meta_len, std::string body) {
  grpc::Status status;
  size_t offset = meta_len;
  if (kind == kError) {
    status = grpc::Status(CodeFromName(body.substr(0, meta_len)), body.substr(meta_len));
  } else if (kind != kReply) {
    status = grpc::Status(grpc::StatusCode::INTERNAL,
                          "fast lane " + address + " sent frame kind " + std::to_string(kind));
  }
  if (!status.ok()) body.clear(), offset = 0;
  std::function<void()> finish;
  {
    std::lock_guard<std::mutex> lock(mu);
    auto it = pending.find(id);
    if (it == pending.end() || it->second.finish) return;  // timed out already
    finish = CompleteLocked(it, [done = std::move(it->second.done), status, body = std::move(body),
                                 offset]() mutable { done(status, std::move(body), offset); });
  }
  if (finish) finish();
}

void FastLane::Conn::FailAll(const std::string& error) {
  std::vector<std::function<void()>> failed;
  {
    std::lock_guard<std::mutex> lock(mu);
    dead = true;
    for (auto it = pending.begin(); it != pending.end();) {
      auto current = it++;
      if (current->second.finish) continue;  // answered; waits for its writer
      auto finish = FailLocked(current, grpc::Status(grpc::StatusCode::UNAVAILABLE, error));
      if (finish) failed.push_back(std::move(finish));
    }
  }
  for (auto& finish : failed) finish();
}

FastLane::FastLane(std::string address) : address_(std::move(address)) {}

std::shared_ptr<FastLane::Conn> FastLane::Connection(std::string* error) {
  std::lock_guard<std::mutex> lock(mu_);
  if (conn_) {
    std::lock_guard<std::mutex> conn_lock(conn_->mu);
    if (!conn_->dead) return conn_;
  }
  conn_.reset();
  int fd = ConnectTcp(address_, error);
  if (fd < 0) {
    *error = "fast lane " + address_ + " unreachable: " + *error;
    return nullptr;
  }
  SSL* ssl = nullptr;
  if (NodeTls().on) {
    std::string host, port;
    SplitAddress(address_, &host, &port);
    ssl = Handshake(fd, NodeServerName().empty() ? host : NodeServerName(), error);
    if (ssl == nullptr) {
      ::close(fd);
      *error = "fast lane " + address_ + " unreachable: " + *error;
      return nullptr;
    }
  }
  auto conn = std::make_shared<Conn>(fd, ssl, address_);
  const std::string& hello = HelloFrame();
  if (!hello.empty() && !conn->Send({{const_cast<char*>(hello.data()), hello.size()}})) {
    *error = "fast lane " + address_ + ": hello not sent";
    return nullptr;
  }
  conn_ = std::move(conn);
  std::thread([conn = conn_] { conn->ReadLoop(); }).detach();
  return conn_;
}

void FastLane::Call(const std::string& meta, const std::vector<std::string_view>& payload,
                    double timeout_s, FastDone done) {
  std::string error;
  std::shared_ptr<Conn> conn = Connection(&error);
  if (!conn) return done(grpc::Status(grpc::StatusCode::UNAVAILABLE, error), std::string(), 0);
  size_t length = kHeader - 4 + meta.size();
  for (std::string_view piece : payload) length += piece.size();
  if (length > kMaxFrame) {
    return done(grpc::Status(grpc::StatusCode::RESOURCE_EXHAUSTED,
                             "batch of " + std::to_string(length) + " bytes exceeds the fast lane's limit"),
                std::string(), 0);
  }
  uint64_t id = next_id_++;
  Clock::time_point deadline =
      Clock::now() + std::chrono::microseconds(int64_t(std::max(timeout_s, 0.0) * 1e6));
  bool wake = false;
  {
    std::lock_guard<std::mutex> lock(conn->mu);
    if (conn->dead) {
      error = "fast lane " + address_ + " connection lost";
      return done(grpc::Status(grpc::StatusCode::UNAVAILABLE, error), std::string(), 0);
    }
    wake = deadline < conn->wake_at;
    conn->pending.emplace(id, Conn::Pending{std::move(done), deadline, timeout_s, true, nullptr});
  }
  if (wake) {
    uint64_t one = 1;
    if (write(conn->wake_fd, &one, sizeof one) < 0) { /* reader wakes within 1 s anyway */ }
  }
  char head[kHeader];
  PutLE(head, length, 4);
  PutLE(head + 4, id, 8);
  head[12] = static_cast<char>(kRequest);
  PutLE(head + 13, meta.size(), 2);
  std::vector<iovec> iov;
  iov.reserve(payload.size() + 2);
  iov.push_back({head, kHeader});
  iov.push_back({const_cast<char*>(meta.data()), meta.size()});
  for (std::string_view piece : payload) {
    if (!piece.empty()) iov.push_back({const_cast<char*>(piece.data()), piece.size()});
  }
  if (!conn->Send(std::move(iov))) ::shutdown(conn->fd, SHUT_RDWR);  // the reader fails the calls
  conn->Sent(id);
}

bool SetNodeTls(const std::string& ca_file, const std::string& cert_file, const std::string& key_file,
                const std::string& server_name, std::string* error) {
  NodeTlsFiles& tls = NodeTls();
  tls.ca = ca_file, tls.cert = cert_file, tls.key = key_file;
  tls.seen = FilesState(tls);
  tls.context = MakeNodeContext(ca_file, cert_file, key_file, error);
  if (tls.context == nullptr) return false;
  tls.next_look = Clock::now() + std::chrono::seconds(1);
  tls.on = true;
  NodeServerName() = server_name;
  return true;
}

bool SetHelloHeaders(const std::vector<std::pair<std::string, std::string>>& headers) {
  if (headers.empty()) return true;
  std::string meta = "{\"headers\": {";
  for (size_t i = 0; i < headers.size(); ++i) {
    if (i > 0) meta += ", ";
    AppendJson(&meta, headers[i].first);
    meta += ": ";
    AppendJson(&meta, headers[i].second);
  }
  meta += "}}";
  if (meta.size() > 0xffff) return false;
  std::string frame(kHeader, '\0');
  PutLE(frame.data(), kHeader - 4 + meta.size(), 4);
  PutLE(frame.data() + 4, 0, 8);
  frame[12] = static_cast<char>(kHello);
  PutLE(frame.data() + 13, meta.size(), 2);
  HelloFrame() = frame + meta;
  return true;
}

std::shared_ptr<FastLane> LaneFor(const std::string& address) {
  static std::mutex mu;
  static std::unordered_map<std::string, std::shared_ptr<FastLane>> lanes;
  std::lock_guard<std::mutex> lock(mu);
  std::shared_ptr<FastLane>& lane = lanes[address];
  if (!lane) lane = std::make_shared<FastLane>(address);
  return lane;
}

}  // namespace frontdoor
