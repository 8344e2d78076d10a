#include "intensity.h"

#include <itkImage.h>
#include <itkImportImageFilter.h>
#include <itkOtsuThresholdImageFilter.h>

#include <algorithm>
#include <cmath>
#include <numeric>

namespace concord::intensity {

std::vector<ArgSpec> foreground_args(const std::string& default_policy) {
  return {
      ArgSpec::choice("foreground", {"mean", "otsu", "nonzero", "threshold", "all"}, default_policy,
                      "voxels that count for the statistics: above the channel mean, above "
                      "Otsu's threshold, non-zero, above `threshold`, or all"),
      ArgSpec::real("threshold", 0.0, "intensity cut used when foreground = threshold")};
}

ForegroundRule foreground_rule(const Args& args) {
  const std::string& k = args.str("foreground");
  ForegroundRule r;
  r.threshold = args.real("threshold");
  if (k == "mean")
    r.kind = Foreground::Mean;
  else if (k == "otsu")
    r.kind = Foreground::Otsu;
  else if (k == "nonzero")
    r.kind = Foreground::Nonzero;
  else if (k == "threshold")
    r.kind = Foreground::Threshold;
  else if (k == "all")
    r.kind = Foreground::All;
  else
    throw Error("plugin '" + args.plugin() + "': unknown foreground policy '" + k + "'");
  return r;
}

double otsu_threshold(const float* v, int64_t n, unsigned bins) {
  // A 1-D view of the values: Otsu only looks at the histogram, so the layout is irrelevant.
  using Img = itk::Image<float, 1>;
  using Import = itk::ImportImageFilter<float, 1>;
  auto import = Import::New();
  Import::SizeType size;
  size[0] = static_cast<itk::SizeValueType>(n);
  import->SetRegion(Import::RegionType(size));
  // The filter only reads the buffer and does not own it.
  import->SetImportPointer(const_cast<float*>(v), static_cast<itk::SizeValueType>(n), false);
  auto otsu = itk::OtsuThresholdImageFilter<Img, itk::Image<unsigned char, 1>>::New();
  otsu->SetInput(import->GetOutput());
  otsu->SetNumberOfHistogramBins(bins);
  otsu->SetNumberOfWorkUnits(1);
  otsu->Update();
  return otsu->GetThreshold();
}

std::vector<uint8_t> foreground_mask(const float* v, int64_t n, const ForegroundRule& rule) {
  std::vector<uint8_t> m(static_cast<size_t>(n), 1);
  double cut = rule.threshold;
  switch (rule.kind) {
    case Foreground::All:
      return m;
    case Foreground::Nonzero:
      for (int64_t i = 0; i < n; ++i) m[i] = v[i] != 0;
      return m;
    case Foreground::Mean: {
      double sum = 0;
      for (int64_t i = 0; i < n; ++i) sum += v[i];
      cut = n > 0 ? sum / double(n) : 0;
      break;
    }
    case Foreground::Otsu:
      cut = n > 0 ? otsu_threshold(v, n) : 0;
      break;
    case Foreground::Threshold:
      break;
  }
  for (int64_t i = 0; i < n; ++i) m[i] = v[i] > cut;
  return m;
}

std::vector<float> sorted_foreground(const float* v, int64_t n, const ForegroundRule& rule) {
  std::vector<uint8_t> m = foreground_mask(v, n, rule);
  std::vector<float> out;
  out.reserve(static_cast<size_t>(std::count(m.begin(), m.end(), uint8_t(1))));
  for (int64_t i = 0; i < n; ++i)
    if (m[i]) out.push_back(v[i]);
  std::sort(out.begin(), out.end());
  return out;
}

std::vector<double> percentiles(const std::vector<float>& sorted, const std::vector<double>& pcts) {
  if (sorted.empty()) throw Error("percentiles of an empty set of voxels");
  std::vector<double> out;
  out.reserve(pcts.size());
  const double last = double(sorted.size() - 1);
  for (double p : pcts) {
    double pos = std::clamp(p, 0.0, 100.0) / 100.0 * last;
    auto lo = static_cast<size_t>(std::floor(pos));
    size_t hi = std::min(lo + 1, sorted.size() - 1);
    double t = pos - double(lo);
    out.push_back(double(sorted[lo]) + t * (double(sorted[hi]) - double(sorted[lo])));
  }
  return out;
}

ArgSpec tails_arg() {
  return ArgSpec::choice("tails", {"global-slope", "end-segments", "clamp"}, "global-slope",
                         "map beyond the outer landmarks: slope of the chord between them, slopes "
                         "of the first/last segments, or clamp");
}

Tails tails_from(const std::string& name) {
  if (name == "global-slope") return Tails::GlobalSlope;
  if (name == "end-segments") return Tails::EndSegments;
  if (name == "clamp") return Tails::Clamp;
  throw Error("unknown tails policy '" + name + "'");
}

PiecewiseLinear::PiecewiseLinear(const std::vector<double>& x, const std::vector<double>& y,
                                 Tails tails, const std::string& context) {
  if (x.size() != y.size()) throw Error(context + ": landmark count mismatch");
  std::vector<size_t> order(x.size());
  std::iota(order.begin(), order.end(), size_t(0));
  std::stable_sort(order.begin(), order.end(), [&](size_t a, size_t b) { return x[a] < x[b]; });
  for (size_t k = 0; k < order.size();) {
    size_t j = k;
    double sum = 0;
    while (j < order.size() && x[order[j]] == x[order[k]]) sum += y[order[j++]];
    x_.push_back(x[order[k]]);
    y_.push_back(sum / double(j - k));
    k = j;
  }
  if (x_.size() < 2)
    throw Error(context + ": the image's landmarks collapse to a single intensity (" +
                std::to_string(x.empty() ? 0.0 : x[0]) + "); cannot build an intensity map");
  const size_t n = x_.size();
  switch (tails) {
    case Tails::GlobalSlope:
      slope_lo_ = slope_hi_ = (y_[n - 1] - y_[0]) / (x_[n - 1] - x_[0]);
      break;
    case Tails::EndSegments:
      slope_lo_ = (y_[1] - y_[0]) / (x_[1] - x_[0]);
      slope_hi_ = (y_[n - 1] - y_[n - 2]) / (x_[n - 1] - x_[n - 2]);
      break;
    case Tails::Clamp:
      slope_lo_ = slope_hi_ = 0;
      break;
  }
}

double PiecewiseLinear::operator()(double v) const {
  const size_t n = x_.size();
  if (v <= x_[0]) return y_[0] + slope_lo_ * (v - x_[0]);
  if (v >= x_[n - 1]) return y_[n - 1] + slope_hi_ * (v - x_[n - 1]);
  size_t k =
      size_t(std::upper_bound(x_.begin(), x_.end(), v) - x_.begin());  // x_[k-1] <= v < x_[k]
  double t = (v - x_[k - 1]) / (x_[k] - x_[k - 1]);
  return y_[k - 1] + t * (y_[k] - y_[k - 1]);
}

std::vector<double> list_reals(const Args& args, const std::string& name) {
  std::vector<double> out;
  for (const auto& v : args.value(name).items) {
    if (v.type == ArgType::Int)
      out.push_back(double(v.i));
    else if (v.type == ArgType::Float)
      out.push_back(v.f);
    else {
      try {
        out.push_back(std::stod(v.s));
      } catch (const std::exception&) {
        throw Error("plugin '" + args.plugin() + "': '" + name + "' item '" + v.s +
                    "' is not a number");
      }
    }
  }
  return out;
}

static std::string shape_str(const Array& a) {
  std::string s = "[";
  for (size_t k = 0; k < a.shape().size(); ++k) s += (k ? "," : "") + std::to_string(a.shape()[k]);
  return s + "]";
}

Stats weighted_mean(const std::vector<Stats>& parts, const std::vector<std::string>& averaged,
                    const std::vector<std::string>& identical, const std::string& plugin) {
  Stats out;
  auto part = [&](size_t p) {
    return "part " + std::to_string(p) +
           (parts[p].site.empty() ? std::string() : " (site '" + parts[p].site + "')");
  };
  const Stats* first = nullptr;
  size_t first_index = 0;
  for (size_t p = 0; p < parts.size(); ++p) {
    if (parts[p].weight < 0)
      throw Error(plugin + ": combine: " + part(p) + " has a negative weight");
    if (parts[p].weight == 0) continue;
    out.weight += parts[p].weight;
    if (!first) first = &parts[p], first_index = p;
  }
  if (!first) throw Error(plugin + ": combine: no statistics with positive weight (no images)");
  auto get = [&](const Stats& s, size_t p, const std::string& name) -> const Array& {
    auto it = s.arrays.find(name);
    if (it == s.arrays.end())
      throw Error(plugin + ": combine: " + part(p) + " lacks array '" + name + "'");
    if (it->second.dtype() != DType::F64)
      throw Error(plugin + ": combine: array '" + name + "' of " + part(p) + " is " +
                  dtype_name(it->second.dtype()) + ", expected f64");
    return it->second;
  };
  for (const auto& name : identical) {
    const Array& ref = get(*first, first_index, name);
    for (size_t p = 0; p < parts.size(); ++p) {
      if (parts[p].weight == 0) continue;
      const Array& a = get(parts[p], p, name);
      if (a.shape() != ref.shape() ||
          !std::equal(a.data<double>(), a.data<double>() + a.numel(), ref.data<double>()))
        throw Error(plugin + ": combine: '" + name + "' of " + part(p) + " differs from " +
                    part(first_index) + " (sites configured differently)");
    }
    out.arrays[name] = ref.clone();
  }
  for (const auto& name : averaged) {
    const Array& ref = get(*first, first_index, name);
    Array acc(DType::F64, ref.shape());
    double* d = acc.data<double>();
    for (size_t p = 0; p < parts.size(); ++p) {
      if (parts[p].weight == 0) continue;
      const Array& a = get(parts[p], p, name);
      if (a.shape() != ref.shape())
        throw Error(plugin + ": combine: '" + name + "' of " + part(p) + " has shape " +
                    shape_str(a) + " but " + part(first_index) + " has " + shape_str(ref) +
                    " (different channel counts?)");
      const double w = parts[p].weight / out.weight;
      const double* s = a.data<double>();
      for (int64_t i = 0; i < a.numel(); ++i) d[i] += w * s[i];
    }
    out.arrays[name] = std::move(acc);
  }
  return out;
}

const double* row(const Array& a, int c, int64_t len, const std::string& what) {
  if (a.dtype() != DType::F64 || a.shape().size() != 2 || a.shape()[1] != len)
    throw Error(what + ": expected an f64 array of shape [channels, " + std::to_string(len) +
                "], got " + dtype_name(a.dtype()) + " " + shape_str(a));
  if (c >= a.shape()[0])
    throw Error(what + ": statistics hold " + std::to_string(a.shape()[0]) +
                " channel(s) but the image has channel " + std::to_string(c));
  return a.data<double>() + c * len;
}

Stats SiteLocal::fit_site(const ImageSource& images) {
  Stats s;
  images([&](const Image&) { s.weight += 1; });
  return s;
}

Stats SiteLocal::combine(const std::vector<Stats>& parts) {
  Stats s;
  for (const auto& p : parts) s.weight += p.weight;
  return s;
}

}  // namespace concord::intensity
