// Unit tests of the adapter plugins (batchnorm, split, finetune, ditto), built through the
// plugin registry and exercised on a small real network with a real SGD LocalTrainer.
#include <concord/adapter.h>
#include <concord/tensor_bridge.h>

#include "adapter_common.h"
#include "test_model.h"
#include "testing.h"

#include <ATen/ATen.h>

using namespace concord;
using adapter_testing::make_tiny_net;
using adapter_testing::SgdTrainer;

namespace {

std::unique_ptr<Adapter> make_adapter(const std::string& name,
                                      const std::map<std::string, Value>& args = {}) {
  const Registry& reg = testkit::builtin_registry();
  return reg.create<Adapter>(Kind::Adapter, name,
                             make_args(name, reg.get(Kind::Adapter, name).args, args));
}

Value list(std::vector<std::string> v) {
  return make_value(v);
}

bool same(const Array& a, const Array& b) {
  return to_tensor(a).equal(to_tensor(b));
}

bool same_all(const NamedArrays& a, const NamedArrays& b) {
  if (a.size() != b.size()) return false;
  for (const auto& [k, v] : a)
    if (!b.count(k) || !same(v, b.at(k))) return false;
  return true;
}

// Names of the parameters whose values differ between two snapshots.
std::set<std::string> changed_params(Model& model, const NamedArrays& before,
                                     const NamedArrays& after) {
  std::set<std::string> out;
  for (const StateEntry& e : model.state())
    if (e.is_parameter && !same(before.at(e.name), after.at(e.name))) out.insert(e.name);
  return out;
}

std::set<std::string> params_where(Model& model, const std::function<bool(const StateEntry&)>& f) {
  std::set<std::string> out;
  for (const StateEntry& e : model.state())
    if (e.is_parameter && f(e)) out.insert(e.name);
  return out;
}

const StateEntry& entry(const std::vector<StateEntry>& state, const std::string& name) {
  for (const StateEntry& e : state)
    if (e.name == name) return e;
  throw Error("test: no entry " + name);
}

std::string error_of(const std::function<void()>& f) {
  try {
    f();
  } catch (const Error& e) {
    return e.what();
  }
  return "<no error>";
}

double distance(const NamedArrays& a, const NamedArrays& b, Model& model) {
  double d = 0;
  for (const StateEntry& e : model.state())
    if (e.is_parameter)
      d += (to_tensor(a.at(e.name)) - to_tensor(b.at(e.name))).pow(2).sum().item<double>();
  return std::sqrt(d);
}

}  // namespace

// ---------------------------------------------------------------------------------------------
// batchnorm

TEST(BatchNormTypes, DecidedByModuleTypeOnly) {
  using adapters::is_batchnorm_type;
  EXPECT_TRUE(is_batchnorm_type("BatchNorm1d"));
  EXPECT_TRUE(is_batchnorm_type("BatchNorm2d"));
  EXPECT_TRUE(is_batchnorm_type("BatchNorm3d"));
  EXPECT_TRUE(is_batchnorm_type("torch::nn::BatchNorm2dImpl"));
  EXPECT_TRUE(is_batchnorm_type("__torch__.torch.nn.modules.batchnorm.BatchNorm2d"));
  EXPECT_TRUE(
      is_batchnorm_type("__torch__.torch.nn.modules.batchnorm.___torch_mangle_3.BatchNorm3d"));
  EXPECT_TRUE(is_batchnorm_type("SyncBatchNorm"));
  EXPECT_FALSE(is_batchnorm_type("Conv2d"));
  EXPECT_FALSE(is_batchnorm_type("InstanceNorm2d"));
  EXPECT_FALSE(is_batchnorm_type("GroupNorm"));
  EXPECT_FALSE(is_batchnorm_type("bn"));
  EXPECT_FALSE(is_batchnorm_type("BatchNorm2dWrapper"));
  EXPECT_FALSE(is_batchnorm_type("__torch__.model.bn_block"));
}

