// The Channel: the only way coordinator and sites talk.
#pragma once

#include <concord/message.h>

#include <functional>
#include <map>
#include <string>
#include <vector>

namespace concord {

class Channel {
 public:
  virtual ~Channel() = default;
  // One request/reply exchange with a site (a unary call, as gRPC will make it). Throws
  // SiteError when the site fails or cannot be reached.
  virtual Bytes call(const std::string& site, const Bytes& request) = 0;
  virtual std::vector<std::string> sites() const = 0;
};

using SiteHandler = std::function<Bytes(const Bytes& request)>;

// In-process simulation: requests and replies are the encoded bytes a network channel sends.
class InProcessChannel : public Channel {
 public:
  void connect(const std::string& site, SiteHandler handler);
  Bytes call(const std::string& site, const Bytes& request) override;
  std::vector<std::string> sites() const override;
  size_t bytes_sent() const { return bytes_sent_; }
  size_t bytes_received() const { return bytes_received_; }

 private:
  std::map<std::string, SiteHandler> sites_;
  size_t bytes_sent_ = 0, bytes_received_ = 0;
};

}  // namespace concord
