#include <concord/error.h>
#include <concord/registry.h>

namespace concord {

std::string SourceLoc::str() const {
  if (line <= 0) return file.empty() ? "<pipeline>" : file;
  return file + ":" + std::to_string(line) + ":" + std::to_string(column);
}

Plugin::~Plugin() = default;

}  // namespace concord
