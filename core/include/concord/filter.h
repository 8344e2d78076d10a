// Filter plugins (privacy) transform a site's update before it leaves the site.
#pragma once

#include <concord/array.h>
#include <concord/registry.h>

#include <random>

namespace concord {

struct FilterContext {
  std::string site;
  int round = 0;
  std::mt19937_64* rng = nullptr;  // seeded from (pipeline seed, round, site)
};

class Filter : public Plugin {
 public:
  // `update` is the shared state about to be uploaded; `global` what the site received.
  virtual void apply(NamedArrays& update, const NamedArrays& global, FilterContext& ctx) = 0;
};

}  // namespace concord
