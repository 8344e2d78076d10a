// Registration info of concord server / concord site (federation.h).
#include <concord/error.h>
#include <concord/net/federation.h>
#include <concord/net/pki.h>

#include <spdlog/fmt/fmt.h>
#include <yaml-cpp/yaml.h>
#include <nlohmann/json.hpp>

#include <random>

namespace concord::net {

std::string pipeline_fingerprint(const PipelineConfig& config) {
  YAML::Node root = YAML::Load(config.resolved_yaml);
  if (YAML::Node data = root["data"]; data && data.IsMap()) {
    data.remove("dataset");
    data.remove("partition");
    data.remove("scanner_shift");
  }
  if (YAML::Node training = root["training"]; training && training.IsMap())
    training.remove("threads");
  root.remove("output");
  YAML::Emitter em;
  em.SetDoublePrecision(15);
  em << root;
  return sha256_hex(em.c_str());
}

namespace {

nlohmann::json parse(const std::string& info, const char* what) {
  try {
    nlohmann::json j = nlohmann::json::parse(info);
    if (!j.is_object()) throw Error("not a JSON object");
    return j;
  } catch (const std::exception& e) {
    throw Error(std::string(what) + " is not what this build sends (" + e.what() +
                "): is it an older or newer concord?");
  }
}

int64_t whole(const nlohmann::json& j, const char* key, int64_t lo, int64_t hi) {
  if (!j.contains(key) || !j[key].is_number_integer())
    throw Error(std::string("'") + key + "' is missing or not a whole number");
  const int64_t v = j[key].get<int64_t>();
  if (v < lo || v > hi)
    throw Error(std::string("'") + key + "' = " + std::to_string(v) + " is outside [" +
                std::to_string(lo) + ", " + std::to_string(hi) + "]");
  return v;
}

std::string text(const nlohmann::json& j, const char* key) {
  if (!j.contains(key) || !j[key].is_string())
    throw Error(std::string("'") + key + "' is missing or not text");
  return j[key].get<std::string>();
}

}  // namespace

std::string encode_site_hello(const SiteHello& h) {
  nlohmann::json j;
  j["pipeline"] = h.pipeline;
  j["task"] = task_name(h.shape.task);
  j["channels"] = h.shape.channels;
  j["classes"] = h.shape.num_classes;
  j["width"] = h.shape.image_size[0];
  j["height"] = h.shape.image_size[1];
  j["instance"] = h.instance;
  return j.dump();
}

SiteHello decode_site_hello(const std::string& info) {
  const nlohmann::json j = parse(info, "the site's registration");
  SiteHello h;
  try {
    h.pipeline = text(j, "pipeline");
    const std::string task = text(j, "task");
    if (task != task_name(Task::Classification) && task != task_name(Task::Segmentation))
      throw Error("unknown task '" + task + "'");
    h.shape.task =
        task == task_name(Task::Classification) ? Task::Classification : Task::Segmentation;
    h.shape.channels = int(whole(j, "channels", 1, 1024));
    h.shape.num_classes = int(whole(j, "classes", 1, 1 << 20));
    h.shape.image_size = {whole(j, "width", 1, 1 << 20), whole(j, "height", 1, 1 << 20)};
    h.instance = text(j, "instance");
    if (h.instance.empty() || h.instance.size() > 64 ||
        h.instance.find_first_not_of("0123456789abcdef") != std::string::npos)
      throw Error("'instance' is not 1 to 64 lower-case hex digits");
  } catch (const Error& e) {
    throw Error(std::string("the site's registration: ") + e.what());
  }
  return h;
}

std::string new_site_instance() {
  std::random_device os;  // /dev/urandom on Linux
  std::string out;
  for (int i = 0; i < 4; ++i) out += fmt::format("{:08x}", uint32_t(os()));
  return out;
}

void SiteStarts::registered(const std::string& site, const std::string& instance) {
  std::lock_guard<std::mutex> lock(mu_);
  auto& [last, count] = seen_[site];
  if (count == 0 || last != instance) ++count;
  last = instance;
}

uint64_t SiteStarts::count(const std::string& site) const {
  std::lock_guard<std::mutex> lock(mu_);
  auto it = seen_.find(site);
  return it == seen_.end() ? 0 : it->second.second;
}

std::string encode_server_welcome(const ServerWelcome& w) {
  return nlohmann::json{{"pipeline", w.pipeline}, {"session", w.session}}.dump();
}

ServerWelcome decode_server_welcome(const std::string& info) {
  const nlohmann::json j = parse(info, "the server's welcome");
  try {
    return {text(j, "pipeline"), text(j, "session")};
  } catch (const Error& e) {
    throw Error(std::string("the server's welcome: ") + e.what());
  }
}

}  // namespace concord::net
