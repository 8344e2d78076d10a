// The network Channel on loopback: sites in threads and in separate processes, mutual TLS
// accepted and refused, chunked payloads, sites that die, hang or misbehave.
#include <concord/engine.h>
#include <concord/error.h>
#include <concord/net/kit.h>
#include <concord/net/pki.h>
#include <concord/net/transport.h>
#include <concord/protocol.h>
#include <concord/seed.h>

#include <grpcpp/generic/generic_stub.h>
#include <grpcpp/grpcpp.h>
#include <gtest/gtest.h>
#include <spdlog/sinks/ringbuffer_sink.h>
#include <spdlog/spdlog.h>

#include <signal.h>
#include <sys/wait.h>
#include <unistd.h>

#include <cstring>
#include <filesystem>
#include <fstream>
#include <thread>

#include "data_link.h"
#include "testing.h"

using namespace concord;
using namespace concord::net;
using concord::testkit::TempDir;

namespace {

void write(const std::string& file, const std::string& text) {
  std::ofstream(file) << text;
}
std::string slurp(const std::string& file) {
  std::ifstream in(file);
  return std::string(std::istreambuf_iterator<char>(in), {});
}

// A project's certificates, written once per test program.
struct Pki {
  TempDir dir;
  CertKey ca, other_ca;
  std::string path(const std::string& f) const { return dir.str() + "/" + f; }
  Pki() {
    CertSpec s;
    s.common_name = "test root CA";
    ca = make_ca(s);
    s.common_name = "another CA";
    other_ca = make_ca(s);
    write(path("ca.pem"), ca.cert);
    CertSpec sv;
    sv.common_name = "localhost";
    sv.role = CertRole::Server;
    sv.hosts = {"localhost", "127.0.0.1"};
    sv.serial = 1;
    put("server", issue_certificate(ca, sv));
    uint64_t serial = 10;
    for (const char* site : {"site-a", "site-b", "site-c", "intruder", "revoked"}) {
      CertSpec c;
      c.common_name = site;
      c.serial = serial++;
      put(site, issue_certificate(ca, c));
    }
    CertSpec c;
    c.common_name = "site-a";
    c.serial = 99;
    put("site-a-other-ca", issue_certificate(other_ca, c));
    c.serial = 98;
    c.not_before = std::time(nullptr) - 10 * 86400;
    c.not_after = std::time(nullptr) - 86400;
    put("site-a-expired", issue_certificate(ca, c));
    sv.serial = 2;
    put("server-other-ca", issue_certificate(other_ca, sv));
    write(path("crl.pem"), make_crl(ca, {14}, std::time(nullptr) + 86400));  // "revoked"
  }
  void put(const std::string& name, const CertKey& ck) {
    write(path(name + ".pem"), ck.cert);
    write(path(name + ".key"), ck.key);
  }
};

const Pki& pki() {
  static Pki p;
  return p;
}

ServerOptions server_opts(std::vector<std::string> sites = {"site-a", "site-b", "site-c",
                                                            "revoked"}) {
  ServerOptions o;
  o.listen = "127.0.0.1:0";
  o.ca_cert = pki().path("ca.pem");
  o.server_cert = pki().path("server.pem");
  o.server_key = pki().path("server.key");
  o.crl = pki().path("crl.pem");
  o.sites = std::move(sites);
  o.heartbeat_seconds = 1;  // a busy test machine must not look like a dead site
  return o;
}

SiteClientOptions site_opts(int port, const std::string& site, const std::string& cert = "") {
  SiteClientOptions o;
  o.server = "localhost:" + std::to_string(port);
  o.site = site;
  o.ca_cert = pki().path("ca.pem");
  o.cert = pki().path((cert.empty() ? site : cert) + ".pem");
  o.key = pki().path((cert.empty() ? site : cert) + ".key");
  o.heartbeat_seconds = 0.3;
  o.backoff_initial_seconds = 0.05;
  o.backoff_max_seconds = 0.3;
  return o;
}

// A site running in a thread of this process until the server shuts down or `stop` is set.
class SiteThread {
 public:
  SiteThread(SiteClientOptions o, SiteHandler h) : opt_(std::move(o)) {
    opt_.stop = &stop_;
    thread_ = std::thread([this, h] {
      try {
        exit_ = run_site_client(opt_, h);
      } catch (const std::exception& e) {
        error_ = e.what();
      }
    });
  }
  ~SiteThread() {
    stop_ = true;
    if (thread_.joinable()) thread_.join();
  }
  void join() { thread_.join(); }
  const std::string& error() const { return error_; }
  SiteExit exit() const { return exit_; }

