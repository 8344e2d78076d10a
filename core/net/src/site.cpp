// run_site_client: a site's end of the network. Connects out to the server, registers, answers
// requests with the site's handler, heartbeats, reconnects with jittered exponential backoff.
#include <concord/net/pki.h>
#include <concord/net/transport.h>
#include <concord/seed.h>

#include "data_link.h"
#include "framed_stream.h"
#include "net_common.h"

#include <grpcpp/generic/generic_stub.h>

#include <condition_variable>
#include <csignal>
#include <map>
#include <thread>

namespace concord::net {

bool is_loopback_address(const std::string& host_port) {
  std::string host = host_port;
  if (!host.empty() && host[0] == '[') {
    host = host.substr(1, host.find(']') - 1);
  } else if (auto c = host.rfind(':'); c != std::string::npos && host.find(':') == c) {
    host = host.substr(0, c);
  }
  return host == "localhost" || host == "::1" || host.rfind("127.", 0) == 0;
}

std::string read_text(const std::string& file) {
  Bytes b = read_file(file, size_t(1) << 20);
  return std::string(reinterpret_cast<const char*>(b->data()), b->size());
}

namespace {

std::atomic<bool> g_stop_signal{false};
extern "C" void on_stop_signal(int) {
  g_stop_signal = true;
}

using ClientReactor = grpc::ClientBidiReactor<grpc::ByteBuffer, grpc::ByteBuffer>;

class SiteConnection;

struct Work {
  std::shared_ptr<SiteConnection> conn;
  uint64_t call_id = 0;
  Bytes request;
  bool welcome = false;  // not a request: the server's WELCOME info for on_welcome
  std::string info;
};

// Requests are answered one at a time, in order, on one thread: a site's state is not shared.
class Worker {
 public:
  Worker(SiteHandler handler, std::function<void(const std::string&)> on_welcome, std::string site)
      : handler_(std::move(handler)), on_welcome_(std::move(on_welcome)), site_(std::move(site)) {
    thread_ = std::thread([this] { loop(); });
  }
  ~Worker() {
    {
      std::lock_guard<std::mutex> lock(mu_);
      stop_ = true;
    }
    cv_.notify_all();
    thread_.join();
  }
  void push(Work w) {
    {
      std::lock_guard<std::mutex> lock(mu_);
      queue_.push_back(std::move(w));
    }
    cv_.notify_all();
  }

