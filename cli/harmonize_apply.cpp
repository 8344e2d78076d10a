// The apply loop both input forms of `concord harmonize apply` share: see harmonize_apply.h.
#include "harmonize_apply.h"

#include <filesystem>
#include <iostream>

namespace concord::cli {

namespace fs = std::filesystem;

std::string with_path(const std::string& path, const std::string& reason) {
  return reason.find(path) != std::string::npos ? reason : path + ": " + reason;
}

ApplyLoop::ApplyLoop(ApplyLoopOptions options, Failures& failures)
    : options_(std::move(options)),
      failures_(failures),
      report_pick_(pick_report_items(options_.site_of, 16, options_.seed)),
      bar_(options_.label, int64_t(options_.site_of.size()), options_.progress),
      publisher_([this](const std::string& path, const std::string& error) {
        std::atomic<size_t>* counter = nullptr;
        {
          std::lock_guard<std::mutex> lock(pending_mutex_);
          auto it = pending_.find(path);
          if (it != pending_.end()) counter = it->second, pending_.erase(it);
        }
        if (!error.empty())
          failures_.add(path, with_path(path, error), &bar_);
        else if (counter)
          ++*counter;
      }) {}

void ApplyLoop::run(const std::function<std::string(size_t)>& name_of,
                    const std::function<void(size_t)>& work) {
  parallel_for(options_.site_of.size(), options_.jobs, [&](size_t i) {
    try {
      work(i);
    } catch (const std::exception& e) {
      const std::string name = name_of(i);
      failures_.add(name, with_path(name, e.what()), &bar_);
    }
    bar_.advance();
    std::string status;
    if (skipped) status += std::to_string(skipped) + " already done";
    if (failures_.size())
      status += (status.empty() ? "" : ", ") + std::to_string(failures_.size()) + " failed";
    bar_.set_status(status);
  });
  publisher_.finish();  // every output in place (or failed) before the caller lists them
  bar_.finish();
}

void ApplyLoop::write(const Image& image, const std::string& path, WriteOptions options,
                      std::atomic<size_t>& published) {
  // The publisher reports an output under its target's name: no trailing '/' (a DICOM folder).
  fs::path target(path);
  while (target.filename().empty() && target.has_parent_path() && target != target.parent_path())
    target = target.parent_path();
  {
    std::lock_guard<std::mutex> lock(pending_mutex_);
    pending_[target.string()] = &published;
  }
  options.publisher = &publisher_;
  try {
    write_image(image, target.string(), options);
  } catch (...) {
    std::lock_guard<std::mutex> lock(pending_mutex_);
    pending_.erase(target.string());
    throw;
  }
}

void ApplyLoop::print_summary() const {
  std::cout << "harmonize apply: " << written << " written, " << skipped
            << " already complete (skipped), " << masks << " masks " << options_.masks_verb << ", "
            << failures_.size() << " failed, in " << format_duration(bar_.elapsed_seconds()) << " ("
            << options_.jobs << " threads)\n";
}

void ApplyLoop::add_to_report(nlohmann::json& rep, const std::string& preview,
                              int preview_per_site) const {
  rep["written"] = size_t(written);
  rep["skipped"] = size_t(skipped);
  rep[std::string("masks_") + options_.masks_verb] = size_t(masks);
  add_failures_to_report(failures_, rep);
  print_site_shift(report, rep, preview, preview_per_site);
}

}  // namespace concord::cli
