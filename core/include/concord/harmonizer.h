// Harmonizer plugins: federated fit of statistics, then a per-image transform (or augmentation).
//
// Federated fit phase (run by the engine before training, and by `concord harmonize fit`):
//   1. each site: stats_i = fit_site(its training images)     -> only stats cross the Channel
//   2. coordinator: global = combine({stats_i})               -> broadcast
//   3. each site: set_statistics(global, site); then apply() to each of its images (or
//      augment() per sample during training when augments() is true).
// Masks are never passed to a harmonizer.
#pragma once

#include <concord/array.h>
#include <concord/image.h>
#include <concord/message.h>
#include <concord/registry.h>

#include <functional>
#include <random>

namespace concord {

// Statistics a harmonizer declares: named arrays and scalars, with the weight (usually the
// number of images) they stand for. This is all that leaves a site.
struct Stats {
  NamedArrays arrays;
  std::map<std::string, double> scalars;
  double weight = 0;
  // The site a fit_site() result comes from: set by the caller (engine, `concord harmonize`)
  // before combine(), so harmonizers that keep per-site statistics can key them by site.
  // Empty for combined statistics.
  std::string site;
};

// Calls the visitor once per image; lets sites and the offline tool stream images.
using ImageVisitor = std::function<void(const Image&)>;
using ImageSource = std::function<void(const ImageVisitor&)>;

class Harmonizer : public Plugin {
 public:
  // False: the harmonizer is site-local (e.g. N4) and fit/combine are skipped.
  virtual bool needs_fit() const { return true; }
  virtual Stats fit_site(const ImageSource& images) = 0;
  // Combines per-site (or per-chunk) statistics; must accept its own output as input.
  virtual Stats combine(const std::vector<Stats>& parts) = 0;
  virtual void set_statistics(const Stats& global, const std::string& site) = 0;
  // Fixed transform applied once to every image of the site (train and test).
  virtual void apply(Image& image) const = 0;
  // Augmentation instead of a fixed transform: applied to each training sample per draw.
  virtual bool augments() const { return false; }
  virtual void augment(Image& /*image*/, std::mt19937_64& /*rng*/) const {}
};

// Stats as a Message (the Channel and the statistics file use the same form): arrays and
// scalars as they are, the weight as the reserved scalar "__weight". `site` does not travel.
Message stats_message(Stats stats, const std::string& type);
Stats stats_from_message(Message&& message);

// Serialises Stats to a file (the same wire format as Channel messages), atomically.
void save_stats(const Stats& stats, const std::string& file, const std::string& method);
Stats load_stats(const std::string& file, std::string* method = nullptr);

}  // namespace concord
