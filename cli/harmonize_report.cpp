#include "harmonize_report.h"

#include <concord/durable_output.h>
#include <concord/error.h>
#include <concord/message.h>

#include <opencv2/core.hpp>
#include <opencv2/imgcodecs.hpp>
#include <opencv2/imgproc.hpp>

#include <algorithm>
#include <cmath>

namespace concord::cli {

namespace {

constexpr int kBins = 64;

struct Range {
  double lo = 0, hi = 1;
};

// Pooled robust range of every kept value of one side (before or after).
Range pooled_range(const std::vector<const SiteShiftReport::Summary*>& all) {
  std::vector<float> v;
  for (const auto* s : all) v.insert(v.end(), s->values.begin(), s->values.end());
  Range r;
  if (v.empty()) return r;
  auto at = [&](double q) {
    size_t k = size_t(q * double(v.size() - 1));
    std::nth_element(v.begin(), v.begin() + long(k), v.end());
    return double(v[k]);
  };
  r.lo = at(0.005);
  r.hi = at(0.995);
  if (!(r.hi > r.lo)) r.hi = r.lo + 1;
  return r;
}

std::vector<double> histogram(const std::vector<float>& values, Range r) {
  std::vector<double> h(kBins, 0);
  for (float x : values) {
    int b = int((double(x) - r.lo) / (r.hi - r.lo) * kBins);
    h[size_t(std::clamp(b, 0, kBins - 1))] += 1;
  }
  for (auto& x : h) x /= std::max<size_t>(1, values.size());
  return h;
}

// log(1 + |FFT|) of the thumbnail in range units, centred.
std::vector<double> log_amplitude(const std::vector<float>& thumb, Range r) {
  const int n = SiteShiftReport::kThumb;
  cv::Mat m(n, n, CV_32F);
  for (int i = 0; i < n * n; ++i)
    m.ptr<float>()[i] = float((thumb[size_t(i)] - r.lo) / (r.hi - r.lo));
  cv::Mat spec;
  cv::dft(m, spec, cv::DFT_COMPLEX_OUTPUT);
  std::vector<double> out(size_t(n) * n);
  for (int y = 0; y < n; ++y)
    for (int x = 0; x < n; ++x) {
      cv::Vec2f c = spec.at<cv::Vec2f>(y, x);
      int sy = (y + n / 2) % n, sx = (x + n / 2) % n;
      out[size_t(sy) * n + sx] = std::log1p(std::hypot(double(c[0]), double(c[1])) / n);
    }
  return out;
}

double w1(const std::vector<double>& a, const std::vector<double>& b) {
  double ca = 0, cb = 0, d = 0;
  for (size_t i = 0; i < a.size(); ++i) {
    ca += a[i];
    cb += b[i];
    d += std::abs(ca - cb);
  }
  return d / double(a.size());
}

double mean_abs(const std::vector<double>& a, const std::vector<double>& b) {
  double d = 0;
  for (size_t i = 0; i < a.size(); ++i) d += std::abs(a[i] - b[i]);
  return d / double(a.size());
}

template <class F>
double mean_pairwise(const std::vector<std::vector<double>>& per_site, F dist) {
  double sum = 0;
  int n = 0;
  for (size_t i = 0; i < per_site.size(); ++i)
    for (size_t j = i + 1; j < per_site.size(); ++j, ++n) sum += dist(per_site[i], per_site[j]);
  return n ? sum / n : 0;
}

void accumulate(std::vector<double>& acc, const std::vector<double>& x) {
  if (acc.empty()) acc.assign(x.size(), 0);
  for (size_t i = 0; i < x.size(); ++i) acc[i] += x[i];
}

}  // namespace

SiteShiftReport::Summary SiteShiftReport::summarize(const Image& im) {
  Summary s;
  const int64_t w = im.size[0], h = im.size[1], z = im.size[2] / 2;
  cv::Mat slice(int(h), int(w), CV_32F, cv::Scalar(0));
  for (int c = 0; c < im.channels; ++c)
    for (int64_t y = 0; y < h; ++y)
      for (int64_t x = 0; x < w; ++x)
        slice.at<float>(int(y), int(x)) += im.at(x, y, z, c) / float(im.channels);
  cv::Mat t;
  cv::resize(slice, t, cv::Size(kThumb, kThumb), 0, 0, cv::INTER_AREA);
  s.thumb.assign(t.ptr<float>(), t.ptr<float>() + kThumb * kThumb);
  const int64_t n = im.voxels();
  const int64_t step = std::max<int64_t>(1, n / 8192);
  for (int64_t i = 0; i < n; i += step) {
    float v = 0;
    for (int c = 0; c < im.channels; ++c) v += im.channel(c)[i] / float(im.channels);
    if (std::isfinite(v)) s.values.push_back(v);
  }
  return s;
}

void SiteShiftReport::add(const std::string& site, const std::string& key, const Image& before,
                          const Image& after) {
  Entry e{summarize(before), summarize(after)};
  std::lock_guard<std::mutex> lock(mutex_);
  sites_[site][key] = std::move(e);
}

bool SiteShiftReport::empty() const {
  std::lock_guard<std::mutex> lock(mutex_);
  return sites_.empty();
}

ShiftMeasure SiteShiftReport::measure() const {
  std::lock_guard<std::mutex> lock(mutex_);
  ShiftMeasure m;
  m.sites = int(sites_.size());
  for (int side = 0; side < 2; ++side) {
    std::vector<const Summary*> all;
    for (const auto& [site, entries] : sites_)
      for (const auto& [key, e] : entries) all.push_back(side == 0 ? &e.before : &e.after);
    if (side == 0) m.images = int(all.size());
    const Range r = pooled_range(all);
    std::vector<std::vector<double>> hists, specs;
    for (const auto& [site, entries] : sites_) {
      std::vector<double> h, s;
      for (const auto& [key, e] : entries) {
        const Summary& x = side == 0 ? e.before : e.after;
        accumulate(h, histogram(x.values, r));
        accumulate(s, log_amplitude(x.thumb, r));
      }
      for (auto& v : h) v /= double(entries.size());
      for (auto& v : s) v /= double(entries.size());
      hists.push_back(std::move(h));
      specs.push_back(std::move(s));
    }
    const double hd = mean_pairwise(hists, w1), sd = mean_pairwise(specs, mean_abs);
    (side == 0 ? m.histogram_before : m.histogram_after) = hd;
    (side == 0 ? m.spectrum_before : m.spectrum_after) = sd;
  }
  return m;
}

void SiteShiftReport::write_preview(const std::string& png, int per_site) const {
  const std::string bytes = preview_png(per_site, png);
  write_file_atomic(png, bytes.data(), bytes.size());
}

std::string SiteShiftReport::preview_png(int per_site, const std::string& what) const {
  std::lock_guard<std::mutex> lock(mutex_);
  if (sites_.empty()) throw Error(what + ": no images to preview");
  Range range[2];
  for (int side = 0; side < 2; ++side) {
    std::vector<const Summary*> all;
    for (const auto& [site, entries] : sites_)
      for (const auto& [key, e] : entries) all.push_back(side == 0 ? &e.before : &e.after);
    range[side] = pooled_range(all);
  }
  const int label_w = 170, gap = 4, pair_gap = 16, header = 24, row_gap = 8;
  const int pair_w = 2 * kThumb + gap;
  int cols = 1;
  for (const auto& [site, entries] : sites_)
    cols = std::max(cols, std::min(per_site, int(entries.size())));
  const int W = label_w + cols * pair_w + (cols - 1) * pair_gap + 8;
  const int H = header + int(sites_.size()) * (kThumb + row_gap);
  cv::Mat canvas(H, W, CV_8U, cv::Scalar(32));
  for (int c = 0; c < cols; ++c) {
    const int x0 = label_w + c * (pair_w + pair_gap);
    cv::putText(canvas, "before", {x0 + 4, 16}, cv::FONT_HERSHEY_SIMPLEX, 0.45, cv::Scalar(220), 1);
    cv::putText(canvas, "after", {x0 + kThumb + gap + 4, 16}, cv::FONT_HERSHEY_SIMPLEX, 0.45,
                cv::Scalar(220), 1);
  }
  int row = 0;
  for (const auto& [site, entries] : sites_) {
    const int y0 = header + row * (kThumb + row_gap);
    std::string label = site.size() > 20 ? "..." + site.substr(site.size() - 17) : site;
    cv::putText(canvas, label, {6, y0 + kThumb / 2}, cv::FONT_HERSHEY_SIMPLEX, 0.5, cv::Scalar(255),
                1);
    int c = 0;
    for (const auto& [key, e] : entries) {
      if (c >= per_site) break;
      for (int side = 0; side < 2; ++side) {
        const Summary& s = side == 0 ? e.before : e.after;
        const Range r = range[side];
        const int x0 = label_w + c * (pair_w + pair_gap) + side * (kThumb + gap);
        cv::Mat roi = canvas(cv::Rect(x0, y0, kThumb, kThumb));
        for (int i = 0; i < kThumb * kThumb; ++i) {
          double v = (s.thumb[size_t(i)] - r.lo) / (r.hi - r.lo) * 255.0;
          roi.at<uint8_t>(i / kThumb, i % kThumb) = uint8_t(std::clamp(v, 0.0, 255.0));
        }
      }
      ++c;
    }
    ++row;
  }
  std::vector<uchar> bytes;
  if (!cv::imencode(".png", canvas, bytes)) throw Error(what + ": cannot encode preview");
  return std::string(bytes.begin(), bytes.end());
}

}  // namespace concord::cli
