// One federated round over the network Channel (gRPC, mutual TLS on loopback), as ratios to the
// in-process Channel round and to a raw TLS transfer of the same bytes, measured in the same run.
//
//   bench_net_round [--sites 8] [--params 10000000] [--reps 3] [--chunk-kb 1024]
//   bench_net_round --payload-mb 2500         one payload to one site and back (echo)
//
// Round = what bench/engine times: the real Coordinator (select, train request, uploads decoded,
// finite check, the fedavg plugin) and the broadcast of the new global state; sites are
// Channel endpoints whose training is a no-op (they upload the state they received). Over the
// network each site is run_site_client in a thread of this process, with its own TLS connection.
#include <concord/engine.h>
#include <concord/net/pki.h>
#include <concord/net/transport.h>
#include <concord/protocol.h>
#include <concord/registry.h>

#include "../common/noop_federation.h"

#include <netinet/in.h>
#include <netinet/tcp.h>
#include <openssl/err.h>
#include <openssl/ssl.h>
#include <sys/resource.h>
#include <sys/socket.h>
#include <unistd.h>

#include <spdlog/spdlog.h>

#include <algorithm>
#include <chrono>
#include <cstdio>
#include <cstring>
#include <filesystem>
#include <fstream>
#include <functional>
#include <mutex>
#include <string>
#include <thread>
#include <vector>

using namespace concord;
using Clock = std::chrono::steady_clock;

