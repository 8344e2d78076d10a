// Messages between coordinator and sites, and their wire format.
//
// A Message carries only named arrays (model tensors, declared statistics), scalars and short
// text fields: never images or labels. encode() writes the bytes a network Channel will send;
// decode() reads them back without copying array data (arrays alias the buffer).
#pragma once

#include <concord/array.h>
// write_file_atomic lives in durable_output.h; included here so that code which found it in
// message.h (plugins, other branches) keeps building.
#include <concord/durable_output.h>

#include <cstdint>
#include <map>
#include <memory>
#include <string>

namespace concord {

// An immutable, 64-byte aligned byte buffer. Its memory may be recycled from an earlier
// message (the pool), so it is zero-filled unless the caller promises to write every byte.
class Buffer {
 public:
  struct ForOverwrite {};        // tag: the caller overwrites all size() bytes before anyone reads
  explicit Buffer(size_t size);  // zero-filled
  Buffer(size_t size, ForOverwrite);
  ~Buffer();
  Buffer(const Buffer&) = delete;
  Buffer& operator=(const Buffer&) = delete;
  uint8_t* data() { return data_; }
  const uint8_t* data() const { return data_; }
  size_t size() const { return size_; }

 private:
  uint8_t* data_;
  size_t size_;
};
using Bytes = std::shared_ptr<const Buffer>;

struct Message {
  std::string type;  // the message types of the site protocol: see protocol.h
  int64_t round = 0;
  std::string site;
  NamedArrays arrays;
  std::map<std::string, double> scalars;
  std::map<std::string, std::string> text;
};

// The largest message, statistics file or checkpoint Concord accepts, in bytes:
// CONCORD_MAX_MESSAGE_MB MiB (default 4096). Checked before anything is allocated for it.
size_t max_message_bytes();

// Every byte of the result is written (padding is zero): equal messages give equal bytes.
Bytes encode(const Message& m);
// The bytes may come from an untrusted peer or file: every length, count, dtype and shape is
// checked against the buffer (and the size against max_message_bytes()) with overflow-checked
// arithmetic before anything is allocated. Throws Error on a truncated or corrupt buffer.
Message decode(const Bytes& bytes);

// The whole of a regular file (a folder, device or pipe is refused), at most max_message_bytes()
// or `max_bytes`: the size is checked before the buffer is allocated.
Bytes read_file(const std::string& file);
Bytes read_file(const std::string& file, size_t max_bytes);

}  // namespace concord