 private:
  SiteClientOptions opt_;
  std::atomic<bool> stop_{false};
  std::thread thread_;
  std::string error_;
  SiteExit exit_ = SiteExit::GaveUp;
};

Bytes echo(const Bytes& b) {
  return b;
}

// Replies with a message holding the sum of the request's float arrays.
Bytes sum(const Bytes& b) {
  Message m = decode(b);
  double s = 0;
  for (const auto& [name, a] : m.arrays)
    for (int64_t i = 0; i < a.numel(); ++i) s += a.data<float>()[i];
  Message r;
  r.type = "sum";
  r.site = "site-b";
  r.scalars["sum"] = s;
  return encode(r);
}

Bytes message_of(size_t floats, uint64_t seed) {
  Message m;
  m.type = "test";
  Array a = Array::uninitialized(DType::F32, {int64_t(floats)});
  SeededRandom rng(seed);
  for (size_t i = 0; i < floats; ++i) a.data<float>()[i] = float(rng.uniform());
  m.arrays["w"] = a;
  return encode(m);
}

bool same_bytes(const Bytes& a, const Bytes& b) {
  return a->size() == b->size() && std::memcmp(a->data(), b->data(), a->size()) == 0;
}

std::string site_error_of(const std::function<void()>& f) {
  try {
    f();
  } catch (const SiteError& e) {
    return e.what();
  } catch (const std::exception& e) {
    return std::string("not a SiteError: ") + e.what();
  }
  return "(no error)";
}

// A site in its own process (tests/fixtures/net/site_process.cpp).
pid_t spawn_site(int port, const std::string& site, const std::string& mode,
                 std::vector<std::string> extra = {}) {
  std::vector<std::string> args = {testkit::build_dir() + "/bin/net_test_site",
                                   "localhost:" + std::to_string(port), site, mode};
  if (extra.empty())
    extra = {"--ca",  pki().path("ca.pem"),      "--cert",      pki().path(site + ".pem"),
             "--key", pki().path(site + ".key"), "--heartbeat", "0.3"};
  args.insert(args.end(), extra.begin(), extra.end());
  pid_t pid = fork();
  if (pid == 0) {
    std::vector<char*> argv;
    for (auto& a : args) argv.push_back(a.data());
    argv.push_back(nullptr);
    execv(argv[0], argv.data());
    _exit(127);
  }
  return pid;
}

int wait_exit(pid_t pid) {
  int status = 0;
  waitpid(pid, &status, 0);
  return WIFEXITED(status) ? WEXITSTATUS(status) : 128 + WTERMSIG(status);
}

// Captures what the server logs.
struct LogCapture {
  std::shared_ptr<spdlog::sinks::ringbuffer_sink_mt> sink =
      std::make_shared<spdlog::sinks::ringbuffer_sink_mt>(200);
  LogCapture() { spdlog::default_logger()->sinks().push_back(sink); }
  ~LogCapture() {
    auto& s = spdlog::default_logger()->sinks();
    s.erase(std::remove(s.begin(), s.end(), sink), s.end());
  }
  bool contains(const std::string& text) const {
    for (const auto& line : sink->last_formatted())
      if (line.find(text) != std::string::npos) return true;
    return false;
  }
};

}  // namespace

TEST(NetTransport, SitesInThreadsAnswerEchoAndSum) {
  GrpcServerChannel server(server_opts());
  SiteThread a(site_opts(server.port(), "site-a"), echo);
  SiteThread b(site_opts(server.port(), "site-b"), sum);
  ASSERT_TRUE(server.wait_for_sites({"site-a", "site-b"}, 20).empty());
  EXPECT_EQ(server.sites(), (std::vector<std::string>{"site-a", "site-b"}));
  Bytes req = message_of(1000, 1);
  EXPECT_TRUE(same_bytes(server.call("site-a", req), req));
  Message s = decode(server.call("site-b", req));
  double expect = 0;
  Message m = decode(req);
  for (int64_t i = 0; i < 1000; ++i) expect += m.arrays["w"].data<float>()[i];
  EXPECT_DOUBLE_EQ(s.scalars.at("sum"), expect);
  // Many calls in a row on the same stream.
  for (int i = 0; i < 20; ++i) EXPECT_TRUE(same_bytes(server.call("site-a", req), req));
  EXPECT_NE(site_error_of([&] { server.call("site-c", req); }).find("site 'site-c': not connected"),
            std::string::npos);
  server.shutdown("test over");
  a.join();
  b.join();
  EXPECT_EQ(a.exit(), SiteExit::Shutdown);
  EXPECT_EQ(b.exit(), SiteExit::Shutdown);
}

// Waits up to 10 s for `want` to be the sites with an open data link.
bool data_links_become(const GrpcServerChannel& server, const std::vector<std::string>& want) {
  for (int i = 0; i < 1000; ++i) {
    if (server.data_link_sites() == want) return true;
    std::this_thread::sleep_for(std::chrono::milliseconds(10));
  }
  return false;
}

// Payloads take the data link when both ends have it, and the stream (in chunks) when either end
// turns it off; the bytes arrive the same either way.
TEST(NetTransport, PayloadsTakeTheDataLinkOrTheStreamBitExact) {
  for (const auto& [server_link, site_link] :
       {std::pair{true, true}, {false, true}, {true, false}}) {
    SCOPED_TRACE(std::string("server data link ") + (server_link ? "on" : "off") + ", site's " +
                 (site_link ? "on" : "off"));
    ServerOptions so = server_opts();
    so.chunk_bytes = 1 << 20;
    if (!server_link) so.data_listen = "off";
    GrpcServerChannel server(so);
    EXPECT_EQ(server.data_port() != 0, server_link);
    SiteClientOptions co = site_opts(server.port(), "site-a");
    co.chunk_bytes = 256 << 10;  // the two ends may cut differently
    co.data_link = site_link;
    SiteThread a(co, echo);
    ASSERT_TRUE(server.wait_for_sites({"site-a"}, 20).empty());
    if (server_link && site_link) {
      EXPECT_TRUE(data_links_become(server, {"site-a"}));
    } else {
      std::this_thread::sleep_for(std::chrono::milliseconds(300));
      EXPECT_TRUE(server.data_link_sites().empty());
    }
    Bytes req = message_of(50u << 18, 7);  // 50 MiB of float32
    ASSERT_GT(req->size(), size_t(50) << 20);
    Bytes reply = server.call("site-a", req);
    EXPECT_TRUE(same_bytes(reply, req));
    // A tiny message too.
    Bytes small = message_of(1, 3);
    EXPECT_TRUE(same_bytes(server.call("site-a", small), small));
  }
}

