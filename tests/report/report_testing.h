// Run folders written by hand for the report tests (the browser tests use real runs).
#pragma once

#include <nlohmann/json.hpp>

#include <filesystem>
#include <fstream>
#include <string>
#include <vector>

namespace testing_report {

// A site name that would run script, load an image or end elements if it were not escaped.
inline const char* const kHostileName =
    "<img src=x onerror=\"window.__pwned=1\"></script><script>window.__pwned=2</script>&amp;'";

// A valid 1x1 RGBA PNG.
inline const unsigned char kTinyPng[] = {
    0x89, 0x50, 0x4e, 0x47, 0x0d, 0x0a, 0x1a, 0x0a, 0x00, 0x00, 0x00, 0x0d, 0x49, 0x48,
    0x44, 0x52, 0x00, 0x00, 0x00, 0x01, 0x00, 0x00, 0x00, 0x01, 0x08, 0x06, 0x00, 0x00,
    0x00, 0x1f, 0x15, 0xc4, 0x89, 0x00, 0x00, 0x00, 0x0d, 0x49, 0x44, 0x41, 0x54, 0x78,
    0xda, 0x63, 0x64, 0x60, 0xf8, 0x5f, 0x0f, 0x00, 0x02, 0x87, 0x01, 0x80, 0xeb, 0x47,
    0xba, 0x92, 0x00, 0x00, 0x00, 0x00, 0x49, 0x45, 0x4e, 0x44, 0xae, 0x42, 0x60, 0x82};

// pipeline.yaml ({SEED} replaced), metrics.jsonl (two rounds) and summary.json with accuracy.
struct FakeRun {
  std::filesystem::path dir;
  int seed;
  std::string pipeline;
  std::vector<std::pair<std::string, double>> sites;
  nlohmann::json notes = nlohmann::json::object();
  nlohmann::json summary_extra = nlohmann::json::object();  // merged into summary.json

  FakeRun(std::filesystem::path d, int s, std::string p)
      : dir(std::move(d)), seed(s), pipeline(std::move(p)) {}
  FakeRun& site(const std::string& name, double accuracy) {
    sites.emplace_back(name, accuracy);
    return *this;
  }
  void write() const {
    std::filesystem::create_directories(dir);
    std::string p = pipeline;
    p.replace(p.find("{SEED}"), 6, std::to_string(seed));
    std::ofstream(dir / "pipeline.yaml") << p;
    std::ofstream m(dir / "metrics.jsonl");
    nlohmann::json js{{"name", "fake"},
                      {"seed", seed},
                      {"rounds", 2},
                      {"ok", true},
                      {"failures", nlohmann::json::array()},
                      {"data_notes", notes}};
    js["sites"] = nlohmann::json::array();
    for (int round = 1; round <= 2; ++round)
      for (const auto& [name, acc] : sites) {
        nlohmann::json j{
            {"round", round},      {"site", name},
            {"held_out", false},   {"train_loss", 1.0 / round},
            {"num_samples", 10.0}, {"metrics", {{"accuracy", round == 2 ? acc : acc / 2}}}};
        m << j.dump(-1, ' ', false, nlohmann::json::error_handler_t::replace) << "\n";
      }
    for (const auto& [name, acc] : sites)
      js["sites"].push_back(
          {{"site", name}, {"held_out", false}, {"metrics", {{"accuracy", acc}}}});
    for (const auto& [k, v] : summary_extra.items()) js[k] = v;
    std::ofstream(dir / "summary.json")
        << js.dump(2, ' ', false, nlohmann::json::error_handler_t::replace);
  }
};

}  // namespace testing_report
