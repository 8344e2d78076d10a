#include <concord/batchnorm.h>

#include <regex>

namespace concord {

std::string short_type_name(const std::string& module_type) {
  std::string s = module_type.substr(0, module_type.find('<'));  // drop template arguments
  // TorchScript names are dotted, LibTorch's are C++ qualified: keep the last component.
  const size_t colon = s.rfind("::");
  if (colon != std::string::npos) s = s.substr(colon + 2);
  const size_t dot = s.rfind('.');
  if (dot != std::string::npos) s = s.substr(dot + 1);
  const std::string impl = "Impl";
  if (s.size() > impl.size() && s.compare(s.size() - impl.size(), impl.size(), impl) == 0)
    s.resize(s.size() - impl.size());
  return s;
}

bool is_batchnorm_type(const std::string& module_type) {
  static const std::regex bn("(Sync|Lazy)?BatchNorm([123]d)?");
  return std::regex_match(short_type_name(module_type), bn);
}

}  // namespace concord