TEST(NetTransport, HandlerErrorIsASiteErrorNamingTheSite) {
  GrpcServerChannel server(server_opts());
  SiteThread a(site_opts(server.port(), "site-a"),
               [](const Bytes&) -> Bytes { throw Error("out of GPU memory"); });
  SiteThread b(site_opts(server.port(), "site-b"),
               [](const Bytes&) -> Bytes { return std::make_shared<Buffer>(16); });
  ASSERT_TRUE(server.wait_for_sites({"site-a", "site-b"}, 20).empty());
  Bytes req = message_of(10, 1);
  EXPECT_EQ(site_error_of([&] { server.call("site-a", req); }), "site 'site-a': out of GPU memory");
  // A reply that is not a Message is the site's failure, reported by name.
  EXPECT_NE(site_error_of([&] {
              server.call("site-b", req);
            }).find("site 'site-b': sent a corrupt reply"),
            std::string::npos);
  // The stream still works afterwards.
  EXPECT_NE(site_error_of([&] { server.call("site-a", req); }).find("out of GPU memory"),
            std::string::npos);
}

TEST(NetTransport, CallDeadlineScalesWithPayloadAndNamesTheSite) {
  ServerOptions so = server_opts();
  so.call_base_seconds = 0.5;
  so.min_throughput_mb_s = 1000;
  GrpcServerChannel server(so);
  SiteThread a(site_opts(server.port(), "site-a"), [](const Bytes& b) {
    std::this_thread::sleep_for(std::chrono::milliseconds(1500));  // heartbeats go on
    return b;
  });
  ASSERT_TRUE(server.wait_for_sites({"site-a"}, 20).empty());
  std::string e = site_error_of([&] { server.call("site-a", message_of(10, 1)); });
  EXPECT_NE(e.find("site 'site-a': no reply within"), std::string::npos) << e;
  // Once the late reply arrives and is dropped, the next call works.
  std::this_thread::sleep_for(std::chrono::milliseconds(1200));
  server.shutdown("done");
}

TEST(NetTransport, TlsRefusalsAreExplainedOnBothEnds) {
  GrpcServerChannel server(server_opts());
  struct Case {
    std::string site, cert, expect;
  };
  const std::vector<Case> cases = {
      {"intruder", "intruder", "site 'intruder' is not in this federation's site list"},
      {"revoked", "revoked", "certificate 'revoked' (serial 14) was revoked"},
      {"site-a", "site-a-other-ca", "is not signed by this project's CA"},
      {"site-a", "site-a-expired", "certificate 'site-a' (serial 98) expired on"},
  };
  for (const Case& c : cases) {
    LogCapture log;
    SiteClientOptions o = site_opts(server.port(), c.site, c.cert);
    o.max_attempts = 3;
    std::string error;
    try {
      run_site_client(o, echo);
    } catch (const Error& e) {
      error = e.what();
    }
    EXPECT_NE(error.find(c.expect), std::string::npos) << c.cert << ": " << error;
    EXPECT_NE(error.find("refused site '" + c.site + "'"), std::string::npos) << error;
    EXPECT_TRUE(log.contains(c.expect)) << "server log lacks: " << c.expect;
  }
  EXPECT_TRUE(server.sites().empty());
}

TEST(NetTransport, SiteRefusesAServerSignedByAnotherCa) {
  ServerOptions so = server_opts();
  so.server_cert = pki().path("server-other-ca.pem");
  so.server_key = pki().path("server-other-ca.key");
  GrpcServerChannel server(so);
  LogCapture log;
  SiteClientOptions o = site_opts(server.port(), "site-a");
  o.max_attempts = 2;
  EXPECT_EQ(run_site_client(o, echo), SiteExit::GaveUp);
  EXPECT_TRUE(log.contains("site 'site-a': cannot connect to localhost:"));
  EXPECT_TRUE(log.contains("the server's certificate is not signed by this kit's CA"));
  EXPECT_TRUE(server.sites().empty());
}

