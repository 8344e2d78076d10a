#include <concord/checked.h>
#include <concord/error.h>
#include <concord/net/wire.h>

#include "concord_net.pb.h"

#include <google/protobuf/io/coded_stream.h>
#include <google/protobuf/io/zero_copy_stream.h>
#include <google/protobuf/wire_format_lite.h>

#include <algorithm>
#include <cstring>

namespace concord::net {

namespace pbio = google::protobuf::io;
using google::protobuf::internal::WireFormatLite;

namespace {

constexpr int kHeaderField = 1;
constexpr int kChunkField = 2;

// The received message's pieces as protobuf's zero-copy input (no byte is copied).
class SpanInput : public pbio::ZeroCopyInputStream {
 public:
  explicit SpanInput(const std::vector<Span>& pieces) : pieces_(pieces) {}
  bool Next(const void** data, int* size) override {
    while (piece_ < pieces_.size()) {
      const Span& s = pieces_[piece_];
      if (pos_ < s.size) {
        size_t n = std::min<size_t>(s.size - pos_, 1 << 30);
        *data = s.data + pos_;
        *size = int(n);
        pos_ += n;
        count_ += int64_t(n);
        last_ = n;
        return true;
      }
      ++piece_;
      pos_ = 0;
    }
    last_ = 0;
    return false;
  }
  void BackUp(int count) override {
    // Only within the last piece returned by Next (protobuf's contract).
    size_t c = std::min<size_t>(size_t(std::max(count, 0)), last_);
    pos_ -= c;
    count_ -= int64_t(c);
    last_ -= c;
  }
  bool Skip(int count) override {
    const void* d;
    int n;
    while (count > 0) {
      if (!Next(&d, &n)) return false;
      if (n > count) {
        BackUp(n - count);
        return true;
      }
      count -= n;
    }
    return true;
  }
  int64_t ByteCount() const override { return count_; }

