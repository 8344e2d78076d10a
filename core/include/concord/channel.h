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
  // True when call() may run for several sites at once from different threads (sites in other
  // processes); the coordinator then asks the sites of an exchange in parallel.
  virtual bool concurrent() const { return false; }
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
