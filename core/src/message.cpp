// Wire format (little-endian), version 1:
//   "CONCORD\1" | u64 total size | header fields | arrays' table | data, each array 64-aligned
// Strings are u32 length + bytes. decode() checks every length, count and shape against the
// bytes that remain, with overflow-checked arithmetic, before it allocates anything.
#include <concord/checked.h>
#include <concord/error.h>
#include <concord/message.h>

#include <fcntl.h>
#include <sys/stat.h>
#include <unistd.h>

#include <cstdlib>
#include <cstring>
#include <fstream>
#include <map>
#include <mutex>

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
  return size ? (checked_add(size, 63, "message buffer") / 64) * 64 : 64;
}
}  // namespace

Buffer::Buffer(size_t size, ForOverwrite) : size_(size) {
  data_ = pool().take(capacity_for(size));
  if (!data_) throw Error("out of memory allocating a " + std::to_string(size) + "-byte message");
}
Buffer::Buffer(size_t size) : Buffer(size, ForOverwrite{}) {
  std::memset(data_, 0, size_);
}

Buffer::~Buffer() {
  pool().give(data_, capacity_for(size_));
}

size_t max_message_bytes() {
  return size_limit_from_env("CONCORD_MAX_MESSAGE_MB", 4096);
}

namespace {
constexpr char kMagic[8] = {'C', 'O', 'N', 'C', 'O', 'R', 'D', 1};
size_t align64(size_t n, const std::string& what) {
  return checked_add(n, 63, what) & ~size_t(63);
}

// A name from the bytes as error text: control bytes (a NUL would cut the message short, an ESC
// would reach the terminal) as \xNN, and at most 64 bytes of it.
std::string printable(const std::string& name) {
  std::string out;
  for (size_t i = 0; i < name.size() && i < 64; ++i) {
    const unsigned char c = static_cast<unsigned char>(name[i]);
    if (c < 0x20 || c == 0x7f) {
      static const char* hex = "0123456789abcdef";
      out += {'\\', 'x', hex[c >> 4], hex[c & 15]};
    } else {
      out += char(c);
    }
  }
  if (name.size() > 64) out += "... (" + std::to_string(name.size()) + " bytes)";
  return out;
}

// The smallest encoding of one entry of each table: a bound on how many the remaining bytes can
// hold, checked before anything is reserved for them.
constexpr size_t kMinScalar = 4 + 8;     // empty key, double
constexpr size_t kMinText = 4 + 4;       // empty key, empty value
constexpr size_t kMinArray = 4 + 1 + 4;  // empty name, dtype, 0 dims
constexpr uint32_t kMaxDims = 16;

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
    put<uint32_t>(count(s.size(), "string"));
    raw(s.data(), s.size());
  }
  // A length or count as the format's u32; larger would be written truncated.
  static uint32_t count(size_t n, const char* what) {
    if (n > UINT32_MAX)
      throw Error(std::string("cannot encode message: ") + what + " of " + std::to_string(n) +
                  " exceeds the wire format's 32-bit limit");
    return uint32_t(n);
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
  // A table's entry count, refused when the remaining bytes cannot hold that many entries of at
  // least `min_entry` bytes each (so no count can make decode reserve or loop beyond the input).
  uint32_t count(size_t min_entry, const char* table) {
    uint32_t n = get<uint32_t>();
    if (n > (size - pos) / min_entry)
      throw Error("corrupt or truncated message: " + std::to_string(n) + " " + table +
                  " at offset " + std::to_string(pos - 4) + " cannot fit in the " +
                  std::to_string(size - pos) + " bytes left");
    return n;
  }
};