 private:
  const std::vector<Span>& pieces_;
  size_t piece_ = 0, pos_ = 0, last_ = 0;
  int64_t count_ = 0;
};

void check_header(const FrameHeader& h, size_t chunk_size, bool has_chunk) {
  const std::string kind = kind_name(h.kind);
  if (h.version != kWireVersion)
    throw Error("frame speaks wire version " + std::to_string(h.version) +
                "; this build speaks version " + std::to_string(kWireVersion));
  if (kind == "unknown") throw Error("frame of unknown kind " + std::to_string(uint32_t(h.kind)));
  const bool payload = h.kind == FrameKind::Request || h.kind == FrameKind::Reply;
  if (h.kind != FrameKind::Welcome && (h.data_port != 0 || !h.data_token.empty()))
    throw Error(kind + " frame offers a data link");
  if (h.data_port > 65535) throw Error("welcome frame: data port " + std::to_string(h.data_port));
  if (h.data_port != 0 && h.data_token.size() != kDataTokenBytes)
    throw Error("welcome frame: data-link token of " + std::to_string(h.data_token.size()) +
                " bytes (expected " + std::to_string(kDataTokenBytes) + ")");
  if (!payload) {
    if (has_chunk) throw Error(kind + " frame carries payload bytes");
    if (h.kind != FrameKind::Error && h.call_id != 0)
      throw Error(kind + " frame names call " + std::to_string(h.call_id));
    if (h.kind == FrameKind::Register && h.site.empty())
      throw Error("register frame names no site");
    return;
  }
  if (h.call_id == 0) throw Error(kind + " frame without a call id");
  if (h.chunk_count == 0) throw Error(kind + " frame declares 0 chunks");
  if (h.chunk_index >= h.chunk_count)
    throw Error(kind + " frame: chunk index " + std::to_string(h.chunk_index) + " of " +
                std::to_string(h.chunk_count) + " chunks");
  const uint64_t end = checked_add(h.offset, uint64_t(chunk_size), kind + " frame offset");
  if (end > h.total_size)
    throw Error(kind + " frame: chunk [" + std::to_string(h.offset) + ", " + std::to_string(end) +
                ") runs past the payload's " + std::to_string(h.total_size) + " bytes");
  if (h.chunk_index + 1 < h.chunk_count && chunk_size == 0)
    throw Error(kind + " frame: chunk " + std::to_string(h.chunk_index) + " of " +
                std::to_string(h.chunk_count) + " is empty");
  // Every chunk but the last holds at least one byte, so count <= total (or 1 when empty).
  if (uint64_t(h.chunk_count) > std::max<uint64_t>(h.total_size, 1))
    throw Error(kind + " frame declares " + std::to_string(h.chunk_count) + " chunks for " +
                std::to_string(h.total_size) + " bytes");
}

}  // namespace

const char* kind_name(FrameKind kind) {
  switch (kind) {
    case FrameKind::Register:
      return "register";
    case FrameKind::Welcome:
      return "welcome";
    case FrameKind::Request:
      return "request";
    case FrameKind::Reply:
      return "reply";
    case FrameKind::Error:
      return "error";
    case FrameKind::Heartbeat:
      return "heartbeat";
    case FrameKind::Shutdown:
      return "shutdown";
  }
  return "unknown";
}

std::string encode_frame_prefix(const FrameHeader& h, size_t chunk_size) {
  v1::FrameHeader pb;
  pb.set_version(h.version);
  pb.set_kind(v1::FrameKind(h.kind));
  pb.set_call_id(h.call_id);
  pb.set_total_size(h.total_size);
  pb.set_offset(h.offset);
  pb.set_chunk_index(h.chunk_index);
  pb.set_chunk_count(h.chunk_count);
  pb.set_heartbeat_ms(h.heartbeat_ms);
  pb.set_site(h.site);
  pb.set_text(h.text.size() > kMaxHeaderBytes / 2 ? h.text.substr(0, kMaxHeaderBytes / 2) : h.text);
  if (h.info.size() > kMaxInfoBytes)
    throw Error(std::string(kind_name(h.kind)) + " frame: info of " +
                std::to_string(h.info.size()) + " bytes (at most " + std::to_string(kMaxInfoBytes) +
                ")");
  pb.set_info(h.info);
  pb.set_data_port(h.data_port);
  pb.set_data_token(h.data_token);
  const std::string header = pb.SerializeAsString();
  std::string out;
  {
    pbio::StringOutputStream raw(&out);
    pbio::CodedOutputStream o(&raw);
    o.WriteTag(WireFormatLite::MakeTag(kHeaderField, WireFormatLite::WIRETYPE_LENGTH_DELIMITED));
    o.WriteVarint32(uint32_t(header.size()));
    o.WriteRaw(header.data(), int(header.size()));
    if (chunk_size > 0) {
      o.WriteTag(WireFormatLite::MakeTag(kChunkField, WireFormatLite::WIRETYPE_LENGTH_DELIMITED));
      o.WriteVarint32(uint32_t(chunk_size));
    }
  }
  return out;
}

std::string encode_frame(const FrameHeader& header, const void* chunk, size_t chunk_size) {
  std::string out = encode_frame_prefix(header, chunk_size);
  if (chunk_size) out.append(static_cast<const char*>(chunk), chunk_size);
  return out;
}

Frame decode_frame(const std::vector<Span>& pieces) {
  size_t total = 0;
  for (const Span& s : pieces) total = checked_add(total, s.size, "frame size");
  if (total > kMaxFrameBytes)
    throw Error("frame of " + std::to_string(total) + " bytes (at most " +
                std::to_string(kMaxFrameBytes) + ")");
  SpanInput input(pieces);
  pbio::CodedInputStream in(&input);
  Frame f;
  bool has_header = false, has_chunk = false;
  v1::FrameHeader pb;
  while (uint32_t tag = in.ReadTag()) {
    const int field = WireFormatLite::GetTagFieldNumber(tag);
    const bool delimited =
        WireFormatLite::GetTagWireType(tag) == WireFormatLite::WIRETYPE_LENGTH_DELIMITED;
    if ((field == kHeaderField || field == kChunkField) && !delimited)
      throw Error("frame field " + std::to_string(field) + " has the wrong wire type");
    if (field == kHeaderField) {
      uint32_t len;
      if (!in.ReadVarint32(&len)) throw Error("frame header: truncated length");
      if (len > kMaxHeaderBytes)
        throw Error("frame header of " + std::to_string(len) + " bytes (at most " +
                    std::to_string(kMaxHeaderBytes) + ")");
      if (has_header) throw Error("frame has two headers");
      auto limit = in.PushLimit(int(len));
      if (!pb.MergeFromCodedStream(&in) || !in.ConsumedEntireMessage() || in.BytesUntilLimit() != 0)
        throw Error("frame header is not a valid FrameHeader");
      in.PopLimit(limit);
      has_header = true;
    } else if (field == kChunkField) {
      uint32_t len;
      if (!in.ReadVarint32(&len)) throw Error("frame chunk: truncated length");
      if (len > kMaxChunkBytes)
        throw Error("frame chunk of " + std::to_string(len) + " bytes (at most " +
                    std::to_string(kMaxChunkBytes) + ")");
      if (has_chunk) throw Error("frame has two chunks");
      has_chunk = true;
      f.chunk.clear();
      size_t left = len;
      while (left > 0) {
        const void* p;
        int n;
        if (!in.GetDirectBufferPointer(&p, &n) || n <= 0)
          throw Error("frame chunk: " + std::to_string(len) + " bytes declared, " +
                      std::to_string(len - left) + " present");
        const size_t take = std::min<size_t>(left, size_t(n));
        f.chunk.push_back({static_cast<const uint8_t*>(p), take});
        in.Skip(int(take));
        left -= take;
      }
      f.chunk_size = len;
    } else if (!WireFormatLite::SkipField(&in, tag)) {
      throw Error("frame field " + std::to_string(field) + " is truncated");
    }
  }
  if (!in.ConsumedEntireMessage()) throw Error("frame is not a valid Frame message");
  if (!has_header) throw Error("frame without a header");
  FrameHeader& h = f.header;
  h.version = pb.version();
  h.kind = FrameKind(uint32_t(pb.kind()));
  h.call_id = pb.call_id();
  h.total_size = pb.total_size();
  h.offset = pb.offset();
  h.chunk_index = pb.chunk_index();
  h.chunk_count = pb.chunk_count();
  h.heartbeat_ms = pb.heartbeat_ms();
  h.site = pb.site();
  h.text = pb.text();
  h.info = pb.info();
  h.data_port = pb.data_port();
  h.data_token = pb.data_token();
  if (h.info.size() > kMaxInfoBytes)
    throw Error("frame info of " + std::to_string(h.info.size()) + " bytes (at most " +
                std::to_string(kMaxInfoBytes) + ")");
  check_header(h, f.chunk_size, has_chunk && f.chunk_size > 0);
  return f;
}

uint32_t chunk_count_for(size_t total, size_t chunk_bytes) {
  if (total == 0) return 1;
  const uint64_t n = (uint64_t(total) + chunk_bytes - 1) / chunk_bytes;
  if (n > UINT32_MAX)
    throw Error("payload of " + std::to_string(total) + " bytes: too many chunks");
  return uint32_t(n);
}

void check_chunk_bytes(size_t bytes) {
  if (bytes < kMinChunkBytes || bytes > kMaxChunkBytes)
    throw Error("chunk size " + std::to_string(bytes) + " bytes: must be " +
                std::to_string(kMinChunkBytes >> 10) + " KiB .. " +
                std::to_string(kMaxChunkBytes >> 20) + " MiB");
}

size_t chunk_bytes_from_env() {
  const char* v = std::getenv("CONCORD_NET_CHUNK_KB");
  if (!v || !*v) return kDefaultChunkBytes;
  char* end = nullptr;
  errno = 0;
  unsigned long long kb = std::strtoull(v, &end, 10);
  if (errno || *end || *v == '-' || kb > (kMaxChunkBytes >> 10))
    throw Error(std::string("CONCORD_NET_CHUNK_KB=") + v + ": expected 4 .. 4096");
  const size_t bytes = size_t(kb) << 10;
  check_chunk_bytes(bytes);
  return bytes;
}

PayloadAssembler::PayloadAssembler(size_t max_total) : max_total_(max_total) {}

bool PayloadAssembler::add(const Frame& f) {
  const FrameHeader& h = f.header;
  const std::string what = std::string(kind_name(h.kind)) + " " + std::to_string(h.call_id);
  if (complete_) throw Error(what + ": chunk after the payload was complete");
  if (!buffer_) {
    if (h.chunk_index != 0 || h.offset != 0)
      throw Error(what + ": first chunk is chunk " + std::to_string(h.chunk_index) + " at offset " +
                  std::to_string(h.offset));
    if (h.total_size > max_total_)
      throw Error(what + ": payload of " + std::to_string(h.total_size) +
                  " bytes is over the limit of " + std::to_string(max_total_) +
                  " bytes (CONCORD_MAX_MESSAGE_MB)");
    buffer_ = std::make_shared<Buffer>(size_t(h.total_size), Buffer::ForOverwrite{});
    total_ = h.total_size;
    count_ = h.chunk_count;
  } else if (h.total_size != total_ || h.chunk_count != count_ || h.chunk_index != next_index_ ||
             h.offset != received_) {
    throw Error(what + ": chunk " + std::to_string(h.chunk_index) + "/" +
                std::to_string(h.chunk_count) + " at offset " + std::to_string(h.offset) + " of " +
                std::to_string(h.total_size) + " bytes; expected chunk " +
                std::to_string(next_index_) + "/" + std::to_string(count_) + " at offset " +
                std::to_string(received_) + " of " + std::to_string(total_));
  }
  // decode_frame checked offset + size <= total; total is the allocated size.
  uint8_t* dst = buffer_->data() + received_;
  for (const Span& s : f.chunk) {
    std::memcpy(dst, s.data, s.size);
    dst += s.size;
  }
  received_ += f.chunk_size;
  ++next_index_;
  if (next_index_ == count_) {
    if (received_ != total_)
      throw Error(what + ": last chunk ends at byte " + std::to_string(received_) + " of " +
                  std::to_string(total_));
    complete_ = true;
  }
  return complete_;
}

Bytes PayloadAssembler::take() {
  if (!complete_) throw Error("payload taken before it was complete");
  Bytes out = std::move(buffer_);
  buffer_.reset();
  return out;
}

namespace {
constexpr uint8_t kDataMagic[4] = {'C', 'N', 'D', 'L'};

void put_u32(uint8_t* p, uint32_t v) {
  for (int i = 0; i < 4; ++i) p[i] = uint8_t(v >> (8 * i));
}
void put_u64(uint8_t* p, uint64_t v) {
  for (int i = 0; i < 8; ++i) p[i] = uint8_t(v >> (8 * i));
}
uint32_t get_u32(const uint8_t* p) {
  uint32_t v = 0;
  for (int i = 0; i < 4; ++i) v |= uint32_t(p[i]) << (8 * i);
  return v;
}
uint64_t get_u64(const uint8_t* p) {
  uint64_t v = 0;
  for (int i = 0; i < 8; ++i) v |= uint64_t(p[i]) << (8 * i);
  return v;
}
}  // namespace

const char* data_kind_name(DataKind kind) {
  switch (kind) {
    case DataKind::HelloDown:
      return "hello-down";
    case DataKind::HelloUp:
      return "hello-up";
    case DataKind::Accept:
      return "accept";
    case DataKind::Refuse:
      return "refuse";
    case DataKind::Request:
      return "request";
    case DataKind::Reply:
      return "reply";
  }
  return "unknown";
}

void encode_data_header(const DataHeader& h, uint8_t out[kDataHeaderBytes]) {
  std::memcpy(out, kDataMagic, 4);
  put_u32(out + 4, kWireVersion);
  put_u32(out + 8, uint32_t(h.kind));
  put_u32(out + 12, 0);
  put_u64(out + 16, h.call_id);
  put_u64(out + 24, h.size);
}

DataHeader decode_data_header(const uint8_t* p, size_t size, size_t max_payload) {
  if (size != kDataHeaderBytes)
    throw Error("data-link header of " + std::to_string(size) + " bytes (expected " +
                std::to_string(kDataHeaderBytes) + ")");
  if (std::memcmp(p, kDataMagic, 4) != 0) throw Error("not a data-link header (bad magic)");
  const uint32_t version = get_u32(p + 4);
  if (version != kWireVersion)
    throw Error("data-link header of wire version " + std::to_string(version) +
                "; this build speaks version " + std::to_string(kWireVersion));
  DataHeader h;
  h.kind = DataKind(get_u32(p + 8));
  const std::string kind = data_kind_name(h.kind);
  if (kind == "unknown")
    throw Error("data-link header of unknown kind " + std::to_string(get_u32(p + 8)));
  if (get_u32(p + 12) != 0) throw Error("data-link " + kind + " header: reserved field is set");
  h.call_id = get_u64(p + 16);
  h.size = get_u64(p + 24);
  const bool payload = h.kind == DataKind::Request || h.kind == DataKind::Reply;
  if (payload != (h.call_id != 0))
    throw Error("data-link " + kind + " header: call id " + std::to_string(h.call_id));
  uint64_t limit = max_payload;
  if (h.kind == DataKind::HelloDown || h.kind == DataKind::HelloUp) {
    if (h.size != kDataTokenBytes)
      throw Error("data-link " + kind + " header: token of " + std::to_string(h.size) +
                  " bytes (expected " + std::to_string(kDataTokenBytes) + ")");
  } else if (h.kind == DataKind::Accept) {
    limit = 0;
  } else if (h.kind == DataKind::Refuse) {
    limit = kMaxRefusalBytes;
  }
  if (h.size > limit)
    throw Error("data-link " + kind + " of " + std::to_string(h.size) +
                " bytes is over the limit of " + std::to_string(limit) +
                (payload ? " bytes (CONCORD_MAX_MESSAGE_MB)" : " bytes"));
  return h;
}

}  // namespace concord::net
