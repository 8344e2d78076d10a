// csv: sites listed in a manifest with a header row: path, label | mask, site, split.
// Paths are relative to the manifest's folder. See README.md.
#include <concord/dataset.h>
#include <concord/error.h>

#include <algorithm>
#include <filesystem>
#include <fstream>
#include <map>

#include "../common/dataset_common.h"

namespace fs = std::filesystem;

namespace concord {
namespace {

// One CSV record: comma-separated, fields optionally double-quoted ("" is a quote).
std::vector<std::string> split_record(const std::string& line, const std::string& where) {
  std::vector<std::string> out(1);
  bool quoted = false;
  for (size_t i = 0; i < line.size(); ++i) {
    const char c = line[i];
    if (quoted) {
      if (c == '"' && i + 1 < line.size() && line[i + 1] == '"')
        out.back() += '"', ++i;
      else if (c == '"')
        quoted = false;
      else
        out.back() += c;
    } else if (c == '"') {
      quoted = true;
    } else if (c == ',') {
      out.emplace_back();
    } else if (c != '\r') {
      out.back() += c;
    }
  }
  if (quoted) throw Error("csv: " + where + ": unterminated quote");
  for (auto& f : out) {  // trim spaces around fields
    f.erase(0, f.find_first_not_of(" \t"));
    f.erase(f.find_last_not_of(" \t") + 1);
  }
  return out;
}

class CsvDataset : public Dataset {
 public:
  CsvDataset(const Args& a, const BuildContext&)
      : file_(a.str("file")),
        splits_(a.strings("splits")),
        classes_(a.strings("classes")),
        opt_(datasets::image_options(a)) {
    std::error_code ec;
    if (!fs::is_regular_file(file_, ec)) throw Error("csv: " + file_ + ": no such file");
    if (splits_.size() != 2)
      throw Error("csv: splits must name the train and the test split, e.g. [train, test]");
  }

