// `concord harmonize fit|apply --shard I/N` and `concord harmonize merge`: batch harmonization
// spread over many processes or machines (a Slurm job array, `xargs -P`, a Kubernetes indexed
// Job), each doing a deterministic share of the inputs.
//
// - Which share an input belongs to depends on the input alone: a stable hash (FNV-1a) of its
//   site (fit's default, --shard-by site) or of its path relative to the input root (apply, and
//   fit --shard-by path), modulo N. Not on listing order, the machine or where the inputs are
//   mounted; adding inputs moves no other input to another shard.
// - fit --shard writes a *part*: the per-site fit_site() results of its share, not combined,
//   with what it was fitted with (method, arguments, seed, shard, a digest of the whole input
//   list). merge checks the parts belong together (and that each shard is there once), then
//   combines the per-site statistics in site order with the harmonizer's own combine(): with
//   whole sites per shard that is exactly the computation of a single-machine fit, so the
//   statistics file is byte for byte the same. With --shard-by path a site split over shards
//   is first combined from its chunks (equal up to floating-point rounding).
#pragma once

#include "harmonize_inputs.h"

#include <concord/harmonizer.h>

#include <string>
#include <utility>
#include <vector>

namespace concord::cli {

struct Shard {
  int index = 0;
  int count = 0;  // 0: not sharded
  bool active() const { return count > 0; }
  std::string str() const;  // "I/N"
};

// "I/N" with 0 <= I < N (0-based: Slurm's --array=0-(N-1), Kubernetes' JOB_COMPLETION_INDEX).
Shard parse_shard(const std::string& text);

// The shard (0..count-1) of a key: FNV-1a of its bytes, modulo count.
int shard_of(const std::string& key, int count);

// The items of this shard (all items when the shard is not active). by_site: whole sites go to
// one shard (key: the site), otherwise each item by its relative path (masks likewise).
std::vector<InputItem> shard_items(const std::vector<InputItem>& items, const Shard& shard,
                                   bool by_site);

// Keeps this shard's share of a discovery: its items (shard_items), and the inputs found but not
// taken (`skipped`) and the non-image files (`ignored`) by the hash of their path, so that each
// is reported by one shard only.
void shard_discovery(Discovery& found, const Shard& shard, bool by_site);

// A digest of the whole input list (each item's site, relative path and role, in order):
// parts fitted on different inputs do not merge.
std::string inputs_digest(const std::vector<InputItem>& items);

// What a part was fitted with and on; equal in every part of one fit except shard and counts.
struct PartInfo {
  std::string method;
  std::vector<std::string> args;  // effective key=value pairs, sorted
  std::string seed;
  std::string shard_by;  // "site" | "path"
  Shard shard;
  std::string inputs;                                       // inputs_digest of the whole list
  size_t images = 0;                                        // images fitted
  std::vector<std::pair<std::string, std::string>> failed;  // (input, reason)
};

struct Part {
  std::string file;
  PartInfo info;
  std::vector<Stats> chunks;  // fit_site() results, each with its site set, in site order
};

// Writes the part atomically (one file in the Concord wire format, type
// "concord-harmonize-part") and a readable FILE.json beside it.
void save_part(const std::string& file, const PartInfo& info, const std::vector<Stats>& chunks);
// Reads a part; Error naming the file when it is not one (or is corrupt).
Part load_part(const std::string& file);

// Checks that `parts` are the N parts of one fit (same method, arguments, seed, shard-by, shard
// count and inputs; every shard exactly once), naming the offending file; returns the chunks to
// combine in site order: one Stats per site, a site split over several parts (--shard-by path)
// first combined from its chunks with `h.combine`.
std::vector<Stats> merge_chunks(const std::vector<Part>& parts, Harmonizer& h);

}  // namespace concord::cli