// Writes everything but array data; returns the header size (with w.p null it only measures).
void write_header(Writer& w, const Message& m, size_t total) {
  w.raw(kMagic, 8);
  w.put<uint64_t>(total);
  w.str(m.type);
  w.put<int64_t>(m.round);
  w.str(m.site);
  w.put<uint32_t>(Writer::count(m.scalars.size(), "number of scalars"));
  for (const auto& [k, v] : m.scalars) {
    w.str(k);
    w.put<double>(v);
  }
  w.put<uint32_t>(Writer::count(m.text.size(), "number of text fields"));
  for (const auto& [k, v] : m.text) {
    w.str(k);
    w.str(v);
  }
  w.put<uint32_t>(Writer::count(m.arrays.size(), "number of arrays"));
  for (const auto& [name, a] : m.arrays) {
    if (a.shape().size() > kMaxDims)
      throw Error("cannot encode message: array " + name + " has " +
                  std::to_string(a.shape().size()) + " dims (the wire format allows " +
                  std::to_string(kMaxDims) + ")");
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
  const std::string what = "cannot encode message '" + m.type + "'";
  size_t total = align64(measure.pos, what);
  for (const auto& [name, a] : m.arrays)
    total = checked_add(total, align64(a.nbytes(), what), what);
  // The buffer may hold an earlier message's bytes (pool): every byte below is written, the
  // padding after the header and after each array with zeros.
  auto buf = std::make_shared<Buffer>(total, Buffer::ForOverwrite{});
  uint8_t* out = buf->data();
  Writer w{out};
  write_header(w, m, total);
  size_t off = align64(w.pos, what);
  std::memset(out + w.pos, 0, off - w.pos);
  for (const auto& [name, a] : m.arrays) {
    const size_t n = a.nbytes(), padded = align64(n, what);
    if (n) std::memcpy(out + off, a.raw(), n);
    std::memset(out + off + n, 0, padded - n);
    off += padded;
  }
  return buf;
}

Message decode(const Bytes& bytes) {
  if (!bytes) throw Error("empty message");
  const size_t limit = max_message_bytes();
  Reader r{bytes->data(), bytes->size()};
  r.need(8);
  if (std::memcmp(bytes->data(), kMagic, 8) != 0)
    throw Error("not a Concord message (bad magic bytes or wire-format version)");
  r.pos = 8;
  // A network channel reads this field first and allocates from it: check it before the rest.
  uint64_t total = r.get<uint64_t>();
  if (total > limit)
    throw Error("message declares " + std::to_string(total) + " bytes, above the limit of " +
                std::to_string(limit >> 20) + " MiB (CONCORD_MAX_MESSAGE_MB)");
  if (total != bytes->size())
    throw Error("corrupt or truncated message: header says " + std::to_string(total) +
                " bytes, got " + std::to_string(bytes->size()));
  Message m;
  m.type = r.str();
  m.round = r.get<int64_t>();
  m.site = r.str();
  const auto duplicate = [](const char* what, const std::string& key) {
    return Error(std::string("corrupt message: ") + what + " '" + printable(key) +
                 "' appears twice");
  };
  for (uint32_t i = 0, n = r.count(kMinScalar, "scalars"); i < n; ++i) {
    std::string k = r.str();
    double v = r.get<double>();
    if (!m.scalars.try_emplace(std::move(k), v).second) throw duplicate("scalar", k);
  }
  for (uint32_t i = 0, n = r.count(kMinText, "text fields"); i < n; ++i) {
    std::string k = r.str();
    std::string v = r.str();
    if (!m.text.try_emplace(std::move(k), std::move(v)).second) throw duplicate("text field", k);
  }
  struct Entry {
    std::string name;
    DType dtype;
    std::vector<int64_t> shape;
    size_t nbytes;
  };
  std::vector<Entry> entries;
  const uint32_t na = r.count(kMinArray, "arrays");
  entries.reserve(na);
  for (uint32_t i = 0; i < na; ++i) {
    Entry e;
    e.name = r.str();
    const std::string what = "corrupt message: array " + printable(e.name);
    uint8_t dt = r.get<uint8_t>();
    if (dt > uint8_t(DType::U8)) throw Error(what + ": unknown dtype " + std::to_string(dt));
    e.dtype = DType(dt);
    uint32_t nd = r.get<uint32_t>();
    if (nd > kMaxDims) throw Error(what + " has " + std::to_string(nd) + " dims");
    r.need(size_t(nd) * 8);
    e.shape.resize(nd);
    for (auto& d : e.shape) d = r.get<int64_t>();
    e.nbytes = checked_nbytes(e.dtype, e.shape, what);
    entries.push_back(std::move(e));
  }
  size_t off = align64(r.pos, "corrupt message");
  auto owner = std::shared_ptr<const void>(bytes, bytes->data());
  for (auto& e : entries) {
    if (off > bytes->size() || e.nbytes > bytes->size() - off)
      throw Error("corrupt or truncated message: array " + printable(e.name) + " (" +
                  std::to_string(e.nbytes) + " bytes at offset " + std::to_string(off) +
                  ") runs past the end");
    Array a =
        Array::view(e.dtype, std::move(e.shape), const_cast<uint8_t*>(bytes->data()) + off, owner);
    if (!m.arrays.try_emplace(e.name, std::move(a)).second) throw duplicate("array", e.name);
    off += align64(e.nbytes, "corrupt message");
  }
  if (off != bytes->size())
    throw Error("corrupt message: its arrays end at offset " + std::to_string(off) + " of " +
                std::to_string(bytes->size()));
  return m;
}

namespace {
Bytes read_file_within(const std::string& file, size_t max_bytes, const char* limit_name) {
  // Opened without blocking (a FIFO would wait for a writer) and checked on the descriptor, so
  // the file checked is the file read.
  int fd = ::open(file.c_str(), O_RDONLY | O_NONBLOCK | O_CLOEXEC);
  if (fd < 0) throw Error("cannot read " + file + ": " + std::strerror(errno));
  struct Closer {
    int fd;
    ~Closer() { ::close(fd); }
  } closer{fd};
  struct stat st {};
  if (::fstat(fd, &st) != 0) throw Error("cannot read " + file + ": " + std::strerror(errno));
  if (S_ISDIR(st.st_mode)) throw Error("cannot read " + file + ": it is a folder, not a file");
  if (!S_ISREG(st.st_mode)) throw Error("cannot read " + file + ": not a regular file");
  const size_t size = size_t(st.st_size);
  if (size > max_bytes)
    throw Error("cannot read " + file + ": " + std::to_string(size) +
                " bytes, above the limit of " + std::to_string(max_bytes >> 20) + " MiB" +
                limit_name);
  auto buf = std::make_shared<Buffer>(size, Buffer::ForOverwrite{});
  size_t got = 0;
  while (got < size) {
    ssize_t n = ::read(fd, buf->data() + got, size - got);
    if (n < 0 && errno == EINTR) continue;
    if (n < 0) throw Error("cannot read " + file + ": " + std::strerror(errno));
    if (n == 0) throw Error("cannot read " + file + ": it shrank while being read");
    got += size_t(n);
  }
  return buf;
}
}  // namespace

Bytes read_file(const std::string& file) {
  return read_file_within(file, max_message_bytes(), " (CONCORD_MAX_MESSAGE_MB)");
}
Bytes read_file(const std::string& file, size_t max_bytes) {
  return read_file_within(file, max_bytes, "");
}

}  // namespace concord
