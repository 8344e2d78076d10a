// Shards of `concord harmonize` and their partial statistics (see harmonize_shard.h).
#include "harmonize_shard.h"

#include "harmonize_common.h"

#include <concord/error.h>
#include <concord/json_text.h>
#include <concord/message.h>
#include <concord/protocol.h>

#include <nlohmann/json.hpp>

#include <algorithm>
#include <cctype>
#include <map>

namespace concord::cli {

using json = nlohmann::json;

namespace {

constexpr const char* kPartType = "concord-harmonize-part";
constexpr const char* kWeight = "__weight";

std::string chunk_prefix(size_t k) {
  return std::to_string(k) + "/";
}

bool all_digits(const std::string& s) {
  return !s.empty() && s.size() <= 9 &&
         std::all_of(s.begin(), s.end(), [](unsigned char c) { return std::isdigit(c); });
}

json parse_json_field(const Message& m, const std::string& key, const std::string& file) {
  auto it = m.text.find(key);
  if (it == m.text.end()) throw Error(file + ": partial statistics without '" + key + "'");
  try {
    return json::parse(it->second);
  } catch (const std::exception& e) {
    throw Error(file + ": partial statistics: '" + key + "' is not valid JSON: " + e.what());
  }
}

}  // namespace

std::string Shard::str() const {
  return std::to_string(index) + "/" + std::to_string(count);
}

Shard parse_shard(const std::string& text) {
  const auto slash = text.find('/');
  const std::string i = text.substr(0, slash);
  const std::string n = slash == std::string::npos ? "" : text.substr(slash + 1);
  if (!all_digits(i) || !all_digits(n))
    throw Error("--shard '" + text + "': expected I/N, e.g. 0/4 (shards 0..N-1)");
  Shard s;
  s.index = std::stoi(i);
  s.count = std::stoi(n);
  if (s.count < 1 || s.index >= s.count)
    throw Error("--shard '" + text + "': the shard index must lie in 0.." +
                std::to_string(std::max(0, s.count - 1)) + " (0-based; N >= 1)");
  return s;
}

int shard_of(const std::string& key, int count) {
  const uint64_t h = std::stoull(checksum(key.data(), key.size()), nullptr, 16);
  return int(h % uint64_t(count));
}

std::vector<InputItem> shard_items(const std::vector<InputItem>& items, const Shard& shard,
                                   bool by_site) {
  if (!shard.active()) return items;
  std::vector<InputItem> mine;
  for (const auto& it : items)
    if (shard_of(by_site ? it.site : it.relative, shard.count) == shard.index) mine.push_back(it);
  return mine;
}

void shard_discovery(Discovery& found, const Shard& shard, bool by_site) {
  if (!shard.active()) return;
  found.items = shard_items(found.items, shard, by_site);
  auto others = [&](const std::string& path) { return shard_of(path, shard.count) != shard.index; };
  found.ignored.erase(std::remove_if(found.ignored.begin(), found.ignored.end(), others),
                      found.ignored.end());
  found.skipped.erase(std::remove_if(found.skipped.begin(), found.skipped.end(),
                                     [&](const auto& s) { return others(s.first); }),
                      found.skipped.end());
}

std::string inputs_digest(const std::vector<InputItem>& items) {
  std::string text;
  for (const auto& it : items)
    text += it.site + '\t' + it.relative + '\t' + (it.role == InputItem::Role::Image ? "i" : "m") +
            '\n';
  return checksum(text.data(), text.size());
}

void save_part(const std::string& file, const PartInfo& info, const std::vector<Stats>& chunks) {
  Message m;
  m.type = kPartType;
  json sites = json::array();
  for (size_t k = 0; k < chunks.size(); ++k) {
    const std::string p = chunk_prefix(k);
    for (const auto& [name, a] : chunks[k].arrays) m.arrays[p + name] = a.clone();
    for (const auto& [name, v] : chunks[k].scalars) m.scalars[p + name] = v;
    m.scalars[p + kWeight] = chunks[k].weight;
    sites.push_back(chunks[k].site);
  }
  json failed = json::array();
  for (const auto& [what, reason] : info.failed) failed.push_back({what, reason});
  m.text["method"] = info.method;
  m.text["args"] = json(info.args).dump();
  m.text["seed"] = info.seed;
  m.text["shard"] = info.shard.str();
  m.text["shard_by"] = info.shard_by;
  m.text["inputs"] = info.inputs;
  m.text["images"] = std::to_string(info.images);
  m.text["chunks"] = sites.dump();
  m.text["failed"] = failed.dump();
  Bytes b = encode(m);
  write_file_atomic(file, b->data(), b->size());
  json side;
  side["partial_statistics_of"] = info.method;
  side["args"] = info.args;
  side["shard"] = info.shard.str();
  side["shard_by"] = info.shard_by;
  side["images"] = info.images;
  side["sites"] = sites;
  side["failed"] = failed;
  side["merge_with"] = "concord harmonize merge PARTS... --stats OUT";
  write_file_atomic(file + ".json", json_text(side, 2) + "\n");
}

Part load_part(const std::string& file) {
  Message m;
  try {
    m = decode(read_file(file));
  } catch (const Error& e) {
    throw Error(file + ": not readable as partial statistics: " + e.what());
  }
  if (m.type != kPartType)
    throw Error(file +
                ": not a partial statistics file (written by `concord harmonize fit --shard I/N`)" +
                (m.type == protocol::kSetStatistics
                     ? std::string("; it holds complete statistics, which need no merge")
                     : std::string()));
  Part part;
  part.file = file;
  PartInfo& info = part.info;
  auto text = [&](const std::string& key) {
    auto it = m.text.find(key);
    if (it == m.text.end()) throw Error(file + ": partial statistics without '" + key + "'");
    return it->second;
  };
  info.method = text("method");
  info.seed = text("seed");
  if (info.seed.empty() || info.seed.size() > 20 ||
      !std::all_of(info.seed.begin(), info.seed.end(),
                   [](unsigned char c) { return std::isdigit(c); }) ||
      (info.seed.size() == 20 && info.seed > "18446744073709551615"))
    throw Error(file + ": corrupt partial statistics: seed '" + info.seed + "'");
  info.shard_by = text("shard_by");
  info.inputs = text("inputs");
  try {
    info.shard = parse_shard(text("shard"));
    info.args = parse_json_field(m, "args", file).get<std::vector<std::string>>();
    for (const auto& f : parse_json_field(m, "failed", file))
      info.failed.emplace_back(f.at(0).get<std::string>(), f.at(1).get<std::string>());
    const std::string images = text("images");
    if (!all_digits(images)) throw Error("'images' is not a count");
    info.images = std::stoull(images);
    const json sites = parse_json_field(m, "chunks", file);
    if (!sites.is_array()) throw Error("'chunks' is not a list");
    part.chunks.resize(sites.size());
    for (size_t k = 0; k < sites.size(); ++k) part.chunks[k].site = sites[k].get<std::string>();
  } catch (const Error& e) {
    throw Error(file + ": " + e.what());
  } catch (const std::exception& e) {
    throw Error(file + ": corrupt partial statistics: " + e.what());
  }
  // Arrays and scalars "K/name" belong to chunk K; each chunk has its weight.
  auto chunk_of = [&](const std::string& key, std::string* name) -> Stats& {
    const auto slash = key.find('/');
    const std::string k = key.substr(0, slash);
    if (slash == std::string::npos || !all_digits(k) || std::stoull(k) >= part.chunks.size())
      throw Error(file + ": corrupt partial statistics: entry '" + key + "' names no chunk");
    *name = key.substr(slash + 1);
    return part.chunks[std::stoull(k)];
  };
  std::vector<bool> weighted(part.chunks.size(), false);
  for (auto& [key, a] : m.arrays) {
    std::string name;
    Stats& s = chunk_of(key, &name);
    s.arrays[name] = a.clone();  // decoded arrays alias the file's buffer
  }
  for (const auto& [key, v] : m.scalars) {
    std::string name;
    Stats& s = chunk_of(key, &name);
    if (name == kWeight) {
      if (!(v >= 0) || v > 1e18)
        throw Error(file + ": corrupt partial statistics: weight " + std::to_string(v) +
                    " of site '" + s.site + "'");
      s.weight = v;
      weighted[size_t(&s - part.chunks.data())] = true;
    } else {
      s.scalars[name] = v;
    }
  }
  for (size_t k = 0; k < part.chunks.size(); ++k)
    if (!weighted[k])
      throw Error(file + ": corrupt partial statistics: site '" + part.chunks[k].site +
                  "' has no weight");
  return part;
}

std::vector<Stats> merge_chunks(const std::vector<Part>& parts, Harmonizer& h) {
  if (parts.empty()) throw Error("merge: no partial statistics given");
  const Part& first = parts.front();
  auto differ = [&](const Part& p, const std::string& what, const std::string& theirs,
                    const std::string& ours) {
    return Error(p.file + ": " + what + " " + theirs + " differs from " + ours + " in " +
                 first.file +
                 "; the parts of one merge come from one `harmonize fit --shard` "
                 "command run for every shard");
  };
  auto list = [](const std::vector<std::string>& v) {
    return v.empty() ? std::string("(none)") : "[" + json(v).dump() + "]";
  };
  std::map<int, const Part*> seen;
  for (const Part& p : parts) {
    const PartInfo& a = p.info;
    const PartInfo& b = first.info;
    if (a.method != b.method) throw differ(p, "method", "'" + a.method + "'", "'" + b.method + "'");
    if (a.args != b.args) throw differ(p, "arguments", list(a.args), list(b.args));
    if (a.seed != b.seed) throw differ(p, "seed", a.seed, b.seed);
    if (a.shard_by != b.shard_by) throw differ(p, "--shard-by", a.shard_by, b.shard_by);
    if (a.shard.count != b.shard.count)
      throw differ(p, "shard count", a.shard.str(), b.shard.str());
    if (a.inputs != b.inputs)
      throw differ(p, "input list (digest)", a.inputs,
                   b.inputs +
                       " (the inputs changed between "
                       "shards, or other INPUTS were "
                       "given)");
    auto [it, fresh] = seen.emplace(a.shard.index, &p);
    if (!fresh)
      throw Error(p.file + " and " + it->second->file + " are both shard " + a.shard.str() +
                  ": give each shard's part once");
  }
  std::string missing;
  for (int i = 0; i < first.info.shard.count; ++i)
    if (!seen.count(i))
      missing += (missing.empty() ? "" : ", ") + std::to_string(i) + "/" +
                 std::to_string(first.info.shard.count);
  if (!missing.empty())
    throw Error("merge: shard(s) " + missing + " missing (given " + std::to_string(parts.size()) +
                " of " + std::to_string(first.info.shard.count) +
                " parts); run `harmonize fit --shard` for them, or give their files");

  // Per site, its chunks in shard order (the order does not depend on the order of PARTS).
  std::map<std::string, std::vector<Stats>> by_site;
  for (const auto& [index, p] : seen)
    for (const Stats& c : p->chunks) {
      auto& list_of_site = by_site[c.site];
      if (!list_of_site.empty() && first.info.shard_by == "site")
        throw Error(p->file + ": site '" + c.site +
                    "' appears in two parts of a fit sharded by site (corrupt or renamed parts)");
      list_of_site.push_back(c);
    }
  std::vector<Stats> out;
  for (auto& [site, chunks] : by_site) {
    if (chunks.size() == 1) {
      out.push_back(std::move(chunks.front()));
      continue;
    }
    // A site split over shards (--shard-by path): its chunks combined first, as one site.
    for (auto& c : chunks) c.site.clear();
    try {
      Stats s = h.combine(chunks);
      s.site = site;
      out.push_back(std::move(s));
    } catch (const std::exception& e) {
      throw Error("merge: combining the " + std::to_string(chunks.size()) + " chunks of site '" +
                  site + "' failed: " + e.what());
    }
  }
  return out;
}

}  // namespace concord::cli