TEST(BatchNormAdapter, ClassifiesStatePerPolicyByModuleType) {
  auto model = make_tiny_net(2, 2, 1);
  const auto state = model->state();
  // The fixture has what the test is about: a BatchNorm without "bn" in its path and a
  // non-BatchNorm with "bn" in its path.
  ASSERT_EQ(entry(state, "norm.running_mean").module_type, "BatchNorm2d");
  ASSERT_EQ(entry(state, "bn_conv.weight").module_type, "Conv2d");
  ASSERT_EQ(entry(state, "features.bn1.weight").module_type, "BatchNorm2d");

  for (const std::string policy : {"shared", "stats-local", "local"}) {
    SCOPED_TRACE(policy);
    auto a = make_adapter("batchnorm", {{"policy", make_value(policy)}});
    a->attach(*model);
    int local = 0;
    for (const StateEntry& e : state) {
      const bool bn = e.module_path == "norm" || e.module_path == "features.bn1";
      const bool expected = policy == "shared"        ? true
                            : policy == "stats-local" ? (!bn || e.is_parameter)
                                                      : !bn;
      EXPECT_EQ(a->is_shared(e), expected) << e.name;
      local += !a->is_shared(e);
    }
    // norm and features.bn1: 2 parameters + 3 buffers each.
    EXPECT_EQ(local, policy == "shared" ? 0 : policy == "stats-local" ? 6 : 10);
    EXPECT_TRUE(a->is_shared(entry(state, "bn_conv.weight")));
    EXPECT_TRUE(a->is_shared(entry(state, "bn_conv.bias")));
  }

  // A TorchScript module reports its qualified type name.
  StateEntry scripted{"body.x.running_var", at::ones({3}), false, "body.x",
                      "__torch__.torch.nn.modules.batchnorm.___torch_mangle_1.BatchNorm3d"};
  StateEntry scripted_gamma{"body.x.weight", at::ones({3}), true, "body.x",
                            "__torch__.torch.nn.modules.batchnorm.BatchNorm3d"};
  auto stats_local = make_adapter("batchnorm", {{"policy", make_value("stats-local")}});
  EXPECT_FALSE(stats_local->is_shared(scripted));
  EXPECT_TRUE(stats_local->is_shared(scripted_gamma));
  auto fedbn = make_adapter("batchnorm", {{"policy", make_value("local")}});
  EXPECT_FALSE(fedbn->is_shared(scripted_gamma));
}

TEST(BatchNormAdapter, PolicyIsRequiredAndGlobalStatisticsNeedPolicyShared) {
  EXPECT_THROW(make_adapter("batchnorm"), Error);
  EXPECT_THROW(make_adapter("batchnorm", {{"policy", make_value("siloBN")}}), Error);
  for (const std::string policy : {"stats-local", "local"}) {
    const std::string msg = error_of([&] {
      make_adapter("batchnorm", {{"policy", make_value(policy)}, {"unseen", make_value("global")}});
    });
    EXPECT_NE(msg.find("use unseen: adapt"), std::string::npos) << msg;
  }
  EXPECT_NO_THROW(make_adapter(
      "batchnorm", {{"policy", make_value("shared")}, {"unseen", make_value("global")}}));
}

TEST(BatchNormAdapter, RefusesALocalPolicyOnAModelWithoutBatchNorm) {
  auto plain = make_tiny_net(2, 2, 1, /*with_batchnorm=*/false);
  auto fedbn = make_adapter("batchnorm", {{"policy", make_value("local")}});
  const std::string msg = error_of([&] { fedbn->attach(*plain); });
  EXPECT_NE(msg.find("no BatchNorm module"), std::string::npos) << msg;
  EXPECT_NE(msg.find("Conv2d"), std::string::npos) << msg;
  EXPECT_NO_THROW(make_adapter("batchnorm", {{"policy", make_value("shared")}})->attach(*plain));
}

