// Wire format (little-endian), version 1:
//   "CONCORD\1" | u64 total size | header fields | arrays' table | data, each array 64-aligned
// Strings are u32 length + bytes. decode() checks every length against the buffer.
#include <concord/error.h>
#include <concord/message.h>

#include <fcntl.h>
#include <unistd.h>

#include <cstdlib>
#include <cstring>
#include <filesystem>
#include <fstream>
#include <map>
#include <mutex>
#include <random>

namespace concord {

namespace {
// Freed message buffers are kept for reuse: a federation sends messages of the same sizes every
// round, and a reused buffer has its pages mapped already (a fresh 40 MB one page-faults 10,000
// times, which costs more than copying into it). Bounded by CONCORD_BUFFER_POOL_MB (1024).
class BufferPool {
 public:
  uint8_t* take(size_t bytes) {
    {
      std::lock_guard<std::mutex> lock(mutex_);
      auto it = free_.find(bytes);
      if (it != free_.end()) {
        uint8_t* p = it->second;
        free_.erase(it);
        held_ -= bytes;
        return p;
      }
    }
    return static_cast<uint8_t*>(std::aligned_alloc(64, bytes));
  }
  void give(uint8_t* p, size_t bytes) {
    {
      std::lock_guard<std::mutex> lock(mutex_);
      if (bytes >= kMinPooled && held_ + bytes <= limit_) {
        free_.emplace(bytes, p);
        held_ += bytes;
        return;
      }
    }
    std::free(p);
  }

