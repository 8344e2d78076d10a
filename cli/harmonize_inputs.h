// Input discovery for `concord harmonize`: folders, manifests and single files become a list of
// work items (image file, DICOM series folder, or mask to copy), each with its site and the
// relative path its output takes under --out.
#pragma once

#include <string>
#include <vector>

namespace concord::cli {

struct InputItem {
  enum class Role { Image, Mask };
  std::string path;      // file, or folder of one DICOM series
  std::string relative;  // output path relative to --out (mirrors the input tree)
  std::string site;
  bool dicom = false;
  Role role = Role::Image;
};

struct DiscoveryOptions {
  // Path components (from the input root) that make the site name; -1: automatic (one input:
  // its top-level subfolders are sites; several inputs: each input is a site).
  int site_depth = -1;
  std::vector<std::string> exclude;     // globs on the relative path: skipped entirely
  std::vector<std::string> mask_globs;  // globs on the relative path: copied unchanged
};

struct Discovery {
  std::vector<InputItem> items;      // sorted by site, then relative path
  std::vector<std::string> ignored;  // files that are not images (not copied)
};

// Throws Error naming the input when it does not exist or a manifest line is malformed.
Discovery discover_inputs(const std::vector<std::string>& inputs, const DiscoveryOptions& opt);

// Folder names that hold masks/labels (case-insensitive): mask, masks, label, labels, seg,
// segmentation, segmentations.
bool is_mask_folder_name(const std::string& name);

}  // namespace concord::cli