TEST(BatchNormAdapter, UnseenSiteReestimatesStatisticsWithoutTouchingWeights) {
  auto model = make_tiny_net(2, 2, 1);
  SgdTrainer site("held-out", *model, 32, 2, /*offset=*/3.0f, 7);
  const NamedArrays before = adapters::snapshot(*model);

  auto global = make_adapter("batchnorm",
                             {{"policy", make_value("shared")}, {"unseen", make_value("global")}});
  global->prepare_unseen_site(site);
  EXPECT_EQ(site.recalibrations(), 0);
  EXPECT_TRUE(same_all(before, adapters::snapshot(*model)));

  auto adapt = make_adapter("batchnorm", {{"policy", make_value("stats-local")}});
  adapt->prepare_unseen_site(site);
  EXPECT_EQ(site.recalibrations(), 1);
  EXPECT_TRUE(site.calls().empty());  // no labels, no training
  const at::Tensor mean = entry(model->state(), "norm.running_mean").tensor;
  const at::Tensor data_mean = site.inputs().mean({0, 2, 3});
  EXPECT_TRUE(mean.allclose(data_mean, 1e-4, 1e-4)) << mean << data_mean;
  EXPECT_GT(mean.min().item<float>(), 2.5f);
  EXPECT_TRUE(changed_params(*model, before, adapters::snapshot(*model)).empty());
}

TEST(BatchNormAdapter, LateJoinerReestimatesOnceBeforeItsFirstTraining) {
  auto model = make_tiny_net(2, 2, 1);
  SgdTrainer site("late", *model, 16, 2, 3.0f, 7);
  auto fedbn = make_adapter("batchnorm", {{"policy", make_value("local")}});
  fedbn->train_local(site, 1);
  EXPECT_EQ(site.recalibrations(), 1);
  ASSERT_EQ(site.calls().size(), 1u);
  EXPECT_EQ(site.calls()[0].epochs, 1);
  fedbn->train_local(site, 2);  // has trained now: its statistics are its own
  EXPECT_EQ(site.recalibrations(), 1);
  EXPECT_EQ(site.calls().size(), 2u);
}

// ---------------------------------------------------------------------------------------------
// split

TEST(SplitAdapter, AttachValidatesModulePathsAgainstTheModel) {
  auto model = make_tiny_net(2, 2, 1);
  auto unknown =
      make_adapter("split", {{"shared", list({"encoder"})}, {"local", list({"decoder"})}});
  std::string msg = error_of([&] { unknown->attach(*model); });
  EXPECT_NE(msg.find("unknown module path 'encoder'"), std::string::npos) << msg;
  for (const char* valid : {"norm", "bn_conv", "features", "features.bn1", "classifier"})
    EXPECT_NE(msg.find(valid), std::string::npos) << msg;

  // A prefix must be whole path components.
  msg = error_of([&] { make_adapter("split", {{"local", list({"class"})}})->attach(*model); });
  EXPECT_NE(msg.find("unknown module path 'class'"), std::string::npos) << msg;

  msg = error_of([&] {
    make_adapter("split", {{"shared", list({"features"})}, {"local", list({"features"})}});
  });
  EXPECT_NE(msg.find("both shared and local"), std::string::npos) << msg;
  EXPECT_THROW(make_adapter("split"), Error);

  // With both lists, every module holding state must be covered.
  msg = error_of([&] {
    make_adapter("split", {{"shared", list({"features"})}, {"local", list({"classifier"})}})
        ->attach(*model);
  });
  EXPECT_NE(msg.find("neither shared nor local: norm, bn_conv"), std::string::npos) << msg;

  // The orientation must match the mode.
  const auto body = list({"norm", "bn_conv", "features"});
  msg = error_of([&] {
    make_adapter("split", {{"local", body}, {"shared", list({"classifier"})}})->attach(*model);
  });
  EXPECT_NE(msg.find("use mode: lg"), std::string::npos) << msg;
  EXPECT_NO_THROW(
      make_adapter("split",
                   {{"mode", make_value("lg")}, {"local", body}, {"shared", list({"classifier"})}})
          ->attach(*model));
  msg = error_of([&] {
    make_adapter("split", {{"mode", make_value("lg")}, {"local", list({"classifier"})}})
        ->attach(*model);
  });
  EXPECT_NE(msg.find("mode: fedper or fedrep"), std::string::npos) << msg;
}

