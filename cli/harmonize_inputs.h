// Input discovery for `concord harmonize`: folders, manifests and single files become a list of
// work items (image file, DICOM series folder, or mask to copy), each with its site and the
// relative path its output takes under --out.
#pragma once

#include <string>
#include <utility>
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
  // Paths found but not taken (a folder that cannot be listed, a symbolic link that loops back
  // to a folder being walked, a manifest line naming no readable input), each with the
  // reason: reported as failed inputs.
  std::vector<std::pair<std::string, std::string>> skipped;
};

// A folder holding DICOM files is one series item; image files and subfolders beside those
// files are items of their own (the series is then written to FOLDER/dicom-series so that the
// two never share an output path). Folders reached twice through symbolic links are skipped.
// Throws Error naming an input that does not exist; a manifest line naming a missing or
// unreadable input is a `skipped` entry ("FILE:LINE: reason").
Discovery discover_inputs(const std::vector<std::string>& inputs, const DiscoveryOptions& opt);

// Refuses (Error naming both paths) an output folder that is an input, lies inside one, or
// holds one: outputs would be taken for inputs on a rerun, or overwrite them. Compares canonical
// paths (symbolic links resolved; `out` need not exist yet); manifests are checked by the
// inputs they list.
void check_output_apart(const std::string& out, const std::vector<std::string>& inputs,
                        const Discovery& found);

// Folder names that hold masks/labels (case-insensitive): mask, masks, label, labels, seg,
// segmentation, segmentations.
bool is_mask_folder_name(const std::string& name);

}  // namespace concord::cli
