#include <concord/error.h>
#include <concord/harmonizer.h>
#include <concord/message.h>

namespace concord {

void save_stats(const Stats& stats, const std::string& file, const std::string& method) {
  Message m;
  m.type = "harmonizer-stats";
  m.arrays = stats.arrays;
  m.scalars = stats.scalars;
  m.scalars["__weight"] = stats.weight;
  m.text["method"] = method;
  Bytes b = encode(m);
  write_file_atomic(file, b->data(), b->size());
}

Stats load_stats(const std::string& file, std::string* method) {
  Message m;
  try {
    m = decode(read_file(file));
  } catch (const Error& e) {
    throw Error(file + ": " + e.what());
  }
  if (m.type != "harmonizer-stats") throw Error(file + ": not a harmonizer statistics file");
  Stats s;
  s.arrays = m.arrays;
  s.scalars = m.scalars;
  s.weight = s.scalars["__weight"];
  s.scalars.erase("__weight");
  if (method) *method = m.text["method"];
  return s;
}

}  // namespace concord
