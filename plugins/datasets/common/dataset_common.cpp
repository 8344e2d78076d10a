#include "dataset_common.h"

#include <concord/error.h>

#include <spdlog/spdlog.h>
#include <opencv2/core.hpp>
#include <opencv2/imgproc.hpp>

#include <algorithm>
#include <cctype>
#include <cmath>
#include <set>

namespace concord::datasets {

std::vector<ArgSpec> image_option_specs() {
  return {
      ArgSpec::integer("size", 0, "Resize every image to size x size (0 keeps the size)")
          .range(0, 4096),
      ArgSpec::integer("channels", 0,
                       "Convert to 1 (grey) or 3 (RGB) channels; 0: grey stored as RGB is grey, "
                       "colour stays colour, grey joins a colour set as 3 channels")
          .range(0, 3),
      ArgSpec::choice("normalize", {"minmax", "percentile", "type", "none"}, "minmax",
                      "Intensities to [0,1]: per-image min-max, per-image percentiles "
                      "(clipped), divide by the pixel type's maximum, or none"),
      ArgSpec::list("percentiles", ArgType::Float, {"1", "99"},
                    "Low and high percentile for normalize: percentile")
          .range(0, 100),
      ArgSpec::list("mask_values", ArgType::Float, {},
                    "Raw mask value of class 0, 1, ... (e.g. [255, 0]); empty: {0,255} -> "
                    "{0,1}, else values are class indices"),
      ArgSpec::choice("slices", {"center", "all"}, "center",
                      "3D volumes: the middle axial slice, or every axial slice"),
      ArgSpec::choice("non_finite", {"error", "zero"}, "error",
                      "Images with NaN/Inf voxels: refuse naming the file, or replace them by 0"),
  };
}

// Numbers of a list argument, whether the items arrived typed (pipeline files) or as text.
static std::vector<double> numbers(const Args& a, const std::string& name) {
  std::vector<double> out;
  for (const auto& s : a.strings(name)) {
    try {
      size_t used = 0;
      out.push_back(std::stod(s, &used));
      if (used != s.size()) throw std::invalid_argument(s);
    } catch (const std::exception&) {
      throw Error(a.plugin() + ": argument '" + name + "': '" + s + "' is not a number");
    }
  }
  return out;
}

ImageOptions image_options(const Args& a) {
  ImageOptions o;
  if (a.has("size")) o.size = int(a.integer("size"));
  if (a.has("channels")) o.channels = int(a.integer("channels"));
  if (o.channels == 2) throw Error(a.plugin() + ": channels must be 0 (keep), 1 or 3, got 2");
  if (a.has("normalize")) o.normalize = a.str("normalize");
  if (a.has("percentiles")) {
    auto p = numbers(a, "percentiles");
    if (p.size() != 2 || !(p[0] < p[1]))
      throw Error(a.plugin() + ": percentiles must be two increasing values, e.g. [1, 99]");
    o.low_percentile = p[0];
    o.high_percentile = p[1];
  }
  if (a.has("mask_values")) o.mask_values = numbers(a, "mask_values");
  if (a.has("slices")) o.slices = a.str("slices");
  if (a.has("non_finite") && a.str("non_finite") == "zero") o.non_finite = NonFinite::Zero;
  return o;
}

std::string extension_of(const std::string& path) {
  std::string name = path.substr(path.find_last_of('/') + 1);
  std::transform(name.begin(), name.end(), name.begin(),
                 [](unsigned char c) { return std::tolower(c); });
  if (name.size() > 7 && name.compare(name.size() - 7, 7, ".nii.gz") == 0) return ".nii.gz";
  const auto dot = name.find_last_of('.');
  return dot == std::string::npos ? "" : name.substr(dot);
}

Image resize(const Image& img, int size, bool nearest) {
  if (size <= 0 || (img.size[0] == size && img.size[1] == size)) return img;
  if (img.dim != 2 && img.size[2] != 1) throw Error("resize: 3D images must be sliced first");
  Image out = img;
  out.size = {size, size, 1};
  out.data.assign(size_t(img.channels) * size * size, 0.f);
  const bool shrink = img.size[0] > size || img.size[1] > size;
  const int interp = nearest ? cv::INTER_NEAREST : shrink ? cv::INTER_AREA : cv::INTER_LINEAR;
  for (int c = 0; c < img.channels; ++c) {
    cv::Mat src(int(img.size[1]), int(img.size[0]), CV_32F, const_cast<float*>(img.channel(c)));
    cv::Mat dst(size, size, CV_32F, out.channel(c));
    cv::resize(src, dst, cv::Size(size, size), 0, 0, interp);
  }
  // Spacing follows the resampling so physical extent is kept.
  out.geometry.spacing[0] = img.geometry.spacing[0] * double(img.size[0]) / size;
  out.geometry.spacing[1] = img.geometry.spacing[1] * double(img.size[1]) / size;
  return out;
}

Image convert_channels(const Image& img, int channels, const std::string& what) {
  if (channels == 0 || img.channels == channels) return img;
  Image out = img;
  if (channels == 1) {
    apply_channel_policy(out, ChannelPolicy::Grey, what);
    return out;
  }
  const int64_t n = img.voxels();
  if (channels == 3 && img.channels == 1) {
    out.channels = 3;
    out.data.resize(size_t(3 * n));
    for (int c = 1; c < 3; ++c) std::copy(img.channel(0), img.channel(0) + n, out.channel(c));
  } else if (channels == 3 && img.channels == 4) {  // drop alpha
    out.channels = 3;
    out.data.resize(size_t(3 * n));
  } else {
    throw Error(what + ": cannot convert " + std::to_string(img.channels) + " channels to " +
                std::to_string(channels));
  }
  return out;
}

void unify_channels(Federation& fed, const ImageOptions& opt, const std::string& plugin) {
  if (opt.channels != 0) return;
  bool colour = false;
  for (const auto& site : fed.sites)
    for (const auto* split : {&site.train, &site.test})
      for (const auto& s : *split) colour = colour || s.image.channels == 3;
  if (!colour) return;
  fed.channels = 3;
  int promoted = 0;
  for (auto& site : fed.sites)
    for (auto* split : {&site.train, &site.test})
      for (auto& s : *split)
        if (s.image.channels == 1) {
          s.image = convert_channels(s.image, 3, s.id);
          ++promoted;
        }
  if (promoted)
    spdlog::info("{}: {} grey image(s) replicated to 3 channels to match the colour ones", plugin,
                 promoted);
}

static double type_max(PixelType t) {
  switch (t) {
    case PixelType::U8:
      return 255;
    case PixelType::I8:
      return 127;
    case PixelType::U16:
      return 65535;
    case PixelType::I16:
      return 32767;
    case PixelType::U32:
      return 4294967295.0;
    case PixelType::I32:
      return 2147483647.0;
    default:
      return 1;  // float data: assumed already in [0,1]
  }
}

void normalize(Image& img, const ImageOptions& opt, const std::string& what) {
  if (img.data.empty()) throw Error(what + ": empty image");
  if (opt.normalize == "none") return;
  if (opt.normalize == "type") {
    const float s = float(1.0 / type_max(img.pixel_type));
    for (auto& v : img.data) v *= s;
    return;
  }
  float lo, hi;
  if (opt.normalize == "minmax") {
    const auto [a, b] = std::minmax_element(img.data.begin(), img.data.end());
    lo = *a;
    hi = *b;
  } else if (opt.normalize == "percentile") {
    std::vector<float> sorted = img.data;
    auto pick = [&](double p) {
      const size_t k = size_t(std::llround(p / 100.0 * double(sorted.size() - 1)));
      std::nth_element(sorted.begin(), sorted.begin() + k, sorted.end());
      return sorted[k];
    };
    lo = pick(opt.low_percentile);
    hi = pick(opt.high_percentile);
  } else {
    throw Error(what + ": unknown normalize mode '" + opt.normalize + "'");
  }
  const float scale = hi > lo ? 1.0f / (hi - lo) : 0.0f;  // a constant image maps to 0
  for (auto& v : img.data) v = std::clamp((v - lo) * scale, 0.0f, 1.0f);
}

Image map_mask(const Image& raw, const std::vector<double>& values, const std::string& what) {
  Image m = raw.channels == 1 ? raw : convert_channels(raw, 1, what);
  if (raw.channels > 1) {  // colour-saved masks: all channels must agree, take the first
    const int64_t n = raw.voxels();
    for (int c = 1; c < raw.channels; ++c)
      for (int64_t i = 0; i < n; ++i)
        if (raw.channel(c)[i] != raw.channel(0)[i])
          throw Error(what + ": mask has " + std::to_string(raw.channels) +
                      " differing channels; expected a single-channel label image");
    m.data.assign(raw.channel(0), raw.channel(0) + n);
  }
  m.pixel_type = PixelType::U8;
  std::set<float> present(m.data.begin(), m.data.end());
  auto fail = [&](float v, const std::string& why) {
    std::string list;
    for (float p : present) {
      if (list.size() > 60) {
        list += ", ...";
        break;
      }
      list += (list.empty() ? "" : ", ") + std::to_string(int64_t(p));
    }
    throw Error(what + ": mask value " + std::to_string(v) + " " + why +
                " (values present: " + list + ")");
  };
  if (!values.empty()) {
    for (auto& v : m.data) {
      const auto it = std::find(values.begin(), values.end(), double(v));
      if (it == values.end()) fail(v, "is not listed in mask_values");
      v = float(it - values.begin());
    }
    return m;
  }
  const bool binary255 =
      std::all_of(present.begin(), present.end(), [](float v) { return v == 0.f || v == 255.f; });
  if (binary255) {
    for (auto& v : m.data) v = v == 255.f ? 1.f : 0.f;
    return m;
  }
  for (float v : present)
    if (v < 0 || v != std::floor(v) || v > 255)
      fail(v, "is not a class index; set mask_values to map raw values to classes");
  return m;
}

std::vector<std::pair<int, Image>> axial_slices(const Image& img, const std::string& mode) {
  std::vector<std::pair<int, Image>> out;
  if (img.size[2] <= 1) {
    Image flat = img;
    flat.dim = 2;
    out.emplace_back(-1, std::move(flat));
    return out;
  }
  const int64_t Z = img.size[2], plane = img.size[0] * img.size[1];
  auto slice = [&](int64_t z) {
    Image s(2, img.channels, {img.size[0], img.size[1], 1});
    s.geometry = img.geometry;
    s.pixel_type = img.pixel_type;
    s.meta = img.meta;
    for (int c = 0; c < img.channels; ++c)
      std::copy(img.channel(c) + z * plane, img.channel(c) + (z + 1) * plane, s.channel(c));
    return s;
  };
  if (mode == "center") {
    out.emplace_back(int(Z / 2), slice(Z / 2));
  } else {
    for (int64_t z = 0; z < Z; ++z) out.emplace_back(int(z), slice(z));
  }
  return out;
}

void check_uniform(const Federation& fed, const std::string& plugin) {
  const Sample* first = nullptr;
  std::string first_site;
  for (const auto& site : fed.sites)
    for (const auto* split : {&site.train, &site.test})
      for (const auto& s : *split) {
        if (!first) {
          first = &s;
          first_site = site.name;
          continue;
        }
        if (s.image.size != first->image.size || s.image.channels != first->image.channels)
          throw Error(plugin + ": site '" + site.name + "': '" + s.id + "' is " +
                      std::to_string(s.image.size[0]) + "x" + std::to_string(s.image.size[1]) +
                      " with " + std::to_string(s.image.channels) + " channel(s), but '" +
                      first->id + "' (site '" + first_site + "') is " +
                      std::to_string(first->image.size[0]) + "x" +
                      std::to_string(first->image.size[1]) + " with " +
                      std::to_string(first->image.channels) +
                      "; training needs one shape: set the `size` and `channels` arguments");
      }
}

}  // namespace concord::datasets
