// Reading and writing medical and natural images (ITK for NIfTI/NRRD/MHA/DICOM, OpenCV for
// PNG/JPEG). Reading treats files as untrusted; all writes are atomic and durable
// (durable_output.h: scratch folder, fsync, rename).
#pragma once

#include <concord/image.h>

#include <functional>
#include <memory>
#include <string>
#include <vector>

namespace concord {

class OutputPublisher;  // durable_output.h

// What read_image does with NaN / +-Inf voxels (only float inputs can hold them).
enum class NonFinite {
  Error,  // refuse the image: Error "<path>: N of M voxels are not finite (NaN or Inf)"
  Zero,   // replace each by 0, log a warning with the count and set
          // meta["concord.non_finite_replaced"] = count
  Keep,   // leave them, for callers that handle them (never for fitting statistics)
};

// What read_image does with colour (3- or 4-channel) images.
enum class ChannelPolicy {
  Auto,  // an opaque 8/16-bit alpha channel is dropped, 3 identical channels become 1 (grey
         // stored as RGB is grey); true colour stays colour
  Grey,  // colour -> 1 channel of luminance 0.299 R + 0.587 G + 0.114 B (alpha dropped)
  Keep,  // channels exactly as stored
};

// Ceiling on one decoded image, in bytes of its voxels as float32 (channels x voxels x 4):
// CONCORD_MAX_IMAGE_MB (MiB), default 2048 (a 512x512x1000 float volume is 1000 MiB). Every
// reader checks the size a header declares against it, and uncompressed data against the file,
// before allocating. Throws Error naming the variable when it is not a positive number.
size_t default_max_image_bytes();

struct ReadOptions {
  size_t max_bytes = 0;  // ceiling as above; 0 = default_max_image_bytes()
  NonFinite non_finite = NonFinite::Error;
  ChannelPolicy channels = ChannelPolicy::Auto;
};

// By content and extension: .png .jpg .jpeg .bmp .tif .tiff (OpenCV: 8/16-bit, grey or colour
// -> channels), .nii .nii.gz .nrrd .nhdr .mha .mhd (ITK), .dcm, or a folder holding one DICOM
// series. Declared sizes are checked before allocating (see default_max_image_bytes); truncated
// files (also DICOM pixel data shorter than its geometry), empty or non-finite geometry and more
// than 3 non-singleton dimensions are refused. Throws Error naming the file and the reason.
Image read_image(const std::string& path, const ReadOptions& options);
Image read_image(const std::string& path);  // default ReadOptions

// Applies `policy` to `image` in place (the one implementation read_image and the dataset
// plugins share); `what` names the file in errors.
void apply_channel_policy(Image& image, ChannelPolicy policy, const std::string& what);

// Writes in the format given by `path`'s extension (a folder for DICOM output). With
// keep_pixel_type the image is cast back (rounded, clamped) to image.pixel_type; otherwise
// float32 where the format allows it. Geometry is preserved where the format has it.
void write_image(const Image& image, const std::string& path, bool keep_pixel_type = true);

struct WriteOptions {
  // Cast back to image.pixel_type (rounded, clamped); false: float32 where the format allows it
  // (PNG keeps 8/16-bit, JPEG/BMP 8-bit; DICOM stores 16-bit integers with a rescale slope).
  bool keep_pixel_type = true;
  // DICOM: new SeriesInstanceUID (and ImageType DERIVED) because the pixel data changed.
  // SOPInstanceUIDs are always new; StudyInstanceUID and FrameOfReferenceUID are kept.
  bool new_uids = true;
  // Finish the output (flush to disk, rename into place) on this publisher's thread instead of
  // before write_image returns; write errors still throw, publishing errors go to its callback.
  OutputPublisher* publisher = nullptr;
};
void write_image(const Image& image, const std::string& path, const WriteOptions& options);

// True for file names read_image understands (not folders).
bool is_image_file(const std::string& path);
// A folder's direct entries, classified (not recursive). An entry that cannot be examined
// (symlink loop, no permission, vanished) is listed in `skipped` and never stops the scan.
struct DicomDirInfo {
  std::vector<std::string> dicom_files;  // DICOM Part 10 files (.dcm or "DICM" magic), sorted;
                                         // DICOMDIR index files are not among them
  std::vector<std::string> image_files;  // other files is_image_file() accepts, sorted: they are
                                         // NOT part of the series read_image(folder) reads
  std::vector<std::string> skipped;      // "path: reason"
  bool has_dicom() const { return !dicom_files.empty(); }
};
// Throws Error only when `path` itself cannot be listed.
DicomDirInfo scan_dicom_dir(const std::string& path);
// True for a folder holding DICOM files (scan_dicom_dir(path).has_dicom()); never throws.
// True for a DICOM Part 10 file: named .dcm, or "DICM" after the 128-byte preamble whatever its
// name. Never throws (an unreadable file is not DICOM).
bool is_dicom_file(const std::string& path);
bool is_dicom_dir(const std::string& path);

}  // namespace concord
