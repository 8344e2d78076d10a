// Reading and writing medical and natural images (ITK for NIfTI/NRRD/MHA/DICOM, OpenCV for
// PNG/JPEG). All writes are atomic (temporary file + rename).
#pragma once

#include <concord/image.h>

#include <functional>
#include <memory>
#include <string>
#include <vector>

namespace concord {

class OutputPublisher;

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
  // Finish the output (flush to disk, rename into place) on this publisher's thread instead of
  // before write_image returns; write errors still throw, publishing errors go to its callback.
  OutputPublisher* publisher = nullptr;
};
void write_image(const Image& image, const std::string& path, const WriteOptions& options);

// True for file names read_image understands (not folders).
bool is_image_file(const std::string& path);
// True for a folder holding DICOM files.
bool is_dicom_dir(const std::string& path);

// Finishes written outputs on a background thread, in submission order: each output's files are
// flushed to disk (fsync) and then renamed from their hidden scratch folder to the final name.
// A worker that writes many files thus computes while the disk flushes, with the same guarantee
// as the synchronous path: an output appears under its final name only once its bytes are
// durable, and a killed process leaves only scratch folders (never a partial output).
// At most `max_pending` outputs wait; write_image blocks beyond that (bounds scratch files and
// dirty memory when the disk is slower than the workers).
class OutputPublisher {
 public:
  // done(path, error) runs on the publisher thread after each output; error is empty on success.
  using Done = std::function<void(const std::string& path, const std::string& error)>;
  explicit OutputPublisher(Done done = {}, size_t max_pending = 8);
  ~OutputPublisher();  // finish()
  OutputPublisher(const OutputPublisher&) = delete;
  OutputPublisher& operator=(const OutputPublisher&) = delete;

  // Waits until every submitted output is published or has failed. Further submits are refused.
  void finish();
  // Queues `publish` (the step that makes `path` appear); used by write_image.
  void submit(const std::string& path, std::function<void()> publish);

 private:
  struct State;
  std::unique_ptr<State> state_;
};

}  // namespace concord