TEST(NetTransport, InsecureIsForLoopbackOnly) {
  ServerOptions so = server_opts();
  so.insecure = true;
  so.listen = "0.0.0.0:0";
  EXPECT_NE(testkit::error_of([&] { GrpcServerChannel s(so); }).find("loopback"),
            std::string::npos);
  SiteClientOptions co = site_opts(1, "site-a");
  co.insecure = true;
  co.server = "10.1.2.3:7443";
  EXPECT_NE(testkit::error_of([&] { run_site_client(co, echo); }).find("loopback"),
            std::string::npos);
  // On loopback it works, names taken on trust.
  so.listen = "127.0.0.1:0";
  GrpcServerChannel server(so);
  co.server = "127.0.0.1:" + std::to_string(server.port());
  SiteThread a(co, echo);
  ASSERT_TRUE(server.wait_for_sites({"site-a"}, 20).empty());
  EXPECT_TRUE(data_links_become(server, {"site-a"}));  // plain TCP too, on loopback
  Bytes req = message_of(100, 2);
  EXPECT_TRUE(same_bytes(server.call("site-a", req), req));
}

TEST(NetTransport, SiteProcessKilledMidCallOthersAnswerThenReconnects) {
  GrpcServerChannel server(server_opts());
  pid_t a = spawn_site(server.port(), "site-a", "echo");
  pid_t b = spawn_site(server.port(), "site-b", "slow");
  pid_t c = spawn_site(server.port(), "site-c", "sum");
  ASSERT_TRUE(server.wait_for_sites({"site-a", "site-b", "site-c"}, 60).empty());
  Bytes req = message_of(100000, 5);
  double expect = 0;
  Message m = decode(req);
  for (int64_t i = 0; i < 100000; ++i) expect += m.arrays["w"].data<float>()[i];
  EXPECT_DOUBLE_EQ(decode(server.call("site-c", req)).scalars.at("sum"), expect);
  std::thread killer([b] {
    std::this_thread::sleep_for(std::chrono::milliseconds(500));
    kill(b, SIGKILL);
  });
  std::string e = site_error_of([&] { server.call("site-b", req); });
  killer.join();
  EXPECT_EQ(wait_exit(b), 128 + SIGKILL);
  EXPECT_NE(e.find("site 'site-b': disconnected during the call"), std::string::npos) << e;
  EXPECT_TRUE(same_bytes(server.call("site-a", req), req));  // the others still answer
  // site-b comes back (a new process): it re-registers and the next call works.
  pid_t b2 = spawn_site(server.port(), "site-b", "echo");
  ASSERT_TRUE(server.wait_for_sites({"site-b"}, 60).empty());
  EXPECT_TRUE(same_bytes(server.call("site-b", req), req));
  server.shutdown("test over");
  EXPECT_EQ(wait_exit(a), 0);  // each site exits 0 when the server ends the run
  EXPECT_EQ(wait_exit(b2), 0);
  EXPECT_EQ(wait_exit(c), 0);
}

TEST(NetTransport, HungSiteIsDroppedByMissingHeartbeats) {
  ServerOptions so = server_opts();
  so.heartbeat_seconds = 0.3;
  GrpcServerChannel server(so);
  pid_t a = spawn_site(server.port(), "site-a", "slow");
  ASSERT_TRUE(server.wait_for_sites({"site-a"}, 60).empty());
  std::thread freezer([a] {
    std::this_thread::sleep_for(std::chrono::milliseconds(300));
    kill(a, SIGSTOP);  // alive for TCP, silent for Concord
  });
  std::string e = site_error_of([&] { server.call("site-a", message_of(10, 1)); });
  freezer.join();
  EXPECT_NE(e.find("site 'site-a': sent no heartbeat for"), std::string::npos) << e;
  kill(a, SIGKILL);
  wait_exit(a);
}

TEST(NetTransport, SiteReconnectReplacesItsStream) {
  GrpcServerChannel server(server_opts());
  pid_t a = spawn_site(server.port(), "site-a", "echo");
  ASSERT_TRUE(server.wait_for_sites({"site-a"}, 60).empty());
  // The old process is frozen, its connection still open: the server cannot know it is gone.
  kill(a, SIGSTOP);
  pid_t a2 = spawn_site(server.port(), "site-a", "echo");
  // The new process registers under the same name and replaces the old stream; calls reach it.
  Bytes req = message_of(1000, 9);
  bool answered = false;
  for (int i = 0; i < 600 && !answered; ++i) {
    try {
      answered = same_bytes(server.call("site-a", req), req);
    } catch (const SiteError&) {
      std::this_thread::sleep_for(std::chrono::milliseconds(100));
    }
  }
  EXPECT_TRUE(answered);
  EXPECT_TRUE(same_bytes(server.call("site-a", req), req));
  EXPECT_EQ(server.sites(), std::vector<std::string>{"site-a"});
  kill(a, SIGKILL);
  wait_exit(a);
  kill(a2, SIGTERM);
  EXPECT_EQ(wait_exit(a2), 2);  // stopped by the signal, cleanly
}

// ---- a raw peer speaking the wire directly ------------------------------------------------

