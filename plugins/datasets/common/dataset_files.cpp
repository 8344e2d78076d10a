// load_samples: the part of the shared helpers that reads files (needs image_io in libconcord).
#include <concord/error.h>
#include <concord/image_io.h>

#include "dataset_common.h"

namespace concord::datasets {

void load_samples(const std::string& image_path, const std::string* mask_path, int64_t label,
                  const ImageOptions& opt, std::vector<Sample>& out) {
  Image image = read_image(image_path);
  std::optional<Image> mask;
  if (mask_path) {
    mask = read_image(*mask_path);
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
