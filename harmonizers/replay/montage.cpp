#include "montage.h"

#include <concord/error.h>
#include <concord/image_io.h>

#include <algorithm>

namespace concord::replay {

void write_montage(const std::string& path, const std::vector<std::vector<Image>>& rows, float lo,
                   float hi, float gap) {
  auto fail = [&](const std::string& why) { throw Error("montage '" + path + "': " + why); };
  if (!(hi > lo)) fail("needs hi > lo");
  const Image* first = nullptr;
  size_t cols = 0;
  for (const auto& row : rows) {
    cols = std::max(cols, row.size());
    for (const Image& im : row) {
      if (!first) first = &im;
      if (im.dim != 2 || im.size[2] != 1) fail("images must be 2D");
      if (im.channels != first->channels || im.size[0] != first->size[0] ||
          im.size[1] != first->size[1])
        fail("images differ in size or channels");
    }
  }
  if (!first) fail("no images");
  if (first->channels != 1 && first->channels != 3) fail("images must have 1 or 3 channels");
  const int64_t w = first->size[0], h = first->size[1], g = 2;
  const int64_t W = checked_add(checked_mul(int64_t(cols), w + g, "montage width"), g, "montage");
  const int64_t H =
      checked_add(checked_mul(int64_t(rows.size()), h + g, "montage height"), g, "montage");
  Image out(2, first->channels, {W, H, 1});
  const float scale = 255.0f / (hi - lo);
  std::fill(out.data.begin(), out.data.end(), std::clamp((gap - lo) * scale, 0.0f, 255.0f));
  for (size_t r = 0; r < rows.size(); ++r)
    for (size_t c = 0; c < rows[r].size(); ++c) {
      const Image& im = rows[r][c];
      const int64_t x0 = g + int64_t(c) * (w + g), y0 = g + int64_t(r) * (h + g);
      for (int ch = 0; ch < im.channels; ++ch)
        for (int64_t y = 0; y < h; ++y)
          for (int64_t x = 0; x < w; ++x)
            out.at(x0 + x, y0 + y, 0, ch) =
                std::clamp((im.at(x, y, 0, ch) - lo) * scale, 0.0f, 255.0f);
    }
  out.pixel_type = PixelType::U8;
  write_image(out, path, /*keep_pixel_type=*/true);
}

}  // namespace concord::replay