namespace {

// A client on the generic async API: sends any bytes as frames, reads what comes back.
class RawClient {
 public:
  RawClient(int port, const std::string& cert) {
    grpc::SslCredentialsOptions ssl;
    ssl.pem_root_certs = slurp(pki().path("ca.pem"));
    ssl.pem_cert_chain = slurp(pki().path(cert + ".pem"));
    ssl.pem_private_key = slurp(pki().path(cert + ".key"));
    channel_ = grpc::CreateChannel("localhost:" + std::to_string(port), grpc::SslCredentials(ssl));
    stub_ = std::make_unique<grpc::GenericStub>(channel_);
    call_ = stub_->PrepareCall(&ctx_, "/concord.net.v1.Federation/Connect", &cq_);
    call_->StartCall(tag(1));
    wait(1);
  }
  ~RawClient() {
    ctx_.TryCancel();
    cq_.Shutdown();
    void* t;
    bool ok;
    while (cq_.Next(&t, &ok)) {
    }
  }
  bool send(const std::string& bytes) {
    grpc::Slice s(bytes);
    grpc::ByteBuffer bb(&s, 1);
    call_->Write(bb, tag(2));
    return wait(2);
  }
  // The next frame from the server, decoded; nullopt when the stream ended.
  std::optional<FrameHeader> read() {
    grpc::ByteBuffer bb;
    call_->Read(&bb, tag(3));
    if (!wait(3)) return std::nullopt;
    std::vector<grpc::Slice> slices;
    (void)bb.Dump(&slices);
    std::vector<Span> spans;
    for (auto& s : slices) spans.push_back({s.begin(), s.size()});
    return decode_frame(spans).header;
  }
  // The next frame that is not a heartbeat.
  std::optional<FrameHeader> read_non_heartbeat() {
    for (;;) {
      auto f = read();
      if (!f || f->kind != FrameKind::Heartbeat) return f;
    }
  }

 private:
  static void* tag(intptr_t i) { return reinterpret_cast<void*>(i); }
  bool wait(intptr_t want) {
    void* t;
    bool ok = false;
    while (cq_.Next(&t, &ok))
      if (t == tag(want)) return ok;
    return false;
  }
  std::shared_ptr<grpc::Channel> channel_;
  std::unique_ptr<grpc::GenericStub> stub_;
  grpc::ClientContext ctx_;
  grpc::CompletionQueue cq_;
  std::unique_ptr<grpc::GenericClientAsyncReaderWriter> call_;
};

FrameHeader header(FrameKind kind, const std::string& site = "") {
  FrameHeader h;
  h.kind = kind;
  h.site = site;
  return h;
}

}  // namespace

TEST(NetTransport, RegisteringUnderAnotherSitesNameIsRefused) {
  LogCapture log;
  GrpcServerChannel server(server_opts());
  RawClient c(server.port(), "site-b");  // holds site-b's certificate
  ASSERT_TRUE(c.send(encode_frame(header(FrameKind::Register, "site-a"))));
  auto f = c.read();
  ASSERT_TRUE(f);
  EXPECT_EQ(f->kind, FrameKind::Error);
  EXPECT_EQ(f->text, "certificate is for site 'site-b' but it registers as 'site-a'");
  EXPECT_FALSE(c.read());  // and the stream ends
  EXPECT_TRUE(log.contains("registers as 'site-a'"));
  EXPECT_TRUE(server.sites().empty());
}

TEST(NetTransport, MalformedFramesGetAnErrorReplyAndALogLine) {
  LogCapture log;
  GrpcServerChannel server(server_opts());
  {
    RawClient c(server.port(), "site-a");
    ASSERT_TRUE(c.send("\xff\xff\xff\xff garbage"));
    auto f = c.read();
    ASSERT_TRUE(f);
    EXPECT_EQ(f->kind, FrameKind::Error);
    EXPECT_NE(f->text.find("malformed frame"), std::string::npos) << f->text;
    EXPECT_TRUE(log.contains("malformed frame"));
    // Still alive: registering works after it.
    ASSERT_TRUE(c.send(encode_frame(header(FrameKind::Register, "site-a"))));
    f = c.read_non_heartbeat();
    ASSERT_TRUE(f);
    EXPECT_EQ(f->kind, FrameKind::Welcome);
    ASSERT_TRUE(server.wait_for_sites({"site-a"}, 10).empty());
    // A reply to a call never made.
    FrameHeader r = header(FrameKind::Reply);
    r.call_id = 12345;
    r.total_size = 4;
    r.chunk_count = 1;
    ASSERT_TRUE(c.send(encode_frame(r, "abcd", 4)));
    f = c.read_non_heartbeat();
    ASSERT_TRUE(f);
    EXPECT_EQ(f->kind, FrameKind::Error);
    EXPECT_EQ(f->text, "reply to unknown call 12345");
    // A chunk running past its declared payload.
    r.total_size = 2;
    ASSERT_TRUE(c.send(encode_frame(r, "abcd", 4)));
    f = c.read_non_heartbeat();
    ASSERT_TRUE(f);
    EXPECT_NE(f->text.find("runs past the payload's 2 bytes"), std::string::npos) << f->text;
  }
  {
    // A first frame that is not a registration ends the stream.
    RawClient c(server.port(), "site-a");
    ASSERT_TRUE(c.send(encode_frame(header(FrameKind::Heartbeat))));
    auto f = c.read();
    ASSERT_TRUE(f);
    EXPECT_EQ(f->text, "first frame must be 'register', got 'heartbeat'");
  }
}

