#include <concord/error.h>
#include <concord/harmonizer.h>
#include <concord/message.h>

namespace concord {

static const char* const kWeight = "__weight";

Message stats_message(Stats stats, const std::string& type) {
  Message m;
  m.type = type;
  m.arrays = std::move(stats.arrays);
  m.scalars = std::move(stats.scalars);
  m.scalars[kWeight] = stats.weight;
  return m;
}

Stats stats_from_message(Message&& m) {
  Stats s;
  s.arrays = std::move(m.arrays);
  s.scalars = std::move(m.scalars);
  s.weight = s.scalars[kWeight];
  s.scalars.erase(kWeight);
  return s;
}

void save_stats(const Stats& stats, const std::string& file, const std::string& method) {
  Message m = stats_message(stats, "harmonizer-stats");
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
  if (method) *method = m.text["method"];
  return stats_from_message(std::move(m));
}

}  // namespace concord
