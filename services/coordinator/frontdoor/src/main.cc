// cnei-frontdoor: flags, wiring, serving the public OIP port, and shutdown on SIGTERM/SIGINT.
#include <absl/synchronization/mutex.h>
#include <grpcpp/grpcpp.h>
#include <grpcpp/security/server_credentials.h>
#include <grpcpp/security/tls_certificate_provider.h>
#include <grpcpp/security/tls_credentials_options.h>
#include <signal.h>
#include <sys/prctl.h>
#include <unistd.h>

#include <chrono>
#include <cstdio>
#include <cstdlib>
#include <fstream>
#include <map>
#include <sstream>
#include <string>
#include <thread>

#include "backend.h"
#include "cache.h"
#include "door.h"
#include "fastlane.h"
#include "reporter.h"
#include "router.h"
#include "service.h"

namespace {

struct Flags {
  std::string listen;
  std::string backend;
  int report_interval_ms = 100;
  int max_inflight = 2;
  int queue_limit = 2048;
  int max_message_bytes = 64 * 1024 * 1024;
  int parent_pid = 0;  // stop when this process (the coordinator) is gone
  std::string shm_dir;  // the coordinator's shared memory registrations (empty: none served here)
  long long response_cache_bytes = 0;  // for deployments with response_cache (0: no cache here)
  std::string tls_cert;       // PEM files of the public port's TLS (empty: plaintext)
  std::string tls_key;
  std::string tls_client_ca;  // client certificates required (mutual TLS) when set
  std::string routes_generation;  // bumped by the coordinator when it drops routes
  std::string node_tls_ca;    // runtimes' fast lanes serve TLS signed by this CA (empty: plaintext)
  std::string node_tls_cert;  // the door's client certificate for runtimes requiring one
  std::string node_tls_key;
  std::string node_tls_server_name;  // the name nodes' certificates hold (empty: the host dialled)
};

constexpr char kUsage[] =
    "usage: cnei-frontdoor --listen HOST:PORT --backend HOST:PORT [--report-interval-ms 100]\n"
    "       [--max-inflight 2] [--queue-limit 2048] [--max-message-bytes 67108864]\n"
    "       [--parent-pid PID] [--shm-dir DIR] [--response-cache-bytes 0]\n"
    "       [--tls-cert PEM --tls-key PEM [--tls-client-ca PEM]] [--routes-generation FILE]\n"
    "       [--node-tls-ca PEM [--node-tls-cert PEM --node-tls-key PEM] [--node-tls-server-name NAME]]\n";

[[noreturn]] void Usage(const std::string& problem) {
  fprintf(stderr, "cnei-frontdoor: %s\n%s", problem.c_str(), kUsage);
  exit(2);
}

int PositiveInt(const std::string& name, const std::string& text) {
  char* end = nullptr;
  long value = strtol(text.c_str(), &end, 10);
  if (text.empty() || *end != '\0' || value < 1 || value > (1L << 31) - 1) {
    Usage(name + " needs a positive integer, not '" + text + "'");
  }
  return int(value);
}

long long NonNegative(const std::string& name, const std::string& text) {
  char* end = nullptr;
  long long value = strtoll(text.c_str(), &end, 10);
  if (text.empty() || *end != '\0' || value < 0) Usage(name + " needs an integer of at least 0, not '" + text + "'");
  return value;
}

Flags ParseFlags(int argc, char** argv) {
  Flags flags;
  std::map<std::string, std::string> values;
  for (int i = 1; i < argc; ++i) {
    std::string arg = argv[i];
    size_t eq = arg.find('=');
    std::string name = arg.substr(0, eq);
    if (name == "--help" || name == "-h") fputs(kUsage, stdout), exit(0);
    if (name.rfind("--", 0) != 0) Usage("unexpected argument '" + arg + "'");
    if (eq != std::string::npos) {
      values[name] = arg.substr(eq + 1);
    } else if (i + 1 < argc) {
      values[name] = argv[++i];
    } else {
      Usage(name + " needs a value");
    }
  }
  for (const auto& [name, value] : values) {
    if (name == "--listen") flags.listen = value;
    else if (name == "--backend") flags.backend = value;
    else if (name == "--report-interval-ms") flags.report_interval_ms = PositiveInt(name, value);
    else if (name == "--max-inflight") flags.max_inflight = PositiveInt(name, value);
    else if (name == "--queue-limit") flags.queue_limit = PositiveInt(name, value);
    else if (name == "--max-message-bytes") flags.max_message_bytes = PositiveInt(name, value);
    else if (name == "--parent-pid") flags.parent_pid = PositiveInt(name, value);
    else if (name == "--shm-dir") flags.shm_dir = value;
    else if (name == "--response-cache-bytes") flags.response_cache_bytes = NonNegative(name, value);
    else if (name == "--tls-cert") flags.tls_cert = value;
    else if (name == "--tls-key") flags.tls_key = value;
    else if (name == "--tls-client-ca") flags.tls_client_ca = value;
    else if (name == "--routes-generation") flags.routes_generation = value;
    else if (name == "--node-tls-ca") flags.node_tls_ca = value;
    else if (name == "--node-tls-cert") flags.node_tls_cert = value;
    else if (name == "--node-tls-key") flags.node_tls_key = value;
    else if (name == "--node-tls-server-name") flags.node_tls_server_name = value;
    else Usage("unknown flag " + name);
  }
  if (flags.listen.empty() || flags.backend.empty()) Usage("--listen and --backend are required");
  if (flags.tls_cert.empty() != flags.tls_key.empty()) Usage("--tls-cert and --tls-key go together");
  if (!flags.tls_client_ca.empty() && flags.tls_cert.empty()) Usage("--tls-client-ca needs --tls-cert and --tls-key");
  if (flags.node_tls_cert.empty() != flags.node_tls_key.empty()) Usage("--node-tls-cert and --node-tls-key go together");
  if ((!flags.node_tls_cert.empty() || !flags.node_tls_server_name.empty()) && flags.node_tls_ca.empty()) {
    Usage("--node-tls-cert and --node-tls-server-name need --node-tls-ca");
  }
  return flags;
}

// Blocks SIGTERM and SIGINT in every thread (call before starting any), so main can sigwait.
sigset_t BlockStopSignals() {
  sigset_t set;
  sigemptyset(&set);
  sigaddset(&set, SIGTERM);
  sigaddset(&set, SIGINT);
  pthread_sigmask(SIG_BLOCK, &set, nullptr);
  signal(SIGPIPE, SIG_IGN);
  return set;
}

constexpr int kShutdownLimitS = 10;  // drain 5 s, last report, then no longer than this

std::string ReadFile(const std::string& path) {
  std::ifstream in(path, std::ios::binary);
  if (!in) Usage("cannot read " + path);
  std::ostringstream text;
  text << in.rdbuf();
  return text.str();
}

// The public port's credentials: TLS from the PEM files (client certificates required when a
// client CA is given), else plaintext. The files are watched: renewed certificates and client CA
// are taken without a restart. gRPC takes whatever the files hold, so the coordinator hands the
// door checked copies (services/coordinator/door_tls.py: key and chain in one file, replaced whole).
constexpr unsigned int kTlsRefreshS = 1;

std::shared_ptr<grpc::ServerCredentials> PublicCredentials(const Flags& flags) {
  if (flags.tls_cert.empty()) return grpc::InsecureServerCredentials();
  bool mutual = !flags.tls_client_ca.empty();
  for (const std::string* path : {&flags.tls_key, &flags.tls_cert, &flags.tls_client_ca}) {
    if (!path->empty()) ReadFile(*path);  // unreadable: a usage error now, not failed handshakes
  }
  auto files = std::make_shared<grpc::experimental::FileWatcherCertificateProvider>(
      flags.tls_key, flags.tls_cert, flags.tls_client_ca, kTlsRefreshS);
  grpc::experimental::TlsServerCredentialsOptions options(files);
  options.watch_identity_key_cert_pairs();
  if (mutual) options.watch_root_certs();
  options.set_cert_request_type(mutual ? GRPC_SSL_REQUEST_AND_REQUIRE_CLIENT_CERTIFICATE_AND_VERIFY
                                       : GRPC_SSL_DONT_REQUEST_CLIENT_CERTIFICATE);
  return grpc::experimental::TlsServerCredentials(options);
}

std::string WithPort(const std::string& address, int port) {
  return address.substr(0, address.rfind(':')) + ":" + std::to_string(port);
}

}  // namespace

