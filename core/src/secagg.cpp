// Secure aggregation, SecAgg+ style (see secagg.h for the protocol and the references).
#include <concord/secagg.h>
#include <concord/seed.h>

#include <sodium.h>
extern "C" {  // libgfshare.h declares C functions without extern "C" guards
#include <libgfshare.h>
}

#include <algorithm>
#include <cmath>
#include <cstring>
#include <mutex>
#include <set>

namespace concord::secagg {
namespace {

constexpr char kKdfContext[crypto_kdf_CONTEXTBYTES] = {'c', 'o', 'n', 'c', 's', 'a', 'g', 'g'};
// Sub-keys of a site's secret, one per purpose.
enum Purpose : uint64_t {
  kCipherKeys = 1,
  kMaskKeys = 2,
  kSelfMask = 3,
  kShamir = 4,
  kRounding = 5,
  kNonces = 6
};
// The plaintext of an encrypted share: from, to (4 bytes each, little-endian), x, b share, key
// share.
constexpr size_t kSharePlain = 4 + 4 + 1 + 32 + 32;
constexpr size_t kShareBox = crypto_box_NONCEBYTES + crypto_box_MACBYTES + kSharePlain;

void init_sodium() {
  static const int ok = sodium_init();
  if (ok < 0) throw Error("secure aggregation: libsodium failed to initialise");
}

Bytes32 subkey(const Bytes32& secret, Purpose purpose) {
  Bytes32 out;
  crypto_kdf_derive_from_key(out.data(), out.size(), purpose, kKdfContext, secret.data());
  return out;
}

// A ChaCha20 keystream from a 256-bit key, read in order (nonce 0: every key is used once).
class Stream {
 public:
  explicit Stream(const Bytes32& key) : key_(key) {}
  void fill(uint8_t* out, size_t n) {
    while (n > 0) {
      if (pos_ == buf_.size()) refill();
      const size_t take = std::min(n, buf_.size() - pos_);
      std::memcpy(out, buf_.data() + pos_, take);
      pos_ += take;
      out += take;
      n -= take;
    }
  }

 private:
  void refill() {
    static const std::array<uint8_t, 4096> zeros{};
    const uint8_t nonce[crypto_stream_chacha20_NONCEBYTES] = {};
    crypto_stream_chacha20_xor_ic(buf_.data(), zeros.data(), zeros.size(), nonce, block_,
                                  key_.data());
    block_ += zeros.size() / 64;
    pos_ = 0;
  }
  Bytes32 key_;
  std::array<uint8_t, 4096> buf_{};
  size_t pos_ = 4096;
  uint64_t block_ = 0;
};

// The ChaCha20 keystream of `key` (nonce 0: every key serves one purpose), consumed in chunks of
// whole 64-byte blocks as words of 4 or 8 little-endian bytes.
class WordStream {
 public:
  static constexpr int64_t kChunk = 8192;  // words per keystream call
  WordStream(const Bytes32& key, int word_bytes) : key_(key), word_bytes_(word_bytes) {}
  // The next m <= kChunk words into out[0..m).
  void next(uint64_t* out, int64_t m) {
    const size_t nbytes = size_t(m) * size_t(word_bytes_);
    buf_.assign(nbytes, 0);
    const uint8_t nonce[crypto_stream_chacha20_NONCEBYTES] = {};
    crypto_stream_chacha20_xor_ic(buf_.data(), buf_.data(), nbytes, nonce, block_, key_.data());
    block_ += (nbytes + 63) / 64;  // only a last, partial chunk leaves part of a block unused
    const uint8_t* b = buf_.data();
    if (word_bytes_ == 8) {
      std::memcpy(out, b, nbytes);
#if __BYTE_ORDER__ == __ORDER_BIG_ENDIAN__
      for (int64_t i = 0; i < m; ++i) out[i] = __builtin_bswap64(out[i]);
#endif
    } else {
      for (int64_t i = 0; i < m; ++i, b += 4)
        out[i] = uint64_t(b[0]) | uint64_t(b[1]) << 8 | uint64_t(b[2]) << 16 | uint64_t(b[3]) << 24;
    }
  }