TEST(NetTransport, MalformedReplyFailsTheCallNamingTheSite) {
  GrpcServerChannel server(server_opts());
  RawClient c(server.port(), "site-a");
  ASSERT_TRUE(c.send(encode_frame(header(FrameKind::Register, "site-a"))));
  ASSERT_TRUE(server.wait_for_sites({"site-a"}, 10).empty());
  std::string error;
  std::thread caller(
      [&] { error = site_error_of([&] { server.call("site-a", message_of(10, 1)); }); });
  std::optional<FrameHeader> req;
  while ((req = c.read()) && req->kind != FrameKind::Request) {
  }
  ASSERT_TRUE(req);
  // Declares 2^60 bytes: refused before anything is allocated.
  FrameHeader r = header(FrameKind::Reply);
  r.call_id = req->call_id;
  r.total_size = uint64_t(1) << 60;
  r.chunk_count = 2;
  ASSERT_TRUE(c.send(encode_frame(r, "abcd", 4)));
  caller.join();
  EXPECT_NE(error.find("site 'site-a': sent a malformed reply"), std::string::npos) << error;
  EXPECT_NE(error.find("over the limit"), std::string::npos) << error;
}

// A data-link connection opened as a site would, with `cert`'s files.
std::shared_ptr<detail::DataSocket> data_connect(int port, const std::string& cert) {
  auto tls = detail::TlsContext::client(pki().path("ca.pem"), pki().path(cert + ".pem"),
                                        pki().path(cert + ".key"));
  return detail::DataSocket::connect("localhost", port, tls, 5);
}

// The data link admits only the registered site itself, with its WELCOME's token, once per
// direction; a reply declaring more than the limit fails the call by the site's name, before any
// allocation, and the site's connection is dropped.
TEST(NetTransport, DataLinkRefusesStrangersAndOversizedReplies) {
  LogCapture log;
  GrpcServerChannel server(server_opts());
  ASSERT_GT(server.data_port(), 0);
  RawClient c(server.port(), "site-a");
  ASSERT_TRUE(c.send(encode_frame(header(FrameKind::Register, "site-a"))));
  auto w = c.read_non_heartbeat();
  ASSERT_TRUE(w);
  ASSERT_EQ(w->kind, FrameKind::Welcome);
  EXPECT_EQ(int(w->data_port), server.data_port());
  ASSERT_EQ(w->data_token.size(), kDataTokenBytes);
  const int port = int(w->data_port);
  const std::string token = w->data_token;

  EXPECT_EQ(data_connect(port, "site-a")->hello(DataKind::HelloDown, std::string(32, 'x')),
            "unknown data-link token (its site's connection has ended)");
  EXPECT_EQ(data_connect(port, "site-b")->hello(DataKind::HelloDown, token),
            "certificate is for site 'site-b' but the token is site 'site-a''s");
  EXPECT_NE(data_connect(port, "revoked")->hello(DataKind::HelloUp, token).find("revoked"),
            std::string::npos);
  EXPECT_NE(data_connect(port, "site-a-other-ca")
                ->hello(DataKind::HelloUp, token)
                .find("not signed by this project's CA"),
            std::string::npos);
  {
    auto s = data_connect(port, "site-a");
    s->send_header({DataKind::Request, 7, 0});
    DataHeader h;
    ASSERT_TRUE(s->read_header(h, 0));
    EXPECT_EQ(h.kind, DataKind::Refuse);
  }
  EXPECT_TRUE(log.contains("refused a data-link connection"));
  EXPECT_TRUE(server.data_link_sites().empty());

  auto down = data_connect(port, "site-a");
  EXPECT_EQ(down->hello(DataKind::HelloDown, token), "");
  auto up = data_connect(port, "site-a");
  EXPECT_EQ(up->hello(DataKind::HelloUp, token), "");
  EXPECT_EQ(data_connect(port, "site-a")->hello(DataKind::HelloDown, token),
            "site 'site-a' already has its request connection");
  EXPECT_TRUE(data_links_become(server, {"site-a"}));

  // The request arrives on the data link, bit-exact.
  const Bytes req = message_of(1000, 2);
  std::string error;
  std::thread caller([&] { error = site_error_of([&] { server.call("site-a", req); }); });
  DataHeader h;
  ASSERT_TRUE(down->read_header(h, size_t(1) << 30));
  EXPECT_EQ(h.kind, DataKind::Request);
  ASSERT_EQ(h.size, req->size());
  std::vector<uint8_t> got(size_t(h.size));
  down->read_exact(got.data(), got.size());
  EXPECT_EQ(std::memcmp(got.data(), req->data(), got.size()), 0);
  // A reply that declares 2^60 bytes.
  up->send_header({DataKind::Reply, h.call_id, uint64_t(1) << 60});
  caller.join();
  EXPECT_NE(error.find("site 'site-a': data link: "), std::string::npos) << error;
  EXPECT_NE(error.find("over the limit"), std::string::npos) << error;
  EXPECT_TRUE(log.contains("site 'site-a': data link (replies)"));
  // The site is told why, and its stream ends.
  std::string told;
  while (auto f = c.read_non_heartbeat())
    if (f->kind == FrameKind::Error) told = f->text;
  EXPECT_NE(told.find("data link: data-link reply of"), std::string::npos) << told;
  for (int i = 0; i < 500 && !server.sites().empty(); ++i)  // the server's end closes too
    std::this_thread::sleep_for(std::chrono::milliseconds(10));
  EXPECT_TRUE(server.sites().empty());
}

