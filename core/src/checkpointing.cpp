// Checkpoint files (see checkpointing.h).
#include "checkpointing.h"

#include <concord/error.h>
#include <concord/message.h>

#include <spdlog/spdlog.h>

#include <algorithm>
#include <cstdio>
#include <fstream>

namespace fs = std::filesystem;

namespace concord {

void write_checkpoint(const fs::path& dir, const protocol::Checkpoint& c) {
  Bytes b = encode(protocol::checkpoint(c));
  char fname[64];
  std::snprintf(fname, sizeof(fname), "round-%04lld.ckpt", static_cast<long long>(c.round));
  write_file_atomic((dir / fname).string(), b->data(), b->size());
  write_file_atomic((dir / "latest").string(), std::string(fname) + "\n");
  // Keep the two newest checkpoints.
  std::vector<fs::path> all;
  for (const auto& e : fs::directory_iterator(dir))
    if (e.path().extension() == ".ckpt") all.push_back(e.path());
  std::sort(all.begin(), all.end());
  for (size_t i = 0; i + 2 < all.size(); ++i) fs::remove(all[i]);
}

int64_t resume_from_checkpoints(const fs::path& dir, const std::vector<std::string>& sites,
                                const std::function<void(protocol::Checkpoint&&)>& install) {
  std::vector<fs::path> candidates;
  {
    std::ifstream latest(dir / "latest");
    std::string fname;
    if (latest >> fname && fs::path(fname).filename() == fs::path(fname))
      candidates.push_back(dir / fname);
  }
  std::vector<fs::path> all;
  std::error_code ec;
  for (fs::directory_iterator it(dir, ec), end; !ec && it != end; it.increment(ec))
    if (it->path().extension() == ".ckpt") all.push_back(it->path());
  std::sort(all.rbegin(), all.rend());  // newest first (round-NNNN)
  for (const auto& f : all)
    if (std::find(candidates.begin(), candidates.end(), f) == candidates.end())
      candidates.push_back(f);
  if (candidates.empty() && !fs::exists(dir / "latest")) return 0;
  std::string problems;
  for (const auto& file : candidates) {
    try {
      protocol::Checkpoint c = protocol::read_checkpoint(decode(read_file(file.string())), sites);
      const int64_t round = c.round;
      install(std::move(c));
      return round;
    } catch (const std::exception& e) {
      spdlog::warn("checkpoint {} is unusable ({}); trying the previous one", file.string(),
                   e.what());
      problems += "\n  " + file.string() + ": " + e.what();
    }
  }
  if (candidates.empty()) problems = "\n  " + (dir / "latest").string() + " names no checkpoint";
  throw Error("cannot resume: no usable checkpoint in " + dir.string() + ":" + problems);
}

}  // namespace concord
