#include <concord/durable_output.h>
#include <concord/error.h>
#include <concord/harmonizer.h>
#include <concord/message.h>
#include <concord/protocol.h>

#include <cmath>

namespace concord {

Message stats_message(Stats stats, const std::string& type) {
  Message m;
  m.type = type;
  m.arrays = std::move(stats.arrays);
  m.scalars = std::move(stats.scalars);
  m.scalars[protocol::kWeight] = stats.weight;
  return m;
}

// The message may come from a peer or a file: its sizes were checked by decode(); the weight (a
// number of images) must be there and be a finite, non-negative number.
Stats stats_from_message(Message&& m) {
  auto w = m.scalars.find(protocol::kWeight);
  if (w == m.scalars.end()) throw Error("statistics without a weight ('" + m.type + "' message)");
  if (!std::isfinite(w->second) || w->second < 0)
    throw Error("statistics with an invalid weight " + std::to_string(w->second));
  Stats s;
  s.weight = w->second;
  m.scalars.erase(w);
  s.arrays = std::move(m.arrays);
  s.scalars = std::move(m.scalars);
  return s;
}

void save_stats(const Stats& stats, const std::string& file, const std::string& method) {
  Message m = stats_message(stats, protocol::kSetStatistics);
  m.text[protocol::kMethod] = method;
  Bytes b = encode(m);
  write_file_atomic(file, b->data(), b->size());
}

Stats load_stats(const std::string& file, std::string* method) {
  // read_file refuses folders and files above max_message_bytes(), naming the file;
  // decode checks every size the bytes declare.
  Bytes bytes = read_file(file);
  try {
    Message m = decode(bytes);
    if (m.type != protocol::kSetStatistics) throw Error("not a harmonizer statistics file");
    if (method) *method = m.text[protocol::kMethod];
    return stats_from_message(std::move(m));
  } catch (const Error& e) {
    throw Error(file + ": " + e.what());
  }
}

}  // namespace concord
