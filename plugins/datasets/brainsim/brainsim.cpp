// brainsim: the built-in default federation, generated from the Colin27 T1 brain MRI
// (ch2bet.nii.gz, Debian mricron-data). Per sample: an axial slice from the brain's central
// range, a seeded smooth deformation (affine + low-frequency displacement field, cv::remap), an
// optional synthetic lesion (soft ellipse, hypo- or hyper-intense, inside brain tissue), then the
// site's scanner signature (federation_tools). sample.reference is the rendering before the
// signature. Everything flows from DataRequest::seed; see README.md.
#include <concord/dataset.h>
#include <concord/error.h>
#include <concord/federation_tools.h>

#include <itkImage.h>
#include <itkImageFileReader.h>
#include <itkNiftiImageIOFactory.h>
#include <nlohmann/json.hpp>
#include <opencv2/core.hpp>
#include <opencv2/imgproc.hpp>

#include <algorithm>
#include <chrono>
#include <cmath>
#include <filesystem>
#include <mutex>

namespace concord {
namespace {

constexpr const char* kDefaultSource = "/usr/share/mricron/templates/ch2bet.nii.gz";
constexpr double kPi = 3.14159265358979323846;

// The source brain as 2D axial slices, already cropped to the brain and resized to size x size.
struct BrainSlices {
  std::vector<cv::Mat> image;  // CV_32F in [0,1]
  std::vector<cv::Mat> brain;  // CV_32F brain mask in [0,1] (soft at the border after resize)
};

BrainSlices load_brain(const std::string& source, int size) {
  if (!std::filesystem::is_regular_file(source))
    throw Error("brainsim: source '" + source +
                "' not found; install it with `scripts/bootstrap` or `apt-get install "
                "mricron-data` (or set the `source` argument)");
  static std::once_flag registered;
  std::call_once(registered, [] { itk::NiftiImageIOFactory::RegisterOneFactory(); });
  using Volume = itk::Image<float, 3>;
  auto reader = itk::ImageFileReader<Volume>::New();
  reader->SetFileName(source);
  try {
    reader->Update();
  } catch (const itk::ExceptionObject& e) {
    throw Error("brainsim: cannot read '" + source + "': " + e.GetDescription());
  }
  Volume::Pointer vol = reader->GetOutput();
  const auto sz = vol->GetLargestPossibleRegion().GetSize();
  const int X = int(sz[0]), Y = int(sz[1]), Z = int(sz[2]);
  const float* v = vol->GetBufferPointer();
  auto at = [&](int x, int y, int z) { return v[(size_t(z) * Y + y) * X + x]; };

  // Central range: axial slices whose brain area is at least 60% of the largest.
  std::vector<int64_t> area(Z, 0);
  std::vector<float> tissue;
  for (int z = 0; z < Z; ++z)
    for (int y = 0; y < Y; ++y)
      for (int x = 0; x < X; ++x)
        if (at(x, y, z) > 0) {
          ++area[z];
          tissue.push_back(at(x, y, z));
        }
  if (tissue.empty()) throw Error("brainsim: '" + source + "' holds no brain voxels (all <= 0)");
  const int64_t peak = *std::max_element(area.begin(), area.end());
  int z0 = Z, z1 = -1, x0 = X, x1 = -1, y0 = Y, y1 = -1;
  for (int z = 0; z < Z; ++z)
    if (area[z] * 10 >= peak * 6) {
      z0 = std::min(z0, z);
      z1 = std::max(z1, z);
      for (int y = 0; y < Y; ++y)
        for (int x = 0; x < X; ++x)
          if (at(x, y, z) > 0) {
            x0 = std::min(x0, x), x1 = std::max(x1, x);
            y0 = std::min(y0, y), y1 = std::max(y1, y);
          }
    }
  // Intensity scale: the 99.5th percentile of brain tissue maps to 1.
  const size_t k = size_t(0.995 * double(tissue.size() - 1));
  std::nth_element(tissue.begin(), tissue.begin() + k, tissue.end());
  const float top = tissue[k];

  // A square field of view around the brain's bounding box, with a 6% margin.
  const int side = int(std::max(x1 - x0 + 1, y1 - y0 + 1) * 1.06) + 1;
  const int cx = (x0 + x1) / 2, cy = (y0 + y1) / 2;
  BrainSlices out;
  for (int z = z0; z <= z1; ++z) {
    cv::Mat img(side, side, CV_32F, cv::Scalar(0)), msk(side, side, CV_32F, cv::Scalar(0));
    for (int r = 0; r < side; ++r)
      for (int c = 0; c < side; ++c) {
        const int x = cx - side / 2 + c;
        const int y = cy + side / 2 - r;  // flip: anterior at the top, as usually displayed
        if (x < 0 || x >= X || y < 0 || y >= Y) continue;
        const float val = at(x, y, z);
        img.at<float>(r, c) = std::clamp(val / top, 0.0f, 1.0f);
        msk.at<float>(r, c) = val > 0 ? 1.0f : 0.0f;
      }
    cv::Mat si, sm;
    cv::resize(img, si, cv::Size(size, size), 0, 0, cv::INTER_AREA);
    cv::resize(msk, sm, cv::Size(size, size), 0, 0, cv::INTER_AREA);
    out.image.push_back(si);
    out.brain.push_back(sm);
  }
  return out;
}

struct Settings {
  int sites, train, test, size;
  double lesion_fraction, shift;
  bool segmentation;
  bool same_test_subjects;
  std::string source;
};

std::string site_name(int i) {
  return std::string("site-") + char('A' + i);
}

class BrainSim : public Dataset {
 public:
  BrainSim(const Args& a, const BuildContext&) {
    s_.sites = int(a.integer("sites"));
    s_.train = int(a.integer("train_per_site"));
    s_.test = int(a.integer("test_per_site"));
    s_.size = int(a.integer("size"));
    s_.lesion_fraction = a.real("lesion_fraction");
    s_.shift = a.real("shift");
    s_.segmentation = a.str("task") == "segmentation";
    s_.same_test_subjects = a.flag("same_test_subjects");
    s_.source = a.str("source");
  }