TEST(SplitAdapter, LongestPrefixDecidesAndOneListImpliesTheOther) {
  auto model = make_tiny_net(2, 2, 1);
  const auto state = model->state();
  auto a = make_adapter("split", {{"shared", list({"norm", "bn_conv", "features"})},
                                  {"local", list({"classifier", "features.bn1"})}});
  a->attach(*model);
  EXPECT_TRUE(a->is_shared(entry(state, "features.conv.weight")));
  EXPECT_FALSE(a->is_shared(entry(state, "features.bn1.weight")));
  EXPECT_FALSE(a->is_shared(entry(state, "features.bn1.running_mean")));
  EXPECT_FALSE(a->is_shared(entry(state, "classifier.bias")));
  EXPECT_TRUE(a->is_shared(entry(state, "norm.running_var")));

  auto head_only = make_adapter("split", {{"local", list({"classifier"})}});
  head_only->attach(*model);
  for (const StateEntry& e : state)
    EXPECT_EQ(head_only->is_shared(e), e.module_path != "classifier") << e.name;
}

TEST(SplitAdapter, FedRepFreezesExactlyTheDeclaredParts) {
  auto model = make_tiny_net(2, 2, 1);
  SgdTrainer site("a", *model, 16, 2, 0.5f, 3);
  auto fedrep = make_adapter("split", {{"mode", make_value("fedrep")},
                                       {"local", list({"classifier"})},
                                       {"head_epochs", make_value(int64_t(2))},
                                       {"body_epochs", make_value(int64_t(1))}});
  fedrep->attach(*model);
  const auto head =
      params_where(*model, [](const StateEntry& e) { return e.module_path == "classifier"; });
  const auto body =
      params_where(*model, [](const StateEntry& e) { return e.module_path != "classifier"; });
  ASSERT_EQ(head.size(), 2u);

  const TrainResult r = fedrep->train_local(site, 5);
  ASSERT_EQ(site.calls().size(), 2u);
  const auto& head_phase = site.calls()[0];
  const auto& body_phase = site.calls()[1];
  EXPECT_EQ(head_phase.epochs, 2);
  EXPECT_EQ(head_phase.trainable, head);
  EXPECT_EQ(changed_params(*model, head_phase.before, head_phase.after), head);
  EXPECT_EQ(body_phase.epochs, 1);
  EXPECT_EQ(body_phase.trainable, body);
  EXPECT_EQ(changed_params(*model, body_phase.before, body_phase.after), body);
  EXPECT_EQ(r.steps, 3 * 4);  // 16 samples in batches of 4, 3 epochs over both phases

  // body_epochs 0: the body follows the pipeline's local_epochs.
  auto fedrep_default =
      make_adapter("split", {{"mode", make_value("fedrep")}, {"local", list({"classifier"})}});
  site.clear_calls();
  fedrep_default->train_local(site, 5);
  ASSERT_EQ(site.calls().size(), 2u);
  EXPECT_EQ(site.calls()[0].epochs, 1);
  EXPECT_EQ(site.calls()[1].epochs, 5);

  // fedper trains everything jointly, once.
  auto fedper = make_adapter("split", {{"local", list({"classifier"})}});
  site.clear_calls();
  fedper->train_local(site, 2);
  ASSERT_EQ(site.calls().size(), 1u);
  EXPECT_EQ(site.calls()[0].epochs, 2);
  EXPECT_EQ(site.calls()[0].trainable.size(), head.size() + body.size());
}

