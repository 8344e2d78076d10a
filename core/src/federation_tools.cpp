// Partitioning one data source into sites, and simulated per-site scanner shift.
//
// Partition schemes (all deterministic in the seed, sites named site-1 .. site-N):
//   iid        shuffled, then dealt round-robin: sizes differ by at most one.
//   quantity   site fractions q ~ Dir(alpha); site sizes by largest remainder of n * q.
//   dirichlet  label skew (Hsu et al., arXiv:1909.06335): for every class c, proportions
//              p_c ~ Dir(alpha) over the sites split that class's samples.
// min_samples: a draw that leaves a site with fewer training samples is redrawn (up to
// kMaxDraws times, each from the same seeded stream); if every draw fails, the last draw is kept
// and rebalanced by moving random samples from the largest site to each site below the minimum.
// The test split is partitioned with the accepted proportions (same per-class p_c, same q), so a
// site's test distribution follows its training distribution (test: follow), or dealt like iid
// (test: iid: every site tested on the pooled label mix, the usual evaluation under label skew);
// every site then gets at least one test sample when there are enough. notes["partition"] records
// sizes and label histograms.
//
// Scanner shift, applied in this order on intensities assumed normalised to [0,1]:
//   1. smooth multiplicative bias field   v *= exp(a * f(x)), f a sum of 4 random cosines of
//      less than one period over the image, scaled to max |f| = 1
//   2. low-frequency amplitude scaling    |F(u)| *= 1 + (s - 1) exp(-|u|^2 / (2 r0^2)), r0 = 0.05
//      cycles/pixel, phase and the mean (DC) kept (cv::dft per slice and channel)
//   3. Gaussian blur                      sigma in pixels, in-plane
//   4. gamma                              v = max(v, 0)^gamma (no upper clamp: nothing saturates)
//   5. contrast and brightness            v = contrast * v + brightness
//   6. Gaussian noise                     v += sigma * N(0, 1), drawn from the noise seed
// Each step is skipped when its parameter is the identity, so strength 0 leaves every bit as is.
// The output is not clamped: a scanner's range is not [0,1]. 3D images are processed slice by
// slice (bias field in 3D, blur and spectrum in-plane).
#include <concord/error.h>
#include <concord/federation_tools.h>
#include <concord/json_text.h>

#include <nlohmann/json.hpp>
#include <opencv2/core.hpp>
#include <opencv2/imgproc.hpp>

#include <algorithm>
#include <cmath>
#include <limits>
#include <map>
#include <numeric>

