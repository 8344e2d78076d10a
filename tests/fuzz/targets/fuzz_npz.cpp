// The .npz reader (plugins/datasets/npz, compiled into this target): the plugin registers itself
// in a registry here and loads the input as its `path`.
#include <concord/dataset.h>
#include <concord/registry.h>

#include "../fuzz_common.h"

using namespace concord;

extern "C" const concord_plugin_info* concord_plugin(void);

extern "C" int LLVMFuzzerTestOneInput(const uint8_t* data, size_t size) {
  static Registry* reg = [] {
    auto* r = new Registry;
    concord_plugin()->register_plugins(r);
    return r;
  }();
  const std::string file = concord::fuzz::write_input(data, size, ".npz");
  concord::fuzz::run([&] {
    const PluginDesc& d = reg->get(Kind::Dataset, "npz");
    auto ds = reg->create<Dataset>(Kind::Dataset, "npz",
                                   make_args("npz", d.args, {{"path", make_value(file)}}));
    Federation fed = ds->load(DataRequest{});
    (void)fed;
  });
  return 0;
}
