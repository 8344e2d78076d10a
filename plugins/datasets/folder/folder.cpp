// folder: sites laid out on disk as ROOT/SITE/SPLIT/{image,mask}/NAME (segmentation) or
// ROOT/SITE/SPLIT/CLASS/NAME (classification). See README.md for arguments and mask values.
#include <concord/dataset.h>
#include <concord/error.h>
#include <concord/image_io.h>

#include <spdlog/spdlog.h>

#include <algorithm>
#include <filesystem>
#include <set>

#include "../common/dataset_common.h"

namespace fs = std::filesystem;

namespace concord {
namespace {

// Image files (and DICOM series folders) directly in `dir`, sorted by name; entries that cannot
// be examined go to `skipped`.
std::vector<fs::path> images_in(const fs::path& dir, std::vector<std::string>& skipped) {
  std::vector<fs::path> out;
  for (const auto& e : datasets::list_folder(dir, skipped)) {
    const std::string p = e.path.string();
    if ((e.is_file && is_image_file(p)) || (e.is_directory && is_dicom_dir(p)))
      out.push_back(e.path);
  }
  return out;
}

// Never throws (a symlink loop or an unreadable path is "not a folder").
bool is_dir(const fs::path& p) {
  std::error_code ec;
  return fs::is_directory(p, ec);
}

std::vector<std::string> subfolders(const fs::path& dir, std::vector<std::string>& skipped) {
  std::vector<std::string> out;
  for (const auto& e : datasets::list_folder(dir, skipped))
    if (e.is_directory && e.path.filename().string()[0] != '.')
      out.push_back(e.path.filename().string());
  return out;
}

class FolderDataset : public Dataset {
 public:
  FolderDataset(const Args& a, const BuildContext&)
      : root_(a.str("root")),
        sites_(a.strings("sites")),
        splits_(a.strings("splits")),
        classes_(a.strings("classes")),
        image_dir_(a.str("image_dir")),
        mask_dir_(a.str("mask_dir")),
        classification_(a.str("task") == "classification"),
        skip_missing_(a.str("missing_mask") == "skip"),
        opt_(datasets::image_options(a)) {
    if (!is_dir(root_)) throw Error("folder: root '" + root_ + "' is not a folder");
    if (splits_.size() != 2)
      throw Error("folder: splits must name the train and the test folder, e.g. [train, test]");
  }

  Federation load(const DataRequest& request) override {
    skipped_.clear();
    std::vector<std::string> sites = request.sites.empty() ? sites_ : request.sites;
    if (sites.empty()) sites = subfolders(root_, skipped_);
    if (sites.empty()) throw Error("folder: root '" + root_ + "' holds no site folders");
    Federation fed;
    fed.task = classification_ ? Task::Classification : Task::Segmentation;
    std::vector<std::string> classes = classes_;
    if (classification_ && classes.empty()) classes = discover_classes(sites);
    int skipped = 0;
    for (const auto& name : sites) {
      const fs::path site_dir = fs::path(root_) / name;
      if (!is_dir(site_dir))
        throw Error("folder: site '" + name + "': no folder " + site_dir.string());
      SiteData site;
      site.name = name;
      for (int k = 0; k < 2; ++k) {
        const fs::path dir = site_dir / splits_[k];
        if (!is_dir(dir))
          throw Error("folder: site '" + name + "': no " + (k ? "test" : "train") + " folder " +
                      dir.string());
        auto& out = k ? site.test : site.train;
        if (classification_)
          load_classes(dir, classes, out);
        else
          skipped += load_segmentation(dir, out);
      }
      if (site.train.empty())
        throw Error("folder: site '" + name + "': no training images under " +
                    (site_dir / splits_[0]).string());
      fed.sites.push_back(std::move(site));
    }
    if (skipped) fed.notes["folder.skipped_without_mask"] = std::to_string(skipped);
    datasets::report_skipped(fed, skipped_, "folder.skipped_entries");
    fed.channels = fed.sites[0].train[0].image.channels;
    if (classification_) {
      fed.num_classes = int(classes.size());
    } else if (!opt_.mask_values.empty()) {
      fed.num_classes = int(opt_.mask_values.size());
    } else {
      float top = 1;
      for (const auto& s : fed.sites)
        for (const auto* split : {&s.train, &s.test})
          for (const auto& x : *split)
            for (float v : x.mask->data) top = std::max(top, v);
      fed.num_classes = int(top) + 1;
    }
    datasets::unify_channels(fed, opt_, "folder");
    datasets::check_uniform(fed, "folder");
    return fed;
  }

