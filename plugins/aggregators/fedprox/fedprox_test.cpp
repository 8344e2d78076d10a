#include <concord/model.h>

#include <ATen/ATen.h>

#include "aggregator_testing.h"

using namespace concord;
using namespace concord::aggtest;

namespace {

// The site's side as local training presents it: a built model and the global values received.
class Trainer : public LocalTrainer {
 public:
  Trainer(Model& m, std::map<std::string, at::Tensor> r) : model_(m), received_(std::move(r)) {}
  const std::string& site() const override { return site_; }
  int round() const override { return 1; }
  Model& model() override { return model_; }
  const std::map<std::string, at::Tensor>& received() const override { return received_; }
  TrainResult train(int, const ParamFilter&, const LossTerm&) override { return {}; }
  void recalibrate_batchnorm() override {}
  NamedArrays& site_store() override { return store_; }
  int64_t train_samples() const override { return 0; }
  bool has_trained() const override { return false; }

 private:
  std::string site_ = "a";
  Model& model_;
  std::map<std::string, at::Tensor> received_;
  NamedArrays store_;
};

std::unique_ptr<Model> small_cnn() {
  const Registry& reg = testkit::builtin_registry();
  auto m = reg.create<Model>(
      Kind::Model, "cnn",
      make_args("cnn", reg.get(Kind::Model, "cnn").args,
                {{"width", make_value(int64_t(4))}, {"depth", make_value(int64_t(1))}}));
  ModelSpec spec;
  spec.image_size = {8, 8};
  m->build(spec);
  return m;
}

}  // namespace

// FedProx's site-side term is mu/2 ||w - w_global||^2 over the trainable parameters, built by
// each site's own FedProx instance: mu never travels in a message.
TEST(FedProx, LocalTermIsHalfMuTimesSquaredDistanceToTheGlobalModel) {
  auto model = small_cnn();
  std::map<std::string, at::Tensor> received;
  int64_t params = 0;
  for (const StateEntry& e : model->state())
    if (e.is_parameter) {
      received[e.name] = e.tensor.detach().clone() + 2;  // every weight 2 away from the global one
      params += e.tensor.numel();
    }
  ASSERT_GT(params, 0);
  Trainer t(*model, received);
  LossTerm term = make("fedprox", {{"mu", make_value(0.05)}})->local_loss_term(t);
  ASSERT_TRUE(term);
  EXPECT_NEAR(term().item<double>(), 0.05 / 2 * 4 * double(params), 1e-3 * double(params));

  // Frozen parameters (no gradient this call) are constants: left out of the term.
  for (const StateEntry& e : model->state())
    if (e.is_parameter) e.tensor.set_requires_grad(false);
  EXPECT_EQ(term().item<double>(), 0.0);

  EXPECT_FALSE(make("fedprox", {{"mu", make_value(0.0)}})->local_loss_term(t)) << "mu 0 is FedAvg";
  EXPECT_FALSE(make("fedavg")->local_loss_term(t));
}

TEST(FedProx, AveragesLikeFedAvg) {
  auto prox = make("fedprox", {{"mu", make_value(0.05)}});
  NamedArrays global{{"w", vec({0, 0})}};
  std::vector<SiteUpdate> ups = {update("a", {{"w", vec({1, 2})}}, 1),
                                 update("b", {{"w", vec({4, 8})}}, 3)};
  const NamedArrays out = prox->aggregate(global, ups, {1, 1, 0});
  EXPECT_FLOAT_EQ(values(out, "w")[0], (1 * 1 + 3 * 4) / 4.0f);
  EXPECT_FLOAT_EQ(values(out, "w")[1], (1 * 2 + 3 * 8) / 4.0f);
  EXPECT_TRUE(identical(out, make("fedavg")->aggregate(global, ups, {1, 1, 0})));
}

TEST(FedProx, RejectsNegativeMu) {
  const auto& desc = testkit::builtin_registry().get(Kind::Aggregator, "fedprox");
  EXPECT_THROW(make_args("fedprox", desc.args, {{"mu", make_value(-1.0)}}), Error);
}
