// The data link's sockets (internal to core/net): TLS 1.3 connections made with OpenSSL's libssl
// from the same kit files as the gRPC stream, or plain TCP for --insecure loopback development.
// A payload is written from its Buffer and read straight into a new Buffer: no reassembly, no
// copy beyond TLS's own. Each DataSocket is used in ONE direction after its hello (OpenSSL's SSL
// objects must not be read and written from two threads at once); shutdown() may be called from
// any thread and wakes a reader or writer blocked in it.
//
// Who uses it: server.cpp (a listener; per site a request connection written by the calling
// threads and a reply connection read by its own thread) and site.cpp (the mirror image).
#pragma once

#include <concord/message.h>
#include <concord/net/wire.h>

#include <cstddef>
#include <functional>
#include <memory>
#include <string>

typedef struct ssl_ctx_st SSL_CTX;
typedef struct ssl_st SSL;

namespace concord::net::detail {

// An OpenSSL context: TLS 1.3 only, AES-128-GCM first (as gRPC negotiates), no session tickets.
class TlsContext {
 public:
  // The server's: its certificate and key; asks every site for a certificate (checked after the
  // handshake by ClientCertificateCheck, as on the gRPC stream, so a refusal can say why).
  static std::shared_ptr<TlsContext> server(const std::string& cert_file,
                                            const std::string& key_file);
  // A site's: its certificate and key; the server's certificate must be signed by `ca_file` and
  // name the host dialled.
  static std::shared_ptr<TlsContext> client(const std::string& ca_file,
                                            const std::string& cert_file,
                                            const std::string& key_file);
  ~TlsContext();
  SSL_CTX* get() const { return ctx_; }

 private:
  explicit TlsContext(SSL_CTX* ctx) : ctx_(ctx) {}
  SSL_CTX* ctx_;
};

class DataSocket {
 public:
  // Connects to host:port within `timeout_seconds` and, with `tls`, completes the handshake
  // (the server's certificate checked against the CA and `host`). Throws concord::Error.
  static std::unique_ptr<DataSocket> connect(const std::string& host, int port,
                                             const std::shared_ptr<TlsContext>& tls,
                                             double timeout_seconds);
  // Takes an accepted socket `fd` (closed with the object); then server_handshake().
  static std::shared_ptr<DataSocket> adopt(int fd, std::shared_ptr<TlsContext> tls);
  // With TLS, the server's handshake within `timeout_seconds`. Throws concord::Error.
  void server_handshake(double timeout_seconds);
  ~DataSocket();
  DataSocket(const DataSocket&) = delete;
  DataSocket& operator=(const DataSocket&) = delete;

  // A header and its payload, the payload in pieces of `piece_bytes`; `between` (if set) runs
  // after each piece and may throw to give up (a deadline). Throws concord::Error.
  void send(const DataHeader& header, const void* payload, size_t piece_bytes,
            const std::function<void()>& between = nullptr);
  // A header alone (its payload follows with further writes, or never: tests).
  void send_header(const DataHeader& header);
  // The next header, decoded and checked (decode_data_header); false when the peer closed the
  // connection cleanly between two transfers. Throws concord::Error (a malformed header, a
  // connection cut inside a header).
  bool read_header(DataHeader& header, size_t max_payload);
  // Exactly `size` bytes into `out`. Throws concord::Error.
  void read_exact(void* out, size_t size);
  // Reads and drops `size` bytes (a payload nobody waits for any more).
  void discard(size_t size);
  // A site's hello (HELLO_DOWN / HELLO_UP with the WELCOME's token) and the server's answer: ""
  // when accepted, else the server's reason. Throws concord::Error when the connection fails.
  std::string hello(DataKind kind, const std::string& token);

  // No send/receive may block longer than this without progress (0: no limit).
  void set_stall_timeout(double seconds);
  // The peer's certificate as PEM ("" without TLS).
  std::string peer_certificate_pem() const;
  std::string peer() const { return peer_; }  // "host:port" of the other end
  // Ends the connection now (either direction), waking a blocked reader or writer.
  void shutdown();

 private:
  DataSocket(int fd, std::shared_ptr<TlsContext> tls);
  void write_all(const void* data, size_t size);
  // Like read_exact; false when the connection ended before the first byte.
  bool read_or_eof(void* out, size_t size);
  int fd_;
  std::shared_ptr<TlsContext> tls_;
  SSL* ssl_ = nullptr;
  std::string peer_;
};

// A listening TCP socket for the data link.
class DataListener {
 public:
  // Binds host:port (port 0: any free port). Throws concord::Error naming the address.
  DataListener(const std::string& host, int port);
  ~DataListener();
  int port() const { return port_; }
  // An accepted connection's fd, or -1 when none arrived within `timeout_ms` or after close().
  int accept(int timeout_ms);
  void close();

 private:
  int fd_ = -1;
  int port_ = 0;
};

// host and port of "host:port" / "[v6]:port"; throws concord::Error when there is no port.
std::pair<std::string, int> split_host_port(const std::string& host_port);
// How long a transfer may make no progress: max(10 s, 6 heartbeats).
inline double stall_seconds(double heartbeat_seconds) {
  return heartbeat_seconds * 6 > 10 ? heartbeat_seconds * 6 : 10;
}
// The data link's switch: CONCORD_NET_DATA_LINK=0 turns it off (payloads on the gRPC stream).
bool data_link_enabled_by_env();
// kDataTokenBytes random bytes (OpenSSL's RAND_bytes).
std::string random_token();

}  // namespace concord::net::detail