namespace {

double since(Clock::time_point t) {
  return std::chrono::duration<double>(Clock::now() - t).count();
}

// CPU seconds (user + system, all threads) used by this process so far: on a busy machine wall
// time measures the other jobs too, CPU time only this work.
double cpu_seconds() {
  rusage ru{};
  getrusage(RUSAGE_SELF, &ru);
  return double(ru.ru_utime.tv_sec + ru.ru_stime.tv_sec) +
         double(ru.ru_utime.tv_usec + ru.ru_stime.tv_usec) * 1e-6;
}

// Best wall time of a phase and the CPU time of that same repetition.
struct Timing {
  double wall = 1e9, cpu = 0;
  void add(double w, double c) {
    if (w < wall) {
      wall = w;
      cpu = c;
    }
  }
};

using bench::fedavg;
using bench::model;
using bench::NoopSite;

// Best-of-`reps` round time (select, train_round, broadcast) over `ch`.
Timing rounds(Channel& ch, const std::vector<std::string>& names, int64_t params, int reps) {
  Registry reg;
  auto agg = fedavg(reg);
  Coordinator c(ch, 1);
  c.set_global(model(params));
  c.broadcast(0, names);
  Timing best;
  for (int r = 1; r <= reps; ++r) {
    auto t = Clock::now();
    const double c0 = cpu_seconds();
    auto out = c.train_round(*agg, r, reps, c.select(r, names, 1.0, 1.0, {}), {}, 1);
    auto failed = c.broadcast(r, names);
    best.add(since(t), cpu_seconds() - c0);
    if (!out.aggregated || out.updates.size() != names.size() || !failed.empty()) {
      std::fprintf(stderr, "round %d failed: %s\n", r,
                   out.failures.empty() ? "" : out.failures[0].c_str());
      std::exit(1);
    }
  }
  return best;
}

struct Certs {
  std::filesystem::path dir;
  std::string file(const std::string& n) const { return (dir / n).string(); }
  explicit Certs(int sites) {
    dir =
        std::filesystem::temp_directory_path() / ("concord-bench-net-" + std::to_string(getpid()));
    std::filesystem::create_directories(dir);
    net::CertSpec s;
    s.common_name = "bench CA";
    net::CertKey ca = net::make_ca(s);
    put("ca", ca);
    net::CertSpec sv;
    sv.common_name = "localhost";
    sv.role = net::CertRole::Server;
    sv.hosts = {"localhost", "127.0.0.1"};
    put("server", net::issue_certificate(ca, sv));
    for (int i = 0; i < sites; ++i) {
      net::CertSpec c;
      c.common_name = "site-" + std::to_string(i);
      c.serial = uint64_t(10 + i);
      put(c.common_name, net::issue_certificate(ca, c));
    }
  }
  ~Certs() { std::filesystem::remove_all(dir); }
  void put(const std::string& n, const net::CertKey& ck) {
    std::ofstream(file(n + ".pem")) << ck.cert;
    std::ofstream(file(n + ".key")) << ck.key;
  }
};

// A server and `sites` site clients in threads of this process, over mutual TLS on loopback.
struct Network {
  std::unique_ptr<net::GrpcServerChannel> server;
  std::vector<std::unique_ptr<NoopSite>> sites;
  std::vector<std::thread> threads;
  std::atomic<bool> stop{false};
  std::vector<std::string> names;
  // `handler` answers site i's requests; empty: a NoopSite. data_link false: payloads as frames
  // on the gRPC stream.
  Network(const Certs& certs, int n, size_t chunk, bool data_link,
          std::function<Bytes(int, const Bytes&)> handler = nullptr) {
    net::ServerOptions so;
    so.listen = "127.0.0.1:0";
    so.ca_cert = certs.file("ca.pem");
    so.server_cert = certs.file("server.pem");
    so.server_key = certs.file("server.key");
    so.chunk_bytes = chunk;
    so.data_listen = data_link ? "" : "off";
    for (int i = 0; i < n; ++i) names.push_back("site-" + std::to_string(i));
    so.sites = names;
    server = std::make_unique<net::GrpcServerChannel>(so);
    for (int i = 0; i < n; ++i) {
      sites.push_back(std::make_unique<NoopSite>());
      NoopSite* s = sites.back().get();
      s->name = names[size_t(i)];
      net::SiteClientOptions o;
      o.server = "localhost:" + std::to_string(server->port());
      o.site = s->name;
      o.ca_cert = certs.file("ca.pem");
      o.cert = certs.file(s->name + ".pem");
      o.key = certs.file(s->name + ".key");
      o.chunk_bytes = chunk;
      o.stop = &stop;
      SiteHandler h = [s](const Bytes& b) { return s->handle(b); };
      if (handler) h = [handler, i](const Bytes& b) { return handler(i, b); };
      threads.emplace_back([o, h] { net::run_site_client(o, h); });
    }
    auto missing = server->wait_for_sites(names, 60);
    if (!missing.empty()) {
      std::fprintf(stderr, "sites did not connect: %s ...\n", missing[0].c_str());
      std::exit(1);
    }
    for (int i = 0; data_link && server->data_link_sites().size() < names.size(); ++i) {
      if (i == 3000) {
        std::fprintf(stderr, "the sites' data links did not open\n");
        std::exit(1);
      }
      std::this_thread::sleep_for(std::chrono::milliseconds(10));
    }
  }
  ~Network() {
    server->shutdown("benchmark over");
    stop = true;
    for (auto& t : threads) t.join();
  }
};

// ---- raw TLS: the same bytes through OpenSSL on loopback, one connection per site ---------

struct TlsPair {
  SSL *server = nullptr, *client = nullptr;
  int sfd = -1, cfd = -1;
};

SSL_CTX* ctx(bool server, const Certs& c) {
  SSL_CTX* x = SSL_CTX_new(server ? TLS_server_method() : TLS_client_method());
  SSL_CTX_set_min_proto_version(x, TLS1_3_VERSION);
  SSL_CTX_set_ciphersuites(x, "TLS_AES_128_GCM_SHA256");  // what gRPC negotiates first
  const std::string who = server ? "server" : "site-0";
  SSL_CTX_use_certificate_file(x, c.file(who + ".pem").c_str(), SSL_FILETYPE_PEM);
  SSL_CTX_use_PrivateKey_file(x, c.file(who + ".key").c_str(), SSL_FILETYPE_PEM);
  SSL_CTX_load_verify_locations(x, c.file("ca.pem").c_str(), nullptr);
  SSL_CTX_set_verify(x, SSL_VERIFY_PEER | (server ? SSL_VERIFY_FAIL_IF_NO_PEER_CERT : 0), nullptr);
  return x;
}

TlsPair connect_pair(SSL_CTX* sctx, SSL_CTX* cctx) {
  int lfd = socket(AF_INET, SOCK_STREAM, 0);
  sockaddr_in a{};
  a.sin_family = AF_INET;
  a.sin_addr.s_addr = htonl(INADDR_LOOPBACK);
  bind(lfd, reinterpret_cast<sockaddr*>(&a), sizeof a);
  listen(lfd, 1);
  socklen_t len = sizeof a;
  getsockname(lfd, reinterpret_cast<sockaddr*>(&a), &len);
  TlsPair p;
  p.cfd = socket(AF_INET, SOCK_STREAM, 0);
  connect(p.cfd, reinterpret_cast<sockaddr*>(&a), sizeof a);
  p.sfd = accept(lfd, nullptr, nullptr);
  close(lfd);
  // Large socket buffers and no Nagle: the floor should be as fast as TLS on loopback can be.
  for (int fd : {p.sfd, p.cfd}) {
    int big = 16 << 20, one = 1;
    setsockopt(fd, SOL_SOCKET, SO_SNDBUF, &big, sizeof big);
    setsockopt(fd, SOL_SOCKET, SO_RCVBUF, &big, sizeof big);
    setsockopt(fd, IPPROTO_TCP, TCP_NODELAY, &one, sizeof one);
  }
  p.server = SSL_new(sctx);
  p.client = SSL_new(cctx);
  SSL_set_fd(p.server, p.sfd);
  SSL_set_fd(p.client, p.cfd);
  std::thread t([&] { SSL_accept(p.server); });
  if (SSL_connect(p.client) != 1) {
    std::fprintf(stderr, "raw TLS handshake failed\n");
    std::exit(1);
  }
  t.join();
  return p;
}

void send_all(SSL* s, const uint8_t* d, size_t n) {
  while (n) {
    int w = SSL_write(s, d, int(std::min<size_t>(n, 1 << 30)));
    if (w <= 0) std::exit(1);
    d += w;
    n -= size_t(w);
  }
}
void recv_all(SSL* s, uint8_t* d, size_t n) {
  while (n) {
    int r = SSL_read(s, d, int(std::min<size_t>(n, 1 << 30)));
    if (r <= 0) std::exit(1);
    d += r;
    n -= size_t(r);
  }
}

// Reads `n` bytes into a 1 MiB scratch buffer (the parallel floor keeps no per-site copy).
void drain(SSL* s, size_t n) {
  std::vector<uint8_t> scratch(size_t(1) << 20);
  while (n) {
    const size_t take = std::min(n, scratch.size());
    recv_all(s, scratch.data(), take);
    n -= take;
  }
}

// `bytes` server -> site and site -> server for every site: in turn, or all sites at once (as
// the Coordinator calls them over a concurrent Channel; each site then echoes the bytes it was
// sent from the shared source buffer, and the server drains the replies).
Timing raw_tls(const Certs& certs, int sites, size_t bytes, int reps, bool parallel = false) {
  SSL_CTX* s = ctx(true, certs);
  SSL_CTX* c = ctx(false, certs);
  std::vector<TlsPair> pairs;
  for (int i = 0; i < sites; ++i) pairs.push_back(connect_pair(s, c));
  std::vector<uint8_t> src(bytes, 1), dst(bytes, 0), back(bytes, 0);
  Timing best;
  for (int r = 0; r < reps; ++r) {
    auto t = Clock::now();
    const double c0 = cpu_seconds();
    if (parallel) {
      std::vector<std::thread> threads;
      for (auto& p : pairs) {
        threads.emplace_back([&p, &src, bytes] {
          drain(p.client, bytes);
          send_all(p.client, src.data(), bytes);
        });
        threads.emplace_back([&p, &src, bytes] {
          send_all(p.server, src.data(), bytes);
          drain(p.server, bytes);
        });
      }
      for (auto& t : threads) t.join();
    } else {
      for (auto& p : pairs) {
        std::thread site([&] {
          recv_all(p.client, dst.data(), bytes);
          send_all(p.client, dst.data(), bytes);
        });
        send_all(p.server, src.data(), bytes);
        recv_all(p.server, back.data(), bytes);
        site.join();
      }
    }
    best.add(since(t), cpu_seconds() - c0);
  }
  for (auto& p : pairs) {
    SSL_free(p.server);
    SSL_free(p.client);
    close(p.sfd);
    close(p.cfd);
  }
  SSL_CTX_free(s);
  SSL_CTX_free(c);
  return best;
}

std::string load_average() {
  std::ifstream in("/proc/loadavg");
  std::string a, b, c;
  in >> a >> b >> c;
  return a + " " + b + " " + c + " (" + std::to_string(std::thread::hardware_concurrency()) +
         " cores)\n";
}

long peak_rss_mb() {
  rusage ru{};
  getrusage(RUSAGE_SELF, &ru);
  return ru.ru_maxrss / 1024;
}

// Only the data-link round (for a profiler): `only_link`.
int round_bench(int sites, int64_t params, int reps, size_t chunk, bool only_link) {
  const size_t model_bytes = size_t(params) * 4;
  Certs certs(sites);
  if (only_link) {
    Network n(certs, sites, chunk, true);
    const Timing t = rounds(*n.server, n.names, params, reps);
    std::printf("round, payloads on the data link: %.1f / %.1f ms (wall / CPU)\n", t.wall * 1e3,
                t.cpu * 1e3);
    return 0;
  }
  // (a) in-process channel
  InProcessChannel ip;
  std::vector<std::unique_ptr<NoopSite>> ss;
  std::vector<std::string> names;
  for (int i = 0; i < sites; ++i) {
    ss.push_back(std::make_unique<NoopSite>());
    NoopSite* s = ss.back().get();
    s->name = "site-" + std::to_string(i);
    ip.connect(s->name, [s](const Bytes& b) { return s->handle(b); });
    names.push_back(s->name);
  }
  const Timing t_inproc = rounds(ip, names, params, reps);
  ss.clear();
  // (b) raw TLS transfer of the same bytes (each site: model down, model up)
  const Timing t_tls = raw_tls(certs, sites, model_bytes, reps);
  const Timing t_tls_par = raw_tls(certs, sites, model_bytes, reps, true);
  // the network round: payloads as chunks on the gRPC stream, then on the data link
  Timing t_stream, t_net;
  {
    Network n(certs, sites, chunk, false);
    t_stream = rounds(*n.server, n.names, params, reps);
  }
  {
    Network n(certs, sites, chunk, true);
    t_net = rounds(*n.server, n.names, params, reps);
  }
  const double moved = 2.0 * sites * model_bytes;
  std::printf(
      "network round: %d sites x %lld float32 params (%.0f MB per site), mutual TLS, "
      "%zu KiB chunks, best of %d (wall ms / CPU ms of this process)\n",
      sites, (long long)params, model_bytes / 1e6, chunk >> 10, reps);
  std::printf("  in-process channel round (a):            %8.1f / %8.1f\n", t_inproc.wall * 1e3,
              t_inproc.cpu * 1e3);
  std::printf("  raw TLS, %.0f MB each way per site (b):   %8.1f / %8.1f  (%.2f GB/s)\n",
              model_bytes / 1e6, t_tls.wall * 1e3, t_tls.cpu * 1e3, moved / t_tls.wall / 1e9);
  std::printf("  raw TLS, all sites at once (b'):         %8.1f / %8.1f  (%.2f GB/s)\n",
              t_tls_par.wall * 1e3, t_tls_par.cpu * 1e3, moved / t_tls_par.wall / 1e9);
  std::printf("  round, payloads on the gRPC stream (c):  %8.1f / %8.1f  (%.2f GB/s)\n",
              t_stream.wall * 1e3, t_stream.cpu * 1e3, moved / t_stream.wall / 1e9);
  std::printf("  round, payloads on the data link:        %8.1f / %8.1f  (%.2f GB/s)\n",
              t_net.wall * 1e3, t_net.cpu * 1e3, moved / t_net.wall / 1e9);
  std::printf("  data link vs gRPC stream (c): %.2fx faster wall, %.2fx less CPU\n",
              t_stream.wall / t_net.wall, t_stream.cpu / t_net.cpu);
  std::printf("  wall ratio to in-process (a): %.2fx, to raw TLS (b): %.2fx, (b'): %.2fx\n",
              t_net.wall / t_inproc.wall, t_net.wall / t_tls.wall, t_net.wall / t_tls_par.wall);
  std::printf("  CPU  ratio to in-process (a): %.2fx, to raw TLS (b): %.2fx, (b'): %.2fx\n",
              t_net.cpu / t_inproc.cpu, t_net.cpu / t_tls.cpu, t_net.cpu / t_tls_par.cpu);
  std::printf("  load average while running: %s", load_average().c_str());
  std::printf("  peak RSS: %ld MB\n", peak_rss_mb());
  std::printf("net_round_stream_s %.4f\n", t_stream.wall);
  std::printf("net_round_s %.4f\n", t_net.wall);
  return 0;
}

int payload_bench(double mb, size_t chunk, bool data_link) {
  Certs certs(1);
  const size_t bytes = size_t(mb * 1e6);
  Bytes received;
  // The site keeps what it received and acknowledges it; compared after the clock stops.
  Network n(certs, 1, chunk, data_link, [&received](int, const Bytes& b) {
    received = b;
    return encode(protocol::ack("site-0", 0));
  });
  Bytes req;
  {
    Message m;
    m.type = "payload";
    Array a = Array::uninitialized(DType::U8, {int64_t(bytes)});
    uint8_t* p = static_cast<uint8_t*>(a.raw());
    for (size_t i = 0; i < bytes; ++i) p[i] = uint8_t(i * 2654435761u >> 24);
    m.arrays["blob"] = a;
    req = encode(m);
  }
  auto t = Clock::now();
  n.server->call("site-0", req);
  const double s = since(t);
  const bool same = received && received->size() == req->size() &&
                    std::memcmp(received->data(), req->data(), req->size()) == 0;
  received.reset();
  std::printf(
      "one payload of %.2f GB to one site, mutual TLS, %s, %zu KiB chunks: %.2f s "
      "(%.2f GB/s), bit-exact: %s\n",
      req->size() / 1e9, data_link ? "data link" : "gRPC stream", chunk >> 10, s,
      req->size() / s / 1e9, same ? "yes" : "NO");
  const size_t probe = std::min<size_t>(req->size(), size_t(1) << 30);
  const double t_tls = raw_tls(certs, 1, probe, 1).wall / 2;  // raw_tls moves bytes both ways
  const double floor_s = t_tls / double(probe) * double(req->size());
  std::printf("  raw TLS of the same bytes (from %.2f GB in this run): %.2f s; ratio %.2fx\n",
              probe / 1e9, floor_s, s / floor_s);
  std::printf("  peak RSS: %ld MB\n", peak_rss_mb());
  return same ? 0 : 1;
}

}  // namespace