  Federation load(const DataRequest& request) override {
    const auto t0 = std::chrono::steady_clock::now();
    std::vector<int> wanted;
    if (request.sites.empty()) {
      for (int i = 0; i < s_.sites; ++i) wanted.push_back(i);
    } else {
      for (const auto& name : request.sites) {
        int found = -1;
        for (int i = 0; i < s_.sites; ++i)
          if (site_name(i) == name) found = i;
        if (found < 0)
          throw Error("brainsim: no site '" + name + "' (this federation has site-A .. " +
                      site_name(s_.sites - 1) + "; see the `sites` argument)");
        wanted.push_back(found);
      }
    }
    const BrainSlices brain = load_brain(s_.source, s_.size);

    Federation fed;
    fed.task = s_.segmentation ? Task::Segmentation : Task::Classification;
    fed.num_classes = 2;
    fed.channels = 1;
    for (int site : wanted) {
      SiteData sd;
      sd.name = site_name(site);
      const ScannerSignature sig = site_signature(request.seed, site, s_.shift);
      sd.train = generate(brain, request.seed, site, 0, s_.train, sig);
      sd.test = generate(brain, request.seed, site, 1, s_.test, sig);
      fed.notes["scanner." + sd.name] = sig.json();
      fed.sites.push_back(std::move(sd));
    }
    const double seconds =
        std::chrono::duration<double>(std::chrono::steady_clock::now() - t0).count();
    nlohmann::ordered_json note;
    note["source"] = s_.source;
    note["seed"] = request.seed;
    note["sites"] = s_.sites;
    note["size"] = s_.size;
    note["lesion_fraction"] = s_.lesion_fraction;
    note["shift"] = s_.shift;
    note["same_test_subjects"] = s_.same_test_subjects;
    note["source_slices"] = brain.image.size();
    note["generation_seconds"] = seconds;
    // Site names come from the pipeline and may hold any bytes: never throw on them.
    fed.notes["brainsim"] =
        note.dump(-1, ' ', false, nlohmann::ordered_json::error_handler_t::replace);
    return fed;
  }