// ---------------------------------------------------------------------------------------------
// ditto

TEST(Ditto, UploadsTheGlobalUpdateAndKeepsThePersonalModelAcrossRounds) {
  auto model = make_tiny_net(2, 2, 1);
  SgdTrainer site("a", *model, 16, 2, 0.5f, 3);
  auto ditto =
      make_adapter("ditto", {{"lambda", make_value(0.5)}, {"epochs", make_value(int64_t(2))}});
  ditto->attach(*model);
  for (const StateEntry& e : model->state()) EXPECT_TRUE(ditto->is_shared(e));
  EXPECT_TRUE(ditto->personalizes());

  const NamedArrays g0 = adapters::snapshot(*model);
  site.receive(g0, 1);
  ditto->train_local(site, 1);
  ASSERT_EQ(site.calls().size(), 2u);
  const auto& global_phase = site.calls()[0];
  const auto& personal_phase = site.calls()[1];
  EXPECT_EQ(global_phase.epochs, 1);
  EXPECT_FALSE(global_phase.had_extra);  // the global update is plain FedAvg training
  EXPECT_EQ(personal_phase.epochs, 2);
  EXPECT_TRUE(personal_phase.had_extra);             // the proximal term
  EXPECT_TRUE(same_all(personal_phase.before, g0));  // v starts as the first global model
  // The model left for upload is the global update, not the personal model.
  EXPECT_TRUE(same_all(adapters::snapshot(*model), global_phase.after));
  const NamedArrays personal1 = adapters::take_prefixed(site.site_store(), "ditto.personal/");
  EXPECT_TRUE(same_all(personal1, personal_phase.after));
  EXPECT_FALSE(same_all(personal1, global_phase.after));

  // Round 2, with a new global model: v continues from round 1, the proximal target moves.
  const NamedArrays g1 = global_phase.after;
  site.clear_calls();
  site.receive(g1, 2);
  ditto->train_local(site, 1);
  ASSERT_EQ(site.calls().size(), 2u);
  EXPECT_TRUE(same_all(site.calls()[0].before, g1));
  EXPECT_TRUE(same_all(site.calls()[1].before, personal1));
  const NamedArrays personal2 = adapters::take_prefixed(site.site_store(), "ditto.personal/");
  EXPECT_TRUE(same_all(personal2, site.calls()[1].after));
  EXPECT_FALSE(same_all(personal2, personal1));
}

TEST(Ditto, LambdaPullsThePersonalModelTowardsTheGlobalOne) {
  double dist[2];
  const double lambdas[2] = {0.0, 10.0};
  for (int i = 0; i < 2; ++i) {
    auto model = make_tiny_net(2, 2, 1);
    SgdTrainer site("a", *model, 16, 2, 0.5f, 3);
    auto ditto = make_adapter(
        "ditto", {{"lambda", make_value(lambdas[i])}, {"epochs", make_value(int64_t(3))}});
    const NamedArrays g0 = adapters::snapshot(*model);
    site.receive(g0, 1);
    ditto->train_local(site, 1);
    EXPECT_EQ(site.calls()[1].had_extra, lambdas[i] > 0);
    dist[i] = distance(adapters::take_prefixed(site.site_store(), "ditto.personal/"), g0, *model);
  }
  EXPECT_GT(dist[0], 0);
  EXPECT_LT(dist[1], 0.5 * dist[0]) << dist[0] << " vs " << dist[1];
}

