// What `concord site` tells the server when it registers (concord/net/federation.h): the hello
// round-trips, a malformed instance is refused with the reason, and the server's count of site
// processes grows only when a new process (a new instance) registers, not when one reconnects.
#include <concord/error.h>
#include <concord/net/federation.h>

#include <gtest/gtest.h>

#include <nlohmann/json.hpp>

#include <set>
#include <vector>

using namespace concord;
using namespace concord::net;

namespace {

SiteHello hello(const std::string& instance) {
  SiteHello h;
  h.pipeline = std::string(64, 'a');
  h.shape.task = Task::Classification;
  h.shape.channels = 1;
  h.shape.num_classes = 2;
  h.shape.image_size = {24, 24};
  h.instance = instance;
  return h;
}

std::string refusal(const std::string& info) {
  try {
    decode_site_hello(info);
  } catch (const Error& e) {
    return e.what();
  }
  return "";
}

}  // namespace

TEST(NetFederation, SiteHelloRoundTripsWithItsInstance) {
  const std::string instance = new_site_instance();
  EXPECT_EQ(instance.size(), 32u);
  EXPECT_EQ(instance.find_first_not_of("0123456789abcdef"), std::string::npos) << instance;
  const SiteHello back = decode_site_hello(encode_site_hello(hello(instance)));
  EXPECT_EQ(back.instance, instance);
  EXPECT_EQ(back.pipeline, std::string(64, 'a'));
  EXPECT_TRUE(back.shape == hello(instance).shape);
  // Each process draws its own.
  std::set<std::string> drawn;
  for (int i = 0; i < 100; ++i) drawn.insert(new_site_instance());
  EXPECT_EQ(drawn.size(), 100u);
}

TEST(NetFederation, MalformedInstanceIsRefusedWithTheReason) {
  for (const std::string& bad :
       std::vector<std::string>{"", "XYZ", "0123-4567", std::string(65, 'a')}) {
    const std::string why = refusal(encode_site_hello(hello(bad)));
    EXPECT_NE(why.find("'instance' is not 1 to 64 lower-case hex digits"), std::string::npos)
        << "'" << bad << "': " << why;
  }
  nlohmann::json j = nlohmann::json::parse(encode_site_hello(hello("ab12")));
  j.erase("instance");
  EXPECT_NE(refusal(j.dump()).find("'instance' is missing or not text"), std::string::npos);
}

TEST(NetFederation, SiteStartsCountNewProcessesNotReconnections) {
  SiteStarts starts;
  EXPECT_EQ(starts.count("site-A"), 0u);
  starts.registered("site-A", "aa");
  EXPECT_EQ(starts.count("site-A"), 1u);
  starts.registered("site-A", "aa");  // the same process reconnects
  EXPECT_EQ(starts.count("site-A"), 1u);
  starts.registered("site-A", "bb");  // a new process took over
  EXPECT_EQ(starts.count("site-A"), 2u);
  starts.registered("site-A", "aa");  // and another (whatever its name)
  EXPECT_EQ(starts.count("site-A"), 3u);
  starts.registered("site-B", "aa");  // sites are counted apart
  EXPECT_EQ(starts.count("site-B"), 1u);
  EXPECT_EQ(starts.count("site-A"), 3u);
}
