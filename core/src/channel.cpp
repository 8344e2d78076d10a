#include <concord/channel.h>
#include <concord/error.h>

namespace concord {

void InProcessChannel::connect(const std::string& site, SiteHandler handler) {
  sites_[site] = std::move(handler);
}

Bytes InProcessChannel::call(const std::string& site, const Bytes& request) {
  auto it = sites_.find(site);
  if (it == sites_.end()) throw SiteError(site, "not connected to the channel");
  Bytes reply;
  try {
    reply = it->second(request);
  } catch (const SiteError&) {
    throw;
  } catch (const std::exception& e) {
    throw SiteError(site, e.what());
  }
  if (!reply) throw SiteError(site, "sent no reply");
  // A reply is bytes from a peer: checked here with decode's limits (size, lengths, counts,
  // shapes) so a corrupt one is this site's failure, reported by name, like a network error.
  try {
    decode(reply);
  } catch (const Error& e) {
    throw SiteError(site, std::string("sent a corrupt reply: ") + e.what());
  }
  return reply;
}

}  // namespace concord
