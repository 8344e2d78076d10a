// The fault-injecting test channel (see concord/fault_injection.h).
#include <concord/error.h>
#include <concord/fault_injection.h>
#include <concord/protocol.h>

namespace concord::test_seam {

Bytes FaultInjectingChannel::call(const std::string& site, const Bytes& request) {
  if (!plan_.fail.empty()) {
    Message in = decode(request);
    auto it = plan_.fail.find({site, int(in.round)});
    if (it != plan_.fail.end() && protocol::request_kind(in) == protocol::Request::Train)
      throw SiteError(site, it->second);
  }
  Bytes reply = inner_.call(site, request);
  if (!plan_.tamper) return reply;
  Message out = decode(reply);
  plan_.tamper(site, out);
  return encode(out);
}

}  // namespace concord::test_seam
