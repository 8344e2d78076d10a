// Secure aggregation, SecAgg+ style: the coordinator learns the (weighted) sum of the sites'
// updates and nothing about any one of them (Bonawitz et al., "Practical Secure Aggregation for
// Privacy-Preserving Machine Learning", CCS 2017; Bell, Bonawitz, Gascon, Lepoint, Raykova,
// "Secure Single-Server Aggregation with (Poly)Logarithmic Overhead", CCS 2020).
//
// Threat model: an honest-but-curious coordinator (it follows the protocol but reads everything
// it relays); sites follow the protocol. No signatures or PKI (the malicious-server variant is not
// implemented). docs/privacy.md says what this does and does not cover.
//
// Protocol, as site-side and coordinator-side state machines exchanging the plain structs below
// (the engine maps them onto protocol messages):
//   0 advertise   site -> C: two X25519 public keys (one to encrypt shares, one to agree masks)
//   1 share keys  C -> site: the neighbours' keys; site -> C: its self-mask seed b and its mask
//                 secret key, each Shamir-shared (libgfshare, GF(2^8), threshold t) to its k
//                 neighbours in a k-regular random graph, every share encrypted to its recipient
//                 (crypto_box: X25519 + XSalsa20-Poly1305), so the coordinator cannot read them
//   2 masked input C -> site: the shares addressed to it and who shared; site -> C:
//                 y = w * quantize(x) ++ [w] + PRG(b) + sum_{v neighbour} +-PRG(s_uv) mod 2^bits,
//                 s_uv agreed by X25519 with v (+ when u < v); PRG = ChaCha20 keyed by the full
//                 256-bit seed. The coordinator adds y into a running sum and keeps nothing else.
//   3 unmask      C -> site: who sent a masked input (survivors) and who shared keys but did not
//                 (dropped); site -> C: for each neighbour, its share of b (a survivor) or of the
//                 mask key (a dropped site), never both. The coordinator rebuilds each survivor's
//                 b and each dropped site's key from t shares, removes the self masks and the
//                 dropped sites' pairwise masks, and decodes the sum.
// Below t shares for any secret, or fewer than t survivors, the round aborts with SecAggAbort.
//
// Randomness: each site draws every key, seed, Shamir coefficient, nonce and rounding decision
// from one 32-byte secret (libsodium's KDF per purpose): random_secret() in a deployment,
// simulation_secret() (derived from the pipeline seed, hence NOT secret) for reproducible runs.
#pragma once

#include <concord/array.h>
#include <concord/error.h>

#include <array>
#include <cstdint>
#include <map>
#include <memory>
#include <string>
#include <vector>

namespace concord::secagg {

using Bytes32 = std::array<uint8_t, 32>;

// 32 random bytes from the operating system (libsodium's randombytes_buf).
Bytes32 random_secret();
// A site's secret derived from the pipeline seed, its name and the round: reproducible, and
// therefore known to anyone who holds the pipeline file (simulation only).
Bytes32 simulation_secret(uint64_t seed, const std::string& site, int64_t round);

struct Config {
  uint32_t sites = 0;          // n: sites are numbered 0 .. n-1 (the engine maps names to them)
  uint32_t neighbours = 0;     // k: >= n - 1 is the complete graph; otherwise even (a ring's k/2
                               // on each side, in a seeded random order)
  uint32_t threshold = 0;      // t: shares needed to rebuild one secret, 2 <= t <= min(k, n-1)
  uint64_t graph_seed = 0;     // public: the neighbour graph (from the pipeline seed and round)
  int64_t length = 0;          // L: values per update
  double clip = 1.0;           // values are clipped to [-clip, clip] before quantization
  uint32_t quant_bits = 16;    // a value becomes an integer in [0, 2^quant_bits - 1]
  uint32_t modulus_bits = 64;  // all arithmetic mod 2^modulus_bits, at most 64
  uint64_t max_weight = 1;     // a site's weight is a whole number in [0, max_weight]

  // Every field checked; and the overflow check: n * max_weight * (2^quant_bits - 1) must be
  // below 2^modulus_bits, so the sum of the weighted quantized values never wraps. Error
  // naming the values otherwise.
  void check() const;
  uint32_t degree() const { return neighbours >= sites - 1 ? sites - 1 : neighbours; }
  // Sensible defaults for n sites: k = n - 1 up to 11 sites, else the even number near
  // 2 log2(n) + 2 (Bell et al.: O(log n)); t = k / 2 + 1; clip 1, 16-bit quantization; modulus
  // 2^32 when n * max_weight * (2^16 - 1) fits below it (masks and uploads in 4-byte words),
  // else 2^64 (8-byte words). check() may still refuse a max_weight too large for 2^64.
  static Config defaults(uint32_t sites, int64_t length, uint64_t graph_seed,
                         uint64_t max_weight = 1);
};

// The neighbour lists (sorted) of the k-regular graph that `config` describes.
std::vector<std::vector<uint32_t>> neighbour_graph(const Config& config);

// The largest quantization error of one decoded weighted sum entry: every site's value is off by
// less than one quantization step 2 clip / (2^quant_bits - 1), times its weight.
double quantization_error_bound(const Config& config, uint64_t total_weight);

// The round cannot finish: too few shares of a secret or too few survivors. The next round can
// proceed with a new Coordinator.
class SecAggAbort : public Error {
 public:
  SecAggAbort(const std::string& what, size_t available, size_t needed)
      : Error("secure aggregation aborted: " + what + ": " + std::to_string(available) +
              " available, " + std::to_string(needed) + " needed"),
        available_(available),
        needed_(needed) {}
  size_t available() const { return available_; }
  size_t needed() const { return needed_; }

