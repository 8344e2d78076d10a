// Client-level differential privacy for federated averaging (DP-FedAvg: McMahan, Ramage, Talwar,
// Zhang, ICLR 2018): what is clipped, where the Gaussian noise is added and how much, and what
// the accountant (dp_accountant.h) is told. Torch-free.
//
//   clip   every site's delta (update - global, the selected float32 entries as one vector) to
//          L2 norm C;
//   noise  central: the coordinator adds N(0, (z C / m)^2) to the mean of the m clipped deltas;
//          local: each of the m sites adds N(0, (z C)^2 / m) to its own clipped delta, so the sum
//          carries N(0, (z C)^2) and the mean the same z C / m as central noise (the mode that
//          composes with secure aggregation: nobody sees a delta without its share of noise).
// Either way one round is a Gaussian mechanism with noise multiplier z on the sum of m deltas of
// sensitivity C (add/remove one site), and the accountant records (z, q) per round.
#pragma once

#include <concord/array.h>
#include <concord/seed.h>

#include <cstdint>
#include <functional>
#include <string>

namespace concord::dp {

// Whose privacy: a whole site's data (one delta per site is clipped) or one training sample
// (per-sample clipping in DP-SGD; q = batch / dataset).
enum class Level { Client, Sample };
// Who adds the noise.
enum class Placement { Central, Local };
// What the accountant may assume about participation. Poisson: every member takes part in a
// step independently with probability q, and the adversary does not learn who did (privacy
// amplification by sampling). None: no amplification (q = 1): the safe choice when selection is
// not secret, as in Concord's seeded selection (docs/privacy.md).
enum class Sampling { Poisson, None };

const char* name(Level level);          // "client" | "sample"
const char* name(Placement placement);  // "central" | "local"
const char* name(Sampling sampling);    // "poisson" | "none"

struct DpSettings {
  Level level = Level::Client;
  Placement placement = Placement::Central;
  Sampling sampling = Sampling::None;
  double clip = 1.0;              // C > 0: the L2 bound on one delta
  double noise_multiplier = 1.0;  // z >= 0: noise std on the sum is z C

  // Throws Error naming the setting unless C is finite > 0 and z finite >= 0.
  void check() const;
  // q for the accountant: selected / population under Poisson sampling (its expectation), 1 under
  // None. Both counts must be > 0 with selected <= population.
  double sampling_rate(int64_t selected, int64_t population) const;
  // Noise std per coordinate on the mean of m clipped deltas (central noise): z C / m.
  double central_std(int64_t m) const;
  // Noise std per coordinate of each of m sites' local shares: z C / sqrt(m), so that the sum of
  // the m shares has std z C.
  double local_share_std(int64_t m) const;
  // The noise multiplier the sum really carries when only `contributed` of the `planned` local
  // shares arrive (sites that drop take their share of noise with them): z sqrt(c / p). Account
  // with this value, not z, for such a round. Central noise does not depend on it: z.
  double effective_noise_multiplier(int64_t planned, int64_t contributed) const;
};

// Which entries of a state are privatised (clipped, counted in the norm, noised).
using EntrySelector = std::function<bool(const std::string& name, const Array& value)>;
// The default: every float32 entry.
bool every_float32(const std::string& name, const Array& value);

// L2 norm of (update - global) over the selected entries, as one vector, in float64. A selected
// entry that is not float32, or whose global value is missing or of another size, is an Error
// naming it.
double delta_norm(const NamedArrays& update, const NamedArrays& global,
                  const EntrySelector& select = every_float32);
// Clips in place: update = global + (update - global) min(1, C / norm), over the selected
// entries (one scale for all); entries within the bound are not touched. Returns the norm before
// clipping.
double clip_update(NamedArrays& update, const NamedArrays& global, double clip,
                   const EntrySelector& select = every_float32);
// Adds N(0, std^2) to every selected coordinate, drawn from `engine` by seed.h's portable
// Box-Muller (the same numbers on every platform for the same stream), in entry name order.
template <class G>
void add_gaussian_noise(NamedArrays& state, double std, G& engine,
                        const EntrySelector& select = every_float32);
// The same with SeededRandom(seed): derive `seed` from the pipeline's with derive_seed().
void add_gaussian_noise(NamedArrays& state, double std, uint64_t seed,
                        const EntrySelector& select = every_float32);

template <class G>
void add_gaussian_noise(NamedArrays& state, double std, G& engine, const EntrySelector& select) {
  if (!(std >= 0)) throw std::invalid_argument("add_gaussian_noise: std must be >= 0");
  if (std == 0) return;
  StandardNormal<G> normal(engine);
  for (auto& entry : state) {
    Array& a = entry.second;
    if (!select(entry.first, a)) continue;
    float* x = a.data<float>();
    for (int64_t k = 0; k < a.numel(); ++k) x[k] = float(double(x[k]) + std * normal());
  }
}

}  // namespace concord::dp
