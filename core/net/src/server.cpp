// GrpcServerChannel: the coordinator's end of the network. Sites connect in; one stream per
// registered site; call() sends a request down the site's stream and waits for its reply.
#include <concord/net/pki.h>
#include <concord/net/transport.h>

#include "data_link.h"
#include "framed_stream.h"
#include "net_common.h"

#include <grpcpp/generic/async_generic_service.h>

#include <condition_variable>
#include <cstdio>
#include <cstdlib>
#include <map>
#include <set>
#include <thread>
#include <tuple>

#include <unistd.h>

namespace concord::net {

namespace {
class ServerStream;
}

struct PendingCall {
  std::string site;
  uint64_t id = 0;
  std::shared_ptr<ServerStream> stream;
  PayloadAssembler reply_parts;
  std::atomic<uint64_t> reply_total{0};
  bool done = false;  // guarded by Impl::mu
  Bytes reply;
  std::string error;
  explicit PendingCall(size_t max_bytes) : reply_parts(max_bytes) {}
};

struct GrpcServerChannel::Impl : grpc::CallbackGenericService {
  ServerOptions opt;
  size_t max_bytes = 0;
  std::unique_ptr<ClientCertificateCheck> check;
  std::mutex check_mu;
  std::unique_ptr<grpc::Server> server;
  int port = 0;

  mutable std::mutex mu;
  std::condition_variable cv;
  std::map<std::string, std::shared_ptr<ServerStream>> registered;
  std::set<std::shared_ptr<ServerStream>> live;
  std::map<uint64_t, std::shared_ptr<PendingCall>> pending;
  std::set<uint64_t> abandoned;  // calls that timed out: their late replies are dropped quietly
  uint64_t next_id = 1;
  bool stopping = false, stopped = false;
  std::thread monitor;

  // The data link (data_link.h): a listener, one thread per accepted connection (a request
  // connection's ends after its hello; a reply connection's reads the replies), the tokens of the
  // registered streams (guarded by mu).
  std::shared_ptr<detail::TlsContext> data_tls;
  std::unique_ptr<detail::DataListener> data_listener;
  std::thread data_accepter;
  std::map<std::string, std::weak_ptr<ServerStream>> data_tokens;
  struct DataThread {
    std::thread thread;
    std::shared_ptr<std::atomic<bool>> done;
  };
  std::mutex data_mu;  // guards data_threads and data_sockets
  std::vector<DataThread> data_threads;
  std::vector<std::weak_ptr<detail::DataSocket>> data_sockets;
  double data_stall_seconds = 10;

