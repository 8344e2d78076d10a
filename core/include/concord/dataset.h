// Dataset plugins load sites with train/test splits.
#pragma once

#include <concord/image.h>
#include <concord/registry.h>

namespace concord {

struct DataRequest {
  uint64_t seed = 0;
  std::vector<std::string> sites;  // requested sites; empty = all the dataset has
};

class Dataset : public Plugin {
 public:
  // Loads (or generates) the federation. Errors name the file or site at fault.
  virtual Federation load(const DataRequest& request) = 0;
};

}  // namespace concord
