// The network frame decoder and payload reassembly (core/net/src/wire.cpp): bytes from a peer.
// Input: records [u16 little-endian length][one gRPC message], each cut in two pieces (as gRPC
// slices) where its first byte says; payload frames feed one PayloadAssembler, as a stream does.
// A record of exactly 32 bytes is also decoded as a data-link header (decode_data_header).
// CONCORD_FUZZ_WRITE_SEEDS=DIR writes seed inputs into DIR and exits (scripts/fuzz).
#include <concord/net/wire.h>

#include <cstdlib>
#include <filesystem>
#include <fstream>

#include "../fuzz_common.h"

using namespace concord;
using namespace concord::net;

namespace {

void record(std::string& out, const std::string& frame) {
  out.push_back(char(frame.size() & 0xff));
  out.push_back(char(frame.size() >> 8));
  out += frame;
}

void write_seeds(const std::string& dir) {
  std::filesystem::create_directories(dir);
  auto put = [&](const std::string& name, const std::string& bytes) {
    std::ofstream(dir + "/" + name, std::ios::binary) << bytes;
  };
  FrameHeader h;
  h.kind = FrameKind::Reply;
  h.call_id = 4;
  h.total_size = 700;
  h.chunk_count = 3;
  std::string chunked;
  const std::string data(300, 'q');
  for (uint32_t i = 0; i < 3; ++i) {
    h.chunk_index = i;
    h.offset = i * 300;
    record(chunked, encode_frame(h, data.data(), i == 2 ? 100 : 300));
  }
  put("chunked", chunked);
  FrameHeader r;
  r.kind = FrameKind::Register;
  r.site = "site-a";
  r.text = "concord 0.1.0";
  std::string control;
  record(control, encode_frame(r));
  FrameHeader e;
  e.kind = FrameKind::Error;
  e.call_id = 2;
  e.text = "out of memory";
  record(control, encode_frame(e));
  FrameHeader w;
  w.kind = FrameKind::Welcome;
  w.heartbeat_ms = 5000;
  record(control, encode_frame(w));
  put("control", control);
  std::string link;
  for (const DataHeader& d :
       {DataHeader{DataKind::HelloDown, 0, kDataTokenBytes}, DataHeader{DataKind::Reply, 9, 4096},
        DataHeader{DataKind::Refuse, 0, 12}}) {
    uint8_t b[kDataHeaderBytes];
    encode_data_header(d, b);
    record(link, std::string(reinterpret_cast<const char*>(b), sizeof b));
  }
  put("datalink", link);
}

}  // namespace

extern "C" int LLVMFuzzerInitialize(int*, char***) {
  if (const char* dir = std::getenv("CONCORD_FUZZ_WRITE_SEEDS")) {
    write_seeds(dir);
    std::exit(0);
  }
  return 0;
}

extern "C" int LLVMFuzzerTestOneInput(const uint8_t* data, size_t size) {
  concord::fuzz::run([&] {
    PayloadAssembler assembler(1 << 20);
    size_t at = 0;
    while (at + 2 <= size) {
      size_t len = size_t(data[at]) | size_t(data[at + 1]) << 8;
      at += 2;
      len = std::min(len, size - at);
      const uint8_t* msg = data + at;
      at += len;
      const size_t cut = len ? msg[0] % (len + 1) : 0;
      if (len == kDataHeaderBytes) {
        try {
          const DataHeader d = decode_data_header(msg, len, 1 << 20);
          const bool payload = d.kind == DataKind::Request || d.kind == DataKind::Reply;
          if (payload ? (d.call_id == 0 || d.size > (1 << 20)) : d.call_id != 0) std::abort();
          if (d.size > (1 << 20)) std::abort();
        } catch (const Error&) {
        }
      }
      std::vector<Span> pieces = {{msg, cut}, {msg + cut, len - cut}};
      try {
        Frame f = decode_frame(pieces);
        if (f.header.kind == FrameKind::Request || f.header.kind == FrameKind::Reply) {
          if (assembler.add(f)) {
            Bytes b = assembler.take();
            if (b->size() != f.header.total_size) std::abort();
            assembler = PayloadAssembler(1 << 20);
          }
        }
      } catch (const Error&) {
        assembler = PayloadAssembler(1 << 20);  // a stream drops the payload it was building
      }
    }
  });
  return 0;
}
