#include "harmonize_inputs.h"

#include <concord/error.h>
#include <concord/image_io.h>

#include <fnmatch.h>
#include <sys/stat.h>

#include <algorithm>
#include <cerrno>
#include <cstring>
#include <filesystem>
#include <fstream>
#include <map>
#include <set>

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
  // `out_rel`, when given, replaces `rel` as the output path.
  void add(const std::string& path, const std::string& rel, const std::string& root, bool dicom,
           const std::string& explicit_site = "", const std::string& out_rel = "") {
    if (glob_match(opt.exclude, rel)) return;
    InputItem it;
    it.path = path;
    it.dicom = dicom;
    const std::string target = out_rel.empty() ? rel : out_rel;
    it.relative = multi ? (fs::path(root) / target).string() : target;
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
    std::set<std::pair<dev_t, ino_t>> open;  // the folders on the path being walked
    walk_dir(root, root, root_name(root), open);
  }

  // One folder: its DICOM files make one series item; image files beside them are items of
  // their own; other files are listed as ignored; subfolders are walked (a symbolic link back
  // to a folder on the current path is a loop: reported and skipped, the rest goes on).
  void walk_dir(const fs::path& dir, const fs::path& root, const std::string& name,
                std::set<std::pair<dev_t, ino_t>>& open) {
    struct stat st {};
    if (::stat(dir.c_str(), &st) != 0) {
      out.skipped.push_back({dir.string(), dir.string() + ": cannot read folder: " +
                                               std::string(std::strerror(errno))});
      return;
    }
    const auto key = std::make_pair(st.st_dev, st.st_ino);
    if (open.count(key)) {
      out.skipped.push_back(
          {dir.string(), dir.string() +
                             ": symbolic link loop (leads back to a folder that contains it); "
                             "not followed"});
      return;
    }
    std::error_code ec;
    std::vector<fs::path> entries;
    fs::directory_iterator it(dir, ec), end;
    for (; !ec && it != end; it.increment(ec)) entries.push_back(it->path());
    if (ec) {
      out.skipped.push_back({dir.string(), dir.string() + ": cannot list folder: " + ec.message()});
      return;
    }
    std::sort(entries.begin(), entries.end());
    open.insert(key);
    std::vector<fs::path> images, subdirs;
    bool dicom = false;
    for (const auto& p : entries) {
      const std::string fname = p.filename().string();
      if (!fname.empty() && fname[0] == '.') continue;  // hidden, including unfinished outputs
      if (fs::is_directory(p, ec))
        subdirs.push_back(p);
      else if (is_image_file(p.string()))
        images.push_back(p);
      else if (fs::is_regular_file(p, ec) && is_dicom_file(p.string()))
        dicom = true;
      else
        out.ignored.push_back(p.string());
    }
    const std::string rel = dir == root ? name : dir.lexically_relative(root).string();
    if (dicom) {
      // Beside other items, the series gets a folder of its own in the output.
      const bool mixed = !images.empty() || !subdirs.empty();
      add(dir.string(), rel, name, true, "",
          mixed ? (fs::path(rel) / "dicom-series").string() : "");
    }
    for (const auto& p : images) add(p.string(), p.lexically_relative(root).string(), name, false);
    for (const auto& d : subdirs) walk_dir(d, root, name, open);
    open.erase(key);
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
      // A listed input that is not there, or not an image, is a failed input, not a failed run.
      auto skip = [&](const std::string& why) {
        out.skipped.push_back({p.string(), where + ": " + p.string() + " " + why});
      };
      if (!fs::exists(p)) {
        skip("does not exist");
        continue;
      }
      const bool dicom = fs::is_directory(p);
      if (dicom && !is_dicom_dir(p.string())) {
        skip("is a folder without DICOM files");
        continue;
      }
      if (!dicom && !is_image_file(p.string())) {
        skip("is not an image file Concord reads");
        continue;
      }
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

namespace {

fs::path canonical_folder(const std::string& p) {
  std::error_code ec;
  fs::path c = fs::weakly_canonical(fs::absolute(p), ec);
  if (ec) c = fs::absolute(p).lexically_normal();
  if (c.filename().empty()) c = c.parent_path();  // "a/b/" -> "a/b"
  return c;
}

// `inner` is `outer` or lies below it.
bool within(const fs::path& inner, const fs::path& outer) {
  auto i = inner.begin();
  for (auto o = outer.begin(); o != outer.end(); ++o, ++i)
    if (i == inner.end() || *i != *o) return false;
  return true;
}

}  // namespace

void check_output_apart(const std::string& out, const std::vector<std::string>& inputs,
                        const Discovery& found) {
  const fs::path o = canonical_folder(out);
  auto check = [&](const std::string& in) {
    const fs::path c = canonical_folder(in);
    const char* how = o == c         ? "is the input"
                      : within(o, c) ? "lies inside the input"
                      : within(c, o) ? "contains the input"
                                     : nullptr;
    if (how)
      throw Error("--out " + out + " (" + o.string() + ") " + how + " " + in + " (" + c.string() +
                  "): outputs would overwrite inputs or be harmonized again on a rerun; choose "
                  "an --out folder apart from every input");
  };
  for (const auto& in : inputs)
    if (!is_manifest(in)) check(in);
  for (const auto& it : found.items) check(it.path);
}

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