TEST(Ditto, PersonalizedEvaluationUsesThePersonalModelGlobalOnesDoNot) {
  auto model = make_tiny_net(2, 2, 1);
  SgdTrainer site("a", *model, 16, 2, 0.5f, 3);
  auto ditto = make_adapter("ditto");
  const NamedArrays g0 = adapters::snapshot(*model);
  site.receive(g0, 1);
  ditto->train_local(site, 1);
  const NamedArrays global = adapters::snapshot(*model);
  const NamedArrays personal = adapters::take_prefixed(site.site_store(), "ditto.personal/");

  ditto->before_evaluate(site);  // a regular (global) evaluation
  EXPECT_TRUE(same_all(adapters::snapshot(*model), global));

  site.clear_calls();
  ditto->personalize(site);
  EXPECT_TRUE(site.calls().empty());  // the personal model already exists
  EXPECT_TRUE(same_all(adapters::snapshot(*model), personal));
  site.receive(global, 1);  // the engine reloads the global state before evaluating
  ditto->before_evaluate(site);
  EXPECT_TRUE(same_all(adapters::snapshot(*model), personal));

  // A site that never trained fits a personal model from the final global one.
  auto model2 = make_tiny_net(2, 2, 1);
  adapters::restore(*model2, global, "test");
  SgdTrainer unseen("held-out", *model2, 16, 2, 1.5f, 9);
  ditto->personalize(unseen);
  ASSERT_EQ(unseen.calls().size(), 1u);
  EXPECT_TRUE(unseen.calls()[0].had_extra);
  const NamedArrays fitted = adapters::take_prefixed(unseen.site_store(), "ditto.personal/");
  EXPECT_FALSE(fitted.empty());
  EXPECT_FALSE(same_all(fitted, global));
  EXPECT_TRUE(same_all(adapters::snapshot(*model2), fitted));
}

// ---------------------------------------------------------------------------------------------
// finetune

TEST(FineTune, FineTunesAfterFederationAndKeepsItForThePersonalizedEvaluation) {
  auto model = make_tiny_net(2, 2, 1);
  SgdTrainer site("a", *model, 16, 2, 0.5f, 3);
  auto ft = make_adapter("finetune", {{"epochs", make_value(int64_t(3))}});
  ft->attach(*model);
  EXPECT_TRUE(ft->personalizes());
  for (const StateEntry& e : model->state()) EXPECT_TRUE(ft->is_shared(e));
  ft->train_local(site, 2);  // federation: plain local training
  ASSERT_EQ(site.calls().size(), 1u);
  EXPECT_EQ(site.calls()[0].epochs, 2);

  const NamedArrays global = adapters::snapshot(*model);
  ft->before_evaluate(site);
  EXPECT_TRUE(same_all(adapters::snapshot(*model), global));
  site.clear_calls();
  ft->personalize(site);
  ASSERT_EQ(site.calls().size(), 1u);
  EXPECT_EQ(site.calls()[0].epochs, 3);
  const NamedArrays tuned = adapters::snapshot(*model);
  EXPECT_EQ(changed_params(*model, global, tuned).size(), site.calls()[0].trainable.size());
  site.receive(global, 1);  // the engine reloads the global state before evaluating
  ft->before_evaluate(site);
  EXPECT_TRUE(same_all(adapters::snapshot(*model), tuned));
}

TEST(FineTune, ModulesRestrictWhatIsFineTuned) {
  auto model = make_tiny_net(2, 2, 1);
  SgdTrainer site("a", *model, 16, 2, 0.5f, 3);
  auto head = make_adapter("finetune", {{"modules", list({"classifier"})}});
  head->attach(*model);
  const NamedArrays before = adapters::snapshot(*model);
  head->personalize(site);
  const std::set<std::string> expected = {"classifier.bias", "classifier.weight"};
  EXPECT_EQ(site.calls().at(0).trainable, expected);
  EXPECT_EQ(changed_params(*model, before, adapters::snapshot(*model)), expected);

  std::string msg = error_of([&] {
    make_adapter("finetune", {{"modules", list({"head"})}})->attach(*model);
  });
  EXPECT_NE(msg.find("unknown module path 'head'"), std::string::npos) << msg;

  SgdTrainer empty("empty-site", *model, 0, 2, 0.f, 3);
  msg = error_of([&] { head->personalize(empty); });
  EXPECT_NE(msg.find("site 'empty-site' has no training samples"), std::string::npos) << msg;
}