 private:
  void loop();
  SiteHandler handler_;
  std::function<void(const std::string&)> on_welcome_;
  std::string site_;
  std::mutex mu_;
  std::condition_variable cv_;
  std::deque<Work> queue_;
  bool stop_ = false;
  std::thread thread_;
};

class SiteConnection : public detail::FramedStream<ClientReactor>,
                       public std::enable_shared_from_this<SiteConnection> {
 public:
  // data_host: where the data link is (the server's host); data_link false: never open it.
  SiteConnection(const SiteClientOptions& opt, size_t max_bytes, Worker& worker, bool data_link,
                 std::string data_host, std::shared_ptr<detail::TlsContext> data_tls)
      : FramedStream(opt.chunk_bytes),
        opt_(opt),
        max_bytes_(max_bytes),
        worker_(worker),
        data_link_(data_link),
        data_host_(std::move(data_host)),
        data_tls_(std::move(data_tls)) {}

  void start(grpc::GenericStub& stub) {
    stub.PrepareBidiStreamingCall(&ctx_, kConnectMethod, grpc::StubOptions(), this);
    AddHold();  // OnDone waits for release(): no write can start after the stream is done
    FrameHeader r;
    r.kind = FrameKind::Register;
    r.site = opt_.site;
    r.text = kSoftware;
    r.info = opt_.info;
    send_control(std::move(r));
    start_reading();
    StartCall();
  }

  // Waits for the stream to end; returns false when `ms` passed first.
  bool wait_done(int64_t ms) {
    std::unique_lock<std::mutex> lock(done_mu_);
    return done_cv_.wait_for(lock, std::chrono::milliseconds(ms), [&] { return done_; });
  }
  void cancel() { ctx_.TryCancel(); }
  void heartbeat() {
    FrameHeader h;
    h.kind = FrameKind::Heartbeat;
    send_control(std::move(h));
  }

  // The data link (data_link.h), when the WELCOME offered one: opened on a thread of its own,
  // which then reads the requests; replies go on the reply connection once it is open.
  void start_data_link() {
    std::lock_guard<std::mutex> lock(data_mu_);
    if (!data_link_ || data_started_ || data_closing_ || data_port_ == 0) return;
    data_started_ = true;
    data_thread_ = std::thread([this] { data_loop(); });
  }
  // Ends the data link and waits for its thread (before the connection is dropped).
  void close_data() {
    {
      std::lock_guard<std::mutex> lock(data_mu_);
      close_sockets_locked();
    }
    if (data_thread_.joinable()) data_thread_.join();
  }
  // The reply to `call_id`: on the reply connection when open, else as frames on the stream.
  bool send_reply(uint64_t call_id, Bytes reply) {
    std::shared_ptr<detail::DataSocket> up;
    {
      std::lock_guard<std::mutex> lock(data_mu_);
      up = up_;
    }
    if (!up) return send_payload(FrameKind::Reply, call_id, std::move(reply));
    try {
      std::lock_guard<std::mutex> lock(up_write_mu_);
      up->send({DataKind::Reply, call_id, reply->size()}, reply->data(), opt_.chunk_bytes);
      return true;
    } catch (const Error& e) {
      data_failed("replies", e.what());
      return false;
    }
  }

  bool welcomed() const { return welcomed_; }
  bool shutdown_received() const { return shutdown_; }
  int64_t heartbeat_ms() const { return heartbeat_ms_; }
  std::string refusal() const {
    std::lock_guard<std::mutex> lock(done_mu_);
    return refusal_;
  }
  std::string shutdown_reason() const {
    std::lock_guard<std::mutex> lock(done_mu_);
    return shutdown_reason_;
  }
  grpc::Status status() const {
    std::lock_guard<std::mutex> lock(done_mu_);
    return status_;
  }

 protected:
  void on_frame(const Frame& f) override {
    const FrameHeader& h = f.header;
    switch (h.kind) {
      case FrameKind::Welcome:
        if (h.heartbeat_ms > 0) heartbeat_ms_ = h.heartbeat_ms;
        {
          std::lock_guard<std::mutex> lock(data_mu_);
          data_port_ = h.data_port;
          data_token_ = h.data_token;
        }
        start_data_link();
        welcomed_ = true;
        spdlog::info("site '{}': registered with the server ({})", opt_.site, h.text);
        // Before any request of this connection, in the handler's thread.
        worker_.push({shared_from_this(), 0, nullptr, true, h.info});
        break;
      case FrameKind::Request:
        on_request(f);
        break;
      case FrameKind::Error:
        if (!welcomed_) {
          std::lock_guard<std::mutex> lock(done_mu_);
          refusal_ = h.text;
        }
        spdlog::warn("site '{}': the server reports: {}", opt_.site, h.text);
        break;
      case FrameKind::Heartbeat:
        break;
      case FrameKind::Shutdown: {
        {
          std::lock_guard<std::mutex> lock(done_mu_);
          shutdown_reason_ = h.text;
        }
        shutdown_ = true;
        spdlog::info("site '{}': the server ends the run: {}", opt_.site, h.text);
        {
          std::lock_guard<std::mutex> lock(mu_);
          writes_done_ = true;
        }
        pump();
        break;
      }
      default: {
        FrameHeader e;
        e.kind = FrameKind::Error;
        e.text = std::string("unexpected '") + kind_name(h.kind) + "' frame";
        send_control(std::move(e));
      }
    }
  }

  void on_request(const Frame& f) {
    const uint64_t id = f.header.call_id;
    auto it = inbound_.find(id);
    try {
      if (it == inbound_.end()) {
        // A server sends one request at a time per site; a few in flight are tolerated.
        if (inbound_.size() >= 8) throw Error("more than 8 requests in flight");
        it = inbound_.emplace(id, PayloadAssembler(max_bytes_)).first;
      }
      if (it->second.add(f)) {
        Bytes request = it->second.take();
        inbound_.erase(it);
        worker_.push({shared_from_this(), id, std::move(request), false, {}});
      }
    } catch (const Error& e) {
      if (it != inbound_.end()) inbound_.erase(it);
      spdlog::warn("site '{}': malformed request {}: {}", opt_.site, id, e.what());
      FrameHeader err;
      err.kind = FrameKind::Error;
      err.call_id = id;
      err.text = std::string("malformed request: ") + e.what();
      send_control(std::move(err));
    }
  }

  void on_bad_frame(const std::string& why) override {
    spdlog::warn("site '{}': malformed frame from the server: {}", opt_.site, why);
    FramedStream::on_bad_frame(why);
  }

  void on_read_end() override { release(); }

  Action on_drained_locked() override {
    if (!writes_done_ || closed_) return Action::None;
    closed_ = true;
    return Action::WritesDone;
  }
  void do_writes_done() override { StartWritesDone(); }

  void OnDone(const grpc::Status& s) override {
    std::lock_guard<std::mutex> lock(done_mu_);
    status_ = s;
    done_ = true;
    done_cv_.notify_all();
  }

 private:
  // Opens the request and reply connections (each: TLS handshake, hello with the token, the
  // server's accept), then reads requests until the link ends.
  void data_loop() {
    const std::string& host = data_host_;
    const auto& tls = data_tls_;
    int port;
    std::string token;
    {
      std::lock_guard<std::mutex> lock(data_mu_);
      port = int(data_port_);
      token = data_token_;
    }
    const std::string where = host + ":" + std::to_string(port);
    auto open = [&](DataKind hello) {
      std::shared_ptr<detail::DataSocket> sock = detail::DataSocket::connect(host, port, tls, 10);
      {
        std::lock_guard<std::mutex> lock(data_mu_);
        if (data_closing_) throw Error("closing");
        opening_ = sock;  // close_data() can interrupt the hello
      }
      sock->set_stall_timeout(10);
      if (std::string why = sock->hello(hello, token); !why.empty())
        throw Error("the server refused it: " + why);
      std::lock_guard<std::mutex> lock(data_mu_);
      opening_.reset();
      if (data_closing_) throw Error("closing");
      // Published only now: send_reply() may write on the reply connection from here on.
      (hello == DataKind::HelloDown ? down_ : up_) = sock;
      return sock;
    };
    std::shared_ptr<detail::DataSocket> down;
    try {
      down = open(DataKind::HelloDown);
    } catch (const Error& e) {
      std::lock_guard<std::mutex> lock(data_mu_);
      opening_.reset();
      if (!data_closing_)
        spdlog::warn("site '{}': no data link to {} ({}): payloads go over the gRPC stream",
                     opt_.site, where, e.what());
      return;
    }
    try {
      auto up = open(DataKind::HelloUp);
      up->set_stall_timeout(detail::stall_seconds(heartbeat_ms_ / 1e3));
      spdlog::info("site '{}': data link to {} open ({})", opt_.site, where,
                   tls ? "mutual TLS" : "INSECURE");
    } catch (const Error& e) {
      std::lock_guard<std::mutex> lock(data_mu_);
      opening_.reset();
      if (data_closing_) return;
      spdlog::warn(
          "site '{}': data link to {}: no reply connection ({}): replies go over the gRPC "
          "stream",
          opt_.site, where, e.what());
    }
    down->set_stall_timeout(0);  // idle between requests
    try {
      for (;;) {
        DataHeader h;
        if (!down->read_header(h, max_bytes_)) {
          // The server closed it between requests (its stream says why): replies go on the
          // stream from now on.
          std::lock_guard<std::mutex> lock(data_mu_);
          if (up_) up_->shutdown();
          up_.reset();
          return;
        }
        if (h.kind != DataKind::Request)
          throw Error(std::string("unexpected data-link '") + data_kind_name(h.kind) + "'");
        auto request = std::make_shared<Buffer>(size_t(h.size), Buffer::ForOverwrite{});
        down->set_stall_timeout(detail::stall_seconds(heartbeat_ms_ / 1e3));
        down->read_exact(request->data(), request->size());
        down->set_stall_timeout(0);
        worker_.push({shared_from_this(), h.call_id, std::move(request), false, {}});
      }
    } catch (const Error& e) {
      data_failed("requests", e.what());
    }
  }

  // A broken data link (not one being closed): the whole connection starts again.
  void data_failed(const char* what, const std::string& why) {
    {
      std::lock_guard<std::mutex> lock(data_mu_);
      if (data_closing_) return;
      close_sockets_locked();
    }
    spdlog::warn("site '{}': data link ({}): {}: reconnecting", opt_.site, what, why);
    cancel();
  }

  // No further data-link connection; the open ones end now (a blocked reader or writer wakes).
  void close_sockets_locked() {
    data_closing_ = true;
    for (auto* s : {&opening_, &down_, &up_})
      if (*s) (*s)->shutdown();
  }

  void release() {
    {
      std::lock_guard<std::mutex> lock(mu_);
      closed_ = true;
      if (released_) return;
      released_ = true;
    }
    RemoveHold();
  }

  const SiteClientOptions& opt_;
  size_t max_bytes_;
  Worker& worker_;
  grpc::ClientContext ctx_;
  std::map<uint64_t, PayloadAssembler> inbound_;  // reactor thread only
  std::atomic<bool> welcomed_{false}, shutdown_{false};
  std::atomic<int64_t> heartbeat_ms_{0};
  bool writes_done_ = false, released_ = false;
  mutable std::mutex done_mu_;
  std::condition_variable done_cv_;
  bool done_ = false;
  grpc::Status status_;
  std::string refusal_, shutdown_reason_;
  const bool data_link_;
  const std::string data_host_;
  const std::shared_ptr<detail::TlsContext> data_tls_;
  std::mutex data_mu_, up_write_mu_;
  uint32_t data_port_ = 0;
  std::string data_token_;
  std::shared_ptr<detail::DataSocket> down_, up_, opening_;
  bool data_started_ = false, data_closing_ = false;
  std::thread data_thread_;
};

void Worker::loop() {
  for (;;) {
    Work w;
    {
      std::unique_lock<std::mutex> lock(mu_);
      cv_.wait(lock, [&] { return stop_ || !queue_.empty(); });
      if (stop_) return;  // requests still queued belong to a closed connection
      w = std::move(queue_.front());
      queue_.pop_front();
    }
    if (w.welcome) {
      try {
        if (on_welcome_) on_welcome_(w.info);
      } catch (const std::exception& e) {
        spdlog::error("site '{}': {}", site_, e.what());
      }
      continue;
    }
    Bytes reply;
    std::string error;
    try {
      reply = handler_(w.request);
      if (!reply) error = "the site's handler returned no reply";
    } catch (const std::exception& e) {
      error = e.what();
    }
    w.request.reset();
    if (!error.empty()) {
      spdlog::warn("site '{}': request {} failed: {}", site_, w.call_id, error);
      FrameHeader e;
      e.kind = FrameKind::Error;
      e.call_id = w.call_id;
      e.text = error;
      w.conn->send_control(std::move(e));
    } else if (!w.conn->send_reply(w.call_id, std::move(reply))) {
      spdlog::warn("site '{}': connection lost before the reply to request {} was sent", site_,
                   w.call_id);
    }
  }
}

std::shared_ptr<grpc::ChannelCredentials> credentials(const SiteClientOptions& o) {
  if (o.insecure) {
    if (!is_loopback_address(o.server))
      throw Error("--insecure connects to loopback servers only, not '" + o.server + "'");
    spdlog::warn("INSECURE: site '{}' talks to {} without TLS (development on this machine only)",
                 o.site, o.server);
    return grpc::InsecureChannelCredentials();
  }
  grpc::SslCredentialsOptions ssl;
  ssl.pem_root_certs = read_text(o.ca_cert);
  ssl.pem_cert_chain = read_text(o.cert);
  ssl.pem_private_key = read_text(o.key);
  const CertInfo info = certificate_info(ssl.pem_cert_chain);
  if (info.common_name != o.site)
    throw Error("certificate " + o.cert + " is for site '" + info.common_name + "', not '" +
                o.site + "'");
  if (!key_matches_certificate(ssl.pem_private_key, ssl.pem_cert_chain))
    throw Error("key " + o.key + " does not belong to certificate " + o.cert);
  return grpc::SslCredentials(ssl);
}

bool stop_requested(const SiteClientOptions& o) {
  return o.stop && o.stop->load();
}

}  // namespace

const std::atomic<bool>* stop_flag_on_signals() {
  static bool installed = [] {
    struct sigaction sa {};
    sa.sa_handler = on_stop_signal;
    sigemptyset(&sa.sa_mask);
    sigaction(SIGINT, &sa, nullptr);
    sigaction(SIGTERM, &sa, nullptr);
    return true;
  }();
  (void)installed;
  return &g_stop_signal;
}

SiteExit run_site_client(const SiteClientOptions& options, SiteHandler handler) {
  SiteClientOptions o = options;
  if (o.chunk_bytes == 0) o.chunk_bytes = chunk_bytes_from_env();
  check_chunk_bytes(o.chunk_bytes);
  if (o.site.empty()) throw Error("site: no site name");
  if (o.heartbeat_seconds <= 0) throw Error("site: heartbeat interval must be > 0");
  const size_t max_bytes = o.max_message_bytes ? o.max_message_bytes : max_message_bytes();
  auto creds = credentials(o);
  grpc::ChannelArguments args;
  args.SetMaxReceiveMessageSize(int(kMaxFrameBytes));
  args.SetMaxSendMessageSize(int(kMaxFrameBytes));
  for (const auto& [k, v] : transport_args()) args.SetInt(k, v);
  args.SetInt(GRPC_ARG_USE_LOCAL_SUBCHANNEL_POOL, 1);

  // The data link's TLS context, from the same kit files as the stream's.
  std::shared_ptr<detail::TlsContext> data_tls;
  const bool data_link = o.data_link && detail::data_link_enabled_by_env();
  const std::string data_host = detail::split_host_port(o.server).first;
  if (data_link && !o.insecure) data_tls = detail::TlsContext::client(o.ca_cert, o.cert, o.key);

  SeededRandom rng(derive_seed(o.seed, "reconnect/" + o.site));
  Worker worker(std::move(handler), o.on_welcome, o.site);
  int failures = 0;
  for (;;) {
    if (stop_requested(o)) return SiteExit::Stopped;
    // A fresh channel per attempt: a new TCP + TLS connection, no state from the broken one.
    auto channel = grpc::CreateCustomChannel(o.server, creds, args);
    grpc::GenericStub stub(channel);
    auto conn =
        std::make_shared<SiteConnection>(o, max_bytes, worker, data_link, data_host, data_tls);
    conn->start(stub);
    int64_t hb_ms = int64_t(o.heartbeat_seconds * 1000);
    int64_t last_hb = detail::now_ms();
    bool cancelled = false;
    while (!conn->wait_done(std::min<int64_t>(hb_ms, 200))) {
      if (conn->heartbeat_ms() > 0) hb_ms = conn->heartbeat_ms();
      const int64_t now = detail::now_ms();
      if (cancelled) continue;
      if (stop_requested(o)) {
        spdlog::info("site '{}': stopping", o.site);
        conn->cancel();
        cancelled = true;
      } else if (conn->welcomed() && now - conn->last_received_ms() > 3 * hb_ms) {
        spdlog::warn("site '{}': nothing from the server for {:.1f} s: reconnecting", o.site,
                     (now - conn->last_received_ms()) / 1e3);
        conn->cancel();
        cancelled = true;
      } else if (now - last_hb >= hb_ms) {
        conn->heartbeat();
        last_hb = now;
      }
    }
    conn->close_data();
    if (conn->shutdown_received()) return SiteExit::Shutdown;
    if (stop_requested(o)) return SiteExit::Stopped;
    const grpc::Status st = conn->status();
    const std::string refusal = conn->refusal();
    if (!conn->welcomed() && st.error_code() == grpc::StatusCode::PERMISSION_DENIED)
      throw Error("server " + o.server + " refused site '" + o.site +
                  "': " + (refusal.empty() ? st.error_message() : refusal));
    if (conn->welcomed()) {
      failures = 0;
      spdlog::warn("site '{}': connection to {} lost ({}): reconnecting", o.site, o.server,
                   st.error_message().empty() ? "closed" : st.error_message());
    } else {
      std::string why = st.error_message();
      if (why.find("certificate verify failed") != std::string::npos)
        why +=
            " (the server's certificate is not signed by this kit's CA, is not for the host "
            "name dialled, or has expired)";
      spdlog::warn("site '{}': cannot connect to {}: {}", o.site, o.server, why);
      ++failures;
      if (o.max_attempts >= 0 && failures >= o.max_attempts) return SiteExit::GaveUp;
    }
    const int shift = std::min(failures, 30);
    double wait = std::min(o.backoff_max_seconds,
                           o.backoff_initial_seconds * double(1u << std::min(shift, 20)));
    wait *= 0.5 + 0.5 * uniform01(rng);
    const int64_t until = detail::now_ms() + int64_t(wait * 1000);
    while (detail::now_ms() < until) {
      if (stop_requested(o)) return SiteExit::Stopped;
      std::this_thread::sleep_for(
          std::chrono::milliseconds(std::min<int64_t>(50, until - detail::now_ms() + 1)));
    }
  }
}

}  // namespace concord::net
