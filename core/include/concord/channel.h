// The Channel: the only way coordinator and sites talk.
#pragma once

#include <concord/message.h>

#include <functional>
#include <map>
#include <string>

namespace concord {

class Channel {
 public:
  virtual ~Channel() = default;
  // One request/reply exchange with a site (a unary call, as gRPC will make it). Throws
  // SiteError when the site fails or cannot be reached.
  virtual Bytes call(const std::string& site, const Bytes& request) = 0;
  // How many calls, each to another site, may run at once from different threads: 1 when the
  // sites share this process (the simulation's model pool); more for sites in other processes.
  // The coordinator asks up to that many sites of an exchange in parallel.
  virtual size_t max_concurrent_calls() const { return 1; }
};

using SiteHandler = std::function<Bytes(const Bytes& request)>;

// In-process simulation: requests and replies are the encoded bytes a network channel sends.
class InProcessChannel : public Channel {
 public:
  void connect(const std::string& site, SiteHandler handler);
  Bytes call(const std::string& site, const Bytes& request) override;

 private:
  std::map<std::string, SiteHandler> sites_;
};

}  // namespace concord
