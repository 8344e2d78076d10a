// Shared by the server and site ends of core/net (internal).
#pragma once

#include <concord/error.h>
#include <concord/message.h>

#include <grpcpp/grpcpp.h>

#include <string>
#include <utility>
#include <vector>

namespace concord::net {

inline const char* const kConnectMethod = "/concord.net.v1.Federation/Connect";
inline const char* const kSoftware = "concord " CONCORD_NET_VERSION;

// True for localhost, 127.x.x.x and ::1 (with a port: "127.0.0.1:7443", "[::1]:0").
bool is_loopback_address(const std::string& host_port);
// A PEM file (at most 1 MiB), or an Error naming it.
std::string read_text(const std::string& file);

// HTTP/2 keepalive (separate from Concord's heartbeats), the same on both ends.
inline std::vector<std::pair<std::string, int>> transport_args() {
  return {{GRPC_ARG_KEEPALIVE_TIME_MS, 20000},
          {GRPC_ARG_KEEPALIVE_TIMEOUT_MS, 10000},
          {GRPC_ARG_KEEPALIVE_PERMIT_WITHOUT_CALLS, 1},
          {GRPC_ARG_HTTP2_MIN_RECV_PING_INTERVAL_WITHOUT_DATA_MS, 10000},
          {GRPC_ARG_HTTP2_MAX_PINGS_WITHOUT_DATA, 0},
          // Throughput for large payloads: a deep stream window and large reads and writes;
          // HTTP/2 frames up to 16 MiB instead of 16 KiB, and a fixed window (no bandwidth-delay
          // probing: its pings and window updates cost 10% of a round's CPU on loopback, and 16 MiB
          // per stream already fills a 1 Gb/s link at 100 ms RTT). bench/net_round measures it.
          {GRPC_ARG_HTTP2_STREAM_LOOKAHEAD_BYTES, 16 << 20},
          {GRPC_ARG_HTTP2_WRITE_BUFFER_SIZE, 8 << 20},
          {GRPC_ARG_TCP_READ_CHUNK_SIZE, 1 << 20},
          {GRPC_ARG_TCP_MIN_READ_CHUNK_SIZE, 256 << 10},
          {GRPC_ARG_TCP_MAX_READ_CHUNK_SIZE, 8 << 20},
          {GRPC_ARG_HTTP2_MAX_FRAME_SIZE, (1 << 24) - 1},
          {GRPC_ARG_HTTP2_BDP_PROBE, 0}};
}

}  // namespace concord::net