 private:
  std::vector<std::string> discover_classes(const std::vector<std::string>& sites) const {
    std::set<std::string> all;
    for (const auto& site : sites)
      for (const auto& split : splits_) {
        const fs::path dir = fs::path(root_) / site / split;
        if (is_dir(dir))
          for (const auto& c : subfolders(dir, skipped_)) all.insert(c);
      }
    if (all.empty())
      throw Error("folder: task classification but no class folders under " + root_ + "/SITE/" +
                  splits_[0]);
    return {all.begin(), all.end()};
  }

  void load_classes(const fs::path& dir, const std::vector<std::string>& classes,
                    std::vector<Sample>& out) const {
    for (const auto& c : subfolders(dir, skipped_))
      if (std::find(classes.begin(), classes.end(), c) == classes.end())
        throw Error("folder: " + (dir / c).string() + ": class '" + c +
                    "' is not in the `classes` argument");
    for (size_t label = 0; label < classes.size(); ++label) {
      const fs::path cdir = dir / classes[label];
      if (!is_dir(cdir)) continue;  // a site may lack a class
      for (const auto& file : images_in(cdir, skipped_))
        datasets::load_samples(file.string(), nullptr, int64_t(label), opt_, out);
    }
  }

  // Returns the number of images skipped for want of a mask.
  int load_segmentation(const fs::path& dir, std::vector<Sample>& out) const {
    const fs::path idir = dir / image_dir_, mdir = dir / mask_dir_;
    if (!is_dir(idir)) throw Error("folder: no image folder " + idir.string());
    int skipped = 0;
    for (const auto& file : images_in(idir, skipped_)) {
      const fs::path mask = mdir / file.filename();
      std::error_code ec;
      if (!fs::exists(mask, ec)) {
        if (!skip_missing_)
          throw Error("folder: " + file.string() + " has no mask " + mask.string() +
                      " (set missing_mask: skip to leave such images out)");
        spdlog::warn("folder: skipping {}: no mask {}", file.string(), mask.string());
        ++skipped;
        continue;
      }
      const std::string m = mask.string();
      datasets::load_samples(file.string(), &m, -1, opt_, out);
    }
    return skipped;
  }

  std::string root_;
  std::vector<std::string> sites_, splits_, classes_;
  std::string image_dir_, mask_dir_;
  bool classification_, skip_missing_;
  datasets::ImageOptions opt_;
  mutable std::vector<std::string> skipped_;  // entries the walk could not examine
};

}  // namespace
}  // namespace concord

CONCORD_PLUGIN("concord-dataset-folder", "0.1.0") {
  using namespace concord;
  std::vector<ArgSpec> args = {
      ArgSpec::path("root", "Folder holding one sub-folder per site"),
      ArgSpec::list("sites", ArgType::String, {}, "Site folders to load; empty = all sub-folders"),
      ArgSpec::list("splits", ArgType::String, {"train", "test"},
                    "Names of the train and the test folder inside each site"),
      ArgSpec::choice("task", {"segmentation", "classification"}, "segmentation",
                      "SITE/SPLIT/{image,mask}/ or SITE/SPLIT/<class>/"),
      ArgSpec::string("image_dir", "image", "Image folder inside SITE/SPLIT (e.g. ROIs/image)"),
      ArgSpec::string("mask_dir", "mask", "Mask folder inside SITE/SPLIT; masks share names"),
      ArgSpec::list("classes", ArgType::String, {},
                    "Classification: class folder names in label order; empty = sorted union"),
      ArgSpec::choice("missing_mask", {"error", "skip"}, "error",
                      "An image without a mask of the same name: error, or skip with a warning"),
  };
  for (auto& spec : datasets::image_option_specs()) args.push_back(std::move(spec));
  registry.add({Kind::Dataset, "folder", "Sites from a folder tree (SITE/SPLIT/{image,mask})",
                std::move(args), factory_of<FolderDataset>()});
}