 private:
  std::vector<Sample> generate(const BrainSlices& brain, uint64_t seed, int site, int split, int n,
                               const ScannerSignature& sig) const {
    const uint64_t base = mix_seed(mix_seed(seed, 0xb7a1), uint64_t(site * 2 + split));
    // same_test_subjects: test subject i (slice, deformation, lesion) is drawn from a seed
    // without the site, so every site scans the same subjects; noise stays per site.
    const bool shared = split == 1 && s_.same_test_subjects;
    const uint64_t subjects = shared ? mix_seed(mix_seed(seed, 0x5a3e), 1) : base;
    // Exactly round(fraction * n) lesion samples per site and split, at seeded positions.
    std::vector<char> lesion(n, 0);
    const int positives = int(std::lround(s_.lesion_fraction * n));
    std::fill(lesion.begin(), lesion.begin() + positives, 1);
    SeededRandom order(mix_seed(subjects, 0x1e5));
    order.shuffle(lesion);
    std::vector<Sample> out;
    out.reserve(n);
    for (int i = 0; i < n; ++i) {
      SeededRandom rng(mix_seed(subjects, uint64_t(i) + 1));
      Sample s = render(brain, rng, lesion[i] != 0);
      char id[64];
      std::snprintf(id, sizeof id, "brainsim:%s:%s:%04d", site_name(site).c_str(),
                    split ? "test" : "train", i);
      s.id = id;
      s.reference = s.image;
      const uint64_t noise = shared ? mix_seed(base, uint64_t(i) + 1) : rng.next();
      apply_signature(s.image, sig, noise);
      if (!s_.segmentation) s.mask.reset();
      out.push_back(std::move(s));
    }
    return out;
  }

  // One subject: slice, deformation, lesion. Returns the neutral rendering (no scanner shift).
  Sample render(const BrainSlices& brain, SeededRandom& rng, bool with_lesion) const {
    const int S = s_.size;
    // Slice position, interpolated between neighbours for continuous anatomy.
    const double zf = rng.uniform(0, double(brain.image.size() - 1));
    const int za = int(zf), zb = std::min(za + 1, int(brain.image.size()) - 1);
    const float f = float(zf - za);
    cv::Mat img = brain.image[za] * (1 - f) + brain.image[zb] * f;
    cv::Mat msk = brain.brain[za] * (1 - f) + brain.brain[zb] * f;

    // Subject shape: affine (rotation, scale, shift) plus a smooth displacement field from a
    // 5 x 5 grid of Gaussian offsets, cubic-upsampled.
    const double angle = rng.uniform(-12, 12) * kPi / 180, scale = rng.uniform(0.9, 1.1);
    const double tx = rng.uniform(-0.04, 0.04) * S, ty = rng.uniform(-0.04, 0.04) * S;
    cv::Mat gx(5, 5, CV_32F), gy(5, 5, CV_32F);
    for (int r = 0; r < 5; ++r)
      for (int c = 0; c < 5; ++c) {
        gx.at<float>(r, c) = float(rng.normal() * 0.035 * S);
        gy.at<float>(r, c) = float(rng.normal() * 0.035 * S);
      }
    cv::Mat dx, dy;
    cv::resize(gx, dx, cv::Size(S, S), 0, 0, cv::INTER_CUBIC);
    cv::resize(gy, dy, cv::Size(S, S), 0, 0, cv::INTER_CUBIC);
    cv::Mat mapx(S, S, CV_32F), mapy(S, S, CV_32F);
    const double c0 = (S - 1) / 2.0, ca = std::cos(angle) / scale, sa = std::sin(angle) / scale;
    for (int r = 0; r < S; ++r)
      for (int c = 0; c < S; ++c) {
        const double u = c - c0 - tx, v = r - c0 - ty;  // output -> source (inverse mapping)
        mapx.at<float>(r, c) = float(c0 + ca * u + sa * v + dx.at<float>(r, c));
        mapy.at<float>(r, c) = float(c0 - sa * u + ca * v + dy.at<float>(r, c));
      }
    cv::Mat warped, wmask;
    cv::remap(img, warped, mapx, mapy, cv::INTER_LINEAR, cv::BORDER_CONSTANT, cv::Scalar(0));
    cv::remap(msk, wmask, mapx, mapy, cv::INTER_LINEAR, cv::BORDER_CONSTANT, cv::Scalar(0));

    Sample s;
    s.image = Image(2, 1, {S, S, 1});
    s.mask = Image(2, 1, {S, S, 1});
    s.mask->pixel_type = PixelType::U8;
    s.label = with_lesion ? 1 : 0;
    if (with_lesion) add_lesion(warped, wmask, rng, *s.mask);
    std::copy(warped.ptr<float>(), warped.ptr<float>() + S * S, s.image.data.begin());
    for (auto& x : s.image.data) x = std::clamp(x, 0.0f, 1.0f);
    return s;
  }

