// A PNG grid of 2D images (reconstructions next to their inputs, rows of samples per label) so a
// user can see what a generative model learned. Torch-free.
#pragma once

#include <concord/image.h>

#include <string>
#include <vector>

namespace concord::replay {

// Writes `rows` (each a list of 2D images of one common size and channel count, 1 or 3) as an
// 8-bit PNG: values map linearly from [lo, hi] to [0, 255] (clamped), 2-pixel gaps at `gap`
// grey. Rows may differ in length (shorter rows are left blank on the right). Written
// atomically (write_image: temporary + rename). Throws Error naming `path` on bad input.
void write_montage(const std::string& path, const std::vector<std::vector<Image>>& rows, float lo,
                   float hi, float gap = 0.5f);

}  // namespace concord::replay
