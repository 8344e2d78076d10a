// Durable output: the one place where Concord makes a file or folder appear under its final name.
//
// Every output (checkpoints, statistics, reports, manifests, harmonized images, copied masks)
// is written under a temporary name in the folder of its target, flushed to disk (fsync), renamed
// into place, and then the folder itself is flushed, so that the rename survives a power loss.
// A reader therefore sees the old output or the complete new one, never a part; a killed writer
// leaves only temporaries, whose names is_temporary_name() recognises.
#pragma once

#include <cstddef>
#include <filesystem>
#include <functional>
#include <memory>
#include <string>

namespace concord {

// Writes `file` atomically and durably (temporary in the same folder, fsync, rename, fsync of
// the folder); creates missing parent folders. On failure the temporary is removed, an existing
// `file` is left untouched, and Error names the file and the reason.
void write_file_atomic(const std::string& file, const void* data, size_t size);
void write_file_atomic(const std::string& file, const std::string& text);

// Copies a file, or a folder with everything below it (a DICOM series), to `to` with the same
// guarantee: the copy appears complete or not at all, and replaces an existing `to` as a whole.
void copy_atomic(const std::string& from, const std::string& to);

// Flushes a file, or a folder's own entry list, to disk. Throws Error naming it on failure
// (a file system that cannot sync a folder, EINVAL, is accepted).
void sync_path(const std::filesystem::path& path);

// True for the names this unit gives its temporaries (".NAME.concord-tmp-PID-N"), and for
// those of earlier Concord versions ("NAME.tmp-PID-N"): what a killed writer may leave behind.
bool is_temporary_name(const std::string& filename);

// A hidden scratch folder beside `target`, into which an output's files are written (by
// Concord, ITK or OpenCV, which want a file name) before one of the publish steps moves them
// into place. Removed with whatever it still holds when destroyed.
class ScratchFolder {
 public:
  explicit ScratchFolder(const std::filesystem::path& target);
  ~ScratchFolder();
  ScratchFolder(const ScratchFolder&) = delete;
  ScratchFolder& operator=(const ScratchFolder&) = delete;

  const std::filesystem::path& path() const { return path_; }
  const std::filesystem::path& target() const { return target_; }

  // Writes path()/name (not flushed yet: publishing flushes).
  void write(const std::string& name, const void* data, size_t size) const;

  // Each file in path() is flushed, then renamed into target()'s folder, the one named like
  // target() last (a header appears only once its data file is complete); then the folder is
  // flushed.
  void publish_files() const;
  // path()/name is a folder (with files below it) that replaces target() as a whole: its files
  // are flushed, an existing target() is moved aside into the scratch folder (and removed with
  // it), the folder is renamed into place and the parent flushed.
  void publish_folder(const std::string& name) const;

 private:
  std::filesystem::path target_, path_;
};

// Finishes written outputs on a background thread, in submission order: each output's files are
// flushed to disk (fsync) and then renamed from their hidden scratch folder to the final name.
// A worker that writes many files thus computes while the disk flushes, with the same guarantee
// as the synchronous path: an output appears under its final name only once its bytes are
// durable, and a killed process leaves only scratch folders (never a partial output).
// At most `max_pending` outputs wait; submit blocks beyond that (bounds scratch files and
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
  // Queues `publish` (the step that makes `path` appear).
  void submit(const std::string& path, std::function<void()> publish);

 private:
  struct State;
  std::unique_ptr<State> state_;
};

// Runs `step` on `scratch` now (publisher == nullptr), or queues it on `publisher`; the scratch
// folder lives until the step has run. Errors of a queued step go to the publisher's callback.
void publish_output(std::shared_ptr<ScratchFolder> scratch, OutputPublisher* publisher,
                    std::function<void(const ScratchFolder&)> step = &ScratchFolder::publish_files);

}  // namespace concord