// A site whose data link reads, but slower than the slowest link accepted (min_throughput_mb_s),
// is given up at the call's deadline even while the request is still being written, and its
// connection is dropped.
TEST(NetTransport, DataLinkGivesUpOnASiteTooSlowToRead) {
  ServerOptions so = server_opts();
  so.call_base_seconds = 0.5;
  so.min_throughput_mb_s = 1000;  // the deadline: 0.5 s + 20 MB at 1 GB/s = 0.52 s
  GrpcServerChannel server(so);
  RawClient c(server.port(), "site-a");
  ASSERT_TRUE(c.send(encode_frame(header(FrameKind::Register, "site-a"))));
  auto w = c.read_non_heartbeat();
  ASSERT_TRUE(w && w->kind == FrameKind::Welcome);
  auto down = data_connect(int(w->data_port), "site-a");
  ASSERT_EQ(down->hello(DataKind::HelloDown, w->data_token), "");
  auto up = data_connect(int(w->data_port), "site-a");
  ASSERT_EQ(up->hello(DataKind::HelloUp, w->data_token), "");
  ASSERT_TRUE(data_links_become(server, {"site-a"}));
  std::atomic<bool> stop{false};
  std::thread slow([&] {  // about 3 MB/s
    std::vector<uint8_t> piece(64 << 10);
    try {
      while (!stop) {
        down->read_exact(piece.data(), piece.size());
        std::this_thread::sleep_for(std::chrono::milliseconds(20));
      }
    } catch (const Error&) {  // the server ended the connection
    }
  });
  // 20 MB: at 3 MB/s the whole request would take 7 s; the error must come from the deadline,
  // while writing (not from the 10 s stall limit, nor "no reply" after the write).
  const std::string e = site_error_of([&] { server.call("site-a", message_of(5u << 20, 9)); });
  stop = true;
  down->shutdown();
  slow.join();
  EXPECT_NE(e.find("site 'site-a': disconnected during the call (data link: request of"),
            std::string::npos)
      << e;
  EXPECT_NE(e.find("bytes not sent within"), std::string::npos) << e;
}

// ---- kits ---------------------------------------------------------------------------------

TEST(NetKits, ProvisionConnectTamperRevokeAddSite) {
  TempDir d;
  write(d.str() + "/project.yaml",
        "project: demo\nserver: {hosts: [localhost, 127.0.0.1], port: 7443}\n"
        "sites: [site-a, site-b]\nvalidity_days: 30\n");
  ProjectSpec p = load_project(d.str() + "/project.yaml");
  const std::string kits = d.str() + "/kits";
  ProvisionResult r = provision(p, kits);
  EXPECT_EQ(r.kits.size(), 3u);
  Kit server_kit = load_kit(kits + "/server");
  Kit a = load_kit(kits + "/site-a");
  EXPECT_EQ(a.name, "site-a");
  EXPECT_EQ(a.server, "localhost:7443");
  EXPECT_EQ(a.ca_fingerprint, r.ca_fingerprint);
  EXPECT_EQ(std::filesystem::status(a.key).permissions() & std::filesystem::perms::all,
            std::filesystem::perms::owner_read | std::filesystem::perms::owner_write);
  CertInfo ci = certificate_info(slurp(a.cert));
  EXPECT_NEAR(double(ci.not_after - ci.not_before), 30 * 86400.0, 10);

  // A connection made from the kits.
  ServerOptions so = server_options(server_kit, {"site-a", "site-b", "site-c"});
  so.listen = "127.0.0.1:0";
  so.heartbeat_seconds = 0.3;
  GrpcServerChannel server(so);
  auto dial = [&](const Kit& k) {
    SiteClientOptions o = site_options(k);
    o.server = "localhost:" + std::to_string(server.port());
    o.heartbeat_seconds = 0.3;
    o.max_attempts = 3;
    o.backoff_initial_seconds = 0.05;
    return o;
  };
  {
    SiteThread sa(dial(a), echo);
    ASSERT_TRUE(server.wait_for_sites({"site-a"}, 20).empty());
    Bytes req = message_of(100, 1);
    EXPECT_TRUE(same_bytes(server.call("site-a", req), req));
  }

  // Tampering: any changed file is named.
  for (const char* file : {"server.txt", "ca.pem", "cert.pem"}) {
    TempDir t;
    std::filesystem::copy(kits + "/site-b", t.str() + "/kit");
    std::ofstream(t.str() + "/kit/" + file, std::ios::app) << "\n# changed\n";
    std::string e = testkit::error_of([&] { load_kit(t.str() + "/kit"); });
    EXPECT_NE(e.find(std::string("/kit/") + file + ": does not match the kit's signed manifest"),
              std::string::npos)
        << e;
  }
  {
    // A manifest edited by hand no longer matches its signature.
    TempDir t;
    std::filesystem::copy(kits + "/site-b", t.str() + "/kit");
    std::ofstream(t.str() + "/kit/manifest.json", std::ios::app) << " ";
    std::string e = testkit::error_of([&] { load_kit(t.str() + "/kit"); });
    EXPECT_NE(e.find("manifest.json: signature does not match"), std::string::npos) << e;
  }
  {
    TempDir t;
    std::filesystem::copy(kits + "/site-b", t.str() + "/kit");
    std::filesystem::permissions(t.str() + "/kit/key.pem", std::filesystem::perms::others_read,
                                 std::filesystem::perm_options::add);
    EXPECT_NE(
        testkit::error_of([&] { load_kit(t.str() + "/kit"); }).find("readable by other users"),
        std::string::npos);
  }

  // Revoking site-a: the running server re-reads its revocation list.
  revoke_site(kits, "site-a");
  EXPECT_NO_THROW(load_kit(kits + "/server"));  // re-signed with the new list
  std::string e = testkit::error_of([&] { run_site_client(dial(a), echo); });
  EXPECT_NE(e.find("was revoked"), std::string::npos) << e;

  // A site added later connects.
  std::string c_dir = add_site(kits, "site-c");
  Kit c = load_kit(c_dir);
  SiteThread sc(dial(c), echo);
  ASSERT_TRUE(server.wait_for_sites({"site-c"}, 20).empty());
  EXPECT_NE(testkit::error_of([&] { add_site(kits, "site-c"); }).find("already has a kit"),
            std::string::npos);
  // Rotation: after revoking, the same name gets a new certificate (new serial) that connects.
  const uint64_t old_serial = certificate_info(slurp(a.cert)).serial;
  std::filesystem::rename(kits + "/site-a", d.str() + "/old-site-a");
  Kit a2 = load_kit(add_site(kits, "site-a"));
  EXPECT_NE(certificate_info(slurp(a2.cert)).serial, old_serial);
  SiteThread sa2(dial(a2), echo);
  ASSERT_TRUE(server.wait_for_sites({"site-a"}, 20).empty());
  EXPECT_NE(testkit::error_of([&] { provision(p, kits); }).find("not empty"), std::string::npos);
}

