#include "adapter_common.h"

#include <concord/error.h>
#include <concord/tensor_bridge.h>

#include <c10/core/GradMode.h>
#include <c10/util/StringUtil.h>

#include <algorithm>
#include <set>

namespace concord::adapters {

bool under_path(const std::string& module_path, const std::string& prefix) {
  if (prefix.empty()) return true;
  if (module_path.size() < prefix.size()) return false;
  if (module_path.compare(0, prefix.size(), prefix) != 0) return false;
  return module_path.size() == prefix.size() || module_path[prefix.size()] == '.';
}

void check_module_paths(Model& model, const std::vector<std::string>& prefixes,
                        const std::string& who, const std::string& arg) {
  std::vector<std::string> valid;
  for (const ModuleEntry& m : model.modules())
    if (!m.path.empty()) valid.push_back(m.path);
  const std::set<std::string> known(valid.begin(), valid.end());
  for (const std::string& p : prefixes) {
    if (known.count(p)) continue;
    std::string msg = who + ": " + arg + ": unknown module path '" + p + "'; valid paths: ";
    // Long models: the list is still the answer the user needs, but keep it readable.
    const size_t shown = std::min<size_t>(valid.size(), 60);
    for (size_t i = 0; i < shown; ++i) msg += (i ? ", " : "") + valid[i];
    if (valid.size() > shown) msg += ", ... (" + std::to_string(valid.size() - shown) + " more)";
    if (valid.empty()) msg += "(the model has no submodules)";
    throw Error(msg);
  }
}

NamedArrays snapshot(Model& model, const ParamFilter& select) {
  NamedArrays out;
  for (const StateEntry& e : model.state())
    if (!select || select(e)) out[e.name] = to_array(e.tensor.detach().clone());
  return out;
}

void restore(Model& model, const NamedArrays& values, const std::string& who, bool require_all) {
  c10::NoGradGuard no_grad;
  std::vector<std::string> missing;
  for (StateEntry& e : model.state()) {
    auto it = values.find(e.name);
    if (it == values.end()) {
      missing.push_back(e.name);
      continue;
    }
    const at::Tensor src = to_tensor(it->second);
    if (src.sizes() != e.tensor.sizes())
      throw Error(who + ": stored '" + e.name + "' has shape " + c10::str(src.sizes()) +
                  " but the model's has " + c10::str(e.tensor.sizes()));
    e.tensor.copy_(src);
  }
  if (require_all && !missing.empty()) {
    std::string msg = who + ": no stored value for model entries: ";
    for (size_t i = 0; i < missing.size(); ++i) msg += (i ? ", " : "") + missing[i];
    throw Error(msg);
  }
}

NamedArrays take_prefixed(const NamedArrays& store, const std::string& prefix) {
  NamedArrays out;
  for (auto it = store.lower_bound(prefix);
       it != store.end() && it->first.compare(0, prefix.size(), prefix) == 0; ++it)
    out[it->first.substr(prefix.size())] = it->second;
  return out;
}

void put_prefixed(NamedArrays& store, const std::string& prefix, const NamedArrays& values) {
  for (auto it = store.lower_bound(prefix);
       it != store.end() && it->first.compare(0, prefix.size(), prefix) == 0;)
    it = store.erase(it);
  for (const auto& [name, a] : values) store[prefix + name] = a;
}

void set_flag(NamedArrays& store, const std::string& key, bool on) {
  store[key] = Array::from(std::vector<int64_t>{on ? 1 : 0});
}

bool flag(const NamedArrays& store, const std::string& key) {
  auto it = store.find(key);
  return it != store.end() && it->second.dtype() == DType::I64 && it->second.numel() == 1 &&
         it->second.data<int64_t>()[0] == 1;
}

}  // namespace concord::adapters
