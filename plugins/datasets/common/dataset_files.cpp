// load_samples and folder listing: the part of the shared helpers that reads files (needs
// image_io in libconcord).
#include <concord/error.h>
#include <concord/image_io.h>

#include <spdlog/spdlog.h>

#include <algorithm>

#include "dataset_common.h"

namespace concord::datasets {
namespace fs = std::filesystem;

std::vector<FolderEntry> list_folder(const fs::path& dir, std::vector<std::string>& skipped) {
  std::vector<FolderEntry> out;
  std::error_code ec;
  fs::directory_iterator it(dir, ec);
  if (ec) {
    skipped.push_back(dir.string() + ": cannot list folder: " + ec.message());
    return out;
  }
  for (; it != fs::directory_iterator(); it.increment(ec)) {
    if (ec) {
      skipped.push_back(dir.string() + ": listing stopped: " + ec.message());
      break;
    }
    std::error_code sec;
    const fs::file_status st = it->status(sec);  // follows symlinks: a loop fails here
    if (sec) {
      skipped.push_back(it->path().string() + ": " + sec.message());
      continue;
    }
    out.push_back({it->path(), fs::is_directory(st), fs::is_regular_file(st)});
  }
  std::sort(out.begin(), out.end(),
            [](const FolderEntry& a, const FolderEntry& b) { return a.path < b.path; });
  return out;
}

void report_skipped(Federation& fed, const std::vector<std::string>& skipped,
                    const std::string& key) {
  if (skipped.empty()) return;
  std::string text;
  for (const auto& s : skipped) {
    spdlog::warn("skipped {}", s);
    text += (text.empty() ? "" : "\n") + s;
  }
  fed.notes[key] = text;
}

void load_samples(const std::string& image_path, const std::string* mask_path, int64_t label,
                  const ImageOptions& opt, std::vector<Sample>& out) {
  ReadOptions ro;
  ro.non_finite = opt.non_finite;
  ro.channels = opt.channels == 1 ? ChannelPolicy::Grey : ChannelPolicy::Auto;
  Image image = read_image(image_path, ro);
  std::optional<Image> mask;
  if (mask_path) {
    ReadOptions mo;  // masks: NaN is never a class; map_mask checks channels itself
    mo.channels = ChannelPolicy::Keep;
    mask = read_image(*mask_path, mo);
    if (mask->size != image.size)
      throw Error(*mask_path + ": mask is " + std::to_string(mask->size[0]) + "x" +
                  std::to_string(mask->size[1]) + "x" + std::to_string(mask->size[2]) +
                  " but its image " + image_path + " is " + std::to_string(image.size[0]) + "x" +
                  std::to_string(image.size[1]) + "x" + std::to_string(image.size[2]));
  }
  auto images = axial_slices(image, opt.slices);
  std::vector<std::pair<int, Image>> masks;
  if (mask) masks = axial_slices(*mask, opt.slices);
  for (size_t k = 0; k < images.size(); ++k) {
    Sample s;
    s.id = image_path + (images[k].first >= 0 ? "#z=" + std::to_string(images[k].first) : "");
    s.label = label;
    Image img = std::move(images[k].second);
    img = convert_channels(img, opt.channels, image_path);
    normalize(img, opt, image_path);
    s.image = resize(img, opt.size, false);
    if (mask)
      s.mask = resize(map_mask(masks[k].second, opt.mask_values, *mask_path), opt.size, true);
    out.push_back(std::move(s));
  }
}

}  // namespace concord::datasets
