// Shared by the adapter plugins: parts of a model named by module
// path prefixes (validated against the model), and snapshots of model state.
#pragma once

#include <concord/adapter.h>
#include <concord/batchnorm.h>
#include <concord/model.h>

#include <string>
#include <vector>

namespace concord::adapters {

// BatchNorm is recognised by module type through core's one helper (concord/batchnorm.h).
using concord::is_batchnorm;
using concord::is_batchnorm_type;
using concord::short_type_name;

// True when `module_path` is `prefix` or lies below it ("encoder" covers "encoder.down1.conv",
// not "encoder2"). The empty prefix covers everything.
bool under_path(const std::string& module_path, const std::string& prefix);

// Throws Error "<who>: <arg>: unknown module path 'x'; valid paths: ..." when a prefix names no
// module of the model.
void check_module_paths(Model& model, const std::vector<std::string>& prefixes,
                        const std::string& who, const std::string& arg);

// Deep copies of the model's state (entries selected by `select`, all when null).
NamedArrays snapshot(Model& model, const ParamFilter& select = nullptr);
// Copies `values` into the live tensors of the entries they name. Entries missing from `values`
// are left as they are when `require_all` is false; otherwise an Error names them.
void restore(Model& model, const NamedArrays& values, const std::string& who,
             bool require_all = true);

// Entries of `store` whose names start with `prefix`, with the prefix removed (and back).
NamedArrays take_prefixed(const NamedArrays& store, const std::string& prefix);
void put_prefixed(NamedArrays& store, const std::string& prefix, const NamedArrays& values);

// A one-number flag in a site store, e.g. "evaluations now use the personalised model": the
// engine reloads the global state before every evaluation, so before_evaluate() must know.
void set_flag(NamedArrays& store, const std::string& key, bool on);
bool flag(const NamedArrays& store, const std::string& key);

}  // namespace concord::adapters