int main(int argc, char** argv) {
  using namespace frontdoor;
  Flags flags = ParseFlags(argc, argv);
  // Debian's abseil checks every absl::Mutex lock order for deadlock cycles (a graph update on
  // each lock gRPC takes, ~2-4 % of the door's CPU under load): a debugging aid, off here.
  absl::SetMutexDeadlockDetectionMode(absl::OnDeadlockCycle::kIgnore);
  sigset_t stop_signals = BlockStopSignals();
  if (flags.parent_pid > 0) {  // a coordinator killed with -9 must not leave its port held
    prctl(PR_SET_PDEATHSIG, SIGTERM);
    if (getppid() != flags.parent_pid) kill(getpid(), SIGTERM);
  }

  Backend backend(flags.backend, flags.max_message_bytes);
  NodeRows node_rows;  // rows queued and in flight per node, every route's (least_loaded; reported)
  Router* router = nullptr;
  Reporter reporter(&backend, flags.report_interval_ms,
                    [&router](const std::vector<uint64_t>& ids) { router->Drop(ids); },
                    [&router] { return router->Held(); }, flags.routes_generation,
                    [&router](const std::vector<std::string>& models) {
                      for (const std::string& model : models) router->DropModel(model);
                    },
                    &node_rows);
  std::unique_ptr<ResponseCache> cache;
  if (flags.response_cache_bytes > 0) cache = std::make_unique<ResponseCache>(size_t(flags.response_cache_bytes));
  BatcherOptions options{flags.max_inflight, size_t(flags.queue_limit), cache.get(), &node_rows};
  Router routes(&backend, &reporter, options);
  router = &routes;
  std::unique_ptr<SharedMemory> shm;
  if (!flags.shm_dir.empty()) shm = std::make_unique<SharedMemory>(flags.shm_dir);
  // Triton's restricted inference API, from the environment (not the command line, which any
  // local user may read): HEADER=VALUE
  std::string restrict_header, restrict_value;
  if (const char* restrict = getenv("CNEI_FRONTDOOR_RESTRICT_INFERENCE"); restrict && *restrict) {
    std::string pair(restrict);
    size_t eq = pair.find('=');
    if (eq == std::string::npos || eq == 0) Usage("CNEI_FRONTDOOR_RESTRICT_INFERENCE must be HEADER=VALUE");
    restrict_header = pair.substr(0, eq), restrict_value = pair.substr(eq + 1);
  }
  // The keys of runtimes whose inference API is restricted, sent in each fast-lane hello:
  // KEY=VALUE;KEY=VALUE
  if (const char* pairs = getenv("CNEI_FRONTDOOR_NODE_HEADERS"); pairs && *pairs) {
    std::vector<std::pair<std::string, std::string>> headers;
    std::string all(pairs);
    for (size_t at = 0; at <= all.size();) {
      size_t end = all.find(';', at);
      if (end == std::string::npos) end = all.size();
      std::string pair = all.substr(at, end - at);
      at = end + 1;
      if (pair.empty()) continue;
      size_t eq = pair.find('=');
      if (eq == std::string::npos || eq == 0) Usage("CNEI_FRONTDOOR_NODE_HEADERS must read KEY=VALUE;...");
      headers.emplace_back(pair.substr(0, eq), pair.substr(eq + 1));
    }
    if (!SetHelloHeaders(headers)) Usage("CNEI_FRONTDOOR_NODE_HEADERS are longer than a fast-lane hello holds");
  }
  if (!flags.node_tls_ca.empty()) {
    std::string error;
    if (!SetNodeTls(flags.node_tls_ca, flags.node_tls_cert, flags.node_tls_key, flags.node_tls_server_name, &error)) Usage(error);
  }
  InferDoor door(&routes, shm.get(), restrict_header, restrict_value);
  FrontDoorService service(&backend, &door, &routes);

  int port = 0;
  grpc::ServerBuilder builder;
  builder.AddListeningPort(flags.listen, PublicCredentials(flags), &port);
  builder.RegisterCallbackGenericService(&service);
  builder.SetMaxReceiveMessageSize(flags.max_message_bytes);
  builder.SetMaxSendMessageSize(flags.max_message_bytes);
  std::unique_ptr<grpc::Server> server = builder.BuildAndStart();
  if (!server || port == 0) {
    fprintf(stderr, "cnei-frontdoor: cannot listen on %s\n", flags.listen.c_str());
    return 1;
  }
  reporter.Start();
  fprintf(stderr, "cnei-frontdoor listening on %s%s backend %s\n", WithPort(flags.listen, port).c_str(),
          flags.tls_cert.empty() ? "" : flags.tls_client_ca.empty() ? " (TLS)" : " (mutual TLS)",
          flags.backend.c_str());

  int signal_number = 0;
  sigwait(&stop_signals, &signal_number);
  fprintf(stderr, "cnei-frontdoor: signal %d, draining\n", signal_number);
  // Shutdown waits for every call to finish; a call that never would (a bug) must not keep the
  // port held after the coordinator is gone.
  std::thread([] {
    std::this_thread::sleep_for(std::chrono::seconds(kShutdownLimitS));
    fprintf(stderr, "cnei-frontdoor: calls still open %d s after the signal; exiting anyway\n",
            kShutdownLimitS);
    _exit(1);
  }).detach();
  server->Shutdown(std::chrono::system_clock::now() + std::chrono::seconds(5));
  reporter.Stop();
  fflush(stderr);
  _exit(0);  // fast-lane reader threads are detached; skip static destructors
}
