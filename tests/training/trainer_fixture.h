// One site's LocalTraining over data a test makes (tests/training): everything its Context points
// to, owned here.
#pragma once

#include "local_training.h"

#include <map>
#include <memory>
#include <string>
#include <vector>

namespace concord::testkit {

struct TrainerFixture {
  std::string site = "site-A";
  PipelineConfig::Training training;
  SiteData data;
  std::vector<Harmonizer*> augmenters;
  NamedArrays store;
  std::map<std::string, at::Tensor> received;
  int64_t calls = 0;
  std::unique_ptr<Model> model;
  Task task = Task::Classification;
  uint64_t seed = 0;

  LocalTraining trainer(int round = 1) {
    LocalTraining::Context c;
    c.site = &site;
    c.training = &training;
    c.seed = seed;
    c.task = task;
    c.data = &data;
    c.model = model.get();
    c.augmenters = &augmenters;
    c.store = &store;
    c.received = &received;
    c.calls = &calls;
    return LocalTraining(c, round);
  }
};

}  // namespace concord::testkit