TEST(NetKits, ProjectFileErrorsNameTheLine) {
  TempDir d;
  write(d.str() + "/p.yaml", "project: demo\nserver: {hosts: [h]}\nsites: [a, 'b c']\n");
  EXPECT_NE(testkit::error_of([&] { load_project(d.str() + "/p.yaml"); }).find("p.yaml:3"),
            std::string::npos);
  write(d.str() + "/p.yaml", "project: demo\nserver: {hosts: [h]}\nsites: [a]\nkey: dsa\n");
  EXPECT_NE(testkit::error_of([&] { load_project(d.str() + "/p.yaml"); }).find("p.yaml:4"),
            std::string::npos);
  write(d.str() + "/p.yaml", "project: demo\nserver: {hosts: [h]}\nsites: [a]\nsite: [b]\n");
  EXPECT_NE(
      testkit::error_of([&] { load_project(d.str() + "/p.yaml"); }).find("unknown key 'site'"),
      std::string::npos);
}

// The Coordinator asks sites over the network in parallel, at most max_parallel_calls at once,
// and takes the replies in site order. Each site's handler waits (up to 10 s) until `want`
// calls are in flight: with sequential calls the most ever in flight would be 1.
TEST(NetTransport, CoordinatorCallsSitesInParallelUpToTheLimit) {
  for (const size_t limit : {size_t(2), size_t(3)}) {
    ServerOptions so = server_opts({"site-a", "site-b", "site-c"});
    so.max_parallel_calls = limit;
    GrpcServerChannel server(so);
    std::atomic<int> in_flight{0}, most{0};
    auto handler = [&](const std::string& site) {
      return [&, site](const Bytes& b) {
        const int now = ++in_flight;
        for (int seen = most.load(); now > seen && !most.compare_exchange_weak(seen, now);) {
        }
        const auto until = std::chrono::steady_clock::now() + std::chrono::seconds(10);
        while (most.load() < int(limit) && std::chrono::steady_clock::now() < until)
          std::this_thread::sleep_for(std::chrono::milliseconds(5));
        --in_flight;
        const Message m = decode(b);
        Message r = protocol::metrics(site, m.round, protocol::kPhaseGlobal, 4,
                                      {{"accuracy", double(site.back() - 'a') / 10}});
        return encode(r);
      };
    };
    std::vector<std::unique_ptr<SiteThread>> sites;
    const std::vector<std::string> names = {"site-a", "site-b", "site-c"};
    for (const auto& n : names)
      sites.push_back(std::make_unique<SiteThread>(site_opts(server.port(), n), handler(n)));
    ASSERT_TRUE(server.wait_for_sites(names, 20).empty());
    EXPECT_EQ(server.max_concurrent_calls(), limit);
    Coordinator coordinator(server, 1);
    Coordinator::Failures failures;
    const auto metrics = coordinator.evaluate(1, protocol::kPhaseGlobal, names, failures);
    EXPECT_TRUE(failures.empty());
    EXPECT_EQ(most.load(), int(limit)) << "calls in flight at once, limit " << limit;
    ASSERT_EQ(metrics.size(), names.size());
    for (size_t i = 0; i < names.size(); ++i)
      EXPECT_DOUBLE_EQ(metrics.at(names[i]).at("accuracy"), double(i) / 10);
    server.shutdown("test over");
  }
}