int main(int argc, char** argv) {
  int sites = 8, reps = 3;
  int64_t params = 10000000;
  double payload_mb = 0;
  bool data_link = true, only_link = false;
  size_t chunk = net::chunk_bytes_from_env();
  for (int i = 1; i < argc; ++i) {
    std::string a = argv[i];
    auto next = [&] { return i + 1 < argc ? std::string(argv[++i]) : std::string(); };
    if (a == "--sites")
      sites = std::stoi(next());
    else if (a == "--params")
      params = std::stoll(next());
    else if (a == "--reps")
      reps = std::stoi(next());
    else if (a == "--chunk-kb")
      chunk = size_t(std::stoul(next())) << 10;
    else if (a == "--payload-mb")
      payload_mb = std::stod(next());
    else if (a == "--stream-only")
      data_link = false;
    else if (a == "--only-link")
      only_link = true;
    else {
      std::fprintf(stderr,
                   "usage: bench_net_round [--sites N] [--params N] [--reps N] "
                   "[--chunk-kb K] [--payload-mb MB [--stream-only]] [--only-link]\n");
      return 2;
    }
  }
  spdlog::set_level(spdlog::level::warn);
  SSL_library_init();
  if (payload_mb > 0) return payload_bench(payload_mb, chunk, data_link);
  return round_bench(sites, params, reps, chunk, only_link);
}
