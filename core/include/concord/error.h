// Errors carry their context (file:line:col, site, round, plugin) in the message itself.
#pragma once

#include <stdexcept>
#include <string>

namespace concord {

// Where a value came from: a pipeline file position, or a command-line override.
struct SourceLoc {
  std::string file;         // pipeline file, or "--set" for command-line overrides
  int line = 0;             // 1-based; 0 = unknown
  int column = 0;           // 1-based
  std::string str() const;  // "file:line:col" (or just "file")
};

class Error : public std::runtime_error {
 public:
  explicit Error(const std::string& what) : std::runtime_error(what) {}
};

// A site failed during a round; the engine reports it and continues without the site.
class SiteError : public Error {
 public:
  SiteError(std::string site, const std::string& what)
      : Error("site '" + site + "': " + what), site_(std::move(site)) {}
  const std::string& site() const { return site_; }

 private:
  std::string site_;
};

}  // namespace concord
