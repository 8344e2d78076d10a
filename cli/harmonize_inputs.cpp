#include "harmonize_inputs.h"

#include <concord/error.h>
#include <concord/image_io.h>

#include <fnmatch.h>

#include <algorithm>
#include <filesystem>
#include <fstream>
#include <map>

namespace concord::cli {
namespace fs = std::filesystem;

namespace {

std::string lower(std::string s) {
  std::transform(s.begin(), s.end(), s.begin(), [](unsigned char c) { return std::tolower(c); });
  return s;
}

bool glob_match(const std::vector<std::string>& globs, const std::string& rel) {
  const std::string name = fs::path(rel).filename().string();
  for (const auto& g : globs)
    if (fnmatch(g.c_str(), rel.c_str(), 0) == 0 || fnmatch(g.c_str(), name.c_str(), 0) == 0)
      return true;
  return false;
}

bool is_manifest(const std::string& path) {
  const std::string ext = lower(fs::path(path).extension().string());
  return ext == ".txt" || ext == ".csv" || ext == ".lst" || ext == ".list";
}

std::vector<std::string> dir_components(const std::string& rel, bool is_dir_item) {
  std::vector<std::string> out;
  for (const auto& c : fs::path(rel)) out.push_back(c.string());
  if (!is_dir_item && !out.empty()) out.pop_back();  // the file name is not a folder
  return out;
}

std::string root_name(const fs::path& root) {
  fs::path p = fs::absolute(root).lexically_normal();
  if (p.filename().empty()) p = p.parent_path();
  return p.filename().string();
}

struct Builder {
  const DiscoveryOptions& opt;
  bool multi;
  Discovery out;
  std::map<std::string, std::string> seen;  // relative output -> input, to refuse collisions

  // `rel` is relative to the input root; `root` names the input for site and output prefixes.
  void add(const std::string& path, const std::string& rel, const std::string& root, bool dicom,
           const std::string& explicit_site = "") {
    if (glob_match(opt.exclude, rel)) return;
    InputItem it;
    it.path = path;
    it.dicom = dicom;
    it.relative = multi ? (fs::path(root) / rel).string() : rel;
    const auto dirs = dir_components(rel, dicom);
    bool mask = glob_match(opt.mask_globs, rel);
    for (const auto& d : dirs) mask = mask || is_mask_folder_name(d);
    it.role = mask ? InputItem::Role::Mask : InputItem::Role::Image;
    if (!explicit_site.empty()) {
      it.site = explicit_site;
    } else {
      const int depth = opt.site_depth >= 0 ? opt.site_depth : (multi ? 0 : 1);
      std::string site;
      // A DICOM folder is itself one image: it does not name its own site.
      const size_t usable = dicom && !dirs.empty() ? dirs.size() - 1 : dirs.size();
      for (int i = 0; i < depth && size_t(i) < usable; ++i)
        site += (site.empty() ? "" : "/") + dirs[size_t(i)];
      if (multi || site.empty()) site = site.empty() ? root : root + "/" + site;
      it.site = site;
    }
    auto [pos, inserted] = seen.emplace(it.relative, path);
    if (!inserted)
      throw Error("inputs " + pos->second + " and " + path + " would both be written to " +
                  it.relative);
    out.items.push_back(std::move(it));
  }

  void walk(const fs::path& root) {
    const std::string name = root_name(root);
    if (is_dicom_dir(root.string())) {
      add(root.string(), name, name, true);
      return;
    }
    std::error_code ec;
    fs::recursive_directory_iterator it(root, fs::directory_options::follow_directory_symlink, ec);
    if (ec) throw Error(root.string() + ": cannot list folder: " + ec.message());
    for (; it != fs::recursive_directory_iterator(); it.increment(ec)) {
      if (ec) throw Error(root.string() + ": cannot list folder: " + ec.message());
      const fs::path p = it->path();
      const std::string fname = p.filename().string();
      if (!fname.empty() && fname[0] == '.') {  // hidden, including unfinished outputs
        if (it->is_directory()) it.disable_recursion_pending();
        continue;
      }
      const std::string rel = p.lexically_relative(root).string();
      if (it->is_directory()) {
        if (is_dicom_dir(p.string())) {
          it.disable_recursion_pending();
          add(p.string(), rel, name, true);
        }
        continue;
      }
      if (is_image_file(p.string()))
        add(p.string(), rel, name, false);
      else
        out.ignored.push_back(p.string());
    }
  }

  void manifest(const fs::path& file) {
    std::ifstream in(file);
    if (!in) throw Error(file.string() + ": cannot read manifest");
    const fs::path base = file.parent_path();
    std::string line;
    int lineno = 0;
    while (std::getline(in, line)) {
      ++lineno;
      if (!line.empty() && line.back() == '\r') line.pop_back();
      if (line.empty() || line[0] == '#') continue;
      std::string path = line, site;
      auto sep = line.find_first_of(",\t");
      if (sep != std::string::npos) {
        path = line.substr(0, sep);
        site = line.substr(sep + 1);
        site = site.substr(0, site.find_first_of(",\t"));
      }
      if (lineno == 1 && lower(path) == "path") continue;  // header row
      fs::path p = fs::path(path).is_absolute() ? fs::path(path) : base / path;
      const std::string where = file.string() + ":" + std::to_string(lineno);
      if (!fs::exists(p)) throw Error(where + ": " + p.string() + " does not exist");
      const bool dicom = fs::is_directory(p);
      if (dicom && !is_dicom_dir(p.string()))
        throw Error(where + ": " + p.string() + " is a folder without DICOM files");
      if (!dicom && !is_image_file(p.string()))
        throw Error(where + ": " + p.string() + " is not an image file Concord reads");
      std::string rel = p.lexically_relative(base).string();
      if (rel.empty() || rel.rfind("..", 0) == 0) rel = p.filename().string();
      if (site.empty()) {
        auto dirs = dir_components(rel, dicom);
        site = dirs.size() > (dicom ? 1u : 0u) ? dirs.front() : root_name(base);
      }
      add(p.string(), rel, root_name(base), dicom, site);
    }
  }
};

}  // namespace

bool is_mask_folder_name(const std::string& name) {
  static const char* names[] = {"mask", "masks",        "label",        "labels",
                                "seg",  "segmentation", "segmentations"};
  const std::string n = lower(name);
  return std::any_of(std::begin(names), std::end(names), [&](const char* m) { return n == m; });
}

Discovery discover_inputs(const std::vector<std::string>& inputs, const DiscoveryOptions& opt) {
  if (inputs.empty()) throw Error("no inputs given");
  Builder b{opt, inputs.size() > 1, {}, {}};
  for (const auto& in : inputs) {
    std::error_code ec;
    if (!fs::exists(in, ec)) throw Error(in + ": no such file or folder");
    if (fs::is_directory(in, ec)) {
      b.walk(in);
    } else if (is_manifest(in)) {
      b.manifest(in);
    } else if (is_image_file(in)) {
      const fs::path p(in);
      const std::string parent = root_name(p.has_parent_path() ? p.parent_path() : fs::path("."));
      b.add(in, p.filename().string(), parent, false, parent);
    } else {
      throw Error(in + ": not an image, a folder or a manifest (.txt/.csv list of paths)");
    }
  }
  std::sort(b.out.items.begin(), b.out.items.end(), [](const InputItem& x, const InputItem& y) {
    return std::tie(x.site, x.relative) < std::tie(y.site, y.relative);
  });
  return std::move(b.out);
}

}  // namespace concord::cli
