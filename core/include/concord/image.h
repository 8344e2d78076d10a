// Images and samples as plugins see them: plain float buffers with geometry, no LibTorch.
#pragma once

#include <concord/checked.h>

#include <array>
#include <cstdint>
#include <map>
#include <optional>
#include <string>
#include <vector>

namespace concord {

struct Geometry {
  std::array<double, 3> spacing{1, 1, 1};
  std::array<double, 3> origin{0, 0, 0};
  std::array<double, 9> direction{1, 0, 0, 0, 1, 0, 0, 0, 1};  // row-major 3x3
};

// Pixel type found on disk, kept so that writers can restore it ("keep" policy).
enum class PixelType { U8, I8, U16, I16, U32, I32, F32, F64 };

// Planar layout: data[c][z][y][x], x fastest. 2D images have dim == 2 and size[2] == 1.
struct Image {
  int dim = 2;
  int channels = 1;
  std::array<int64_t, 3> size{0, 0, 1};  // x, y, z
  std::vector<float> data;
  Geometry geometry;
  PixelType pixel_type = PixelType::F32;    // as read from disk
  std::map<std::string, std::string> meta;  // format metadata (e.g. DICOM tags), passed through

  Image() = default;
  // Throws Error on a negative size or a voxel count that overflows (sizes may come from files).
  Image(int dim, int channels, std::array<int64_t, 3> size)
      : dim(dim),
        channels(channels),
        size(size),
        data(size_t(checked_numel({channels, size[0], size[1], size[2]}, "image"))) {}
  int64_t voxels() const { return size[0] * size[1] * size[2]; }  // per channel
  float* channel(int c) { return data.data() + c * voxels(); }
  const float* channel(int c) const { return data.data() + c * voxels(); }
  float& at(int64_t x, int64_t y, int64_t z = 0, int c = 0) {
    return data[((c * size[2] + z) * size[1] + y) * size[0] + x];
  }
  float at(int64_t x, int64_t y, int64_t z = 0, int c = 0) const {
    return data[((c * size[2] + z) * size[1] + y) * size[0] + x];
  }
};

enum class Task { Classification, Segmentation };
const char* task_name(Task t);

struct Sample {
  std::string id;  // stable identifier (file path or generated name)
  Image image;
  int64_t label = -1;              // classification target, -1 when none
  std::optional<Image> mask;       // segmentation target: class index per pixel, 1 channel
  std::optional<Image> reference;  // same content under a neutral acquisition, when known
};

struct SiteData {
  std::string name;
  std::vector<Sample> train, test;
};

// A dataset as the engine receives it: the sites and what the samples mean.
struct Federation {
  Task task = Task::Classification;
  int num_classes = 2;
  int channels = 1;
  std::vector<SiteData> sites;
  std::map<std::string, std::string> notes;  // e.g. per-site scanner parameters (JSON text)
};

}  // namespace concord