 private:
  size_t available_, needed_;
};

// ---- messages -------------------------------------------------------------------------------

struct KeyAdvert {  // stage 0, site -> coordinator (and relayed to the neighbours)
  uint32_t site = 0;
  Bytes32 cipher_pk{};  // X25519: shares are encrypted to it
  Bytes32 mask_pk{};    // X25519: pairwise mask seeds are agreed with it
};
struct EncryptedShare {  // one site's shares for one neighbour, readable only by it
  uint32_t from = 0, to = 0;
  std::vector<uint8_t> box;  // nonce ++ crypto_box_easy(from, to, x, share of b, share of key)
};
struct ShareKeys {  // stage 1, site -> coordinator
  uint32_t site = 0;
  std::vector<EncryptedShare> shares;
};
struct ShareDelivery {                 // stage 2, coordinator -> site
  std::vector<uint32_t> sharing;       // every site whose shares were relayed (sorted)
  std::vector<EncryptedShare> shares;  // those addressed to this site
};
struct MaskedInput {  // stage 2, site -> coordinator: L weighted values and the weight, masked
  uint32_t site = 0;
  std::vector<uint64_t> values;  // L + 1 values in [0, 2^modulus_bits)
};
struct UnmaskRequest {              // stage 3, coordinator -> site
  std::vector<uint32_t> survivors;  // sent a masked input (sorted)
  std::vector<uint32_t> dropped;    // shared keys but sent no masked input (sorted)
};
struct RevealedShare {
  uint32_t owner = 0;     // whose secret
  uint8_t x = 0;          // the share's number (the holder's place among the owner's
                          // neighbours, from 1)
  bool mask_key = false;  // false: share of the self-mask seed b; true: of the mask key
  Bytes32 share{};
};
struct UnmaskReply {  // stage 3, site -> coordinator
  uint32_t site = 0;
  std::vector<RevealedShare> shares;
};

// What the coordinator learns.
struct Aggregate {
  std::vector<double> weighted_sum;  // sum over survivors of weight * value, L entries
  uint64_t total_weight = 0;         // sum of the survivors' weights
  std::vector<uint32_t> survivors;   // whose inputs are in the sum
  std::vector<uint32_t> recovered;   // dropped after sharing keys, masks removed via shares
  std::vector<double> mean() const;  // weighted_sum / total_weight (Error when 0)
};

// ---- between model states and masked vectors ------------------------------------------------

// The float32 entries of (update - global) in name order, as one vector: what a site masks. Mask
// deltas, not weights: they are small, and DP clipping to L2 norm C bounds every coordinate by C
// (so Config::clip = C loses nothing). An entry missing from `global` or of another size is an
// Error naming it. Other dtypes are left out (they cannot be summed securely here).
std::vector<float> flatten_delta(const NamedArrays& update, const NamedArrays& global);
// global + delta: the float32 entries of `global` (in name order) advanced by `delta` (e.g.
// Aggregate::mean()), the others copied unchanged. Error unless the sizes match.
NamedArrays apply_delta(const NamedArrays& global, const std::vector<double>& delta);

// ---- state machines -------------------------------------------------------------------------

// One site's side of one round. Calls go in stage order, each once; anything else is an Error.
class Site {
 public:
  Site(Config config, uint32_t index, const Bytes32& secret);
  ~Site();
  Site(Site&&) noexcept;
  Site& operator=(Site&&) noexcept;

  KeyAdvert advertise();
  // `keys`: the adverts the coordinator relays (at least this site's advertised neighbours;
  // others are ignored). Throws SecAggAbort when fewer than t neighbours advertised.
  ShareKeys share_keys(const std::vector<KeyAdvert>& keys);
  // `values`: L floats (clipped to the range, stochastically rounded), `weight` in
  // [0, max_weight] (e.g. the sample count for weighted FedAvg; 1 for a plain mean).
  MaskedInput masked_input(const ShareDelivery& delivery, const float* values, int64_t count,
                           uint64_t weight);
  UnmaskReply unmask(const UnmaskRequest& request);

 private:
  struct State;
  std::unique_ptr<State> s_;
};

// The coordinator's side of one round. Every input is checked (site numbers, sizes, duplicates,
// ranges); an Error names the site and what is wrong.
class Coordinator {
 public:
  explicit Coordinator(Config config);
  ~Coordinator();
  Coordinator(Coordinator&&) noexcept;
  Coordinator& operator=(Coordinator&&) noexcept;

  void add_advert(const KeyAdvert& advert);
  // The adverts to relay to `site` (its advertised neighbours and itself). The first call closes
  // the advert stage: every site must get the same picture.
  std::vector<KeyAdvert> keys_for(uint32_t site);
  void add_shares(const ShareKeys& shares);
  // What to send `site` for stage 2 (it must have shared its keys). The first call closes the
  // sharing stage.
  ShareDelivery delivery_for(uint32_t site);
  // Adds the masked values into the running sum; the input itself is not kept.
  void add_masked_input(const MaskedInput& input);
  // Who survived and who dropped; closes the masked-input stage.
  UnmaskRequest unmask_request();
  void add_unmask_reply(const UnmaskReply& reply);
  // Rebuilds the secrets, removes the masks and decodes. Throws SecAggAbort when a secret has
  // fewer than t shares or fewer than t sites sent a masked input.
  Aggregate finish();

 private:
  struct State;
  std::unique_ptr<State> s_;
};

}  // namespace concord::secagg
