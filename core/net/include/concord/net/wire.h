// Frames of the site <-> server stream (core/net/proto/concord_net.proto): encoding without
// copying the payload, decoding with every declared length checked, and reassembly of a payload
// from its chunks. Free of gRPC (tests/fuzz builds it alone); the transport is transport.h.
#pragma once

#include <concord/message.h>

#include <cstddef>
#include <cstdint>
#include <string>
#include <vector>

namespace concord::net {

constexpr uint32_t kWireVersion = 1;
// A chunk is 4 KiB .. 4 MiB; a gRPC message is one chunk plus a header of at most kMaxHeaderBytes.
constexpr size_t kMinChunkBytes = size_t(4) << 10;
constexpr size_t kMaxChunkBytes = size_t(4) << 20;
constexpr size_t kDefaultChunkBytes = size_t(1) << 20;
constexpr size_t kMaxHeaderBytes = size_t(16) << 10;
constexpr size_t kMaxFrameBytes = kMaxChunkBytes + kMaxHeaderBytes + 64;

enum class FrameKind : uint32_t {
  Register = 1,
  Welcome = 2,
  Request = 3,
  Reply = 4,
  Error = 5,
  Heartbeat = 6,
  Shutdown = 7,
};
const char* kind_name(FrameKind kind);

struct FrameHeader {
  uint32_t version = kWireVersion;
  FrameKind kind = FrameKind::Heartbeat;
  uint64_t call_id = 0;
  uint64_t total_size = 0;
  uint64_t offset = 0;
  uint32_t chunk_index = 0;
  uint32_t chunk_count = 0;
  uint32_t heartbeat_ms = 0;
  std::string site;
  std::string text;
  std::string info;  // REGISTER / WELCOME: the application's description (at most kMaxInfoBytes)
  uint32_t data_port = 0;  // WELCOME: the data link's port (0: none offered)
  std::string data_token;  // WELCOME with data_port: kDataTokenBytes random bytes
};
constexpr size_t kMaxInfoBytes = size_t(4) << 10;

struct Span {
  const uint8_t* data;
  size_t size;
};

// A decoded frame. `chunk` points into the received bytes (no copy): valid while they are.
struct Frame {
  FrameHeader header;
  std::vector<Span> chunk;
  size_t chunk_size = 0;
};

// The protobuf encoding of Frame{header, chunk} without the chunk's bytes: `prefix + chunk` is
// the complete message (the chunk field comes last, with its tag and length in the prefix).
std::string encode_frame_prefix(const FrameHeader& header, size_t chunk_size);
// A whole frame in one string (small frames, tests).
std::string encode_frame(const FrameHeader& header, const void* chunk = nullptr,
                         size_t chunk_size = 0);

// Decodes one received gRPC message given as its pieces (gRPC slices). Throws concord::Error
// saying what is wrong: not protobuf, a header over kMaxHeaderBytes, a chunk over
// kMaxChunkBytes, an unknown kind or version, chunk fields that contradict each other
// (index >= count, offset + size > total, ...). Nothing is allocated from a declared size.
Frame decode_frame(const std::vector<Span>& pieces);

// Chunks needed for `total` bytes at `chunk_bytes` each (an empty payload is one empty chunk).
uint32_t chunk_count_for(size_t total, size_t chunk_bytes);
// The chunk size from CONCORD_NET_CHUNK_KB (default 1024), checked to be within range.
size_t chunk_bytes_from_env();
// Throws unless kMinChunkBytes <= bytes <= kMaxChunkBytes.
void check_chunk_bytes(size_t bytes);

// Reassembles one payload from its REQUEST or REPLY frames, which arrive in order. The first
// frame's total_size is checked against `max_total` (max_message_bytes()) before the buffer is
// allocated; every later frame must agree with the first (same total and count, next index, next
// offset). Throws concord::Error on any inconsistency.
class PayloadAssembler {
 public:
  explicit PayloadAssembler(size_t max_total);
  // Adds one frame; true when the payload is complete (then take() it).
  bool add(const Frame& frame);
  Bytes take();
  uint64_t total() const { return total_; }
  uint64_t received() const { return received_; }
  bool started() const { return buffer_ != nullptr; }

 private:
  size_t max_total_;
  std::shared_ptr<Buffer> buffer_;
  uint64_t total_ = 0, received_ = 0;
  uint32_t count_ = 0, next_index_ = 0;
  bool complete_ = false;
};

// The data link (concord_net.proto, core/net/src/data_link.h): two TLS connections per site beside
// the stream, one per direction. Each transfer on them is a fixed header followed by `size`
// payload bytes. A site's first transfer on each connection is HELLO_DOWN or HELLO_UP carrying
// the WELCOME's token; the server answers ACCEPT, or REFUSE with a reason (text payload).
constexpr size_t kDataHeaderBytes = 32;
constexpr size_t kDataTokenBytes = 32;
constexpr size_t kMaxRefusalBytes = size_t(4) << 10;

enum class DataKind : uint32_t {
  HelloDown = 1,  // site -> server: this connection carries requests (server -> site)
  HelloUp = 2,    // site -> server: this connection carries replies (site -> server)
  Accept = 3,     // server -> site: the hello is accepted
  Refuse = 4,     // server -> site: the hello is refused; the payload says why
  Request = 5,    // server -> site: a request payload (an encoded Message) of call `call_id`
  Reply = 6,      // site -> server: the reply payload of call `call_id`
};
const char* data_kind_name(DataKind kind);

struct DataHeader {
  DataKind kind = DataKind::Accept;
  uint64_t call_id = 0;
  uint64_t size = 0;  // payload bytes that follow the header
};

// Layout: "CNDL", u32 wire version, u32 kind, u32 zero, u64 call id, u64 size; little-endian.
void encode_data_header(const DataHeader& header, uint8_t out[kDataHeaderBytes]);
// Checks everything a peer declares before anything is allocated: magic, version, kind, the
// call id (> 0 exactly for REQUEST / REPLY), the size (the token's for a hello, none for ACCEPT,
// at most kMaxRefusalBytes for REFUSE, at most `max_payload` for REQUEST / REPLY). Throws
// concord::Error saying what is wrong.
DataHeader decode_data_header(const uint8_t* bytes, size_t size, size_t max_payload);

}  // namespace concord::net