namespace concord {

constexpr double kPi = 3.14159265358979323846;

// ---------------------------------------------------------------------------------------------
// Partition

namespace {

constexpr int kMaxDraws = 100;

// Splits `total` into integer counts proportional to `p` (largest remainder, ties to the lower
// index), so the counts always add up to `total`.
std::vector<int64_t> allocate(int64_t total, const std::vector<double>& p) {
  const int k = int(p.size());
  std::vector<int64_t> n(k);
  std::vector<std::pair<double, int>> rem(k);
  int64_t used = 0;
  for (int i = 0; i < k; ++i) {
    const double exact = double(total) * p[i];
    n[i] = int64_t(std::floor(exact));
    used += n[i];
    rem[i] = {exact - double(n[i]), i};
  }
  std::stable_sort(rem.begin(), rem.end(),
                   [](const auto& a, const auto& b) { return a.first > b.first; });
  for (int64_t j = 0; used < total; ++j, ++used) n[rem[j % k].second] += 1;
  return n;
}

std::vector<int64_t> site_sizes(const std::vector<int>& site_of, int sites) {
  std::vector<int64_t> n(sites, 0);
  for (int s : site_of) n[s] += 1;
  return n;
}

// Moves random samples from the largest site to each site below `min`; returns moves made.
int64_t rebalance(std::vector<int>& site_of, int sites, int64_t min, SeededRandom& rng) {
  int64_t moves = 0;
  for (;;) {
    auto n = site_sizes(site_of, sites);
    const int poor = int(std::min_element(n.begin(), n.end()) - n.begin());
    if (n[poor] >= min) return moves;
    const int rich = int(std::max_element(n.begin(), n.end()) - n.begin());
    if (n[rich] <= min) return moves;  // not enough samples overall: caller checked
    std::vector<size_t> members;
    for (size_t i = 0; i < site_of.size(); ++i)
      if (site_of[i] == rich) members.push_back(i);
    site_of[members[rng.below(int64_t(members.size()))]] = poor;
    ++moves;
  }
}

// Assigns the samples listed in `idx` (already shuffled) to sites by `counts`.
void deal(const std::vector<size_t>& idx, const std::vector<int64_t>& counts,
          std::vector<int>& site_of) {
  size_t k = 0;
  for (size_t s = 0; s < counts.size(); ++s)
    for (int64_t j = 0; j < counts[s]; ++j) site_of[idx[k++]] = int(s);
}

std::vector<size_t> shuffled_range(size_t n, SeededRandom& rng) {
  std::vector<size_t> v(n);
  std::iota(v.begin(), v.end(), size_t(0));
  rng.shuffle(v);
  return v;
}

int64_t min_of(const std::vector<int64_t>& v) {
  return *std::min_element(v.begin(), v.end());
}

}  // namespace

Federation partition(Federation pooled, const PartitionSpec& spec, uint64_t seed) {
  if (spec.scheme == "none") return pooled;
  if (spec.scheme != "iid" && spec.scheme != "dirichlet" && spec.scheme != "quantity")
    throw Error("partition: unknown scheme '" + spec.scheme +
                "' (expected none, iid, dirichlet or quantity)");
  const int N = spec.sites;
  if (N < 1) throw Error("partition: sites must be at least 1, got " + std::to_string(N));
  if (spec.scheme != "iid" && !(spec.alpha > 0))
    throw Error("partition: alpha must be > 0, got " + std::to_string(spec.alpha));
  if (spec.min_samples < 0) throw Error("partition: min_samples must be >= 0");
  if (spec.test != "follow" && spec.test != "iid")
    throw Error("partition: unknown test '" + spec.test + "' (expected follow or iid)");

  std::vector<Sample> train, test;
  for (auto& site : pooled.sites) {
    for (auto& s : site.train) train.push_back(std::move(s));
    for (auto& s : site.test) test.push_back(std::move(s));
  }
  const int64_t min_train = spec.min_samples;
  if (int64_t(train.size()) < int64_t(N) * min_train)
    throw Error("partition: " + std::to_string(train.size()) + " training samples cannot give " +
                std::to_string(N) + " sites at least " + std::to_string(min_train) +
                " each (lower data.partition.sites or min_samples)");

  int num_classes = 0;
  if (spec.scheme == "dirichlet") {
    for (const auto* split : {&train, &test})
      for (const auto& s : *split) {
        if (s.label < 0)
          throw Error("partition: scheme 'dirichlet' needs a class label on every sample; '" +
                      s.id + "' has none (use 'iid' or 'quantity' for segmentation data)");
        num_classes = std::max<int>(num_classes, int(s.label) + 1);
      }
  }

  SeededRandom rng(mix_seed(seed, 0x9a27));
  std::vector<int> train_site(train.size(), 0), test_site(test.size(), 0);
  int draws = 1;
  int64_t moved = 0;

  auto deal_iid = [&](size_t n, std::vector<int>& site_of) {
    const auto idx = shuffled_range(n, rng);
    for (size_t k = 0; k < idx.size(); ++k) site_of[idx[k]] = int(k % N);
  };
  if (spec.scheme == "iid") {
    deal_iid(train.size(), train_site);
    deal_iid(test.size(), test_site);
  } else if (spec.scheme == "quantity") {
    std::vector<double> q;
    std::vector<int64_t> counts;
    for (draws = 1;; ++draws) {
      q = rng.dirichlet(spec.alpha, N);
      counts = allocate(int64_t(train.size()), q);
      if (min_of(counts) >= min_train || draws == kMaxDraws) break;
    }
    deal(shuffled_range(train.size(), rng), counts, train_site);
    moved = rebalance(train_site, N, min_train, rng);
    deal(shuffled_range(test.size(), rng), allocate(int64_t(test.size()), q), test_site);
  } else {  // dirichlet
    auto by_class = [&](const std::vector<Sample>& v) {
      std::vector<std::vector<size_t>> c(num_classes);
      for (size_t i = 0; i < v.size(); ++i) c[v[i].label].push_back(i);
      return c;
    };
    const auto train_cls = by_class(train), test_cls = by_class(test);
    std::vector<std::vector<double>> p(num_classes);
    for (draws = 1;; ++draws) {
      for (int c = 0; c < num_classes; ++c) {
        p[c] = rng.dirichlet(spec.alpha, N);
        auto idx = train_cls[c];
        rng.shuffle(idx);
        deal(idx, allocate(int64_t(idx.size()), p[c]), train_site);
      }
      if (min_of(site_sizes(train_site, N)) >= min_train || draws == kMaxDraws) break;
    }
    moved = rebalance(train_site, N, min_train, rng);
    for (int c = 0; c < num_classes; ++c) {
      auto idx = test_cls[c];
      rng.shuffle(idx);
      deal(idx, allocate(int64_t(idx.size()), p[c]), test_site);
    }
  }
  if (spec.test == "iid") {
    // Drawn after the training split, from the same stream: the training split is the same as
    // with test: follow.
    deal_iid(test.size(), test_site);
  }
  if (int64_t(test.size()) >= N) rebalance(test_site, N, 1, rng);

  Federation out;
  out.task = pooled.task;
  out.num_classes = pooled.num_classes;
  out.channels = pooled.channels;
  out.notes = std::move(pooled.notes);
  out.sites.resize(N);
  for (int s = 0; s < N; ++s) out.sites[s].name = "site-" + std::to_string(s + 1);
  for (size_t i = 0; i < train.size(); ++i)
    out.sites[train_site[i]].train.push_back(std::move(train[i]));
  for (size_t i = 0; i < test.size(); ++i)
    out.sites[test_site[i]].test.push_back(std::move(test[i]));

  nlohmann::ordered_json note;
  note["scheme"] = spec.scheme;
  note["alpha"] = spec.alpha;
  note["min_samples"] = spec.min_samples;
  note["test"] = spec.test;
  note["seed"] = seed;
  note["draws"] = draws;
  note["rebalanced_samples"] = moved;
  for (const auto& site : out.sites) {
    auto& j = note["sites"][site.name];
    j["train"] = site.train.size();
    j["test"] = site.test.size();
    std::map<int64_t, int64_t> hist;
    for (const auto& s : site.train) hist[s.label] += 1;
    if (!(hist.size() == 1 && hist.count(-1)))
      for (const auto& [label, n] : hist) j["train_labels"][std::to_string(label)] = n;
  }
  out.notes["partition"] = json_text(note);  // site names come from data
  return out;
}

// ---------------------------------------------------------------------------------------------
// Scanner shift

std::string ScannerSignature::json() const {
  nlohmann::ordered_json j;
  j["gamma"] = gamma;
  j["contrast"] = contrast;
  j["brightness"] = brightness;
  j["bias_amplitude"] = bias_amplitude;
  j["bias_seed"] = bias_seed;
  j["noise_sigma"] = noise_sigma;
  j["blur_sigma"] = blur_sigma;
  j["lowfreq_scale"] = lowfreq_scale;
  return j.dump();
}

ScannerSignature site_signature(uint64_t seed, int site_index, double strength) {
  if (!(strength >= 0)) throw Error("scanner shift: strength must be >= 0");
  // Each parameter walks a golden-ratio sequence from a seeded start, so sites 0, 1, 2, ... are
  // spread over the parameter's range instead of clustering by chance.
  auto t = [&](int param) {
    const double start = SeededRandom(mix_seed(seed, 0x5ca7 + param)).uniform();
    const double v = start + site_index * 0.6180339887498949;
    return v - std::floor(v);
  };
  auto sym = [&](int param) { return 2 * t(param) - 1; };  // in [-1, 1)
  const double s = strength;
  ScannerSignature sig;
  sig.gamma = std::exp(s * 0.4 * sym(0));
  sig.contrast = std::exp(s * 0.25 * sym(1));
  sig.brightness = s * 0.08 * sym(2);
  sig.bias_amplitude = s > 0 ? s * (0.05 + 0.2 * t(3)) : 0.0;
  sig.bias_seed = mix_seed(mix_seed(seed, 0xb1a5), uint64_t(site_index));
  sig.noise_sigma = s > 0 ? s * (0.01 + 0.03 * t(4)) : 0.0;
  sig.blur_sigma = s * 1.2 * t(5);
  sig.lowfreq_scale = std::exp(s * 0.3 * sym(6));
  return sig;
}

namespace {

// f(x, y, z) = sum of 4 cosines with < 1 period over the image, scaled to max |f| = 1.
std::vector<float> bias_field(const Image& img, uint64_t bias_seed) {
  SeededRandom rng(bias_seed);
  struct Wave {
    double fx, fy, fz, phase, amp;
  };
  std::vector<Wave> waves(4);
  for (auto& w : waves) {
    w.fx = rng.uniform(-0.9, 0.9);
    w.fy = rng.uniform(-0.9, 0.9);
    w.fz = img.size[2] > 1 ? rng.uniform(-0.9, 0.9) : 0.0;
    w.phase = rng.uniform(0, 2 * kPi);
    w.amp = rng.uniform(0.5, 1.0);
  }
  const int64_t X = img.size[0], Y = img.size[1], Z = img.size[2];
  std::vector<float> f(img.voxels());
  double peak = 0;
  for (int64_t z = 0; z < Z; ++z)
    for (int64_t y = 0; y < Y; ++y)
      for (int64_t x = 0; x < X; ++x) {
        double v = 0;
        for (const auto& w : waves)
          v += w.amp * std::cos(2 * kPi * (w.fx * x / X + w.fy * y / Y + w.fz * z / Z) + w.phase);
        f[(z * Y + y) * X + x] = float(v);
        peak = std::max(peak, std::abs(v));
      }
  if (peak > 0)
    for (auto& v : f) v = float(v / peak);
  return f;
}

void scale_low_frequencies(cv::Mat& slice, double scale) {
  cv::Mat spec;
  cv::dft(slice, spec, cv::DFT_COMPLEX_OUTPUT);
  const int H = slice.rows, W = slice.cols;
  const double r0 = 0.05;
  for (int v = 0; v < H; ++v) {
    const double fv = double(std::min(v, H - v)) / H;
    auto* row = spec.ptr<cv::Vec2f>(v);
    for (int u = 0; u < W; ++u) {
      if (u == 0 && v == 0) continue;  // the mean is brightness's business
      const double fu = double(std::min(u, W - u)) / W;
      const double w = 1 + (scale - 1) * std::exp(-(fu * fu + fv * fv) / (2 * r0 * r0));
      row[u] *= float(w);
    }
  }
  cv::dft(spec, slice, cv::DFT_INVERSE | cv::DFT_SCALE | cv::DFT_REAL_OUTPUT);
}

}  // namespace

void apply_signature(Image& image, const ScannerSignature& sig, uint64_t noise_seed) {
  const int64_t X = image.size[0], Y = image.size[1], Z = image.size[2];
  if (int64_t(image.data.size()) != image.channels * X * Y * Z)
    throw Error("scanner shift: image buffer holds " + std::to_string(image.data.size()) +
                " values, geometry says " + std::to_string(image.channels * X * Y * Z));
  const int64_t nvox = image.voxels();
  if (sig.bias_amplitude != 0) {
    const auto f = bias_field(image, sig.bias_seed);
    for (int c = 0; c < image.channels; ++c) {
      float* p = image.channel(c);
      for (int64_t i = 0; i < nvox; ++i) p[i] *= float(std::exp(sig.bias_amplitude * f[i]));
    }
  }
  if (sig.lowfreq_scale != 1 || sig.blur_sigma > 0) {
    for (int c = 0; c < image.channels; ++c)
      for (int64_t z = 0; z < Z; ++z) {
        cv::Mat slice(int(Y), int(X), CV_32F, image.channel(c) + z * X * Y);  // a view
        if (sig.lowfreq_scale != 1) {
          cv::Mat work = slice.clone();
          scale_low_frequencies(work, sig.lowfreq_scale);
          work.copyTo(slice);
        }
        if (sig.blur_sigma > 0) {
          cv::Mat blurred;
          cv::GaussianBlur(slice, blurred, cv::Size(0, 0), sig.blur_sigma, sig.blur_sigma,
                           cv::BORDER_REFLECT);
          blurred.copyTo(slice);
        }
      }
  }
  if (sig.gamma != 1)
    for (auto& v : image.data) v = float(std::pow(std::max(double(v), 0.0), sig.gamma));
  if (sig.contrast != 1 || sig.brightness != 0)
    for (auto& v : image.data) v = float(sig.contrast * v + sig.brightness);
  if (sig.noise_sigma > 0) {
    SeededRandom rng(noise_seed);
    for (auto& v : image.data) v += float(sig.noise_sigma * rng.normal());
  }
}

void apply_scanner_shift(Federation& federation, double strength, uint64_t seed) {
  for (size_t s = 0; s < federation.sites.size(); ++s) {
    auto& site = federation.sites[s];
    const ScannerSignature sig = site_signature(seed, int(s), strength);
    uint64_t split_tag = 0;
    for (auto* split : {&site.train, &site.test}) {
      ++split_tag;
      for (size_t i = 0; i < split->size(); ++i) {
        Sample& sample = (*split)[i];
        if (!sample.reference) sample.reference = sample.image;
        apply_signature(sample.image, sig,
                        mix_seed(mix_seed(mix_seed(seed, 0x7015e), s * 4 + split_tag), i));
      }
    }
    federation.notes["scanner." + site.name] = sig.json();
  }
  nlohmann::ordered_json j;
  j["strength"] = strength;
  j["seed"] = seed;
  federation.notes["scanner"] = j.dump();
}

}  // namespace concord
