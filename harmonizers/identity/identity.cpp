// identity: a pass-through harmonizer. It takes part in the federated fit phase (each site
// reports its image count and mean intensity, the coordinator sums them) but leaves images
// unchanged: a baseline, and the smallest example of the Harmonizer contract.
#include <concord/harmonizer.h>

namespace concord {
namespace {

class Identity : public Harmonizer {
 public:
  Identity(const Args&, const BuildContext&) {}
  Stats fit_site(const ImageSource& images) override {
    Stats s;
    double sum = 0, n = 0;
    images([&](const Image& im) {
      for (float v : im.data) sum += v;
      n += double(im.data.size());
      s.weight += 1;
    });
    s.scalars["mean"] = n > 0 ? sum / n : 0;
    return s;
  }
  Stats combine(const std::vector<Stats>& parts) override {
    Stats out;
    double mean = 0;
    for (const auto& p : parts) out.weight += p.weight;
    for (const auto& p : parts)
      if (out.weight > 0) mean += p.scalars.at("mean") * p.weight / out.weight;
    out.scalars["mean"] = mean;
    return out;
  }
  void set_statistics(const Stats& global, const std::string&) override { global_ = global; }
  void apply(Image&) const override {}

 private:
  Stats global_;
};

}  // namespace
}  // namespace concord

CONCORD_PLUGIN("concord-harmonizer-identity", "0.1.0") {
  using namespace concord;
  registry.add({Kind::Harmonizer,
                "identity",
                "Pass-through harmonizer (fit phase only; images unchanged)",
                {},
                factory_of<Identity>()});
}