 private:
  Bytes32 key_;
  int word_bytes_;
  uint64_t block_ = 0;
  std::vector<uint8_t> buf_;
};

// Bytes of keystream per masked value: 4 when the modulus is at most 2^32 (half the ChaCha20
// work), else 8. Sites and coordinator derive it from the same config.
int mask_word_bytes(const Config& c) {
  return c.modulus_bits <= 32 ? 4 : 8;
}

// Adds (or subtracts) the mask PRG(seed) to acc[0..n) mod 2^64; the caller reduces mod 2^bits
// (2^bits divides 2^64, so the result is the sum mod 2^bits).
void apply_mask(uint64_t* acc, int64_t n, const Bytes32& seed, bool subtract, int word_bytes) {
  WordStream stream(seed, word_bytes);
  static thread_local std::vector<uint64_t> words(WordStream::kChunk);
  for (int64_t start = 0; start < n; start += WordStream::kChunk) {
    const int64_t m = std::min(WordStream::kChunk, n - start);
    stream.next(words.data(), m);
    uint64_t* a = acc + start;
    if (subtract)
      for (int64_t i = 0; i < m; ++i) a[i] -= words[size_t(i)];
    else
      for (int64_t i = 0; i < m; ++i) a[i] += words[size_t(i)];
  }
}

// The pairwise mask seed of sites lo < hi from one's secret key and the other's public key
// (X25519), hashed with both public keys so both ends derive the same 256 bits.
Bytes32 pair_seed(const Bytes32& my_sk, const Bytes32& other_pk, const Bytes32& lo_pk,
                  const Bytes32& hi_pk) {
  uint8_t shared[crypto_scalarmult_BYTES];
  if (crypto_scalarmult(shared, my_sk.data(), other_pk.data()) != 0)
    throw Error("secure aggregation: a mask public key is a low-order point");
  crypto_generichash_state h;
  crypto_generichash_init(&h, nullptr, 0, 32);
  crypto_generichash_update(&h, shared, sizeof shared);
  crypto_generichash_update(&h, lo_pk.data(), 32);
  crypto_generichash_update(&h, hi_pk.data(), 32);
  Bytes32 out;
  crypto_generichash_final(&h, out.data(), 32);
  sodium_memzero(shared, sizeof shared);
  return out;
}

// libgfshare draws its polynomial coefficients (and blinding bytes) through one process-wide
// callback without a context argument: it reads from the Stream installed for this thread, so
// the coefficients flow from the site's secret. Calls are serialised by a mutex.
thread_local Stream* gf_stream = nullptr;
void gf_fill(unsigned char* out, unsigned int n) {
  if (gf_stream)
    gf_stream->fill(out, n);
  else
    randombytes_buf(out, n);
}
std::mutex& gf_mutex() {
  static std::mutex m;
  return m;
}
struct GfStreamScope {
  std::lock_guard<std::mutex> lock{gf_mutex()};
  explicit GfStreamScope(Stream* s) {
    gfshare_fill_rand = gf_fill;
    gf_stream = s;
  }
  ~GfStreamScope() { gf_stream = nullptr; }
};

// Shamir shares (threshold t) of a 32-byte secret for share numbers xs (distinct, 1..255).
std::vector<Bytes32> shamir_split(const Bytes32& secret, std::vector<uint8_t> xs, uint32_t t,
                                  Stream& coefficients) {
  GfStreamScope scope(&coefficients);
  gfshare_ctx* ctx =
      gfshare_ctx_init_enc(xs.data(), unsigned(xs.size()), static_cast<unsigned char>(t), 32);
  if (!ctx) throw Error("secure aggregation: libgfshare could not start a sharing");
  Bytes32 copy = secret;
  gfshare_ctx_enc_setsecret(ctx, copy.data());
  std::vector<Bytes32> shares(xs.size());
  for (size_t i = 0; i < xs.size(); ++i)
    gfshare_ctx_enc_getshare(ctx, static_cast<unsigned char>(i), shares[i].data());
  gfshare_ctx_free(ctx);
  sodium_memzero(copy.data(), copy.size());
  return shares;
}

Bytes32 shamir_combine(const std::vector<std::pair<uint8_t, Bytes32>>& shares) {
  Stream blinding(Bytes32{});  // the result does not depend on these bytes
  GfStreamScope scope(&blinding);
  std::vector<uint8_t> xs;
  for (const auto& s : shares) xs.push_back(s.first);
  gfshare_ctx* ctx = gfshare_ctx_init_dec(xs.data(), unsigned(xs.size()), 32);
  if (!ctx) throw Error("secure aggregation: libgfshare could not start a reconstruction");
  for (size_t i = 0; i < shares.size(); ++i) {
    Bytes32 s = shares[i].second;
    gfshare_ctx_dec_giveshare(ctx, static_cast<unsigned char>(i), s.data());
  }
  Bytes32 out;
  gfshare_ctx_dec_extract(ctx, out.data());
  gfshare_ctx_free(ctx);
  return out;
}

void put32(uint8_t* p, uint32_t v) {
  for (int i = 0; i < 4; ++i) p[i] = uint8_t(v >> (8 * i));
}
uint32_t get32(const uint8_t* p) {
  uint32_t v = 0;
  for (int i = 3; i >= 0; --i) v = (v << 8) | p[i];
  return v;
}

uint64_t modulus_mask(uint32_t bits) {
  return bits >= 64 ? ~uint64_t(0) : (uint64_t(1) << bits) - 1;
}

std::string site_name(uint32_t i) {
  return "site #" + std::to_string(i);
}

// The place of `v` in the sorted list `list`, or -1.
int64_t index_of(const std::vector<uint32_t>& list, uint32_t v) {
  auto it = std::lower_bound(list.begin(), list.end(), v);
  return it != list.end() && *it == v ? int64_t(it - list.begin()) : -1;
}

}  // namespace

Bytes32 random_secret() {
  init_sodium();
  Bytes32 out;
  randombytes_buf(out.data(), out.size());
  return out;
}

Bytes32 simulation_secret(uint64_t seed, const std::string& site, int64_t round) {
  init_sodium();
  const uint64_t s = derive_seed(seed, "secagg/" + site, round);
  uint8_t in[8];
  for (int i = 0; i < 8; ++i) in[i] = uint8_t(s >> (8 * i));
  Bytes32 out;
  crypto_generichash(out.data(), out.size(), in, sizeof in, nullptr, 0);
  return out;
}

// ---- Config ---------------------------------------------------------------------------------

void Config::check() const {
  auto fail = [](const std::string& m) { throw Error("secure aggregation config: " + m); };
  if (sites < 3) fail("needs at least 3 sites, got " + std::to_string(sites));
  if (sites > 100000) fail("at most 100000 sites, got " + std::to_string(sites));
  const uint32_t k = degree();
  if (k < 2) fail("needs at least 2 neighbours per site, got " + std::to_string(neighbours));
  if (k > 255)
    fail("at most 255 neighbours per site (Shamir over GF(2^8)), got " + std::to_string(k));
  if (k < sites - 1 && k % 2 != 0)
    fail("the neighbour count must be even or at least n - 1 = " + std::to_string(sites - 1) +
         ", got " + std::to_string(neighbours));
  if (threshold < 2 || threshold > k)
    fail("threshold must be in [2, " + std::to_string(k) + "] (the neighbour count), got " +
         std::to_string(threshold));
  if (length < 1 || length > (int64_t(1) << 40))
    fail("length must be in [1, 2^40], got " + std::to_string(length));
  if (!(clip > 0) || !std::isfinite(clip)) fail("clip must be finite and > 0");
  if (quant_bits < 1 || quant_bits > 32)
    fail("quant_bits must be in [1, 32], got " + std::to_string(quant_bits));
  if (modulus_bits < 2 || modulus_bits > 64)
    fail("modulus_bits must be in [2, 64], got " + std::to_string(modulus_bits));
  if (max_weight < 1) fail("max_weight must be >= 1");
  // The overflow check: the largest possible sum must stay below the modulus.
  const unsigned __int128 levels = (unsigned __int128)1 << quant_bits;
  const unsigned __int128 largest = (unsigned __int128)sites * max_weight * (levels - 1);
  const unsigned __int128 weights = (unsigned __int128)sites * max_weight;
  const unsigned __int128 modulus = (unsigned __int128)1 << modulus_bits;
  if (largest >= modulus || weights >= modulus)
    fail(std::to_string(sites) + " sites x max_weight " + std::to_string(max_weight) + " x " +
         std::to_string(uint64_t(levels - 1)) +
         " (the largest quantized value) does not fit below the modulus 2^" +
         std::to_string(modulus_bits) + ": the sum would wrap around");
}

Config Config::defaults(uint32_t sites, int64_t length, uint64_t graph_seed, uint64_t max_weight) {
  Config c;
  c.sites = sites;
  c.length = length;
  c.graph_seed = graph_seed;
  c.max_weight = max_weight;
  if (sites <= 11) {
    c.neighbours = sites - 1;
  } else {
    uint32_t k = 2 * uint32_t(std::ceil(std::log2(double(sites)))) + 2;
    k += k % 2;
    c.neighbours = std::min(k, sites - 1);
  }
  c.threshold = c.degree() / 2 + 1;
  // 32-bit words when n * max_weight * (2^16 - 1) fits: half the keystream and upload of 64-bit
  // words.
  const unsigned __int128 largest = (unsigned __int128)sites * max_weight * 65535u;
  c.modulus_bits = largest < ((unsigned __int128)1 << 32) ? 32 : 64;
  return c;
}

std::vector<std::vector<uint32_t>> neighbour_graph(const Config& config) {
  config.check();
  const uint32_t n = config.sites, k = config.degree();
  std::vector<std::vector<uint32_t>> graph(n);
  if (k >= n - 1) {
    for (uint32_t u = 0; u < n; ++u)
      for (uint32_t v = 0; v < n; ++v)
        if (u != v) graph[u].push_back(v);
    return graph;
  }
  // A Harary graph on a seeded random ring: each site joins the k / 2 nearest on each side.
  std::vector<uint32_t> ring(n);
  for (uint32_t i = 0; i < n; ++i) ring[i] = i;
  SeededRandom rng(mix_seed(config.graph_seed, 0x5ecA66));
  shuffle(ring, rng);
  for (uint32_t p = 0; p < n; ++p)
    for (uint32_t d = 1; d <= k / 2; ++d) {
      graph[ring[p]].push_back(ring[(p + d) % n]);
      graph[ring[p]].push_back(ring[(p + n - d) % n]);
    }
  for (auto& list : graph) std::sort(list.begin(), list.end());
  return graph;
}

double quantization_error_bound(const Config& config, uint64_t total_weight) {
  const double levels = std::ldexp(1.0, int(config.quant_bits)) - 1;
  return 2 * config.clip / levels * double(total_weight);
}

std::vector<double> Aggregate::mean() const {
  if (total_weight == 0) throw Error("secure aggregation: the total weight is 0, no mean");
  std::vector<double> out(weighted_sum.size());
  for (size_t i = 0; i < out.size(); ++i) out[i] = weighted_sum[i] / double(total_weight);
  return out;
}

std::vector<float> flatten_delta(const NamedArrays& update, const NamedArrays& global) {
  std::vector<float> out;
  for (const auto& [name, a] : update) {
    if (a.dtype() != DType::F32) continue;
    auto it = global.find(name);
    if (it == global.end() || it->second.dtype() != DType::F32 || it->second.numel() != a.numel())
      throw Error("secure aggregation: update entry '" + name +
                  "' has no float32 global value of the same size");
    const float* x = a.data<float>();
    const float* x0 = it->second.data<float>();
    for (int64_t k = 0; k < a.numel(); ++k) out.push_back(x[k] - x0[k]);
  }
  return out;
}

NamedArrays apply_delta(const NamedArrays& global, const std::vector<double>& delta) {
  NamedArrays out;
  size_t pos = 0;
  for (const auto& [name, g] : global) {
    Array a = g.clone();
    if (a.dtype() == DType::F32) {
      if (delta.size() - pos < size_t(a.numel()))
        throw Error("secure aggregation: " + std::to_string(delta.size()) +
                    " delta values do not cover the global state's float32 entries (short at '" +
                    name + "')");
      float* x = a.data<float>();
      for (int64_t k = 0; k < a.numel(); ++k) x[k] = float(double(x[k]) + delta[pos++]);
    }
    out[name] = std::move(a);
  }
  if (pos != delta.size())
    throw Error("secure aggregation: " + std::to_string(delta.size()) + " delta values for " +
                std::to_string(pos) + " float32 values in the global state");
  return out;
}

// ---- Site -----------------------------------------------------------------------------------

struct Site::State {
  Config config;
  uint32_t index = 0;
  std::vector<uint32_t> neighbours;  // sorted
  Bytes32 cipher_pk{}, cipher_sk{}, mask_pk{}, mask_sk{}, self_seed{};
  Bytes32 shamir_key{}, rounding_key{}, nonce_key{};
  std::map<uint32_t, KeyAdvert> keys;  // advertised neighbours
  struct Held {
    uint8_t x = 0;
    Bytes32 b, key;
  };
  std::map<uint32_t, Held> held;  // shares this site holds, by owner
  std::vector<uint32_t> sharing;  // stage 2: who shared keys
  int stage = 0;
  ~State() {
    sodium_memzero(cipher_sk.data(), 32);
    sodium_memzero(mask_sk.data(), 32);
    sodium_memzero(self_seed.data(), 32);
    for (auto& [o, h] : held) {
      sodium_memzero(h.b.data(), 32);
      sodium_memzero(h.key.data(), 32);
    }
  }
  void expect(int wanted, const char* call) const {
    if (stage != wanted)
      throw Error("secure aggregation, " + site_name(index) + ": " + call +
                  " called out of order (stage " + std::to_string(stage) + ", expected " +
                  std::to_string(wanted) + ")");
  }
};

Site::Site(Config config, uint32_t index, const Bytes32& secret) : s_(std::make_unique<State>()) {
  init_sodium();
  config.check();
  if (index >= config.sites)
    throw Error("secure aggregation: site index " + std::to_string(index) + " of " +
                std::to_string(config.sites) + " sites");
  s_->config = config;
  s_->index = index;
  s_->neighbours = neighbour_graph(config)[index];
  Bytes32 seed = subkey(secret, kCipherKeys);
  crypto_box_seed_keypair(s_->cipher_pk.data(), s_->cipher_sk.data(), seed.data());
  seed = subkey(secret, kMaskKeys);
  crypto_box_seed_keypair(s_->mask_pk.data(), s_->mask_sk.data(), seed.data());
  sodium_memzero(seed.data(), 32);
  s_->self_seed = subkey(secret, kSelfMask);
  s_->shamir_key = subkey(secret, kShamir);
  s_->rounding_key = subkey(secret, kRounding);
  s_->nonce_key = subkey(secret, kNonces);
}
Site::~Site() = default;
Site::Site(Site&&) noexcept = default;
Site& Site::operator=(Site&&) noexcept = default;

KeyAdvert Site::advertise() {
  s_->expect(0, "advertise");
  s_->stage = 1;
  return {s_->index, s_->cipher_pk, s_->mask_pk};
}

ShareKeys Site::share_keys(const std::vector<KeyAdvert>& keys) {
  State& s = *s_;
  s.expect(1, "share_keys");
  for (const auto& k : keys)
    if (index_of(s.neighbours, k.site) >= 0) s.keys[k.site] = k;
  if (s.keys.size() < s.config.threshold)
    throw SecAggAbort(site_name(s.index) + " has too few neighbours with keys to share with",
                      s.keys.size(), s.config.threshold);
  // Share numbers: the recipient's place among all neighbours, from 1 (stable under dropouts).
  std::vector<uint8_t> xs;
  std::vector<uint32_t> to;
  for (const auto& [v, advert] : s.keys) {
    xs.push_back(uint8_t(index_of(s.neighbours, v) + 1));
    to.push_back(v);
  }
  Stream coefficients(s.shamir_key), nonces(s.nonce_key);
  const auto b_shares = shamir_split(s.self_seed, xs, s.config.threshold, coefficients);
  const auto key_shares = shamir_split(s.mask_sk, xs, s.config.threshold, coefficients);
  ShareKeys out{s.index, {}};
  for (size_t i = 0; i < to.size(); ++i) {
    std::array<uint8_t, kSharePlain> plain;
    put32(plain.data(), s.index);
    put32(plain.data() + 4, to[i]);
    plain[8] = xs[i];
    std::memcpy(plain.data() + 9, b_shares[i].data(), 32);
    std::memcpy(plain.data() + 41, key_shares[i].data(), 32);
    EncryptedShare e{s.index, to[i], std::vector<uint8_t>(kShareBox)};
    nonces.fill(e.box.data(), crypto_box_NONCEBYTES);
    if (crypto_box_easy(e.box.data() + crypto_box_NONCEBYTES, plain.data(), plain.size(),
                        e.box.data(), s.keys[to[i]].cipher_pk.data(), s.cipher_sk.data()) != 0)
      throw Error("secure aggregation, " + site_name(s.index) + ": encrypting a share for " +
                  site_name(to[i]) + " failed");
    sodium_memzero(plain.data(), plain.size());
    out.shares.push_back(std::move(e));
  }
  s.stage = 2;
  return out;
}

MaskedInput Site::masked_input(const ShareDelivery& delivery, const float* values, int64_t count,
                               uint64_t weight) {
  State& s = *s_;
  s.expect(2, "masked_input");
  const Config& c = s.config;
  if (count != c.length)
    throw Error("secure aggregation, " + site_name(s.index) + ": " + std::to_string(count) +
                " values, the round aggregates " + std::to_string(c.length));
  if (weight > c.max_weight)
    throw Error("secure aggregation, " + site_name(s.index) + ": weight " + std::to_string(weight) +
                " above max_weight " + std::to_string(c.max_weight));
  s.sharing = delivery.sharing;
  std::sort(s.sharing.begin(), s.sharing.end());
  if (index_of(s.sharing, s.index) < 0)
    throw Error("secure aggregation, " + site_name(s.index) +
                ": the coordinator does not list this site among those that shared keys");
  // Open the shares addressed to this site: each must come from an advertised neighbour that
  // shared, and name the sender and this site inside the authenticated box.
  for (const auto& e : delivery.shares) {
    const std::string from = site_name(e.from);
    auto k = s.keys.find(e.from);
    if (e.to != s.index || k == s.keys.end() || index_of(s.sharing, e.from) < 0)
      throw Error("secure aggregation, " + site_name(s.index) + ": unexpected share from " + from);
    if (e.box.size() != kShareBox)
      throw Error("secure aggregation, " + site_name(s.index) + ": share from " + from + " has " +
                  std::to_string(e.box.size()) + " bytes, expected " + std::to_string(kShareBox));
    std::array<uint8_t, kSharePlain> plain;
    if (crypto_box_open_easy(plain.data(), e.box.data() + crypto_box_NONCEBYTES,
                             kShareBox - crypto_box_NONCEBYTES, e.box.data(),
                             k->second.cipher_pk.data(), s.cipher_sk.data()) != 0)
      throw Error("secure aggregation, " + site_name(s.index) + ": the share from " + from +
                  " does not decrypt (tampered or misaddressed)");
    if (get32(plain.data()) != e.from || get32(plain.data() + 4) != s.index)
      throw Error("secure aggregation, " + site_name(s.index) + ": the share from " + from +
                  " names another sender or recipient");
    State::Held h;
    h.x = plain[8];
    std::memcpy(h.b.data(), plain.data() + 9, 32);
    std::memcpy(h.key.data(), plain.data() + 41, 32);
    sodium_memzero(plain.data(), plain.size());
    s.held[e.from] = h;
  }

  // y = w * quantize(x) ++ [w], then the masks, all mod 2^bits.
  MaskedInput out{s.index, std::vector<uint64_t>(size_t(c.length) + 1)};
  const double levels = std::ldexp(1.0, int(c.quant_bits)) - 1;
  WordStream rounding(s.rounding_key, 8);
  std::vector<uint64_t> random(WordStream::kChunk);
  for (int64_t start = 0; start < c.length; start += WordStream::kChunk) {
    const int64_t m = std::min(WordStream::kChunk, c.length - start);
    rounding.next(random.data(), m);
    for (int64_t i = 0; i < m; ++i) {
      double x = double(values[start + i]);
      if (!std::isfinite(x))
        throw Error("secure aggregation, " + site_name(s.index) + ": value " +
                    std::to_string(start + i) + " is not finite");
      x = std::clamp(x, -c.clip, c.clip);
      const double v = (x + c.clip) / (2 * c.clip) * levels;
      double q = std::floor(v);
      if (double(random[size_t(i)] >> 11) * 0x1.0p-53 < v - q) q += 1;  // stochastic: unbiased
      out.values[size_t(start + i)] = uint64_t(std::min(q, levels)) * weight;
    }
  }
  out.values[size_t(c.length)] = weight;
  const int64_t n = c.length + 1;
  apply_mask(out.values.data(), n, s.self_seed, false, mask_word_bytes(c));
  for (const auto& [v, advert] : s.keys) {
    if (index_of(s.sharing, v) < 0) continue;  // v did not share keys: no mask with it
    const bool lo = s.index < v;
    const Bytes32 seed = pair_seed(s.mask_sk, advert.mask_pk, lo ? s.mask_pk : advert.mask_pk,
                                   lo ? advert.mask_pk : s.mask_pk);
    apply_mask(out.values.data(), n, seed, !lo, mask_word_bytes(c));
  }
  const uint64_t m = modulus_mask(c.modulus_bits);
  for (auto& y : out.values) y &= m;
  s.stage = 3;
  return out;
}

UnmaskReply Site::unmask(const UnmaskRequest& request) {
  State& s = *s_;
  s.expect(3, "unmask");
  std::set<uint32_t> survivors(request.survivors.begin(), request.survivors.end());
  std::set<uint32_t> dropped(request.dropped.begin(), request.dropped.end());
  for (uint32_t d : dropped)
    if (survivors.count(d))
      throw Error("secure aggregation, " + site_name(s.index) + ": " + site_name(d) +
                  " is listed as both survivor and dropped: no share is revealed");
  if (!survivors.count(s.index))
    throw Error("secure aggregation, " + site_name(s.index) +
                ": the coordinator lists this site as not having sent its input");
  if (survivors.size() < s.config.threshold)
    throw SecAggAbort(site_name(s.index) + " refuses to unmask a sum of too few sites",
                      survivors.size(), s.config.threshold);
  UnmaskReply out{s.index, {}};
  for (const auto& [owner, h] : s.held) {
    if (survivors.count(owner))
      out.shares.push_back({owner, h.x, false, h.b});
    else if (dropped.count(owner))
      out.shares.push_back({owner, h.x, true, h.key});
  }
  s.stage = 4;
  return out;
}

// ---- Coordinator ----------------------------------------------------------------------------

struct Coordinator::State {
  Config config;
  std::vector<std::vector<uint32_t>> graph;
  std::map<uint32_t, KeyAdvert> adverts;
  std::map<uint32_t, std::vector<EncryptedShare>> inbox;  // by recipient
  std::set<uint32_t> sharing;
  std::set<uint32_t> survivors;
  std::vector<uint64_t> sum;  // running sum of masked inputs, mod 2^64
  std::map<uint32_t, std::vector<RevealedShare>> revealed;  // by owner
  std::set<uint32_t> replied;
  int stage = 0;  // 0 adverts, 1 shares, 2 masked inputs, 3 unmask replies, 4 done