  // A soft-edged ellipse, radii 4-10 px at 64 x 64 (scaled with size), centred inside tissue.
  void add_lesion(cv::Mat& img, const cv::Mat& brain, SeededRandom& rng, Image& mask) const {
    const int S = s_.size;
    const double k = S / 64.0;
    const double rx = rng.uniform(4, 10) * k, ry = rng.uniform(4, 10) * k;
    const double theta = rng.uniform(0, kPi);
    // Centre: a tissue pixel at least min(rx, ry) / 2 inside the brain.
    cv::Mat inside = brain > 0.95f, eroded;
    const int er = std::max(1, int(std::min(rx, ry) / 2));
    cv::erode(inside, eroded,
              cv::getStructuringElement(cv::MORPH_ELLIPSE, cv::Size(2 * er + 1, 2 * er + 1)));
    std::vector<cv::Point> candidates;
    cv::findNonZero(eroded, candidates);
    if (candidates.empty()) cv::findNonZero(inside, candidates);
    if (candidates.empty()) throw Error("brainsim: a deformed slice holds no brain tissue");
    const cv::Point p = candidates[rng.below(int64_t(candidates.size()))];
    const bool hyper = rng.uniform() < 0.5;
    const double amount = hyper ? rng.uniform(0.25, 0.45) : rng.uniform(0.5, 0.75);
    const double ct = std::cos(theta), st = std::sin(theta);
    int64_t marked = 0;
    for (int r = 0; r < S; ++r)
      for (int c = 0; c < S; ++c) {
        const double u = (c - p.x) * ct + (r - p.y) * st, v = -(c - p.x) * st + (r - p.y) * ct;
        const double d = std::sqrt((u / rx) * (u / rx) + (v / ry) * (v / ry));
        // Weight 1 inside d < 0.8, smooth fall-off to 0 at d = 1.2; only within tissue.
        double w = std::clamp((1.2 - d) / 0.4, 0.0, 1.0);
        w = w * w * (3 - 2 * w) * brain.at<float>(r, c);
        if (w <= 0) continue;
        float& x = img.at<float>(r, c);
        x = hyper ? float(x + w * amount) : float(x * (1 - w * amount));
        if (w >= 0.5) {
          mask.at(c, r) = 1;
          ++marked;
        }
      }
    if (!marked) mask.at(p.x, p.y) = 1;  // unreachable in practice: the centre has w = 1
  }

  Settings s_;
};

}  // namespace
}  // namespace concord

CONCORD_PLUGIN("concord-dataset-brainsim", "0.1.0") {
  using namespace concord;
  registry.add(
      {Kind::Dataset,
       "brainsim",
       "Simulated multi-site brain MRI (Colin27 T1) with lesions and per-site scanner shift",
       {ArgSpec::integer("sites", 4, "Number of sites (named site-A, site-B, ...)").range(1, 26),
        ArgSpec::integer("train_per_site", 160, "Training samples per site").range(1, 100000),
        ArgSpec::integer("test_per_site", 48, "Test samples per site").range(0, 100000),
        ArgSpec::integer("size", 64, "Image side in pixels").range(16, 1024),
        ArgSpec::real("lesion_fraction", 0.5, "Share of samples with a lesion").range(0, 1),
        ArgSpec::choice("task", {"classification", "segmentation"}, "classification",
                        "Label lesion/no-lesion, or a background/lesion mask"),
        ArgSpec::real("shift", 1.0, "Scanner-shift strength (0 = identical scanners)").range(0, 3),
        ArgSpec::boolean("same_test_subjects", false,
                         "Every site's test split holds the same subjects (test sample i is one "
                         "subject under each site's scanner; sample.reference is its neutral "
                         "rendering), for harmonization ground truth"),
        ArgSpec::string("source", kDefaultSource,
                        "T1 brain volume (brain-extracted: tissue > 0, background 0)")},
       factory_of<BrainSim>()});
}
