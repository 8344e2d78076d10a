// Helpers shared by the filter plugins (header-only, compiled into each plugin library).
#pragma once

#include <concord/error.h>
#include <concord/filter.h>

#include <cmath>
#include <cstdint>
#include <random>
#include <string>

namespace concord::filtering {

// "plugin (site 'x', round 3)": the context every filter error names.
inline std::string where(const std::string& plugin, const FilterContext& ctx) {
  return plugin + " (site '" + ctx.site + "', round " + std::to_string(ctx.round) + ")";
}

inline std::mt19937_64& rng_of(const std::string& plugin, FilterContext& ctx) {
  if (!ctx.rng) throw Error(where(plugin, ctx) + ": the filter context carries no random stream");
  return *ctx.rng;
}

// The received global value of a float32 update entry, checked to match it in type and size.
inline const Array& global_of(const std::string& plugin, const FilterContext& ctx,
                              const NamedArrays& global, const std::string& name,
                              const Array& update) {
  auto it = global.find(name);
  if (it == global.end())
    throw Error(where(plugin, ctx) + ": update entry '" + name + "' has no global value");
  if (it->second.dtype() != DType::F32 || it->second.numel() != update.numel())
    throw Error(where(plugin, ctx) + ": entry '" + name + "' is " + dtype_name(update.dtype()) +
                "[" + std::to_string(update.numel()) + "] in the update but " +
                dtype_name(it->second.dtype()) + "[" + std::to_string(it->second.numel()) +
                "] in the global state");
  return it->second;
}

// Standard normal draws from a 64-bit Mersenne Twister by the Box-Muller transform. Written out
// (rather than std::normal_distribution, whose algorithm is implementation-defined) so the same
// seed gives the same noise with every standard library.
class StandardNormal {
 public:
  explicit StandardNormal(std::mt19937_64& rng) : rng_(rng) {}
  double operator()() {
    if (has_spare_) {
      has_spare_ = false;
      return spare_;
    }
    // u1 in (0, 1] so log(u1) is finite; u2 in [0, 1). 53 random bits each.
    const double u1 = (double(rng_() >> 11) + 1.0) * 0x1.0p-53;
    const double u2 = double(rng_() >> 11) * 0x1.0p-53;
    const double r = std::sqrt(-2.0 * std::log(u1));
    const double theta = 2.0 * M_PI * u2;
    spare_ = r * std::sin(theta);
    has_spare_ = true;
    return r * std::cos(theta);
  }

 private:
  std::mt19937_64& rng_;
  double spare_ = 0;
  bool has_spare_ = false;
};

}  // namespace concord::filtering