  grpc::ServerGenericBidiReactor* CreateReactor(grpc::GenericCallbackServerContext* ctx) override;
  void register_site(const std::shared_ptr<ServerStream>& s, const FrameHeader& h);
  void on_reply(const std::shared_ptr<ServerStream>& s, const Frame& f);
  void on_site_error(const std::shared_ptr<ServerStream>& s, const FrameHeader& h);
  void on_stream_done(const std::shared_ptr<ServerStream>& s, const std::string& why);
  void fail_calls_locked(const std::shared_ptr<ServerStream>& s, const std::string& why);
  void monitor_loop();
  void start_data_link();
  void data_accept_loop();
  void data_connection(int fd);
  void read_replies(const std::shared_ptr<ServerStream>& s, detail::DataSocket& sock);
  void stop_data_link();
};

namespace {

using Impl = GrpcServerChannel::Impl;

class ServerStream : public detail::FramedStream<grpc::ServerGenericBidiReactor>,
                     public std::enable_shared_from_this<ServerStream> {
 public:
  ServerStream(Impl* impl, grpc::GenericCallbackServerContext* ctx)
      : FramedStream(impl->opt.chunk_bytes), impl_(impl), ctx_(ctx), peer_(ctx->peer()) {}

  void start(std::shared_ptr<ServerStream> self) {
    self_ = std::move(self);
    if (ctx_->method() != kConnectMethod) {
      finish(grpc::Status(grpc::StatusCode::UNIMPLEMENTED, "no method " + ctx_->method()));
      return;
    }
    start_reading();
  }

  const std::string& site() const { return site_; }
  const std::string& info() const { return info_; }
  void set_info(std::string info) { info_ = std::move(info); }
  const std::string& peer() const { return peer_; }
  grpc::GenericCallbackServerContext* context() { return ctx_; }
  bool is_registered() const { return registered_; }
  void set_registered(std::string site) {
    site_ = std::move(site);
    registered_ = true;
  }

  // Refuses the peer: an ERROR frame with the reason, then the stream ends with the status.
  void refuse(const std::string& why) {
    spdlog::warn("refused a site connecting from {}: {}", peer_, why);
    FrameHeader e;
    e.kind = FrameKind::Error;
    e.text = why;
    send_control(std::move(e));
    finish(grpc::Status(grpc::StatusCode::PERMISSION_DENIED, why));
  }

  // Ends the stream once the queued frames are written.
  void finish(grpc::Status status) {
    Action a;
    {
      std::lock_guard<std::mutex> lock(mu_);
      if (finishing_) return;
      finishing_ = true;
      status_ = std::move(status);
      payloads_.clear();  // requests still queued cannot be answered any more
      a = next_locked();
    }
    perform(a);
  }

  void cancel() { ctx_->TryCancel(); }

  // The data link of this registration: its token, and its two connections once the site has
  // opened them (each direction once).
  const std::string& data_token() const { return data_token_; }
  void set_data_token(std::string t) { data_token_ = std::move(t); }
  // False when this direction is already attached or the stream has ended.
  bool attach_data(bool down, std::shared_ptr<detail::DataSocket> sock) {
    std::lock_guard<std::mutex> lock(data_mu_);
    auto& slot = down ? down_ : up_;
    if (data_closed_ || slot || (down ? down_used_ : up_used_)) return false;
    (down ? down_used_ : up_used_) = true;
    slot = std::move(sock);
    return true;
  }
  std::shared_ptr<detail::DataSocket> data_down() {
    std::lock_guard<std::mutex> lock(data_mu_);
    return down_;
  }
  bool data_attached() {
    std::lock_guard<std::mutex> lock(data_mu_);
    return down_ && up_;
  }
  std::mutex& request_write_mutex() { return request_write_mu_; }
  bool data_closed() {
    std::lock_guard<std::mutex> lock(data_mu_);
    return data_closed_;
  }
  // Ends both connections (a blocked reader or writer wakes with an error) and refuses new ones.
  void close_data() {
    std::lock_guard<std::mutex> lock(data_mu_);
    data_closed_ = true;
    if (down_) down_->shutdown();
    if (up_) up_->shutdown();
    down_.reset();
    up_.reset();
  }

 protected:
  void on_frame(const Frame& f) override {
    auto self = shared_from_this();
    if (!registered_) {
      if (f.header.kind != FrameKind::Register)
        refuse(std::string("first frame must be 'register', got '") + kind_name(f.header.kind) +
               "'");
      else
        impl_->register_site(self, f.header);
      return;
    }
    switch (f.header.kind) {
      case FrameKind::Reply:
        impl_->on_reply(self, f);
        break;
      case FrameKind::Error:
        impl_->on_site_error(self, f.header);
        break;
      case FrameKind::Heartbeat:
        break;
      default: {
        spdlog::warn("site '{}': unexpected '{}' frame", site_, kind_name(f.header.kind));
        FrameHeader e;
        e.kind = FrameKind::Error;
        e.text = std::string("unexpected '") + kind_name(f.header.kind) + "' frame";
        send_control(std::move(e));
      }
    }
  }
  void on_bad_frame(const std::string& why) override {
    spdlog::warn("site '{}' ({}): malformed frame: {}", registered_ ? site_ : "?", peer_, why);
    FramedStream::on_bad_frame(why);
  }
  void on_read_end() override {
    finish(grpc::Status::OK);
    impl_->on_stream_done(shared_from_this(), "disconnected");
  }
  Action on_drained_locked() override {
    if (!finishing_ || finished_) return Action::None;
    finished_ = true;
    closed_ = true;
    return Action::Finish;
  }
  void do_finish() override { Finish(status_); }
  bool keep_reading() override {
    std::lock_guard<std::mutex> lock(mu_);
    return !finishing_;
  }
  void OnDone() override {
    impl_->on_stream_done(shared_from_this(), "disconnected");
    self_.reset();  // gRPC's reference: the object goes when the last user lets go
  }

 private:
  Impl* impl_;
  grpc::GenericCallbackServerContext* ctx_;
  std::string peer_, site_, info_;
  std::atomic<bool> registered_{false};
  bool finishing_ = false, finished_ = false;
  grpc::Status status_;
  std::shared_ptr<ServerStream> self_;
  std::string data_token_;
  std::mutex data_mu_, request_write_mu_;
  std::shared_ptr<detail::DataSocket> down_, up_;
  bool down_used_ = false, up_used_ = false, data_closed_ = false;
};

}  // namespace

grpc::ServerGenericBidiReactor* Impl::CreateReactor(grpc::GenericCallbackServerContext* ctx) {
  auto s = std::make_shared<ServerStream>(this, ctx);
  {
    std::lock_guard<std::mutex> lock(mu);
    if (!stopping) live.insert(s);
  }
  s->start(s);
  return s.get();
}

void Impl::register_site(const std::shared_ptr<ServerStream>& s, const FrameHeader& h) {
  std::string name = h.site;
  if (!opt.insecure) {
    auto auth = s->context()->auth_context();
    std::string pem;
    if (auth)
      for (const auto& v : auth->FindPropertyValues(GRPC_X509_PEM_CERT_PROPERTY_NAME))
        pem.assign(v.data(), v.size());
    try {
      std::lock_guard<std::mutex> lock(check_mu);
      name = check->verify(pem);
    } catch (const Error& e) {
      s->refuse(e.what());
      return;
    }
    if (h.site != name) {
      s->refuse("certificate is for site '" + name + "' but it registers as '" + h.site + "'");
      return;
    }
  }
  if (std::find(opt.sites.begin(), opt.sites.end(), name) == opt.sites.end()) {
    std::string list;
    for (const auto& n : opt.sites) list += (list.empty() ? "" : ", ") + n;
    s->refuse("site '" + name + "' is not in this federation's site list (" + list + ")");
    return;
  }
  if (opt.admit) {
    std::string why;
    try {
      why = opt.admit(name, h.info);
    } catch (const std::exception& e) {
      why = e.what();
    }
    if (!why.empty()) {
      s->refuse("site '" + name + "': " + why);
      return;
    }
  }
  s->set_info(h.info);
  std::shared_ptr<ServerStream> old;
  {
    std::lock_guard<std::mutex> lock(mu);
    if (stopping) {
      s->refuse("the server is shutting down");
      return;
    }
    auto it = registered.find(name);
    if (it != registered.end()) old = it->second;
    s->set_registered(name);
    registered[name] = s;
    if (data_listener) {
      s->set_data_token(detail::random_token());
      data_tokens[s->data_token()] = s;
    }
    if (old) fail_calls_locked(old, "reconnected during the call (a new connection replaced it)");
  }
  if (old) {
    spdlog::info("site '{}' reconnected from {}: replacing its previous connection", name,
                 s->peer());
    old->cancel();
  } else {
    spdlog::info("site '{}' registered from {}", name, s->peer());
  }
  FrameHeader w;
  w.kind = FrameKind::Welcome;
  w.heartbeat_ms = uint32_t(std::max(1.0, opt.heartbeat_seconds * 1000));
  w.site = name;
  w.text = kSoftware;
  w.info = opt.welcome_info;
  if (data_listener) {
    w.data_port = uint32_t(data_listener->port());
    w.data_token = s->data_token();
  }
  s->send_control(std::move(w));
  cv.notify_all();
}

void Impl::on_reply(const std::shared_ptr<ServerStream>& s, const Frame& f) {
  const uint64_t id = f.header.call_id;
  std::shared_ptr<PendingCall> c;
  {
    std::lock_guard<std::mutex> lock(mu);
    auto it = pending.find(id);
    if (it != pending.end()) c = it->second;
    if (!c || c->done) {
      if (abandoned.count(id) || (c && c->done)) return;  // late reply to a call given up
    }
  }
  // A reply counts only on the stream of the site the call went to: another site's identity
  // cannot answer it.
  if (!c || c->stream != s) {
    spdlog::warn("site '{}': reply to unknown call {}", s->site(), id);
    FrameHeader e;
    e.kind = FrameKind::Error;
    e.call_id = id;
    e.text = "reply to unknown call " + std::to_string(id);
    s->send_control(std::move(e));
    return;
  }
  try {
    const bool complete = c->reply_parts.add(f);
    c->reply_total = c->reply_parts.total();
    if (!complete) return;
    std::lock_guard<std::mutex> lock(mu);
    c->reply = c->reply_parts.take();
    c->done = true;
  } catch (const Error& e) {
    spdlog::warn("site '{}': malformed reply: {}", s->site(), e.what());
    FrameHeader err;
    err.kind = FrameKind::Error;
    err.call_id = id;
    err.text = std::string("malformed reply: ") + e.what();
    s->send_control(std::move(err));
    std::lock_guard<std::mutex> lock(mu);
    if (!c->done) {
      c->done = true;
      c->error = std::string("sent a malformed reply: ") + e.what();
    }
  }
  cv.notify_all();
}

void Impl::on_site_error(const std::shared_ptr<ServerStream>& s, const FrameHeader& h) {
  std::lock_guard<std::mutex> lock(mu);
  auto it = h.call_id ? pending.find(h.call_id) : pending.end();
  if (it != pending.end() && it->second->stream == s && !it->second->done) {
    it->second->done = true;
    it->second->error = h.text;
    cv.notify_all();
    return;
  }
  spdlog::warn("site '{}' reports: {}", s->site(), h.text);
}

void Impl::fail_calls_locked(const std::shared_ptr<ServerStream>& s, const std::string& why) {
  for (auto& [id, c] : pending)
    if (c->stream == s && !c->done) {
      c->done = true;
      c->error = why;
    }
  cv.notify_all();
}

void Impl::on_stream_done(const std::shared_ptr<ServerStream>& s, const std::string& why) {
  s->close_data();
  std::lock_guard<std::mutex> lock(mu);
  if (!s->data_token().empty()) data_tokens.erase(s->data_token());
  if (s->is_registered()) {
    auto it = registered.find(s->site());
    if (it != registered.end() && it->second == s) {
      registered.erase(it);
      spdlog::info("site '{}' {}", s->site(), why);
    }
  }
  fail_calls_locked(s, why + " during the call");
  live.erase(s);
  cv.notify_all();
}

void Impl::monitor_loop() {
  const auto interval = std::chrono::milliseconds(int64_t(opt.heartbeat_seconds * 1000));
  const int64_t dead_ms = int64_t(opt.heartbeat_seconds * 3000);
  std::unique_lock<std::mutex> lock(mu);
  while (!stopped) {
    cv.wait_for(lock, interval);
    if (stopped) break;
    std::vector<std::shared_ptr<ServerStream>> streams;
    for (auto& [name, s] : registered) streams.push_back(s);
    lock.unlock();
    const int64_t now = detail::now_ms();
    for (auto& s : streams) {
      const int64_t silent = now - s->last_received_ms();
      if (silent > dead_ms) {
        spdlog::warn("site '{}': no heartbeat for {:.1f} s: dropping it", s->site(), silent / 1e3);
        {
          std::lock_guard<std::mutex> l(mu);
          fail_calls_locked(s, "sent no heartbeat for " + std::to_string(silent / 1000) + " s");
        }
        s->cancel();
        continue;
      }
      FrameHeader hb;
      hb.kind = FrameKind::Heartbeat;
      s->send_control(std::move(hb));
    }
    lock.lock();
  }
}

GrpcServerChannel::GrpcServerChannel(ServerOptions options) : impl_(std::make_shared<Impl>()) {
  Impl& m = *impl_;
  m.opt = std::move(options);
  if (m.opt.chunk_bytes == 0) m.opt.chunk_bytes = chunk_bytes_from_env();
  check_chunk_bytes(m.opt.chunk_bytes);
  m.max_bytes = m.opt.max_message_bytes ? m.opt.max_message_bytes : max_message_bytes();
  if (m.opt.heartbeat_seconds <= 0) throw Error("server: heartbeat interval must be > 0");
  if (m.opt.max_parallel_calls == 0) {
    m.opt.max_parallel_calls = 8;
    if (const char* v = std::getenv("CONCORD_NET_PARALLEL_SITES")) {
      char* end = nullptr;
      const long n = std::strtol(v, &end, 10);
      if (!*v || *end || n < 1 || n > 1024)
        throw Error(std::string("CONCORD_NET_PARALLEL_SITES='") + v +
                    "': a whole number in [1, 1024]");
      m.opt.max_parallel_calls = size_t(n);
    }
  }
  std::shared_ptr<grpc::ServerCredentials> creds;
  if (m.opt.insecure) {
    if (!is_loopback_address(m.opt.listen))
      throw Error("--insecure listens on loopback addresses only, not '" + m.opt.listen + "'");
    spdlog::warn(
        "INSECURE: no TLS, no site authentication (development on this machine only); every "
        "byte crosses {} in the clear",
        m.opt.listen);
    creds = grpc::InsecureServerCredentials();
  } else {
    m.check = std::make_unique<ClientCertificateCheck>(m.opt.ca_cert, m.opt.crl);
    grpc::SslServerCredentialsOptions ssl(
        GRPC_SSL_REQUEST_AND_REQUIRE_CLIENT_CERTIFICATE_BUT_DONT_VERIFY);
    // The chain is verified after the handshake (ClientCertificateCheck) so that a refused site
    // is told why in an ERROR frame, not by a bare TLS alert. TLS still proves the site holds
    // the certificate's key.
    ssl.pem_root_certs = read_text(m.opt.ca_cert);
    ssl.pem_key_cert_pairs.push_back({read_text(m.opt.server_key), read_text(m.opt.server_cert)});
    creds = grpc::SslServerCredentials(ssl);
  }
  grpc::ServerBuilder builder;
  builder.AddListeningPort(m.opt.listen, creds, &m.port);
  builder.RegisterCallbackGenericService(&m);
  builder.SetMaxReceiveMessageSize(int(kMaxFrameBytes));
  builder.SetMaxSendMessageSize(int(kMaxFrameBytes));
  for (const auto& [k, v] : transport_args()) builder.AddChannelArgument(k, v);
  m.server = builder.BuildAndStart();
  if (!m.server || m.port == 0)
    throw Error("server: cannot listen on '" + m.opt.listen + "' (address in use or invalid?)");
  spdlog::info("server listening on port {} ({})", m.port,
               m.opt.insecure ? "INSECURE" : "mutual TLS");
  m.monitor = std::thread([&m] { m.monitor_loop(); });
  try {
    m.start_data_link();
  } catch (...) {
    shutdown("the data link could not start", false);
    throw;
  }
}

void Impl::start_data_link() {
  if (opt.data_listen == "off" || !detail::data_link_enabled_by_env()) {
    spdlog::info("data link off: payloads go over the gRPC stream");
    return;
  }
  auto [host, port] = detail::split_host_port(opt.listen);
  if (!opt.data_listen.empty()) {
    std::tie(host, port) = detail::split_host_port(opt.data_listen);
  } else if (port != 0) {
    port = port + 1;
    if (port > 65535) throw Error("server: no data-link port after " + opt.listen);
  }
  if (opt.insecure && !is_loopback_address(host))
    throw Error("--insecure listens on loopback addresses only, not '" + host + "'");
  if (!opt.insecure) data_tls = detail::TlsContext::server(opt.server_cert, opt.server_key);
  data_listener = std::make_unique<detail::DataListener>(host, port);
  data_stall_seconds = detail::stall_seconds(opt.heartbeat_seconds);
  spdlog::info("data link listening on port {} ({})", data_listener->port(),
               opt.insecure ? "INSECURE" : "mutual TLS");
  data_accepter = std::thread([this] { data_accept_loop(); });
}

void Impl::data_accept_loop() {
  for (;;) {
    {
      std::lock_guard<std::mutex> lock(mu);
      if (stopping) return;
    }
    const int fd = data_listener->accept(200);
    std::lock_guard<std::mutex> lock(data_mu);
    // Reap the threads of connections that ended.
    for (size_t i = 0; i < data_threads.size();) {
      if (*data_threads[i].done) {
        data_threads[i].thread.join();
        data_threads.erase(data_threads.begin() + long(i));
      } else {
        ++i;
      }
    }
    if (fd < 0) continue;
    // Each site keeps one connection's thread (its replies) and briefly a second; beyond a
    // margin, connections are refused at once instead of each holding a thread for its
    // handshake's 10 s.
    if (data_threads.size() >= 4 * opt.sites.size() + 16) {
      ::close(fd);
      spdlog::warn("data link: {} connections open or being accepted: refusing another",
                   data_threads.size());
      continue;
    }
    auto done = std::make_shared<std::atomic<bool>>(false);
    data_threads.push_back({std::thread([this, fd, done] {
                              data_connection(fd);
                              *done = true;
                            }),
                            done});
  }
}

void Impl::data_connection(int fd) {
  auto sock = detail::DataSocket::adopt(fd, data_tls);
  {
    std::lock_guard<std::mutex> lock(data_mu);
    data_sockets.erase(std::remove_if(data_sockets.begin(), data_sockets.end(),
                                      [](const auto& w) { return w.expired(); }),
                       data_sockets.end());
    data_sockets.push_back(sock);
    std::lock_guard<std::mutex> l(mu);
    if (stopping) return;
  }
  std::shared_ptr<ServerStream> s;
  bool down = false, attached = false;
  // What of the peer's hello is still unread when it is refused (header_unread: all of it).
  bool header_unread = true;
  size_t unread = 0;
  try {
    sock->server_handshake(10);
    // Who the peer is, before it may present a token: a certificate of this project, valid,
    // not revoked, of a site of this federation.
    std::string name;
    if (!opt.insecure) {
      std::lock_guard<std::mutex> lock(check_mu);
      name = check->verify(sock->peer_certificate_pem());
    }
    sock->set_stall_timeout(10);
    DataHeader h;
    if (!sock->read_header(h, max_bytes)) throw Error("closed before its hello");
    header_unread = false;
    if (h.kind != DataKind::HelloDown && h.kind != DataKind::HelloUp)
      throw Error(std::string("the first transfer must be a hello, not '") +
                  data_kind_name(h.kind) + "'");
    down = h.kind == DataKind::HelloDown;
    unread = kDataTokenBytes;
    std::string token(kDataTokenBytes, '\0');
    sock->read_exact(token.data(), token.size());
    unread = 0;
    {
      std::lock_guard<std::mutex> lock(mu);
      auto it = data_tokens.find(token);
      if (it != data_tokens.end()) s = it->second.lock();
    }
    if (!s) throw Error("unknown data-link token (its site's connection has ended)");
    if (!opt.insecure && name != s->site())
      throw Error("certificate is for site '" + name + "' but the token is site '" + s->site() +
                  "''s");
    // The request connection is written by call() once attached: the accept goes first.
    std::unique_lock<std::mutex> writing(s->request_write_mutex(), std::defer_lock);
    if (down) writing.lock();
    if (!s->attach_data(down, sock))
      throw Error(std::string("site '") + s->site() + "' already has its " +
                  (down ? "request" : "reply") + " connection");
    attached = true;
    sock->send_header({DataKind::Accept, 0, 0});
  } catch (const Error& e) {
    spdlog::warn("refused a data-link connection from {}: {}", sock->peer(), e.what());
    try {
      // A peer refused for its certificate is still sending its hello: take it first, so that
      // it reads the reason instead of a broken pipe.
      DataHeader h;
      if (header_unread && sock->read_header(h, kDataTokenBytes)) unread = size_t(h.size);
      sock->discard(unread);
    } catch (const Error&) {
    }
    try {
      const std::string why = std::string(e.what()).substr(0, kMaxRefusalBytes);
      sock->send({DataKind::Refuse, 0, why.size()}, why.data(), opt.chunk_bytes);
    } catch (const Error&) {
    }
    if (attached) s->close_data();  // failed half-way: the site stays on the stream
    return;
  }
  spdlog::debug("site '{}': data link {} connection from {}", s->site(), down ? "request" : "reply",
                sock->peer());
  if (down) {
    sock->set_stall_timeout(data_stall_seconds);
    return;  // written by call(); this thread is done
  }
  sock->set_stall_timeout(0);  // idle between replies while the site trains
  read_replies(s, *sock);
}

// The reply connection's reader: each REPLY is read straight into its call's buffer.
void Impl::read_replies(const std::shared_ptr<ServerStream>& s, detail::DataSocket& sock) {
  try {
    for (;;) {
      DataHeader h;
      if (!sock.read_header(h, max_bytes)) {
        spdlog::debug("site '{}': reply connection closed", s->site());
        return;  // the site closed it between replies; its stream says whether it is gone
      }
      if (h.kind != DataKind::Reply)
        throw Error(std::string("unexpected data-link '") + data_kind_name(h.kind) + "'");
      std::shared_ptr<PendingCall> c;
      bool drop = false;
      {
        std::lock_guard<std::mutex> lock(mu);
        auto it = pending.find(h.call_id);
        if (it != pending.end()) c = it->second;
        drop = (!c && abandoned.count(h.call_id)) || (c && c->done);
      }
      sock.set_stall_timeout(data_stall_seconds);
      if (drop) {  // a late reply to a call given up
        sock.discard(h.size);
        sock.set_stall_timeout(0);
        continue;
      }
      // A reply counts only on the connection of the site the call went to.
      if (!c || c->stream != s) throw Error("reply to unknown call " + std::to_string(h.call_id));
      c->reply_total = h.size;  // the deadline grows with the declared size
      auto buffer = std::make_shared<Buffer>(size_t(h.size), Buffer::ForOverwrite{});
      // In pieces: a reply still arriving when its call has given up (the site sends slower
      // than min_throughput_mb_s) ends the site's connection.
      for (size_t off = 0; off < buffer->size();) {
        const size_t n = std::min(opt.chunk_bytes, buffer->size() - off);
        sock.read_exact(buffer->data() + off, n);
        off += n;
        std::lock_guard<std::mutex> lock(mu);
        if (c->done && off < buffer->size())
          throw Error("reply " + std::to_string(h.call_id) +
                      " still arriving after its call gave up (" + std::to_string(off) + " of " +
                      std::to_string(buffer->size()) + " bytes)");
      }
      sock.set_stall_timeout(0);
      std::lock_guard<std::mutex> lock(mu);
      if (!c->done) {
        c->reply = std::move(buffer);
        c->done = true;
      }
      cv.notify_all();
    }
  } catch (const Error& e) {
    if (s->data_closed()) return;  // the stream ended: not the site's fault
    spdlog::warn("site '{}': data link (replies): {}: dropping its connection", s->site(),
                 e.what());
    FrameHeader err;
    err.kind = FrameKind::Error;
    err.text = std::string("data link: ") + e.what();
    s->send_control(std::move(err));
    {
      std::lock_guard<std::mutex> lock(mu);
      fail_calls_locked(s, std::string("data link: ") + e.what());
    }
    s->close_data();
    s->cancel();
  }
}

void Impl::stop_data_link() {
  if (!data_listener) return;
  data_listener->close();
  if (data_accepter.joinable()) data_accepter.join();
  std::vector<DataThread> threads;
  {
    std::lock_guard<std::mutex> lock(data_mu);
    for (auto& w : data_sockets)
      if (auto sock = w.lock()) sock->shutdown();
    threads = std::move(data_threads);
  }
  for (auto& t : threads) t.thread.join();
}

int GrpcServerChannel::data_port() const {
  return impl_->data_listener ? impl_->data_listener->port() : 0;
}

GrpcServerChannel::~GrpcServerChannel() {
  try {
    shutdown("server stopped");
  } catch (...) {
  }
}

int GrpcServerChannel::port() const {
  return impl_->port;
}

Bytes GrpcServerChannel::call(const std::string& site, const Bytes& request) {
  Impl& m = *impl_;
  auto c = std::make_shared<PendingCall>(m.max_bytes);
  c->site = site;
  {
    std::lock_guard<std::mutex> lock(m.mu);
    if (m.stopping) throw SiteError(site, "the server is shutting down");
    auto it = m.registered.find(site);
    if (it == m.registered.end()) throw SiteError(site, "not connected");
    c->stream = it->second;
    c->id = m.next_id++;
    m.pending[c->id] = c;
  }
  // The deadline counts from here: writing a request on the data link is part of the call.
  const auto start = std::chrono::steady_clock::now();
  auto deadline = [&] {
    const double bytes = double(request->size()) + double(c->reply_total.load());
    const double s = m.opt.call_base_seconds + bytes / (m.opt.min_throughput_mb_s * 1e6);
    return start + std::chrono::microseconds(int64_t(s * 1e6));
  };
  auto seconds_since_start = [&] {
    const double s =
        std::chrono::duration<double>(std::chrono::steady_clock::now() - start).count();
    char text[32];
    std::snprintf(text, sizeof text, "%.1f", s);
    return std::string(text);
  };
  std::string send_error;
  if (auto down = c->stream->data_down()) {
    try {
      std::lock_guard<std::mutex> lock(c->stream->request_write_mutex());
      // A site that reads, but slower than min_throughput_mb_s, is given up at the deadline.
      down->send({DataKind::Request, c->id, request->size()}, request->data(), m.opt.chunk_bytes,
                 [&] {
                   if (std::chrono::steady_clock::now() >= deadline())
                     throw Error("request of " + std::to_string(request->size()) +
                                 " bytes not sent within " + seconds_since_start() + " s");
                 });
    } catch (const Error& e) {
      if (!c->stream->data_closed()) {
        spdlog::warn("site '{}': data link (requests): {}: dropping its connection", site,
                     e.what());
        c->stream->close_data();
        c->stream->cancel();
      }
      send_error = std::string("disconnected during the call (data link: ") + e.what() + ")";
    }
  } else if (!c->stream->send_payload(FrameKind::Request, c->id, request)) {
    send_error = "disconnected";
  }
  if (!send_error.empty()) {
    std::lock_guard<std::mutex> lock(m.mu);
    m.pending.erase(c->id);
    throw SiteError(site, send_error);
  }
  std::unique_lock<std::mutex> lock(m.mu);
  while (!c->done) {
    auto d = deadline();
    if (std::chrono::steady_clock::now() >= d) break;
    m.cv.wait_until(lock, std::min(d, std::chrono::steady_clock::now() + std::chrono::seconds(1)));
  }
  m.pending.erase(c->id);
  if (!c->done) {
    c->done = true;
    m.abandoned.insert(c->id);
    lock.unlock();
    c->stream->cancel_payload(c->id);
    throw SiteError(site, "no reply within " + seconds_since_start() + " s (request of " +
                              std::to_string(request->size()) + " bytes)");
  }
  lock.unlock();
  if (!c->error.empty()) throw SiteError(site, c->error);
  try {
    decode(c->reply);
  } catch (const Error& e) {
    throw SiteError(site, std::string("sent a corrupt reply: ") + e.what());
  }
  return c->reply;
}

std::vector<std::string> GrpcServerChannel::sites() const {
  std::lock_guard<std::mutex> lock(impl_->mu);
  std::vector<std::string> out;
  for (const auto& [name, s] : impl_->registered) out.push_back(name);
  return out;
}

std::vector<std::string> GrpcServerChannel::data_link_sites() const {
  std::lock_guard<std::mutex> lock(impl_->mu);
  std::vector<std::string> out;
  for (const auto& [name, s] : impl_->registered)
    if (s->data_attached()) out.push_back(name);
  return out;
}

size_t GrpcServerChannel::max_concurrent_calls() const {
  return impl_->opt.max_parallel_calls;
}

std::string GrpcServerChannel::site_info(const std::string& site) const {
  std::lock_guard<std::mutex> lock(impl_->mu);
  auto it = impl_->registered.find(site);
  return it == impl_->registered.end() ? std::string() : it->second->info();
}

std::vector<std::string> GrpcServerChannel::wait_for_sites(const std::vector<std::string>& names,
                                                           double timeout_seconds) {
  Impl& m = *impl_;
  const auto until =
      std::chrono::steady_clock::now() + std::chrono::milliseconds(int64_t(timeout_seconds * 1e3));
  std::unique_lock<std::mutex> lock(m.mu);
  for (;;) {
    std::vector<std::string> missing;
    for (const auto& n : names)
      if (!m.registered.count(n)) missing.push_back(n);
    if (missing.empty() || std::chrono::steady_clock::now() >= until) return missing;
    m.cv.wait_until(lock, until);
  }
}

void GrpcServerChannel::shutdown(const std::string& reason, bool end_run) {
  Impl& m = *impl_;
  std::vector<std::shared_ptr<ServerStream>> streams;
  {
    std::lock_guard<std::mutex> lock(m.mu);
    if (m.stopping) return;
    m.stopping = true;
    streams.assign(m.live.begin(), m.live.end());
  }
  if (!end_run) spdlog::info("server stopping ({}): the sites will reconnect", reason);
  for (auto& s : streams) {
    if (!end_run) {
      s->cancel();
      continue;
    }
    FrameHeader h;
    h.kind = FrameKind::Shutdown;
    h.text = reason;
    s->send_control(std::move(h));
  }
  // Sites close their end when they read SHUTDOWN; give them a moment, then stop.
  {
    std::unique_lock<std::mutex> lock(m.mu);
    m.cv.wait_for(lock, std::chrono::seconds(3), [&] { return m.live.empty(); });
  }
  m.server->Shutdown(std::chrono::system_clock::now() + std::chrono::seconds(1));
  {
    std::lock_guard<std::mutex> lock(m.mu);
    m.stopped = true;
    m.cv.notify_all();
  }
  if (m.monitor.joinable()) m.monitor.join();
  m.server->Wait();
  m.stop_data_link();
}

}  // namespace concord::net