  void check_site(uint32_t site, const char* what) const {
    if (site >= config.sites)
      throw Error(std::string("secure aggregation: ") + what + " from " + site_name(site) +
                  ", but the round has " + std::to_string(config.sites) + " sites");
  }
  void advance(int to, const char* what) {
    if (stage > to)
      throw Error(std::string("secure aggregation: ") + what + " arrives after its stage closed");
    stage = to;
  }
};

Coordinator::Coordinator(Config config) : s_(std::make_unique<State>()) {
  init_sodium();
  config.check();
  s_->config = config;
  s_->graph = neighbour_graph(config);
}
Coordinator::~Coordinator() = default;
Coordinator::Coordinator(Coordinator&&) noexcept = default;
Coordinator& Coordinator::operator=(Coordinator&&) noexcept = default;

void Coordinator::add_advert(const KeyAdvert& advert) {
  State& s = *s_;
  s.check_site(advert.site, "key advert");
  s.advance(0, "a key advert");
  if (!s.adverts.emplace(advert.site, advert).second)
    throw Error("secure aggregation: " + site_name(advert.site) + " advertised keys twice");
}

std::vector<KeyAdvert> Coordinator::keys_for(uint32_t site) {
  State& s = *s_;
  s.check_site(site, "key request");
  s.advance(1, "a key request");
  std::vector<KeyAdvert> out;
  if (auto it = s.adverts.find(site); it != s.adverts.end()) out.push_back(it->second);
  for (uint32_t v : s.graph[site])
    if (auto it = s.adverts.find(v); it != s.adverts.end()) out.push_back(it->second);
  return out;
}

void Coordinator::add_shares(const ShareKeys& shares) {
  State& s = *s_;
  s.check_site(shares.site, "shares");
  s.advance(1, "shares");
  const std::string who = site_name(shares.site);
  if (!s.adverts.count(shares.site))
    throw Error("secure aggregation: shares from " + who + ", which advertised no keys");
  if (s.sharing.count(shares.site))
    throw Error("secure aggregation: " + who + " sent its shares twice");
  std::set<uint32_t> to;
  for (const auto& e : shares.shares) {
    if (e.from != shares.site || index_of(s.graph[shares.site], e.to) < 0 ||
        !s.adverts.count(e.to) || !to.insert(e.to).second)
      throw Error("secure aggregation: " + who + " sent a share for " + site_name(e.to) +
                  ", not one advertised neighbour each");
    if (e.box.size() != kShareBox)
      throw Error("secure aggregation: a share from " + who + " has " +
                  std::to_string(e.box.size()) + " bytes, expected " + std::to_string(kShareBox));
  }
  if (to.size() < s.config.threshold)
    throw Error("secure aggregation: " + who + " shared with " + std::to_string(to.size()) +
                " neighbours, fewer than the threshold " + std::to_string(s.config.threshold));
  for (const auto& e : shares.shares) s.inbox[e.to].push_back(e);
  s.sharing.insert(shares.site);
}

ShareDelivery Coordinator::delivery_for(uint32_t site) {
  State& s = *s_;
  s.check_site(site, "delivery request");
  s.advance(2, "a delivery request");
  if (!s.sharing.count(site))
    throw Error("secure aggregation: " + site_name(site) + " did not share its keys");
  ShareDelivery out;
  out.sharing.assign(s.sharing.begin(), s.sharing.end());
  for (const auto& e : s.inbox.count(site) ? s.inbox.at(site) : std::vector<EncryptedShare>{})
    if (s.sharing.count(e.from)) out.shares.push_back(e);
  return out;
}

void Coordinator::add_masked_input(const MaskedInput& input) {
  State& s = *s_;
  s.check_site(input.site, "masked input");
  s.advance(2, "a masked input");
  const std::string who = site_name(input.site);
  if (!s.sharing.count(input.site))
    throw Error("secure aggregation: masked input from " + who + ", which shared no keys");
  if (!s.survivors.insert(input.site).second)
    throw Error("secure aggregation: " + who + " sent its masked input twice");
  const size_t n = size_t(s.config.length) + 1;
  if (input.values.size() != n) {
    s.survivors.erase(input.site);
    throw Error("secure aggregation: masked input from " + who + " has " +
                std::to_string(input.values.size()) + " values, expected " + std::to_string(n));
  }
  const uint64_t m = modulus_mask(s.config.modulus_bits);
  for (uint64_t y : input.values)
    if (y & ~m) {
      s.survivors.erase(input.site);
      throw Error("secure aggregation: masked input from " + who + " has a value outside [0, 2^" +
                  std::to_string(s.config.modulus_bits) + ")");
    }
  if (s.sum.empty()) s.sum.assign(n, 0);
  for (size_t i = 0; i < n; ++i) s.sum[i] += input.values[i];
}

UnmaskRequest Coordinator::unmask_request() {
  State& s = *s_;
  s.advance(3, "the unmask request");
  UnmaskRequest r;
  r.survivors.assign(s.survivors.begin(), s.survivors.end());
  for (uint32_t u : s.sharing)
    if (!s.survivors.count(u)) r.dropped.push_back(u);
  return r;
}

void Coordinator::add_unmask_reply(const UnmaskReply& reply) {
  State& s = *s_;
  s.check_site(reply.site, "unmask reply");
  s.advance(3, "an unmask reply");
  const std::string who = site_name(reply.site);
  if (!s.survivors.count(reply.site))
    throw Error("secure aggregation: unmask reply from " + who + ", which sent no masked input");
  if (!s.replied.insert(reply.site).second)
    throw Error("secure aggregation: " + who + " replied twice");
  std::set<uint32_t> owners;
  for (const auto& r : reply.shares) {
    const int64_t place = r.owner < s.config.sites ? index_of(s.graph[r.owner], reply.site) : -1;
    const bool survivor = s.survivors.count(r.owner) > 0;
    const bool dropped = !survivor && s.sharing.count(r.owner) > 0;
    if (place < 0 || r.x != place + 1 || (!survivor && !dropped) || r.mask_key != dropped ||
        !owners.insert(r.owner).second)
      throw Error("secure aggregation: " + who + " revealed an unexpected share (of " +
                  site_name(r.owner) + ", number " + std::to_string(r.x) + ")");
  }
  for (const auto& r : reply.shares) s.revealed[r.owner].push_back(r);
}

Aggregate Coordinator::finish() {
  State& s = *s_;
  s.advance(4, "finish");
  const Config& c = s.config;
  const size_t t = c.threshold;
  if (s.survivors.size() < t)
    throw SecAggAbort("too few sites sent a masked input", s.survivors.size(), t);
  auto rebuild = [&](uint32_t owner, const char* what) {
    std::vector<std::pair<uint8_t, Bytes32>> shares;
    for (const auto& r : s.revealed[owner]) shares.push_back({r.x, r.share});
    if (shares.size() < t)
      throw SecAggAbort("cannot rebuild the " + std::string(what) + " of " + site_name(owner) +
                            " from its neighbours' shares",
                        shares.size(), t);
    shares.resize(t);
    return shamir_combine(shares);
  };
  const size_t n = size_t(c.length) + 1;
  // Remove every survivor's self mask.
  for (uint32_t u : s.survivors) {
    Bytes32 b = rebuild(u, "self-mask seed");
    apply_mask(s.sum.data(), int64_t(n), b, true, mask_word_bytes(c));
    sodium_memzero(b.data(), 32);
  }
  // Remove the pairwise masks the survivors shared with a site that dropped after sharing keys.
  Aggregate out;
  for (uint32_t u : s.sharing) {
    if (s.survivors.count(u)) continue;
    Bytes32 sk = rebuild(u, "mask key");
    Bytes32 pk;
    crypto_scalarmult_base(pk.data(), sk.data());
    const KeyAdvert& adv = s.adverts.at(u);
    if (sodium_memcmp(pk.data(), adv.mask_pk.data(), 32) != 0)
      throw Error("secure aggregation: the mask key rebuilt for " + site_name(u) +
                  " does not match its advertised public key (a share was corrupted)");
    for (uint32_t v : s.graph[u]) {
      if (!s.survivors.count(v)) continue;
      const KeyAdvert& other = s.adverts.at(v);
      const bool v_lo = v < u;  // v added +PRG(s_uv) when v < u, -PRG otherwise
      const Bytes32 seed = pair_seed(sk, other.mask_pk, v_lo ? other.mask_pk : adv.mask_pk,
                                     v_lo ? adv.mask_pk : other.mask_pk);
      apply_mask(s.sum.data(), int64_t(n), seed, v_lo, mask_word_bytes(c));
    }
    sodium_memzero(sk.data(), 32);
    out.recovered.push_back(u);
  }
  const uint64_t m = modulus_mask(c.modulus_bits);
  for (auto& y : s.sum) y &= m;
  // Decode: sum_u w_u q_u / levels * 2 clip - clip * sum_u w_u.
  const double levels = std::ldexp(1.0, int(c.quant_bits)) - 1;
  out.total_weight = s.sum[n - 1];
  out.weighted_sum.resize(n - 1);
  for (size_t j = 0; j + 1 < n; ++j)
    out.weighted_sum[j] =
        double(s.sum[j]) / levels * 2 * c.clip - c.clip * double(out.total_weight);
  out.survivors.assign(s.survivors.begin(), s.survivors.end());
  s.sum.clear();
  return out;
}

}  // namespace concord::secagg
