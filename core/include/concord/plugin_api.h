// The whole plugin contract: one C entry point per shared library.
//
// A plugin library exports `concord_plugin`, returning a static concord_plugin_info. The loader
// checks `api_version` and `abi_tag` against its own and refuses a mismatch with an error that
// names the file and both values; then it calls `register_plugins`, which adds factories to the
// registry (a concord::Registry behind the opaque pointer). In C++ use the CONCORD_PLUGIN macro.
#ifndef CONCORD_PLUGIN_API_H
#define CONCORD_PLUGIN_API_H

#include <stdint.h>

#define CONCORD_API_VERSION 3u  // when it changes: the end of this file
#define CONCORD_PLUGIN_SYMBOL "concord_plugin"

#ifdef __cplusplus
extern "C" {
#endif

typedef struct concord_plugin_info {
  uint32_t api_version;  // CONCORD_API_VERSION the library was built with
  const char* abi_tag;   // compiler, C++ ABI and LibTorch version (CONCORD_ABI_TAG)
  const char* library;   // library name, e.g. "concord-aggregators"
  const char* version;   // the library's own version, e.g. "0.1.0"
  void (*register_plugins)(void* registry);  // registry is a concord::Registry*
} concord_plugin_info;

typedef const concord_plugin_info* (*concord_plugin_fn)(void);

#ifdef __cplusplus
}
#endif

// C++ objects (std::string, at::Tensor, vtables) cross the boundary, so compiler family, C++
// ABI and LibTorch version must match: they are all in the tag.
#define CONCORD_STR2(x) #x
#define CONCORD_STR(x) CONCORD_STR2(x)
#if defined(__clang__)
#define CONCORD_COMPILER_TAG "clang-" CONCORD_STR(__clang_major__)
#elif defined(__GNUC__)
#define CONCORD_COMPILER_TAG "gcc-" CONCORD_STR(__GNUC__)
#else
#define CONCORD_COMPILER_TAG "unknown"
#endif
#ifndef CONCORD_TORCH_TAG
#define CONCORD_TORCH_TAG "torch-1.13"
#endif
#define CONCORD_ABI_TAG \
  CONCORD_COMPILER_TAG ";cxx11abi-" CONCORD_STR(_GLIBCXX_USE_CXX11_ABI) ";" CONCORD_TORCH_TAG

#ifdef __cplusplus
#define CONCORD_EXPORT __attribute__((visibility("default")))

namespace concord {
class Registry;
}

// Usage, once per library:
//   CONCORD_PLUGIN("concord-aggregators", "0.1.0") { registry.add(...); }
#define CONCORD_PLUGIN(LIBRARY, VERSION)                                          \
  static void concord_register_(concord::Registry& registry);                     \
  extern "C" CONCORD_EXPORT const concord_plugin_info* concord_plugin(void) {     \
    static const concord_plugin_info info = {                                     \
        CONCORD_API_VERSION, CONCORD_ABI_TAG, LIBRARY, VERSION,                   \
        [](void* r) { concord_register_(*static_cast<concord::Registry*>(r)); }}; \
    return &info;                                                                 \
  }                                                                               \
  static void concord_register_(concord::Registry& registry)
#endif

// When CONCORD_API_VERSION changes.
//
// CONCORD_API_VERSION names the C++ contract between libconcord and a plugin, beyond what the
// ABI tag covers (compiler, C++ ABI, LibTorch). A plugin built against another version would
// call a virtual method through the wrong vtable slot or read a struct with the wrong layout, so
// the version is bumped (by one) in the same commit as any change that an already built plugin
// would see:
//   - an interface's virtual methods: Plugin, Dataset, Model, Harmonizer, Adapter, Aggregator,
//     Filter, Metric, LocalTrainer - adding, removing or reordering one, or changing its
//     parameters, return type, const-ness or meaning (e.g. Aggregator gains a client-side hook;
//     LocalTrainer::train takes another parameter; Harmonizer::apply may now be called from
//     several threads at once);
//   - a struct or class that crosses the boundary, passed to or returned by those methods or the
//     registry: PluginDesc, ArgSpec, Value, Args, BuildContext, Stats, SiteUpdate, RoundInfo,
//     TrainResult, FilterContext, Predictions, ModelSpec, StateEntry, ModuleEntry, DataRequest,
//     Image, Geometry, Sample, SiteData, Federation, Array / NamedArrays - a member added,
//     removed, reordered or retyped (e.g. Stats gains a field; ArgSpec's range becomes a type of
//     its own), or a value of Kind, ArgType, Task, PixelType or DType added or renumbered;
//   - concord_plugin_info above, or what register_plugins may do with the registry.
// No bump: new free functions or classes in libconcord that no interface above takes or returns,
// fixes inside libconcord that keep signatures and meaning, new plugins. (A new plugin kind is a
// new Kind value: bump.) The loader refuses a mismatch naming the file and both versions.
//
// History: 3 - Harmonizer gained the learned-harmonizer stage (learned, default_stage, survey,
// plan, learn_begin, learn_round, learned_state, load_learned_state, learn_result, replays, replay)
// and its structs (issue 10). 2 - Aggregator::client_settings() replaced by local_loss_term();
// PluginDesc gained default_for; LocalTrainer moved to local_trainer.h (issue 9). 1 - the first.

#endif  // CONCORD_PLUGIN_API_H
