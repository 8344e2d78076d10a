// Messages between coordinator and sites, and their wire format.
//
// A Message carries only named arrays (model tensors, declared statistics), scalars and short
// text fields: never images or labels. encode() writes the bytes a network Channel will send;
// decode() reads them back without copying array data (arrays alias the buffer).
#pragma once

#include <concord/array.h>

#include <cstdint>
#include <map>
#include <memory>
#include <string>

namespace concord {

// An immutable, 64-byte aligned byte buffer.
class Buffer {
 public:
  explicit Buffer(size_t size);
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
  std::string type;  // "train", "update", "evaluate", "metrics", "fit", "stats", ...
  int64_t round = 0;
  std::string site;
  NamedArrays arrays;
  std::map<std::string, double> scalars;
  std::map<std::string, std::string> text;
};

Bytes encode(const Message& m);
// Throws Error on a truncated or corrupt buffer.
Message decode(const Bytes& bytes);

// Atomic file helpers: write to a temporary file in the same folder, fsync, rename.
void write_file_atomic(const std::string& file, const void* data, size_t size);
void write_file_atomic(const std::string& file, const std::string& text);
Bytes read_file(const std::string& file);

}  // namespace concord