 private:
  static constexpr size_t kMinPooled = 1 << 20;  // small buffers: malloc is fast enough
  std::mutex mutex_;
  std::multimap<size_t, uint8_t*> free_;
  size_t held_ = 0;
  size_t limit_ = [] {
    const char* v = std::getenv("CONCORD_BUFFER_POOL_MB");
    return size_t(v ? std::atol(v) : 1024) << 20;
  }();
};

BufferPool& pool() {
  static BufferPool* p = new BufferPool;  // never destroyed: buffers may outlive statics
  return *p;
}
}  // namespace

uint8_t* pooled_alloc(size_t bytes) {
  return pool().take(bytes);
}
void pooled_free(uint8_t* p, size_t bytes) {
  pool().give(p, bytes);
}

namespace {

size_t capacity_for(size_t size) {
  return size ? ((size + 63) / 64) * 64 : 64;
}
}  // namespace

Buffer::Buffer(size_t size) : size_(size) {
  data_ = pool().take(capacity_for(size));
  if (!data_) throw Error("out of memory allocating a " + std::to_string(size) + "-byte message");
}
Buffer::~Buffer() {
  pool().give(data_, capacity_for(size_));
}

namespace {
constexpr char kMagic[8] = {'C', 'O', 'N', 'C', 'O', 'R', 'D', 1};
size_t align64(size_t n) {
  return (n + 63) & ~size_t(63);
}

struct Writer {
  uint8_t* p;
  size_t pos = 0;
  void raw(const void* d, size_t n) {
    if (p) std::memcpy(p + pos, d, n);
    pos += n;
  }
  template <class T>
  void put(T v) {
    raw(&v, sizeof(T));
  }
  void str(const std::string& s) {
    put<uint32_t>(uint32_t(s.size()));
    raw(s.data(), s.size());
  }
};

struct Reader {
  const uint8_t* p;
  size_t size;
  size_t pos = 0;
  void need(size_t n) {
    if (n > size || pos > size - n)
      throw Error("corrupt or truncated message: needs " + std::to_string(n) + " bytes at offset " +
                  std::to_string(pos) + " of " + std::to_string(size));
  }
  template <class T>
  T get() {
    need(sizeof(T));
    T v;
    std::memcpy(&v, p + pos, sizeof(T));
    pos += sizeof(T);
    return v;
  }
  std::string str() {
    uint32_t n = get<uint32_t>();
    need(n);
    std::string s(reinterpret_cast<const char*>(p + pos), n);
    pos += n;
    return s;
  }
};

// Writes everything but array data; returns the header size (with w.p null it only measures).
void write_header(Writer& w, const Message& m, size_t total) {
  w.raw(kMagic, 8);
  w.put<uint64_t>(total);
  w.str(m.type);
  w.put<int64_t>(m.round);
  w.str(m.site);
  w.put<uint32_t>(uint32_t(m.scalars.size()));
  for (const auto& [k, v] : m.scalars) {
    w.str(k);
    w.put<double>(v);
  }
  w.put<uint32_t>(uint32_t(m.text.size()));
  for (const auto& [k, v] : m.text) {
    w.str(k);
    w.str(v);
  }
  w.put<uint32_t>(uint32_t(m.arrays.size()));
  for (const auto& [name, a] : m.arrays) {
    w.str(name);
    w.put<uint8_t>(uint8_t(a.dtype()));
    w.put<uint32_t>(uint32_t(a.shape().size()));
    for (int64_t d : a.shape()) w.put<int64_t>(d);
  }
}
}  // namespace

Bytes encode(const Message& m) {
  Writer measure{nullptr};
  write_header(measure, m, 0);
  size_t total = align64(measure.pos);
  for (const auto& [name, a] : m.arrays) total += align64(a.nbytes());
  auto buf = std::make_shared<Buffer>(total);
  Writer w{buf->data()};
  write_header(w, m, total);
  size_t off = align64(w.pos);
  std::memset(buf->data() + w.pos, 0, off - w.pos);
  for (const auto& [name, a] : m.arrays) {
    if (a.nbytes()) std::memcpy(buf->data() + off, a.raw(), a.nbytes());
    off += align64(a.nbytes());
  }
  return buf;
}

Message decode(const Bytes& bytes) {
  if (!bytes) throw Error("empty message");
  Reader r{bytes->data(), bytes->size()};
  r.need(8);
  if (std::memcmp(bytes->data(), kMagic, 8) != 0)
    throw Error("not a Concord message (bad magic bytes or wire-format version)");
  r.pos = 8;
  uint64_t total = r.get<uint64_t>();
  if (total != bytes->size())
    throw Error("corrupt or truncated message: header says " + std::to_string(total) +
                " bytes, got " + std::to_string(bytes->size()));
  Message m;
  m.type = r.str();
  m.round = r.get<int64_t>();
  m.site = r.str();
  uint32_t ns = r.get<uint32_t>();
  for (uint32_t i = 0; i < ns; ++i) {
    std::string k = r.str();
    m.scalars[k] = r.get<double>();
  }
  uint32_t nt = r.get<uint32_t>();
  for (uint32_t i = 0; i < nt; ++i) {
    std::string k = r.str();
    m.text[k] = r.str();
  }
  uint32_t na = r.get<uint32_t>();
  struct Entry {
    std::string name;
    DType dtype;
    std::vector<int64_t> shape;
  };
  std::vector<Entry> entries;
  for (uint32_t i = 0; i < na; ++i) {
    Entry e;
    e.name = r.str();
    uint8_t dt = r.get<uint8_t>();
    if (dt > uint8_t(DType::U8)) throw Error("corrupt message: unknown dtype in array " + e.name);
    e.dtype = DType(dt);
    uint32_t nd = r.get<uint32_t>();
    if (nd > 16)
      throw Error("corrupt message: array " + e.name + " has " + std::to_string(nd) + " dims");
    for (uint32_t k = 0; k < nd; ++k) {
      int64_t d = r.get<int64_t>();
      if (d < 0) throw Error("corrupt message: negative dimension in array " + e.name);
      e.shape.push_back(d);
    }
    entries.push_back(std::move(e));
  }
  size_t off = align64(r.pos);
  auto owner = std::shared_ptr<const void>(bytes, bytes->data());
  for (auto& e : entries) {
    size_t n = dtype_size(e.dtype);
    for (int64_t d : e.shape) n *= size_t(d);
    if (off > bytes->size() || n > bytes->size() - off)
      throw Error("corrupt or truncated message: array " + e.name + " runs past the end");
    m.arrays[e.name] =
        Array::view(e.dtype, e.shape, const_cast<uint8_t*>(bytes->data()) + off, owner);
    off += align64(n);
  }
  return m;
}

void write_file_atomic(const std::string& file, const void* data, size_t size) {
  namespace fs = std::filesystem;
  fs::path target(file);
  if (target.has_parent_path()) fs::create_directories(target.parent_path());
  static thread_local std::mt19937_64 rng(std::random_device{}());
  std::string tmp =
      file + ".tmp-" + std::to_string(getpid()) + "-" + std::to_string(rng() % 1000000);
  int fd = ::open(tmp.c_str(), O_WRONLY | O_CREAT | O_TRUNC, 0644);
  if (fd < 0) throw Error("cannot write " + tmp + ": " + std::strerror(errno));
  const uint8_t* p = static_cast<const uint8_t*>(data);
  size_t left = size;
  while (left > 0) {
    ssize_t n = ::write(fd, p, left);
    if (n < 0) {
      int err = errno;
      ::close(fd);
      ::unlink(tmp.c_str());
      throw Error("cannot write " + tmp + ": " + std::strerror(err));
    }
    p += n;
    left -= size_t(n);
  }
  ::fsync(fd);
  ::close(fd);
  if (::rename(tmp.c_str(), file.c_str()) != 0) {
    int err = errno;
    ::unlink(tmp.c_str());
    throw Error("cannot rename " + tmp + " to " + file + ": " + std::strerror(err));
  }
}

void write_file_atomic(const std::string& file, const std::string& text) {
  write_file_atomic(file, text.data(), text.size());
}

Bytes read_file(const std::string& file) {
  std::ifstream in(file, std::ios::binary | std::ios::ate);
  if (!in) throw Error("cannot read " + file);
  std::streamsize n = in.tellg();
  in.seekg(0);
  auto buf = std::make_shared<Buffer>(size_t(n));
  if (!in.read(reinterpret_cast<char*>(buf->data()), n)) throw Error("cannot read " + file);
  return buf;
}

}  // namespace concord