  Federation load(const DataRequest& request) override {
    std::ifstream in(file_);
    if (!in) throw Error("csv: " + file_ + ": cannot open");
    const fs::path base = fs::path(file_).parent_path();
    std::string line;
    int lineno = 0;
    std::map<std::string, int> col;
    while (std::getline(in, line)) {  // header: first non-empty line
      ++lineno;
      if (line.find_first_not_of(" \t\r") == std::string::npos) continue;
      auto names = split_record(line, file_ + ":" + std::to_string(lineno));
      for (size_t k = 0; k < names.size(); ++k) col[names[k]] = int(k);
      break;
    }
    const std::string where0 = file_ + ":" + std::to_string(lineno);
    for (const char* need : {"path", "site", "split"})
      if (!col.count(need))
        throw Error("csv: " + where0 + ": header has no '" + need +
                    "' column (expected path, label or mask, site, split)");
    const bool seg = col.count("mask") != 0;
    if (seg == (col.count("label") != 0))
      throw Error("csv: " + where0 +
                  ": header needs exactly one of 'label' (classification) "
                  "and 'mask' (segmentation)");

    // Rows first, so class names can be collected before labels are assigned.
    struct Row {
      int line;
      std::vector<std::string> f;
    };
    std::vector<Row> rows;
    std::vector<std::string> site_order;
    while (std::getline(in, line)) {
      ++lineno;
      if (line.find_first_not_of(" \t\r") == std::string::npos || line[0] == '#') continue;
      Row r{lineno, split_record(line, file_ + ":" + std::to_string(lineno))};
      if (r.f.size() < col.size())
        throw Error("csv: " + file_ + ":" + std::to_string(lineno) + ": " +
                    std::to_string(r.f.size()) + " fields, the header has " +
                    std::to_string(col.size()));
      const std::string& site = r.f[col["site"]];
      if (std::find(site_order.begin(), site_order.end(), site) == site_order.end())
        site_order.push_back(site);
      rows.push_back(std::move(r));
    }
    if (rows.empty()) throw Error("csv: " + file_ + ": no rows after the header");

    std::vector<std::string> classes = classes_;
    bool named_labels = false;
    if (!seg) {
      for (const auto& r : rows) {
        const std::string& l = r.f[col["label"]];
        if (l.empty() || l.find_first_not_of("0123456789") != std::string::npos)
          named_labels = true;
      }
      if (named_labels && classes.empty()) {
        for (const auto& r : rows)
          if (std::find(classes.begin(), classes.end(), r.f[col["label"]]) == classes.end())
            classes.push_back(r.f[col["label"]]);
        std::sort(classes.begin(), classes.end());
      }
    }

    std::vector<std::string> wanted = request.sites.empty() ? site_order : request.sites;
    for (const auto& w : wanted)
      if (std::find(site_order.begin(), site_order.end(), w) == site_order.end())
        throw Error("csv: " + file_ + ": no rows for site '" + w + "'");
    Federation fed;
    fed.task = seg ? Task::Segmentation : Task::Classification;
    for (const auto& w : wanted) fed.sites.push_back({w, {}, {}});
    int64_t max_label = 1;
    for (const auto& r : rows) {
      const std::string where = file_ + ":" + std::to_string(r.line);
      auto it = std::find(wanted.begin(), wanted.end(), r.f[col["site"]]);
      if (it == wanted.end()) continue;
      SiteData& site = fed.sites[it - wanted.begin()];
      const std::string& split = r.f[col["split"]];
      std::vector<Sample>* out = split == splits_[0]   ? &site.train
                                 : split == splits_[1] ? &site.test
                                                       : nullptr;
      if (!out)
        throw Error("csv: " + where + ": split '" + split + "' is neither '" + splits_[0] +
                    "' nor '" + splits_[1] + "' (see the `splits` argument)");
      const std::string path = resolve(base, r.f[col["path"]], where);
      try {
        if (seg) {
          const std::string mask = resolve(base, r.f[col["mask"]], where);
          datasets::load_samples(path, &mask, -1, opt_, *out);
        } else {
          const std::string& l = r.f[col["label"]];
          int64_t label;
          if (named_labels || !classes_.empty()) {
            auto c = std::find(classes.begin(), classes.end(), l);
            if (c == classes.end())
              throw Error("label '" + l + "' is not in the `classes` argument");
            label = c - classes.begin();
          } else {
            label = std::stoll(l);
          }
          max_label = std::max(max_label, label);
          datasets::load_samples(path, nullptr, label, opt_, *out);
        }
      } catch (const Error& e) {
        throw Error("csv: " + where + ": " + e.what());
      }
    }
    for (const auto& s : fed.sites)
      if (s.train.empty())
        throw Error("csv: " + file_ + ": site '" + s.name + "' has no '" + splits_[0] + "' rows");
    fed.channels = fed.sites[0].train[0].image.channels;
    if (seg) {
      float top = 1;
      for (const auto& s : fed.sites)
        for (const auto* sp : {&s.train, &s.test})
          for (const auto& x : *sp)
            for (float v : x.mask->data) top = std::max(top, v);
      fed.num_classes = opt_.mask_values.empty() ? int(top) + 1 : int(opt_.mask_values.size());
    } else {
      fed.num_classes = classes.empty() ? int(max_label + 1) : int(classes.size());
    }
    datasets::unify_channels(fed, opt_, "csv " + file_);
    datasets::check_uniform(fed, "csv " + file_);
    return fed;
  }

 private:
  static std::string resolve(const fs::path& base, const std::string& p, const std::string& where) {
    if (p.empty()) throw Error("csv: " + where + ": empty path");
    const fs::path full = fs::path(p).is_absolute() ? fs::path(p) : base / p;
    std::error_code ec;
    if (!fs::exists(full, ec))
      throw Error("csv: " + where + ": no file " + full.string() +
                  (ec ? " (" + ec.message() + ")" : ""));
    return full.string();
  }

  std::string file_;
  std::vector<std::string> splits_, classes_;
  datasets::ImageOptions opt_;
};

}  // namespace
}  // namespace concord

CONCORD_PLUGIN("concord-dataset-csv", "0.1.0") {
  using namespace concord;
  std::vector<ArgSpec> args = {
      ArgSpec::path("file", "Manifest: header path,label|mask,site,split; paths relative to it"),
      ArgSpec::list("splits", ArgType::String, {"train", "test"},
                    "Values of the split column meaning train and test"),
      ArgSpec::list("classes", ArgType::String, {},
                    "Class names in label order when labels are names; empty = sorted names"),
  };
  for (auto& spec : datasets::image_option_specs()) args.push_back(std::move(spec));
  registry.add({Kind::Dataset, "csv",
                "Sites listed in a CSV manifest (path, label|mask, site, split)", std::move(args),
                factory_of<CsvDataset>()});
}
