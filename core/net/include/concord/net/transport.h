// The network Channel: a coordinator (server) and sites in other processes or on other machines,
// over gRPC with mutual TLS. Each site connects OUT to the server and keeps one bidirectional
// stream open (core/net/proto/concord_net.proto); the server sends requests down that stream
// and waits for the replies. Payloads travel on the data link (two TLS connections per site beside
// the stream, core/net/src/data_link.h), or in chunks on the stream (wire.h) without it.
//
//   server:  GrpcServerChannel ch(options);  ch.wait_for_sites(names, 60);
//            Coordinator coordinator(ch, aggregator, seed);  ...   (ch is a concord::Channel)
//   site:    run_site_client(options, handler);   // returns when the server says the run is over
#pragma once

#include <concord/channel.h>
#include <concord/net/wire.h>

#include <atomic>
#include <cstdint>
#include <functional>
#include <memory>
#include <string>
#include <vector>

namespace concord::net {

struct ServerOptions {
  // host:port to listen on; port 0 picks a free port (see GrpcServerChannel::port()).
  std::string listen = "0.0.0.0:7443";
  // Mutual TLS (the default): PEM files. A site's identity is its certificate's common name,
  // which must be signed by `ca_cert`, within its validity dates, not on the `crl` revocation
  // list (optional; re-read when the file changes) and one of `sites`.
  std::string ca_cert, server_cert, server_key, crl;
  // Development only: no TLS, a site is who it says it is. Refused unless `listen` is a
  // loopback address; logs a warning.
  bool insecure = false;
  std::vector<std::string> sites;  // the sites allowed to register (the pipeline's site list)
  // Called at each registration (after the identity checks) with the site's name and the info
  // it sent: "" admits it, anything else refuses it with that reason, which both ends log
  // (e.g. a different pipeline). May be called from several threads at once.
  std::function<std::string(const std::string& site, const std::string& info)> admit;
  std::string welcome_info;      // sent to every site in WELCOME (SiteClientOptions::on_welcome)
  size_t chunk_bytes = 0;        // 0: CONCORD_NET_CHUNK_KB, else 1 MiB (4 KiB .. 4 MiB)
  size_t max_message_bytes = 0;  // 0: max_message_bytes() (CONCORD_MAX_MESSAGE_MB)
  // Application heartbeat interval (sent to every site in WELCOME). A site silent for
  // 3 intervals is dropped and its calls fail. HTTP/2 keepalive pings run separately.
  double heartbeat_seconds = 5;
  // A call's deadline: call_base_seconds (the site's work, e.g. local training) plus the
  // request and reply bytes at min_throughput_mb_s (MB/s, the slowest link accepted).
  double call_base_seconds = 600;
  double min_throughput_mb_s = 5;
  // The data link: requests and replies travel on two TLS connections per site beside the stream
  // (same certificates; concord_net.proto), which costs half the CPU of gRPC's TLS stack.
  // "": the listen host at the listen port + 1 (any free port when that is 0); "off" (or
  // CONCORD_NET_DATA_LINK=0): payloads go over the stream. A site that cannot reach it uses the
  // stream too.
  std::string data_listen;
  // Sites the coordinator asks at once (each call then runs on its own thread); more sites
  // than this wait for a free slot. 0: CONCORD_NET_PARALLEL_SITES, else 8.
  size_t max_parallel_calls = 0;
};

// The server side of the network: a Channel whose sites are the connected site processes.
// Thread-safe: call() may be used from several threads (each call has its own id).
class GrpcServerChannel : public Channel {
 public:
  // Starts listening; throws concord::Error when the address cannot be bound or the TLS files
  // cannot be read.
  explicit GrpcServerChannel(ServerOptions options);
  ~GrpcServerChannel() override;  // shutdown("server stopped") if not done yet
  GrpcServerChannel(const GrpcServerChannel&) = delete;
  GrpcServerChannel& operator=(const GrpcServerChannel&) = delete;

  int port() const;       // the port actually bound
  int data_port() const;  // the data link's port (0: none)

  // Sends `request` to `site` and waits for its reply. Throws SiteError naming the site when it
  // is not connected, disconnects or stops heartbeating during the call, replies with an error
  // (the site's handler threw), sends a malformed reply, or misses the deadline.
  Bytes call(const std::string& site, const Bytes& request) override;
  std::vector<std::string> sites() const;  // registered sites, now
  // Registered sites whose data link is open both ways (their payloads bypass the stream), now.
  std::vector<std::string> data_link_sites() const;
  // The info a registered site sent at its (latest) registration; "" when it is not registered.
  std::string site_info(const std::string& site) const;
  size_t max_concurrent_calls() const override;

  // Waits until every site of `names` is registered or `timeout_seconds` passed; returns the
  // ones still missing (empty: all there).
  std::vector<std::string> wait_for_sites(const std::vector<std::string>& names,
                                          double timeout_seconds);
  // Sends SHUTDOWN (with `reason`) to every site, lets the streams close, stops the server.
  // end_run false: the streams are cut without SHUTDOWN, so the sites keep reconnecting (to a
  // server resuming the run).
  void shutdown(const std::string& reason, bool end_run = true);

  struct Impl;

 private:
  std::shared_ptr<Impl> impl_;
};

struct SiteClientOptions {
  std::string server;  // host:port
  std::string site;    // this site's name (with TLS: must be the certificate's common name)
  std::string ca_cert, cert, key;  // PEM files (a site kit: see provision.h load_kit)
  bool insecure = false;           // development only: loopback servers only, warned
  size_t chunk_bytes = 0;          // 0: CONCORD_NET_CHUNK_KB, else 1 MiB (4 KiB .. 4 MiB)
  size_t max_message_bytes = 0;    // 0: max_message_bytes()
  // Open the data link when the server offers one (CONCORD_NET_DATA_LINK=0 also turns it off).
  bool data_link = true;
  // Heartbeat interval before the server's WELCOME says otherwise.
  double heartbeat_seconds = 5;
  // Reconnection: waits initial * 2^attempt, capped at max, times a factor in [0.5, 1) drawn
  // from `seed` (so sites do not reconnect in lockstep); attempts < 0: forever.
  double backoff_initial_seconds = 0.5;
  double backoff_max_seconds = 30;
  int max_attempts = -1;
  uint64_t seed = 0;
  // Set (e.g. by a signal handler: stop_flag_on_signals()) to stop: the stream is closed.
  const std::atomic<bool>* stop = nullptr;
  std::string info;  // sent in REGISTER (ServerOptions::admit reads it)
  // Called with the server's WELCOME info after each registration, on the thread that runs the
  // handler and before any request of that connection (e.g. a new server run: start afresh).
  std::function<void(const std::string& welcome_info)> on_welcome;
};

enum class SiteExit {
  Shutdown,  // the server sent SHUTDOWN: the run is over
  Stopped,   // options.stop was set
  GaveUp,    // max_attempts connections failed in a row
};

// Runs a site: connects, registers, answers every request with `handler` (one at a time, in
// order, on one thread), heartbeats, reconnects with backoff when the connection drops.
// Throws concord::Error when the server refuses this site (unknown name, revoked or wrongly
// signed certificate: the server's reason is in the message) - retrying would not help.
SiteExit run_site_client(const SiteClientOptions& options, SiteHandler handler);

// A flag set by SIGINT and SIGTERM (handlers installed on first call).
const std::atomic<bool>* stop_flag_on_signals();

}  // namespace concord::net
