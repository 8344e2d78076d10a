#include "harmonize_common.h"

#include <concord/durable_output.h>
#include <concord/error.h>
#include <concord/message.h>
#include <concord/seed.h>

#include <spdlog/spdlog.h>

#include <fcntl.h>
#include <sys/stat.h>
#include <unistd.h>

#include <algorithm>
#include <cerrno>
#include <cstdio>
#include <cstring>
#include <filesystem>
#include <fstream>
#include <iomanip>
#include <iostream>
#include <map>
#include <sstream>

namespace concord::cli {
namespace fs = std::filesystem;
using json = nlohmann::json;

void Failures::add(const std::string& what, const std::string& reason, ProgressBar* bar) {
  std::lock_guard<std::mutex> lock(mutex_);
  list_.push_back({what, reason});
  inputs_.insert(what);
  if (bar)
    bar->print("error: " + reason);
  else
    spdlog::error("{}", reason);
}

size_t Failures::size() const {
  std::lock_guard<std::mutex> lock(mutex_);
  return list_.size();
}

std::vector<std::pair<std::string, std::string>> Failures::list() const {
  std::lock_guard<std::mutex> lock(mutex_);
  return list_;
}

bool Failures::has(const std::string& what) const {
  std::lock_guard<std::mutex> lock(mutex_);
  return inputs_.count(what) > 0;
}

std::vector<Failures::Group> Failures::by_cause() const {
  auto list = this->list();
  std::sort(list.begin(), list.end());
  std::map<std::string, Group> groups;
  for (const auto& [what, reason] : list) {
    std::string cause = reason;
    if (!what.empty())
      for (size_t at; (at = cause.find(what)) != std::string::npos;) cause.erase(at, what.size());
    const size_t start = cause.find_first_not_of(": ");
    cause = start == std::string::npos ? reason : cause.substr(start);
    Group& g = groups[cause];
    if (g.inputs.empty()) g.cause = cause, g.reason = reason;
    g.inputs.push_back(what);
  }
  std::vector<Group> out;
  for (auto& [cause, g] : groups) out.push_back(std::move(g));
  std::stable_sort(out.begin(), out.end(), [](const Group& a, const Group& b) {
    return a.inputs.size() > b.inputs.size();
  });
  return out;
}

void print_failures(const Failures& f, size_t total, const char* verb) {
  std::cerr << f.size() << " of " << total << " inputs failed to " << verb << ":\n";
  for (const auto& g : f.by_cause()) {
    if (g.inputs.size() == 1) {
      std::cerr << "  " << g.reason << "\n";
      continue;
    }
    std::string examples;
    for (size_t i = 0; i < g.inputs.size() && i < 3; ++i)
      examples += (i ? ", " : "") + fs::path(g.inputs[i]).filename().string();
    std::cerr << "  " << g.inputs.size() << " inputs: " << g.cause << " (e.g. " << examples
              << (g.inputs.size() > 3 ? ", ..." : "") << ")\n";
  }
}

void add_failures_to_report(const Failures& f, json& report) {
  report["failed"] = json::array();
  auto list = f.list();
  std::sort(list.begin(), list.end());
  for (const auto& [what, reason] : list) report["failed"].push_back(reason);
  report["failure_causes"] = json::array();
  for (const auto& g : f.by_cause()) {
    json examples = json::array();
    for (size_t i = 0; i < g.inputs.size() && i < 5; ++i) examples.push_back(g.inputs[i]);
    report["failure_causes"].push_back(
        {{"cause", g.cause}, {"count", g.inputs.size()}, {"examples", examples}});
  }
}

Args build_args(const PluginDesc& desc, const std::vector<std::string>& pairs,
                std::map<std::string, Value> base) {
  std::map<std::string, Value>& given = base;
  for (const auto& p : pairs) {
    auto eq = p.find('=');
    if (eq == std::string::npos || eq == 0)
      throw Error("harmonizer '" + desc.name + "': --arg '" + p + "' is not of the form key=value");
    const std::string key = p.substr(0, eq), text = p.substr(eq + 1);
    auto spec = std::find_if(desc.args.begin(), desc.args.end(),
                             [&](const ArgSpec& a) { return a.name == key; });
    if (spec == desc.args.end()) {
      std::string known;
      for (const auto& a : desc.args) known += (known.empty() ? "" : ", ") + a.name;
      throw Error("harmonizer '" + desc.name + "' has no argument '" + key +
                  "' (arguments: " + (known.empty() ? "none" : known) + ")");
    }
    try {
      given[key] = parse_value(*spec, text);
    } catch (const Error& e) {
      throw Error("harmonizer '" + desc.name + "': " + e.what());
    }
  }
  try {
    return make_args(desc.name, desc.args, given);
  } catch (const Error& e) {
    throw Error("harmonizer '" + desc.name + "': " + e.what());
  }
}

std::vector<std::string> arg_pairs_of(const Args& args) {
  auto text = [](const Value& v) {
    if (v.type != ArgType::Float) return v.str();
    std::ostringstream os;
    os << std::setprecision(17) << v.f;
    return os.str();
  };
  std::vector<std::string> pairs;
  for (const auto& [k, v] : args.values()) {
    std::string t;
    if (v.type == ArgType::List)
      for (size_t i = 0; i < v.items.size(); ++i) t += (i ? "," : "") + text(v.items[i]);
    else
      t = text(v);
    pairs.push_back(k + "=" + t);
  }
  return pairs;
}

const Component& pipeline_harmonizer(const PipelineConfig& c, int index) {
  if (c.harmonizers.empty()) throw Error(c.file + ": the pipeline has no harmonizers");
  if (index < 0 || index >= int(c.harmonizers.size()))
    throw Error(c.file + ": --harmonizer " + std::to_string(index) +
                " is out of range: the pipeline has " + std::to_string(c.harmonizers.size()) +
                " harmonizer(s), numbered from 0");
  return c.harmonizers[size_t(index)];
}

std::string file_checksum(const std::string& file) {
  Bytes raw = read_file(file);
  return checksum(raw->data(), raw->size());
}

std::string checksum(const void* data, size_t size) {
  const auto* p = static_cast<const uint8_t*>(data);
  uint64_t h = 1469598103934665603ull;  // FNV-1a
  for (size_t i = 0; i < size; ++i) h = (h ^ p[i]) * 1099511628211ull;
  char hex[17];
  std::snprintf(hex, sizeof hex, "%016llx", (unsigned long long)h);
  return hex;
}

int worker_count(int jobs) {
  if (jobs > 0) return jobs;
  return int(std::max(1u, std::thread::hardware_concurrency()));
}

void save_stats_with_sidecar(const Stats& stats, const std::string& file, const std::string& method,
                             const std::vector<std::string>& args, size_t images, size_t failed,
                             const std::vector<std::string>& sites, const json& extra) {
  save_stats(stats, file, method);
  json side = extra.is_object() ? extra : json::object();
  side["method"] = method;
  side["args"] = args;
  side["images"] = images;
  side["failed"] = failed;
  side["sites"] = sites;
  write_file_atomic(file + ".json", json_text(side, 2) + "\n");
}

namespace {

// A run killed mid-write leaves its temporaries (never a partial output): remove them.
void remove_leftover_temporaries(const std::string& out) {
  std::vector<fs::path> stale;
  std::error_code ec;
  for (fs::recursive_directory_iterator it(out, ec), end; !ec && it != end; it.increment(ec)) {
    if (is_temporary_name(it->path().filename().string())) {
      stale.push_back(it->path());
      if (it->is_directory()) it.disable_recursion_pending();
    }
  }
  for (const auto& p : stale) fs::remove_all(p, ec);
  if (!stale.empty())
    spdlog::info("removed {} temporaries left by an interrupted run", stale.size());
}

}  // namespace

void claim_output_folder(const std::string& out, const json& mine, bool overwrite, bool shared) {
  auto compact = [](const json& j) { return json_text(j); };
  fs::create_directories(out);
  // Refuse to mix outputs of different harmonizations in one folder (resume must be safe).
  const fs::path marker = fs::path(out) / ".concord-harmonize.json";
  if (fs::exists(marker) && !overwrite) {
    json theirs;
    try {
      Bytes b = read_file(marker.string());
      theirs = json::parse(b->data(), b->data() + b->size());
    } catch (const std::exception&) {
    }
    if (theirs != mine) {
      std::string what;
      for (const auto& [key, value] : mine.items())
        if (!theirs.is_object() || !theirs.contains(key) || theirs[key] != value)
          what += std::string(what.empty() ? "" : "; ") + key + " " +
                  (theirs.is_object() && theirs.contains(key) ? compact(theirs[key]) : "(none)") +
                  " -> " + compact(value);
      if (mine.contains("stats") && theirs.is_object() &&
          theirs.value("stats", json()) != mine["stats"])
        what +=
            " (the statistics changed: the inputs or --stats are not those these outputs were "
            "made with)";
      throw Error(out + " holds outputs of a different harmonization: " + what +
                  "; use another --out, or --overwrite to redo every output");
    }
  }
  write_file_atomic(marker.string(), json_text(mine, 2) + "\n");
  if (!shared) remove_leftover_temporaries(out);
}

std::string escape_line(const std::string& s) {
  std::string out;
  for (char c : s) out += c == '\\' ? "\\\\" : c == '\n' ? "\\n" : std::string(1, c);
  return out;
}

std::vector<std::pair<std::string, std::string>> read_tab_lines(const std::string& file,
                                                                bool* torn) {
  std::ifstream in(file, std::ios::binary);
  std::string text((std::istreambuf_iterator<char>(in)), {});
  std::vector<std::pair<std::string, std::string>> out;
  size_t start = 0;
  for (size_t nl; (nl = text.find('\n', start)) != std::string::npos; start = nl + 1) {
    const std::string line = text.substr(start, nl - start);
    const size_t tab = line.find('\t');
    if (tab == std::string::npos) continue;
    std::string value;
    for (size_t i = tab + 1; i < line.size(); ++i)
      if (line[i] == '\\' && i + 1 < line.size())
        value += line[++i] == 'n' ? '\n' : line[i];
      else
        value += line[i];
    out.push_back({line.substr(0, tab), value});
  }
  if (torn) *torn = start < text.size();
  return out;
}

OutputRecords::OutputRecords(const std::string& out, const std::string& shard_tag) {
  const std::string base = ".concord-harmonize.inputs";
  file_ = (fs::path(out) / (shard_tag.empty() ? base : base + "." + shard_tag)).string();
  // Other runs' records (the unsharded file, then the shards' in name order) vouch for outputs
  // too; this process's own file is read last and is the one it appends to and compacts.
  std::vector<std::string> others;
  std::error_code ec;
  for (fs::directory_iterator it(out, ec), end; !ec && it != end; it.increment(ec)) {
    const std::string name = it->path().filename().string();
    if (name.rfind(base + ".shard-", 0) == 0 && it->path().string() != file_ &&
        !is_temporary_name(name))
      others.push_back(it->path().string());
  }
  std::sort(others.begin(), others.end());
  if (!shard_tag.empty()) others.insert(others.begin(), (fs::path(out) / base).string());
  for (const auto& f : others)
    for (auto& [id, rel] : read_tab_lines(f)) records_[rel] = id;
  // "identity<TAB>relative<LF>"; a torn last line (a killed run) is dropped.
  bool torn = false;
  for (auto& [id, rel] : read_tab_lines(file_, &torn)) records_[rel] = id, own_[rel] = id;
  if (torn) compact();  // before appending after it
  fd_ = ::open(file_.c_str(), O_WRONLY | O_CREAT | O_APPEND | O_CLOEXEC, 0644);
  if (fd_ < 0) throw Error(file_ + ": cannot open: " + std::strerror(errno));
}

OutputRecords::~OutputRecords() {
  if (fd_ >= 0) ::close(fd_);
}

bool OutputRecords::matches(const std::string& relative, const std::string& identity) const {
  std::lock_guard<std::mutex> lock(mutex_);
  auto it = records_.find(relative);
  return it != records_.end() && it->second == identity;
}

void OutputRecords::record(const std::string& relative, const std::string& identity) {
  std::lock_guard<std::mutex> lock(mutex_);
  records_[relative] = identity;
  own_[relative] = identity;
  const std::string text = identity + "\t" + escape_line(relative) + "\n";
  if (::write(fd_, text.data(), text.size()) != ssize_t(text.size()))
    throw Error(file_ + ": cannot write: " + std::strerror(errno));
}

void OutputRecords::compact() {
  std::lock_guard<std::mutex> lock(mutex_);
  std::string text;
  for (const auto& [rel, id] : own_) text += id + "\t" + escape_line(rel) + "\n";
  write_file_atomic(file_, text);
  if (fd_ >= 0) {  // the rename replaced the file the descriptor appends to
    ::close(fd_);
    fd_ = ::open(file_.c_str(), O_WRONLY | O_CREAT | O_APPEND | O_CLOEXEC, 0644);
  }
}

std::string input_identity(const std::string& path) {
  auto one = [](const std::string& p) {
    struct stat st {};
    if (::stat(p.c_str(), &st) != 0) return std::string("missing");
    return std::to_string(st.st_size) + ":" +
           std::to_string(int64_t(st.st_mtim.tv_sec) * 1000000000 + st.st_mtim.tv_nsec);
  };
  std::error_code ec;
  if (!fs::is_directory(path, ec)) return one(path);
  std::vector<std::string> lines;
  for (fs::directory_iterator it(path, ec), end; !ec && it != end; it.increment(ec))
    lines.push_back(it->path().filename().string() + " " + one(it->path().string()));
  std::sort(lines.begin(), lines.end());
  std::string all;
  for (const auto& l : lines) all += l + "\n";
  return "dir:" + checksum(all.data(), all.size());
}

std::string stats_digest(const Stats& stats) {
  Bytes b = encode(stats_message(stats, "harmonizer-stats"));
  return checksum(b->data(), b->size());
}

std::vector<bool> pick_report_items(const std::vector<std::string>& site_of, int per_site,
                                    uint64_t seed) {
  std::vector<bool> pick(site_of.size(), false);
  std::map<std::string, std::vector<size_t>> by_site;
  for (size_t i = 0; i < site_of.size(); ++i)
    if (!site_of[i].empty()) by_site[site_of[i]].push_back(i);
  SeededRandom rng(derive_seed(seed, "report-items"));
  for (auto& [site, idx] : by_site) {
    rng.shuffle(idx);
    for (size_t k = 0; k < idx.size() && int(k) < per_site; ++k) pick[idx[k]] = true;
  }
  return pick;
}

void print_site_shift(const SiteShiftReport& shift, json& report, const std::string& preview,
                      int preview_per_site) {
  if (shift.empty()) {
    if (!preview.empty()) spdlog::warn("no image was harmonized: preview {} not written", preview);
    return;
  }
  ShiftMeasure m = shift.measure();
  auto pct = [](double a, double b) { return a > 0 ? 100.0 * (b - a) / a : 0.0; };
  std::printf(
      "site shift over %d sites (%d images): histogram W1 %.4f -> %.4f (%+.1f%%), amplitude "
      "spectrum %.4f -> %.4f (%+.1f%%)\n",
      m.sites, m.images, m.histogram_before, m.histogram_after,
      pct(m.histogram_before, m.histogram_after), m.spectrum_before, m.spectrum_after,
      pct(m.spectrum_before, m.spectrum_after));
  std::fflush(stdout);
  report["site_shift"] = {{"sites", m.sites},
                          {"images", m.images},
                          {"histogram_before", m.histogram_before},
                          {"histogram_after", m.histogram_after},
                          {"spectrum_before", m.spectrum_before},
                          {"spectrum_after", m.spectrum_after}};
  if (!preview.empty()) {
    shift.write_preview(preview, preview_per_site);
    std::cout << "preview: " << preview << "\n";
  }
}

}  // namespace concord::cli
