#include "data_link.h"

#include <concord/error.h>

#include <arpa/inet.h>
#include <fcntl.h>
#include <netdb.h>
#include <netinet/in.h>
#include <netinet/tcp.h>
#include <openssl/err.h>
#include <openssl/pem.h>
#include <openssl/rand.h>
#include <openssl/ssl.h>
#include <openssl/x509v3.h>
#include <poll.h>
#include <sys/socket.h>
#include <unistd.h>

#include <algorithm>
#include <cerrno>
#include <csignal>
#include <cstdlib>
#include <cstring>
#include <vector>

namespace concord::net::detail {

namespace {

std::string openssl_error(const std::string& what) {
  std::string s = what;
  while (unsigned long e = ERR_get_error()) {
    char buf[256];
    ERR_error_string_n(e, buf, sizeof buf);
    s += std::string(": ") + buf;
  }
  return s;
}

// A peer that closes its end must not kill this process with SIGPIPE: writes fail with EPIPE
// instead (OpenSSL writes with write(2), which cannot pass MSG_NOSIGNAL).
void ignore_sigpipe_once() {
  static const bool done = [] {
    struct sigaction old {};
    if (sigaction(SIGPIPE, nullptr, &old) == 0 && old.sa_handler == SIG_DFL)
      std::signal(SIGPIPE, SIG_IGN);
    return true;
  }();
  (void)done;
}

void set_timeouts(int fd, double seconds) {
  timeval tv{};
  if (seconds > 0) {
    tv.tv_sec = time_t(seconds);
    tv.tv_usec = suseconds_t((seconds - double(tv.tv_sec)) * 1e6);
  }
  setsockopt(fd, SOL_SOCKET, SO_RCVTIMEO, &tv, sizeof tv);
  setsockopt(fd, SOL_SOCKET, SO_SNDTIMEO, &tv, sizeof tv);
}

void tune(int fd) {
  const int one = 1;
  // A header is followed at once by its payload: no Nagle delay on the small writes.
  setsockopt(fd, IPPROTO_TCP, TCP_NODELAY, &one, sizeof one);
  // Socket buffers stay autotuned: a fixed 1 MiB made loopback 8% faster (the bytes stay in
  // cache) but would cap a 50 ms WAN link at 20 MB/s per connection.
  fcntl(fd, F_SETFD, FD_CLOEXEC);
}

std::string address_text(const sockaddr* a) {
  char host[INET6_ADDRSTRLEN] = "?";
  int port = 0;
  if (a->sa_family == AF_INET) {
    auto* v4 = reinterpret_cast<const sockaddr_in*>(a);
    inet_ntop(AF_INET, &v4->sin_addr, host, sizeof host);
    port = ntohs(v4->sin_port);
    return std::string(host) + ":" + std::to_string(port);
  }
  if (a->sa_family == AF_INET6) {
    auto* v6 = reinterpret_cast<const sockaddr_in6*>(a);
    inet_ntop(AF_INET6, &v6->sin6_addr, host, sizeof host);
    port = ntohs(v6->sin6_port);
  }
  return "[" + std::string(host) + "]:" + std::to_string(port);
}

std::string errno_text(int e) {
  if (e == EAGAIN || e == EWOULDBLOCK) return "no progress within the time limit";
  return std::strerror(e);
}

// True when SSL_get_error's `err` (errno `e` saved before it) means the peer closed the
// connection: a close_notify, or TCP closed without one (OpenSSL 3's "unexpected eof").
bool peer_closed(int err, int e) {
  return err == SSL_ERROR_ZERO_RETURN || (err == SSL_ERROR_SYSCALL && e == 0) ||
         (err == SSL_ERROR_SSL &&
          ERR_GET_REASON(ERR_peek_error()) == SSL_R_UNEXPECTED_EOF_WHILE_READING);
}

// What went wrong in an SSL call that returned `ret`.
std::string ssl_failure(SSL* ssl, int ret, const std::string& what) {
  const int e = errno;
  const int err = SSL_get_error(ssl, ret);
  if (peer_closed(err, e)) {
    ERR_clear_error();
    return what + ": closed by the peer";
  }
  if (err == SSL_ERROR_SYSCALL) {
    ERR_clear_error();
    return what + ": " + errno_text(e);
  }
  if (err == SSL_ERROR_WANT_READ || err == SSL_ERROR_WANT_WRITE)
    return what + ": no progress within the time limit";
  return openssl_error(what);
}

int accept_any_certificate(int, X509_STORE_CTX*) {
  return 1;
}

SSL_CTX* new_context(bool server) {
  SSL_CTX* ctx = SSL_CTX_new(server ? TLS_server_method() : TLS_client_method());
  if (!ctx) throw Error(openssl_error("data link: cannot create a TLS context"));
  SSL_CTX_set_min_proto_version(ctx, TLS1_3_VERSION);
  SSL_CTX_set_ciphersuites(
      ctx, "TLS_AES_128_GCM_SHA256:TLS_AES_256_GCM_SHA384:TLS_CHACHA20_POLY1305_SHA256");
  // No read-ahead: it made a round 6% slower (bench/net_round), each record is then copied
  // once more.
  if (server) {
    SSL_CTX_set_num_tickets(ctx, 0);  // nobody resumes: the reply connection is never read
    SSL_CTX_set_session_cache_mode(ctx, SSL_SESS_CACHE_OFF);
  }
  return ctx;
}

void use_certificate(SSL_CTX* ctx, const std::string& cert_file, const std::string& key_file) {
  if (SSL_CTX_use_certificate_chain_file(ctx, cert_file.c_str()) != 1)
    throw Error(openssl_error("data link: cannot use certificate " + cert_file));
  if (SSL_CTX_use_PrivateKey_file(ctx, key_file.c_str(), SSL_FILETYPE_PEM) != 1)
    throw Error(openssl_error("data link: cannot use key " + key_file));
  if (SSL_CTX_check_private_key(ctx) != 1)
    throw Error("data link: key " + key_file + " does not belong to certificate " + cert_file);
}

}  // namespace

TlsContext::~TlsContext() {
  SSL_CTX_free(ctx_);
}

std::shared_ptr<TlsContext> TlsContext::server(const std::string& cert_file,
                                               const std::string& key_file) {
  std::shared_ptr<TlsContext> c(new TlsContext(new_context(true)));
  use_certificate(c->ctx_, cert_file, key_file);
  // Verified after the handshake by ClientCertificateCheck (the CRL, the site list): the
  // handshake still proves the site holds its certificate's key.
  SSL_CTX_set_verify(c->ctx_, SSL_VERIFY_PEER | SSL_VERIFY_FAIL_IF_NO_PEER_CERT,
                     accept_any_certificate);
  return c;
}

std::shared_ptr<TlsContext> TlsContext::client(const std::string& ca_file,
                                               const std::string& cert_file,
                                               const std::string& key_file) {
  std::shared_ptr<TlsContext> c(new TlsContext(new_context(false)));
  use_certificate(c->ctx_, cert_file, key_file);
  if (SSL_CTX_load_verify_locations(c->ctx_, ca_file.c_str(), nullptr) != 1)
    throw Error(openssl_error("data link: cannot read the CA " + ca_file));
  SSL_CTX_set_verify(c->ctx_, SSL_VERIFY_PEER, nullptr);
  return c;
}

DataSocket::DataSocket(int fd, std::shared_ptr<TlsContext> tls) : fd_(fd), tls_(std::move(tls)) {
  ignore_sigpipe_once();
  tune(fd_);
  sockaddr_storage a{};
  socklen_t n = sizeof a;
  if (getpeername(fd_, reinterpret_cast<sockaddr*>(&a), &n) == 0)
    peer_ = address_text(reinterpret_cast<sockaddr*>(&a));
}

DataSocket::~DataSocket() {
  if (ssl_) SSL_free(ssl_);
  ::close(fd_);
}

std::unique_ptr<DataSocket> DataSocket::connect(const std::string& host, int port,
                                                const std::shared_ptr<TlsContext>& tls,
                                                double timeout_seconds) {
  const std::string where = host + ":" + std::to_string(port);
  addrinfo hints{};
  hints.ai_family = AF_UNSPEC;
  hints.ai_socktype = SOCK_STREAM;
  addrinfo* res = nullptr;
  if (int rc = getaddrinfo(host.c_str(), std::to_string(port).c_str(), &hints, &res); rc != 0)
    throw Error("data link: cannot resolve " + where + ": " + gai_strerror(rc));
  std::string why = "no address";
  int fd = -1;
  for (addrinfo* ai = res; ai && fd < 0; ai = ai->ai_next) {
    int s = ::socket(ai->ai_family, ai->ai_socktype | SOCK_CLOEXEC | SOCK_NONBLOCK, 0);
    if (s < 0) continue;
    int rc = ::connect(s, ai->ai_addr, ai->ai_addrlen);
    if (rc != 0 && errno == EINPROGRESS) {
      pollfd p{s, POLLOUT, 0};
      rc = ::poll(&p, 1, int(timeout_seconds * 1000));
      int err = 0;
      socklen_t len = sizeof err;
      if (rc == 1 && getsockopt(s, SOL_SOCKET, SO_ERROR, &err, &len) == 0 && err == 0) {
        rc = 0;
      } else {
        errno = rc == 0 ? ETIMEDOUT : err;
        rc = -1;
      }
    }
    if (rc == 0) {
      fcntl(s, F_SETFL, fcntl(s, F_GETFL) & ~O_NONBLOCK);
      fd = s;
    } else {
      why = std::strerror(errno);
      ::close(s);
    }
  }
  freeaddrinfo(res);
  if (fd < 0) throw Error("data link: cannot connect to " + where + ": " + why);
  std::unique_ptr<DataSocket> d(new DataSocket(fd, tls));
  if (!tls) return d;
  set_timeouts(fd, timeout_seconds);
  d->ssl_ = SSL_new(tls->get());
  if (!d->ssl_) throw Error(openssl_error("data link: SSL_new"));
  SSL_set_fd(d->ssl_, fd);
  // The server's certificate must name the host dialled, as on the gRPC stream.
  in6_addr ip{};
  const bool is_ip =
      inet_pton(AF_INET, host.c_str(), &ip) == 1 || inet_pton(AF_INET6, host.c_str(), &ip) == 1;
  if (is_ip) {
    X509_VERIFY_PARAM_set1_ip_asc(SSL_get0_param(d->ssl_), host.c_str());
  } else {
    SSL_set_tlsext_host_name(d->ssl_, host.c_str());
    SSL_set1_host(d->ssl_, host.c_str());
  }
  const int rc = SSL_connect(d->ssl_);
  if (rc != 1) {
    const long v = SSL_get_verify_result(d->ssl_);
    if (v != X509_V_OK)
      throw Error("data link to " + where +
                  ": the server's certificate is refused: " + X509_verify_cert_error_string(v));
    throw Error(ssl_failure(d->ssl_, rc, "data link to " + where + ": TLS handshake"));
  }
  set_timeouts(fd, 0);
  return d;
}

std::shared_ptr<DataSocket> DataSocket::adopt(int fd, std::shared_ptr<TlsContext> tls) {
  return std::shared_ptr<DataSocket>(new DataSocket(fd, std::move(tls)));
}

void DataSocket::server_handshake(double timeout_seconds) {
  if (!tls_) return;
  set_timeouts(fd_, timeout_seconds);
  ssl_ = SSL_new(tls_->get());
  if (!ssl_) throw Error(openssl_error("data link: SSL_new"));
  SSL_set_fd(ssl_, fd_);
  const int rc = SSL_accept(ssl_);
  if (rc != 1) throw Error(ssl_failure(ssl_, rc, "TLS handshake"));
  set_timeouts(fd_, 0);
}

void DataSocket::set_stall_timeout(double seconds) {
  set_timeouts(fd_, seconds);
}

void DataSocket::write_all(const void* data, size_t size) {
  const auto* p = static_cast<const uint8_t*>(data);
  while (size > 0) {
    const size_t n = std::min<size_t>(size, size_t(1) << 30);
    size_t done = 0;
    if (ssl_) {
      const int rc = SSL_write_ex(ssl_, p, n, &done);
      if (rc != 1) throw Error(ssl_failure(ssl_, rc, "send"));
    } else {
      const ssize_t w = ::send(fd_, p, n, MSG_NOSIGNAL);
      if (w < 0) {
        if (errno == EINTR) continue;
        throw Error("send: " + errno_text(errno));
      }
      done = size_t(w);
    }
    p += done;
    size -= done;
  }
}

bool DataSocket::read_or_eof(void* out, size_t size) {
  auto* p = static_cast<uint8_t*>(out);
  const size_t total = size;
  while (size > 0) {
    const size_t n = std::min<size_t>(size, size_t(1) << 30);
    size_t got = 0;
    if (ssl_) {
      const int rc = SSL_read_ex(ssl_, p, n, &got);
      if (rc != 1) {
        const int e = errno;
        // Closed before any byte: the peer closed between two transfers.
        if (size == total && peer_closed(SSL_get_error(ssl_, rc), e)) {
          ERR_clear_error();
          return false;
        }
        errno = e;
        throw Error(ssl_failure(ssl_, rc, "receive"));
      }
    } else {
      const ssize_t r = ::recv(fd_, p, n, 0);
      if (r < 0) {
        if (errno == EINTR) continue;
        throw Error("receive: " + errno_text(errno));
      }
      if (r == 0) {
        if (size == total) return false;
        throw Error("receive: closed by the peer");
      }
      got = size_t(r);
    }
    p += got;
    size -= got;
  }
  return true;
}

void DataSocket::read_exact(void* out, size_t size) {
  if (size > 0 && !read_or_eof(out, size)) throw Error("receive: closed by the peer");
}

void DataSocket::discard(size_t size) {
  std::vector<uint8_t> scratch(std::min<size_t>(size, size_t(1) << 20));
  while (size > 0) {
    const size_t n = std::min(size, scratch.size());
    read_exact(scratch.data(), n);
    size -= n;
  }
}

void DataSocket::send_header(const DataHeader& header) {
  uint8_t h[kDataHeaderBytes];
  encode_data_header(header, h);
  write_all(h, sizeof h);
}

void DataSocket::send(const DataHeader& header, const void* payload, size_t piece_bytes,
                      const std::function<void()>& between) {
  send_header(header);
  const auto* p = static_cast<const uint8_t*>(payload);
  for (uint64_t off = 0; off < header.size;) {
    const size_t n = size_t(std::min<uint64_t>(piece_bytes, header.size - off));
    write_all(p + off, n);
    off += n;
    if (between) between();
  }
}

std::string DataSocket::hello(DataKind kind, const std::string& token) {
  send({kind, 0, token.size()}, token.data(), token.size());
  DataHeader h;
  if (!read_header(h, 0)) throw Error("the server closed it");
  if (h.kind == DataKind::Accept) return "";
  if (h.kind != DataKind::Refuse)
    throw Error(std::string("unexpected '") + data_kind_name(h.kind) + "' from the server");
  std::string why(size_t(h.size), '\0');
  read_exact(why.data(), why.size());
  return why;
}

bool DataSocket::read_header(DataHeader& header, size_t max_payload) {
  uint8_t h[kDataHeaderBytes];
  if (!read_or_eof(h, sizeof h)) return false;
  header = decode_data_header(h, sizeof h, max_payload);
  return true;
}

std::string DataSocket::peer_certificate_pem() const {
  if (!ssl_) return "";
  X509* cert = SSL_get1_peer_certificate(ssl_);
  if (!cert) return "";
  BIO* bio = BIO_new(BIO_s_mem());
  PEM_write_bio_X509(bio, cert);
  char* data = nullptr;
  const long n = BIO_get_mem_data(bio, &data);
  std::string pem(data, size_t(std::max(n, 0L)));
  BIO_free(bio);
  X509_free(cert);
  return pem;
}

void DataSocket::shutdown() {
  ::shutdown(fd_, SHUT_RDWR);
}

DataListener::DataListener(const std::string& host, int port) {
  const std::string where = host + ":" + std::to_string(port);
  addrinfo hints{};
  hints.ai_family = AF_UNSPEC;
  hints.ai_socktype = SOCK_STREAM;
  hints.ai_flags = AI_PASSIVE;
  const bool any = host.empty() || host == "0.0.0.0" || host == "::" || host == "*";
  addrinfo* res = nullptr;
  if (int rc =
          getaddrinfo(any ? nullptr : host.c_str(), std::to_string(port).c_str(), &hints, &res);
      rc != 0)
    throw Error("data link: cannot resolve " + where + ": " + gai_strerror(rc));
  std::string why = "no address";
  for (addrinfo* ai = res; ai && fd_ < 0; ai = ai->ai_next) {
    // "0.0.0.0": IPv4 only; "::": IPv6 (dual-stack where the system allows it).
    if (any && host == "0.0.0.0" && ai->ai_family != AF_INET) continue;
    if (host == "::" && ai->ai_family != AF_INET6) continue;
    int s = ::socket(ai->ai_family, ai->ai_socktype | SOCK_CLOEXEC, 0);
    if (s < 0) continue;
    const int one = 1;
    setsockopt(s, SOL_SOCKET, SO_REUSEADDR, &one, sizeof one);
    if (::bind(s, ai->ai_addr, ai->ai_addrlen) == 0 && ::listen(s, 128) == 0) {
      fd_ = s;
    } else {
      why = std::strerror(errno);
      ::close(s);
    }
  }
  freeaddrinfo(res);
  if (fd_ < 0) throw Error("data link: cannot listen on " + where + ": " + why);
  sockaddr_storage a{};
  socklen_t n = sizeof a;
  getsockname(fd_, reinterpret_cast<sockaddr*>(&a), &n);
  port_ = a.ss_family == AF_INET6 ? ntohs(reinterpret_cast<sockaddr_in6*>(&a)->sin6_port)
                                  : ntohs(reinterpret_cast<sockaddr_in*>(&a)->sin_port);
}

DataListener::~DataListener() {
  if (fd_ >= 0) ::close(fd_);
}

int DataListener::accept(int timeout_ms) {
  pollfd p{fd_, POLLIN, 0};
  if (::poll(&p, 1, timeout_ms) != 1 || !(p.revents & POLLIN)) return -1;
  return ::accept4(fd_, nullptr, nullptr, SOCK_CLOEXEC);
}

void DataListener::close() {
  ::shutdown(fd_, SHUT_RDWR);
}

std::pair<std::string, int> split_host_port(const std::string& hp) {
  std::string host;
  std::string port;
  if (!hp.empty() && hp[0] == '[') {
    const size_t close = hp.find(']');
    if (close == std::string::npos || close + 1 >= hp.size() || hp[close + 1] != ':')
      throw Error("address '" + hp + "': expected [host]:port");
    host = hp.substr(1, close - 1);
    port = hp.substr(close + 2);
  } else {
    const size_t colon = hp.rfind(':');
    if (colon == std::string::npos) throw Error("address '" + hp + "': expected host:port");
    host = hp.substr(0, colon);
    port = hp.substr(colon + 1);
  }
  char* end = nullptr;
  const long p = std::strtol(port.c_str(), &end, 10);
  if (port.empty() || *end || p < 0 || p > 65535)
    throw Error("address '" + hp + "': port '" + port + "' is not 0 .. 65535");
  return {host, int(p)};
}

bool data_link_enabled_by_env() {
  const char* v = std::getenv("CONCORD_NET_DATA_LINK");
  if (!v || !*v) return true;
  const std::string s = v;
  if (s == "0" || s == "off" || s == "no") return false;
  if (s == "1" || s == "on" || s == "yes") return true;
  throw Error("CONCORD_NET_DATA_LINK='" + s + "': expected 1 or 0");
}

std::string random_token() {
  std::string t(kDataTokenBytes, '\0');
  if (RAND_bytes(reinterpret_cast<unsigned char*>(t.data()), int(t.size())) != 1)
    throw Error(openssl_error("data link: no random bytes for a token"));
  return t;
}

}  // namespace concord::net::detail
