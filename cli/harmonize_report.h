// What `concord harmonize apply` shows a person: a site-shift measure before and after
// harmonization, and a before/after montage with one row per site.
//
// Site shift: the mean over site pairs of (a) the 1-Wasserstein distance between the sites'
// mean intensity histograms and (b) the mean absolute difference between the sites' mean
// log-amplitude spectra. Both are computed on a fixed number of images per site, with
// intensities expressed relative to the pooled 0.5-99.5 percentile range of the set (before or
// after), so a global rescaling of every image changes neither number.
#pragma once

#include <concord/image.h>

#include <map>
#include <mutex>
#include <string>
#include <vector>

namespace concord::cli {

struct ShiftMeasure {
  int sites = 0;
  int images = 0;
  double histogram_before = 0, histogram_after = 0;
  double spectrum_before = 0, spectrum_after = 0;
};

class SiteShiftReport {
 public:
  static constexpr int kThumb = 128;  // thumbnail side (central slice, channel mean)

  // Thread-safe. `key` orders images within a site (e.g. the relative path).
  void add(const std::string& site, const std::string& key, const Image& before,
           const Image& after);
  bool empty() const;
  ShiftMeasure measure() const;
  // A row per site: up to `per_site` before/after pairs. Writes the PNG atomically.
  void write_preview(const std::string& png, int per_site) const;
  // The same montage as PNG bytes (`what` names it in errors).
  std::string preview_png(int per_site, const std::string& what) const;

  // What is kept of one image: a thumbnail and a strided sample of its values.
  struct Summary {
    std::vector<float> thumb;   // kThumb x kThumb
    std::vector<float> values;  // up to 8192 values
  };
  static Summary summarize(const Image& image);

 private:
  struct Entry {
    Summary before, after;
  };
  mutable std::mutex mutex_;
  std::map<std::string, std::map<std::string, Entry>> sites_;
};

}  // namespace concord::cli
