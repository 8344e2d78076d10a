// BatchNorm found by module type, the one way the engine (BatchNorm re-estimation) and the adapter
// plugins (which BatchNorm state is federated) recognise it: never by parameter names.
#pragma once

#include <concord/model.h>

#include <string>

namespace concord {

// The class name without namespace or TorchScript qualification and without LibTorch's "Impl":
// "torch::nn::BatchNorm2dImpl" and "__torch__.torch.nn.modules.batchnorm.BatchNorm2d" both give
// "BatchNorm2d".
std::string short_type_name(const std::string& module_type);

// BatchNorm1d/2d/3d (also SyncBatchNorm, LazyBatchNorm*), decided by the module's type only.
bool is_batchnorm_type(const std::string& module_type);
inline bool is_batchnorm(const StateEntry& e) {
  return is_batchnorm_type(e.module_type);
}

}  // namespace concord
