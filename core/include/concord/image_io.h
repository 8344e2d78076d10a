// Reading and writing medical and natural images (ITK for NIfTI/NRRD/MHA/DICOM, OpenCV for
// PNG/JPEG). All writes are atomic (temporary file + rename).
#pragma once

#include <concord/image.h>

#include <string>
#include <vector>

namespace concord {

// By extension: .png .jpg .jpeg .bmp .tif .tiff (OpenCV: 8/16-bit, grey or colour -> channels),
// .nii .nii.gz .nrrd .nhdr .mha .mhd (ITK), or a folder holding one DICOM series.
// Throws Error naming the file and the reason.
Image read_image(const std::string& path);

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
};
void write_image(const Image& image, const std::string& path, const WriteOptions& options);

// True for file names read_image understands (not folders).
bool is_image_file(const std::string& path);
// True for a folder holding DICOM files.
bool is_dicom_dir(const std::string& path);

}  // namespace concord
