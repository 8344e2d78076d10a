// Shared by bench/engine and bench/net_round: sites whose local training is a no-op (they upload
// the state they received), a model of a given size, and the fedavg plugin.
#pragma once

#include <concord/engine.h>
#include <concord/protocol.h>
#include <concord/registry.h>

#include <algorithm>
#include <memory>
#include <mutex>
#include <string>

namespace concord::bench {

struct NoopSite {
  std::string name;
  NamedArrays global;  // views into the broadcast buffer
  std::mutex mu;       // a network site's handler may run on another thread than its creator
  Bytes handle(const Bytes& b) {
    Message in = decode(b);
    std::lock_guard<std::mutex> lock(mu);
    if (protocol::request_kind(in) == protocol::Request::Broadcast) {
      global = std::move(in.arrays);
      return encode(protocol::ack(name, in.round));
    }
    // No-op training: upload the received state.
    return encode(protocol::update(name, in.round, global, 100, 0, 0));
  }
};

inline std::unique_ptr<Aggregator> fedavg(Registry& reg) {
  load_plugins(reg, {});
  const PluginDesc& d = reg.get(Kind::Aggregator, "fedavg");
  return reg.create<Aggregator>(Kind::Aggregator, "fedavg", make_args("fedavg", d.args));
}

// `params` float32 values in a realistic split into tensors: a few large, many small (like a
// CNN's convolutions and BatchNorms).
inline NamedArrays model(int64_t params) {
  NamedArrays m;
  int64_t left = params;
  for (int i = 0; left > 0; ++i) {
    int64_t n = std::min<int64_t>(left, i % 4 == 3 ? 512 : params / 8 + 1);
    Array a = Array::uninitialized(DType::F32, {n});
    float* p = a.data<float>();
    for (int64_t k = 0; k < n; ++k) p[k] = float((k * 2654435761u) % 1000) * 1e-3f;
    m["layer" + std::to_string(1000 + i)] = a;
    left -= n;
  }
  return m;
}

}  // namespace concord::bench
