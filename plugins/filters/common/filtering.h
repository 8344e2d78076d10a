// Helpers shared by the filter plugins (header-only, compiled into each plugin library).
#pragma once

#include <concord/error.h>
#include <concord/filter.h>
#include <concord/seed.h>

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

// Standard normal draws from the filter's stream (seed.h: the same numbers everywhere).
using StandardNormal = concord::StandardNormal<std::mt19937_64>;

}  // namespace concord::filtering
