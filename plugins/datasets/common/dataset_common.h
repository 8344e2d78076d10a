// Helpers shared by the file-based dataset plugins (folder, csv, npz): resizing, channel
// conversion, intensity normalisation, mask value mapping, 3D slicing, uniformity checks.
// Compiled into each plugin library that uses it (no CMakeLists here, so it is no plugin).
#pragma once

#include <concord/args.h>
#include <concord/image.h>
#include <concord/image_io.h>

#include <filesystem>

#include <string>
#include <vector>

namespace concord::datasets {

// How images become training-ready: the arguments folder and csv share (see their READMEs).
struct ImageOptions {
  int size = 0;      // resize to size x size; 0 keeps the size
  int channels = 0;  // 1 or 3 converts; 0: grey stored as colour is grey, colour stays colour
                     // (a set mixing both gets its grey images replicated to 3 channels)
  std::string normalize = "minmax";                 // minmax | percentile | type | none
  double low_percentile = 1, high_percentile = 99;  // for normalize = percentile
  std::vector<double> mask_values;          // raw value of class k at index k; empty = see map_mask
  std::string slices = "center";            // 3D volumes: center | all axial slices
  NonFinite non_finite = NonFinite::Error;  // NaN/Inf voxels: refuse the file, or replace by 0
};

// Reads the options above from a plugin's Args (names: size, channels, normalize,
// percentiles, mask_values, slices, non_finite); arguments the plugin did not declare keep their
// default.
ImageOptions image_options(const Args& args);
// The ArgSpecs for those options, so folder and csv declare them identically.
std::vector<ArgSpec> image_option_specs();

// Bilinear (area averaging when shrinking) for images, nearest for masks. 2D only.
Image resize(const Image& img, int size, bool nearest);
// 1 <-> 3 channels: grey is replicated; RGB(A) -> luminance 0.299 R + 0.587 G + 0.114 B
// (concord::apply_channel_policy, the implementation read_image uses).
Image convert_channels(const Image& img, int channels, const std::string& what);
// Per-image intensity mapping to [0,1]. `what` names the file in errors.
void normalize(Image& img, const ImageOptions& opt, const std::string& what);
// Raw mask -> class indices (1 channel). With `values` empty: a mask holding only {0, 255} maps
// 255 -> 1, otherwise the raw values must already be integer class indices 0..K-1. With `values`,
// raw value values[k] -> class k and any other value is an error naming the file.
Image map_mask(const Image& raw, const std::vector<double>& values, const std::string& what);
// Axial 2D slices of a 3D image (`center` = the middle slice); 2D images pass through.
// Returns (slice index or -1, image) pairs.
std::vector<std::pair<int, Image>> axial_slices(const Image& img, const std::string& mode);

// Everything above on one image (+ optional mask) from disk: read, slice, normalise, convert,
// resize, map. Appends one Sample per slice to `out`; `id` is the file path.
void load_samples(const std::string& image_path, const std::string* mask_path, int64_t label,
                  const ImageOptions& opt, std::vector<Sample>& out);

// With `channels: 0`, a federation mixing grey and colour images: the grey ones are replicated
// to 3 channels (lossless) and fed.channels becomes 3, so one grey file does not sink a colour
// set. Logs the count.
void unify_channels(Federation& fed, const ImageOptions& opt, const std::string& plugin);

// The entries of `dir`, sorted by name. An entry that cannot be examined (a symlink loop, no
// permission) is left out and described in `skipped` ("path: reason"), never aborting the rest;
// so is `dir` itself when it cannot be listed.
struct FolderEntry {
  std::filesystem::path path;
  bool is_directory = false, is_file = false;
};
std::vector<FolderEntry> list_folder(const std::filesystem::path& dir,
                                     std::vector<std::string>& skipped);
// Logs each skipped entry and records them in fed.notes[key] (one per line).
void report_skipped(Federation& fed, const std::vector<std::string>& skipped,
                    const std::string& key);

// Every sample of the federation must have the same size and channel count (training stacks
// them into NCHW tensors); throws naming the first sample that differs and the fix.
void check_uniform(const Federation& fed, const std::string& plugin);

// Lower-case file extension, with .nii.gz kept whole.
std::string extension_of(const std::string& path);

}  // namespace concord::datasets
