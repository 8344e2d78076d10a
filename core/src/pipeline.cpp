// Pipeline files: parse YAML, apply --set overrides, validate every section and every plugin's
// arguments against their declarations, and report all problems at once with FILE:LINE:COL.
#include <concord/harmonizer.h>
#include <concord/pipeline.h>

#include "local_training.h"

#include <yaml-cpp/yaml.h>

#include <cmath>
#include <filesystem>
#include <fstream>
#include <set>
#include <sstream>

namespace concord {

ValidationError::ValidationError(std::vector<Diagnostic> diags)
    : Error([&] {
        std::string s;
        for (size_t i = 0; i < diags.size(); ++i) s += (i ? "\n" : "") + diags[i].str();
        return s;
      }()),
      diags_(std::move(diags)) {}

std::vector<std::string> optimizer_names() {
  return {"adam", "sgd"};
}

namespace {

// Core sections are declared with the same ArgSpec machinery plugins use.
std::vector<ArgSpec> training_specs() {
  return {ArgSpec::integer("local_epochs", 1, "Local epochs per round").range(1, 1000),
          ArgSpec::integer("batch_size", 32, "Mini-batch size").range(1, 65536),
          ArgSpec::choice("optimizer", optimizer_names(), "adam", "Local optimizer"),
          ArgSpec::real("lr", 1e-3, "Learning rate").range(0, 10),
          ArgSpec::real("momentum", 0.9, "SGD momentum").range(0, 1),
          ArgSpec::real("weight_decay", 0, "L2 weight decay").range(0, 1),
          ArgSpec::integer("threads", 0, "LibTorch intra-op threads (0: every CPU available)")
              .range(0, 256),
          ArgSpec::boolean("precise_bn", true,
                           "Re-estimate BatchNorm statistics with the final local weights "
                           "after local training (one forward pass, no labels)")};
}
std::vector<ArgSpec> federation_specs() {
  return {
      ArgSpec::integer("rounds", 5, "Federated rounds").range(1, 100000),
      ArgSpec::real("fraction", 1.0, "Fraction of available sites selected per round").range(0, 1),
      ArgSpec::integer("min_sites", 1, "k: a round needs at least k site replies").range(1, 1e6),
      ArgSpec::real("availability", 1.0,
                    "Probability that a site is available in a round (intermittent sites)")
          .range(0, 1)};
}
std::vector<ArgSpec> privacy_specs() {
  return {
      ArgSpec::real("epsilon", 8, "Privacy budget epsilon for the whole run (at delta)")
          .range(1e-6, 1e6)
          .required(),
      ArgSpec::real("delta", 1e-5, "delta of (epsilon, delta)-DP; well below 1 / sites")
          .range(1e-300, 0.1),
      ArgSpec::choice("level", {"client", "sample"}, "client",
                      "Protected unit: one site's whole data (client: DP-FedAvg) or one training "
                      "sample (sample: DP-SGD in local training, per site; no BatchNorm)"),
      ArgSpec::choice("mode", {"central", "local"}, "central",
                      "Client level: who adds the noise, the coordinator (central) or each site "
                      "its share (local; composes with secure aggregation)"),
      ArgSpec::choice("sampling", {"none", "poisson"}, "none",
                      "Client level: the accountant's assumption on site selection, none (q = 1, "
                      "the safe choice) or poisson (q = selected / sites, only if selection is "
                      "secret). Sample level always samples batches by Poisson"),
      ArgSpec::real("clip", 1.0,
                    "C: L2 bound on one site's delta (client) or one sample's gradient (sample)")
          .range(1e-12, 1e12),
      ArgSpec::real("noise_multiplier", 0,
                    "z (noise std on the sum is z C); 0: the smallest z that keeps the planned "
                    "rounds (client) or local steps (sample) within the budget")
          .range(0, 1e6)};
}
std::vector<ArgSpec> secure_aggregation_specs() {
  return {ArgSpec::integer("threshold", 0,
                           "t: neighbour shares that rebuild a dropped site's secret (0: k/2 + 1)")
              .range(0, 100000),
          ArgSpec::integer("neighbours", 0,
                           "k: neighbours per site (0: all up to 11 sites, else ~2 log2 n + 2)")
              .range(0, 100000),
          ArgSpec::real("range", 64,
                        "Each value of a site's delta is clipped to [-range, range] before "
                        "quantization (wide enough for BatchNorm running variances)")
              .range(1e-9, 1e9),
          ArgSpec::integer("bits", 24,
                           "Quantization: 2^bits levels over the range (24 and range 64: steps "
                           "of 7.6e-6)")
              .range(2, 24),
          ArgSpec::choice("weights", {"samples", "equal"}, "samples",
                          "Weight of a site's delta inside the masked vector: its training "
                          "samples (weighted FedAvg) or 1 (equal; always so with privacy)"),
          ArgSpec::choice("secrets", {"random", "seeded"}, "random",
                          "Sites' key and mask secrets: random (deployments) or derived from the "
                          "pipeline seed (reproducible simulations; NOT secret)")};
}
std::vector<ArgSpec> partition_specs() {
  return {
      ArgSpec::choice("scheme", {"none", "iid", "dirichlet", "quantity"}, "none",
                      "How to split a single-source dataset into sites"),
      ArgSpec::integer("sites", 4, "Number of sites to make").range(1, 100000),
      ArgSpec::real("alpha", 0.5, "Dirichlet concentration (smaller: more skew)").range(1e-3, 1e6),
      ArgSpec::integer("min_samples", 8, "Minimum training samples per site").range(0, 1e9),
      ArgSpec::choice("test", {"follow", "iid"}, "follow",
                      "Test split: follow each site's training proportions, or iid (every site "
                      "tested on the pooled label mix)")};
}

struct Parser {
  std::string file;
  const Registry& registry;
  std::vector<Diagnostic> diags;
  std::set<std::string> overridden;  // dotted paths set from the command line

  SourceLoc loc(const YAML::Node& n, const std::string& path = "") const {
    if (!path.empty()) {
      for (const auto& o : overridden)
        if (path == o || path.rfind(o + ".", 0) == 0) return SourceLoc{"--set " + o, 0, 0};
    }
    if (!n.IsDefined() || n.Mark().is_null()) return SourceLoc{file, 0, 0};
    return SourceLoc{file, n.Mark().line + 1, n.Mark().column + 1};
  }
  void error(const YAML::Node& n, const std::string& path, const std::string& msg) {
    diags.push_back({loc(n, path), msg});
  }

  // Converts one YAML scalar/sequence to a Value of the declared type; false on error (reported).
  bool convert(const YAML::Node& n, const std::string& path, const ArgSpec& spec, ArgType type,
               Value& out) {
    out.type = type;
    auto describe = [&] { return "'" + path + "' expects " + spec.type_str(); };
    if (type == ArgType::List) {
      YAML::Node seq = n;
      if (!n.IsSequence()) {
        error(n, path, describe() + " (a YAML list like [a, b])");
        return false;
      }
      bool ok = true;
      for (size_t i = 0; i < seq.size(); ++i) {
        Value item;
        if (convert(seq[i], path + "[" + std::to_string(i) + "]", spec, spec.element, item))
          out.items.push_back(item);
        else
          ok = false;
      }
      return ok;
    }
    if (!n.IsScalar()) {
      error(n, path,
            describe() + ", got a " +
                (n.IsMap()        ? "map"
                 : n.IsSequence() ? "list"
                                  : "null"));
      return false;
    }
    try {
      out = parse_scalar(spec, type, n.Scalar(), path);
    } catch (const Error& e) {
      error(n, path, e.what());
      return false;
    } catch (const std::filesystem::filesystem_error& e) {
      // A path that cannot even be examined (a symlink loop, no permission) is one error among
      // the others, not the end of validation.
      error(n, path,
            "'" + path + "': cannot examine path '" + n.Scalar() + "': " + e.code().message());
      return false;
    }
    return true;
  }

  // Every key that appears twice in one map, anywhere in the document (yaml-cpp keeps the
  // first silently). Aliased maps are visited once: their marks repeat.
  void duplicate_keys(const YAML::Node& n, std::set<std::pair<int, int>>& visited) {
    if (!n.IsDefined() || (!n.IsMap() && !n.IsSequence())) return;
    if (!visited.insert({n.Mark().line, n.Mark().column}).second) return;
    if (n.IsSequence()) {
      for (const auto& item : n) duplicate_keys(item, visited);
      return;
    }
    std::map<std::string, YAML::Mark> first;
    for (const auto& kv : n) {
      if (kv.first.IsScalar()) {
        auto [it, fresh] = first.emplace(kv.first.Scalar(), kv.first.Mark());
        if (!fresh)
          error(kv.first, "",
                "duplicate key '" + kv.first.Scalar() + "' (first at line " +
                    std::to_string(it->second.line + 1) + ", column " +
                    std::to_string(it->second.column + 1) + "; only one may be given)");
      }
      duplicate_keys(kv.second, visited);
    }
  }

  // Validates a map against specs; fills `resolved` with every value (defaults included).
  std::map<std::string, Value> section(const YAML::Node& n, const std::string& path,
                                       const std::vector<ArgSpec>& specs, YAML::Node resolved,
                                       const std::set<std::string>& other_keys = {}) {
    std::map<std::string, Value> out;
    const bool present = n.IsDefined() && !n.IsNull();  // (IsMap() throws on a missing node)
    if (present && !n.IsMap()) {
      error(n, path, "'" + path + "' must be a map of settings");
      return out;
    }
    std::vector<std::string> known;
    for (const auto& s : specs) known.push_back(s.name);
    for (const auto& k : other_keys) known.push_back(k);
    if (present) {
      for (const auto& kv : n) {
        std::string key = kv.first.Scalar();
        if (other_keys.count(key)) continue;
        const ArgSpec* spec = nullptr;
        for (const auto& s : specs)
          if (s.name == key) spec = &s;
        if (!spec) {
          std::string hint = closest_name(key, known);
          std::string msg = "unknown key '" + key + "' in '" + path + "'";
          if (!hint.empty())
            msg += " (did you mean '" + hint + "'?)";
          else {
            msg += "; expected one of:";
            for (const auto& k : known) msg += " " + k;
          }
          error(kv.first, path + "." + key, msg);
          continue;
        }
        Value v;
        if (convert(kv.second, path + "." + key, *spec, spec->type, v)) out[key] = v;
      }
    }
    for (const auto& s : specs) {
      if (!out.count(s.name) && !(present && n[s.name])) {
        if (s.default_value)
          out[s.name] = *s.default_value;
        else if (!s.optional)
          error(n, path,
                "'" + path + "' is missing required '" + s.name + "' (" + s.type_str() + ": " +
                    s.doc + ")");
      }
    }
    for (const auto& [k, v] : out) resolved[k] = to_yaml(v);
    return out;
  }

  static YAML::Node to_yaml(const Value& v) {
    switch (v.type) {
      case ArgType::Int:
        return YAML::Node(v.i);
      case ArgType::Float:
        return YAML::Node(v.f);
      case ArgType::Bool:
        return YAML::Node(v.b);
      case ArgType::List: {
        YAML::Node seq(YAML::NodeType::Sequence);
        for (const auto& it : v.items) seq.push_back(to_yaml(it));
        return seq;
      }
      default:
        return YAML::Node(v.s);
    }
  }

  // `{type: NAME, args: {...}}` (or just `NAME`) for a plugin of `kind`.
  std::optional<Component> component(const YAML::Node& n, const std::string& path, Kind kind,
                                     YAML::Node& resolved,
                                     const std::vector<std::string>& extra_keys = {}) {
    Component c;
    c.where = loc(n, path);
    // Copy-constructed (never assigned): yaml-cpp's operator= writes through the handle.
    const YAML::Node args_node = n.IsMap() ? YAML::Node(n["args"]) : YAML::Node();
    if (n.IsScalar()) {
      c.type = n.Scalar();
    } else if (n.IsMap()) {
      for (const auto& kv : n) {
        std::string key = kv.first.Scalar();
        if (key != "type" && key != "args" &&
            std::find(extra_keys.begin(), extra_keys.end(), key) == extra_keys.end()) {
          std::vector<std::string> known = {"type", "args"};
          known.insert(known.end(), extra_keys.begin(), extra_keys.end());
          std::string hint = closest_name(key, known);
          std::string expected = "'type' and 'args'";
          for (const auto& k : extra_keys) expected = "'type', 'args' and '" + k + "'";
          error(kv.first, path + "." + key,
                "unknown key '" + key + "' in component '" + path + "': expected " + expected +
                    (hint.empty() ? "" : " (did you mean '" + hint + "'?)"));
        }
      }
      if (!n["type"] || !n["type"].IsScalar()) {
        error(n, path, "'" + path + "' needs 'type: <" + kind_name(kind) + " plugin name>'");
        return std::nullopt;
      }
      c.type = n["type"].Scalar();
    } else {
      error(n, path, "'" + path + "' must be {type: NAME, args: {...}}");
      return std::nullopt;
    }
    const PluginDesc* d = registry.find(kind, c.type);
    if (!d) {
      std::string msg = std::string("unknown ") + kind_name(kind) + " plugin '" + c.type + "'";
      std::string hint = registry.suggest(kind, c.type);
      if (!hint.empty()) msg += " (did you mean '" + hint + "'?)";
      msg += "; available:";
      for (const auto& nm : registry.names(kind)) msg += " " + nm;
      error(n.IsMap() ? n["type"] : n, path + ".type", msg);
      return std::nullopt;
    }
    resolved = YAML::Node(YAML::NodeType::Map);
    resolved["type"] = c.type;
    YAML::Node rargs(YAML::NodeType::Map);
    size_t before = diags.size();
    auto values = section(args_node, path + ".args", d->args, rargs);
    resolved["args"] = rargs;
    // Prefix plugin-argument errors with the plugin they belong to.
    for (size_t i = before; i < diags.size(); ++i) {
      if (diags[i].where.line == 0 && diags[i].where.file == file) diags[i].where = c.where;
      diags[i].message = std::string(kind_name(kind)) + " '" + c.type + "': " + diags[i].message;
    }
    c.args = Args(c.type, values, c.where);
    return c;
  }

  std::vector<Component> component_list(const YAML::Node& n, const std::string& path, Kind kind,
                                        YAML::Node resolved_parent, const std::string& key,
                                        const std::vector<std::string>& extra_keys = {}) {
    std::vector<Component> out;
    YAML::Node seq(YAML::NodeType::Sequence);
    if (n.IsDefined() && !n.IsNull()) {
      if (!n.IsSequence()) {
        error(n, path, "'" + path + "' must be a list of {type, args}");
      } else {
        for (size_t i = 0; i < n.size(); ++i) {
          YAML::Node r;
          auto c = component(n[i], path + "[" + std::to_string(i) + "]", kind, r, extra_keys);
          if (c) {
            out.push_back(*c);
            seq.push_back(r);
          }
        }
      }
    }
    resolved_parent[key] = seq;
    return out;
  }

  std::vector<std::string> string_list(const YAML::Node& n, const std::string& path) {
    std::vector<std::string> out;
    if (!n.IsDefined() || n.IsNull()) return out;
    if (!n.IsSequence()) {
      error(n, path, "'" + path + "' must be a list of names");
      return out;
    }
    for (const auto& it : n) {
      if (!it.IsScalar())
        error(it, path, "'" + path + "' entries must be names");
      else
        out.push_back(it.Scalar());
    }
    return out;
  }

  void unknown_keys(const YAML::Node& n, const std::string& path,
                    const std::vector<std::string>& known) {
    if (!n.IsDefined() || !n.IsMap()) return;
    for (const auto& kv : n) {
      std::string key = kv.first.Scalar();
      if (std::find(known.begin(), known.end(), key) != known.end()) continue;
      std::string hint = closest_name(key, known);
      std::string msg = "unknown key '" + key + "'" + (path.empty() ? "" : " in '" + path + "'");
      if (!hint.empty())
        msg += " (did you mean '" + hint + "'?)";
      else {
        msg += "; expected one of:";
        for (const auto& k : known) msg += " " + k;
      }
      error(kv.first, path.empty() ? key : path + "." + key, msg);
    }
  }
};

// Why `name` cannot be a single folder name made under the output folder, or "".
std::string unsafe_folder_name(const std::string& name) {
  if (name.empty()) return "it is empty";
  if (name.size() > 255) return "it is longer than 255 bytes";
  if (name.front() == '.') return "it starts with '.' ('..' would leave the output folder)";
  for (unsigned char ch : name) {
    if (ch == '/' || ch == '\\') return "it holds a path separator";
    if (ch < 0x20 || ch == 0x7f) return "it holds a control character";
  }
  return "";
}

void apply_override(YAML::Node root, const std::string& expr, std::set<std::string>& paths) {
  size_t eq = expr.find('=');
  if (eq == std::string::npos || eq == 0)
    throw ValidationError({{SourceLoc{"--set", 0, 0}, "override '" + expr +
                                                          "' must be KEY=VALUE, "
                                                          "e.g. training.lr=1e-3"}});
  std::string key = expr.substr(0, eq), value = expr.substr(eq + 1);
  std::vector<std::string> parts;
  std::stringstream ss(key);
  for (std::string p; std::getline(ss, p, '.');) parts.push_back(p);
  YAML::Node value_node;
  try {
    value_node = YAML::Load(value.empty() ? "\"\"" : value);
  } catch (const YAML::Exception& e) {
    throw ValidationError(
        {{SourceLoc{"--set " + key, 0, 0}, "cannot parse value '" + value + "': " + e.msg}});
  }
  // Walk with explicit node copies (yaml-cpp nodes are handles), creating maps as needed.
  std::vector<YAML::Node> chain{root};
  for (size_t i = 0; i + 1 < parts.size(); ++i) {
    YAML::Node cur = chain.back();
    YAML::Node next;
    bool is_index = !parts[i].empty() && std::all_of(parts[i].begin(), parts[i].end(), ::isdigit);
    if (cur.IsSequence() && is_index) {
      size_t idx = std::stoul(parts[i]);
      if (idx >= cur.size())
        throw ValidationError(
            {{SourceLoc{"--set " + key, 0, 0}, "index " + parts[i] + " out of range"}});
      next = cur[idx];
    } else {
      if (!cur[parts[i]] || cur[parts[i]].IsNull()) cur[parts[i]] = YAML::Node(YAML::NodeType::Map);
      next = cur[parts[i]];
    }
    chain.push_back(next);
  }
  YAML::Node last = chain.back();
  const std::string& leaf = parts.back();
  bool leaf_index = !leaf.empty() && std::all_of(leaf.begin(), leaf.end(), ::isdigit);
  if (last.IsSequence() && leaf_index && std::stoul(leaf) < last.size())
    last[std::stoul(leaf)] = value_node;
  else
    last[leaf] = value_node;
  paths.insert(key);
}

// The aggregator component at `n` (`path`), or the loaded default aggregator when `n` is absent.
std::optional<Component> aggregator_or_default(Parser& p, const YAML::Node& parent,
                                               const YAML::Node& n, const std::string& path,
                                               YAML::Node& resolved) {
  if (n.IsDefined()) return p.component(n, path, Kind::Aggregator, resolved);
  // The default is whichever aggregator plugin declares itself one (fedavg, built in).
  auto defaults = p.registry.defaults(Kind::Aggregator, "aggregator");
  if (defaults.size() == 1)
    return p.component(YAML::Node(defaults.front()->name), path, Kind::Aggregator, resolved);
  std::string names;
  for (const auto* d : defaults) names += " '" + d->name + "'";
  p.error(parent, path,
          defaults.empty()
              ? "no aggregator given and no loaded plugin declares itself the default "
                "aggregator: name one (concord plugins --kind aggregator)"
              : "no aggregator given and several plugins declare themselves the default (" +
                    names.substr(1) + "): name one");
  return std::nullopt;
}

// harmonizers[i].stage: rounds, local_epochs, lr (defaults: the plugin's default_stage()) and
// aggregator (default: the default aggregator) for each learned harmonizer; refused for the
// others. Plugins are built here to ask whether they are learned (their constructors only read
// arguments).
void learned_stages(Parser& p, const YAML::Node& list, PipelineConfig& c, YAML::Node resolved) {
  if (!list.IsDefined() || !list.IsSequence() || list.size() != c.harmonizers.size()) return;
  for (size_t i = 0; i < c.harmonizers.size(); ++i) {
    const Component& h = c.harmonizers[i];
    const std::string path = "harmonizers[" + std::to_string(i) + "]";
    const YAML::Node node = list[i];
    // A valid node either way (an absent key's node throws on IsMap()).
    const YAML::Node stage = node.IsMap() && node["stage"] ? YAML::Node(node["stage"])
                                                           : YAML::Node(YAML::NodeType::Undefined);
    std::unique_ptr<Harmonizer> plugin;
    try {
      plugin = p.registry.create<Harmonizer>(Kind::Harmonizer, h.type, h.args, {c.seed, path});
    } catch (const std::exception& e) {
      p.error(node, path, "harmonizer '" + h.type + "': " + e.what());
      continue;
    }
    if (!plugin->learned()) {
      if (stage.IsDefined())
        p.error(stage, path + ".stage",
                "'" + path + ".stage': harmonizer '" + h.type +
                    "' is not learned (it fits statistics in one exchange): remove 'stage'");
      continue;
    }
    const StageSettings d = plugin->default_stage();
    const std::vector<ArgSpec> specs = {
        ArgSpec::integer("rounds", d.rounds, "Federated rounds of each training phase")
            .range(1, 100000),
        ArgSpec::integer("local_epochs", d.local_epochs, "Local epochs per round").range(1, 10000),
        ArgSpec::real("lr", d.lr, "Learning rate of the harmonizer's networks").range(1e-9, 10)};
    YAML::Node r(YAML::NodeType::Map);
    const size_t before = p.diags.size();
    auto v = p.section(stage, path + ".stage", specs, r, {"aggregator"});
    YAML::Node ra;
    auto agg = aggregator_or_default(
        p, stage.IsDefined() ? stage : node,
        stage.IsMap() ? YAML::Node(stage["aggregator"]) : YAML::Node(YAML::NodeType::Undefined),
        path + ".stage.aggregator", ra);
    r["aggregator"] = ra;
    if (p.diags.size() != before || !agg || v.size() != specs.size()) continue;
    PipelineConfig::LearnedStage ls;
    ls.rounds = int(v["rounds"].i);
    ls.local_epochs = int(v["local_epochs"].i);
    ls.lr = v["lr"].f;
    ls.aggregator = *agg;
    ls.where = p.loc(stage.IsDefined() ? stage : node, path + ".stage");
    c.learned_stages[i] = ls;
    resolved[i]["stage"] = r;
  }
}

}  // namespace

PipelineConfig parse_pipeline(const std::string& text, const std::string& file,
                              const std::vector<std::string>& overrides, const Registry& registry) {
  YAML::Node root;
  try {
    root = YAML::Load(text);
  } catch (const YAML::ParserException& e) {
    throw ValidationError(
        {{SourceLoc{file, e.mark.line + 1, e.mark.column + 1}, "YAML syntax: " + e.msg}});
  }
  if (!root.IsMap())
    throw ValidationError({{SourceLoc{file, 1, 1}, "a pipeline file must be a YAML map"}});
  Parser p{file, registry, {}, {}};
  {
    std::set<std::pair<int, int>> visited;
    p.duplicate_keys(root, visited);  // before the overrides: their nodes have no position
  }
  for (const auto& o : overrides) apply_override(root, o, p.overridden);

  PipelineConfig c;
  c.file = file;
  YAML::Node out(YAML::NodeType::Map);
  p.unknown_keys(
      root, "",
      {"name", "seed", "data", "model", "harmonizers", "adapter", "training", "federation",
       "aggregator", "filters", "evaluation", "privacy", "secure_aggregation", "output"});

  // name, seed, output
  {
    std::vector<ArgSpec> top = {
        ArgSpec::string("name", "", "Experiment name (names the run folder)"),
        ArgSpec::integer("seed", 0, "Seed every random choice derives from").range(0, 9.2e18),
        ArgSpec::string("output", "runs", "Folder under which run folders are made")};
    // Validate each node directly, so errors keep their line and column.
    for (const auto& spec : top) {
      Value v = *spec.default_value;
      if (root[spec.name]) p.convert(root[spec.name], spec.name, spec, spec.type, v);
      out[spec.name] = Parser::to_yaml(v);
      if (spec.name == "name") c.name = v.s;
      if (spec.name == "seed") c.seed = uint64_t(v.i);
      if (spec.name == "output") c.output = v.s;
    }
    if (c.name.empty()) {
      c.name = std::filesystem::path(file).stem().string();
      out["name"] = c.name;
    }
    if (std::string why = unsafe_folder_name(c.name); !why.empty())
      p.error(
          root["name"] ? root["name"] : root, "name",
          "'name' names the run folder under 'output' and must be one plain folder name: " + why);
  }

  // data
  {
    YAML::Node d = root["data"];
    YAML::Node rd(YAML::NodeType::Map);
    if (!d || !d.IsMap()) {
      p.error(d ? d : root, "data", "missing 'data' section with 'dataset: {type, args}'");
    } else {
      p.unknown_keys(d, "data", {"dataset", "sites", "partition", "scanner_shift"});
      YAML::Node r;
      if (!d["dataset"])
        p.error(d, "data", "'data' needs 'dataset: {type, args}'");
      else if (auto comp = p.component(d["dataset"], "data.dataset", Kind::Dataset, r))
        c.data.dataset = *comp;
      rd["dataset"] = r;
      c.data.sites = p.string_list(d["sites"], "data.sites");
      YAML::Node rs(YAML::NodeType::Sequence);
      for (const auto& s : c.data.sites) rs.push_back(s);
      rd["sites"] = rs;
      YAML::Node rp(YAML::NodeType::Map);
      auto pv = p.section(d["partition"], "data.partition", partition_specs(), rp);
      rd["partition"] = rp;
      if (pv.count("scheme")) {
        c.data.partition.scheme = pv["scheme"].s;
        c.data.partition.sites = int(pv["sites"].i);
        c.data.partition.alpha = pv["alpha"].f;
        c.data.partition.min_samples = int(pv["min_samples"].i);
        c.data.partition.test = pv["test"].s;
      }
      ArgSpec shift =
          ArgSpec::real("scanner_shift", 0, "Per-site scanner shift strength").range(0, 3);
      Value sv = *shift.default_value;
      if (d["scanner_shift"])
        p.convert(d["scanner_shift"], "data.scanner_shift", shift, ArgType::Float, sv);
      c.data.scanner_shift = sv.f;
      rd["scanner_shift"] = sv.f;
    }
    out["data"] = rd;
  }

  // model
  {
    YAML::Node r;
    if (!root["model"])
      p.error(root, "model", "missing 'model: {type, args}'");
    else if (auto comp = p.component(root["model"], "model", Kind::Model, r))
      c.model = *comp;
    out["model"] = r;
  }

  c.harmonizers = p.component_list(root["harmonizers"], "harmonizers", Kind::Harmonizer, out,
                                   "harmonizers", {"stage"});
  learned_stages(p, root["harmonizers"], c, out["harmonizers"]);
  c.filters = p.component_list(root["filters"], "filters", Kind::Filter, out, "filters");

  if (root["adapter"] && !root["adapter"].IsNull()) {
    YAML::Node r;
    if (auto comp = p.component(root["adapter"], "adapter", Kind::Adapter, r)) c.adapter = *comp;
    out["adapter"] = r;
  }

  {
    YAML::Node r;
    if (auto comp = aggregator_or_default(p, root, root["aggregator"], "aggregator", r))
      c.aggregator = *comp;
    out["aggregator"] = r;
  }

  // training
  {
    YAML::Node r(YAML::NodeType::Map);
    auto v = p.section(root["training"], "training", training_specs(), r);
    out["training"] = r;
    if (v.size() == training_specs().size()) {
      c.training.local_epochs = int(v["local_epochs"].i);
      c.training.batch_size = int(v["batch_size"].i);
      c.training.optimizer = v["optimizer"].s;
      c.training.lr = v["lr"].f;
      c.training.momentum = v["momentum"].f;
      c.training.weight_decay = v["weight_decay"].f;
      c.training.threads = int(v["threads"].i);
      c.training.precise_bn = v["precise_bn"].b;
    }
  }

  // federation
  {
    YAML::Node f = root["federation"];
    YAML::Node r(YAML::NodeType::Map);
    auto v = p.section(f, "federation", federation_specs(), r, {"site_availability"});
    // A round with no site selected aggregates nothing: these must leave someone in.
    for (const char* key : {"fraction", "availability"})
      if (v.count(key) && v[key].f <= 0)
        p.error(f && f.IsMap() ? f[key] : f, std::string("federation.") + key,
                std::string("'federation.") + key + "' must be above 0 (range (0, 1]): with 0 " +
                    "no site takes part in any round");
    if (v.size() == federation_specs().size()) {
      c.federation.rounds = int(v["rounds"].i);
      c.federation.fraction = v["fraction"].f;
      c.federation.min_sites = int(v["min_sites"].i);
      c.federation.availability = v["availability"].f;
    }
    if (f && f.IsMap() && f["site_availability"]) {
      YAML::Node sa = f["site_availability"];
      if (!sa.IsMap()) {
        p.error(sa, "federation.site_availability",
                "'federation.site_availability' must map site names to probabilities");
      } else {
        YAML::Node rsa(YAML::NodeType::Map);
        ArgSpec prob = ArgSpec::real("p", 1, "").range(0, 1);
        for (const auto& kv : sa) {
          Value pv;
          std::string site = kv.first.Scalar();
          if (p.convert(kv.second, "federation.site_availability." + site, prob, ArgType::Float,
                        pv)) {
            c.federation.site_availability[site] = pv.f;
            rsa[site] = pv.f;
          }
        }
        r["site_availability"] = rsa;
      }
    }
    out["federation"] = r;
  }

  // evaluation
  {
    YAML::Node e = root["evaluation"];
    YAML::Node r(YAML::NodeType::Map);
    p.unknown_keys(e, "evaluation", {"metrics", "every", "held_out"});
    c.evaluation.metrics = p.component_list(e ? e["metrics"] : YAML::Node(), "evaluation.metrics",
                                            Kind::Metric, r, "metrics");
    ArgSpec every = ArgSpec::integer("every", 1, "Evaluate every N rounds").range(1, 1e6);
    Value ev = *every.default_value;
    if (e && e["every"]) p.convert(e["every"], "evaluation.every", every, ArgType::Int, ev);
    c.evaluation.every = int(ev.i);
    r["every"] = ev.i;
    c.evaluation.held_out = p.string_list(e ? e["held_out"] : YAML::Node(), "evaluation.held_out");
    YAML::Node rh(YAML::NodeType::Sequence);
    for (const auto& s : c.evaluation.held_out) rh.push_back(s);
    r["held_out"] = rh;
    out["evaluation"] = r;
  }

  // privacy (optional)
  if (root["privacy"] && !root["privacy"].IsNull()) {
    YAML::Node r(YAML::NodeType::Map);
    auto v = p.section(root["privacy"], "privacy", privacy_specs(), r);
    out["privacy"] = r;
    if (v.size() == privacy_specs().size()) {
      PipelineConfig::Privacy pr;
      pr.epsilon = v["epsilon"].f;
      pr.delta = v["delta"].f;
      pr.level = v["level"].s;
      pr.mode = v["mode"].s;
      pr.sampling = v["sampling"].s;
      pr.clip = v["clip"].f;
      pr.noise_multiplier = v["noise_multiplier"].f;
      pr.where = p.loc(root["privacy"], "privacy");
      // At sample level the noise is always the site's (in local training) and every step's
      // batch a Poisson sample: a `mode` or another `sampling` would be silently ignored.
      const YAML::Node node = root["privacy"];
      if (pr.level == "sample" && node.IsMap()) {
        const std::string why =
            "' applies to level: client only; level: sample adds the noise in each site's local "
            "training, to batches drawn by Poisson sampling";
        if (node["mode"]) p.error(node["mode"], "privacy.mode", "'privacy.mode" + why);
        if (node["sampling"] && pr.sampling != "poisson")
          p.error(node["sampling"], "privacy.sampling", "'privacy.sampling: " + pr.sampling + why);
      }
      c.privacy = pr;
    }
  }

  // secure_aggregation (optional)
  if (root["secure_aggregation"] && !root["secure_aggregation"].IsNull()) {
    YAML::Node r(YAML::NodeType::Map);
    auto v =
        p.section(root["secure_aggregation"], "secure_aggregation", secure_aggregation_specs(), r);
    out["secure_aggregation"] = r;
    if (v.size() == secure_aggregation_specs().size()) {
      PipelineConfig::SecureAggregation sa;
      sa.threshold = int(v["threshold"].i);
      sa.neighbours = int(v["neighbours"].i);
      sa.range = v["range"].f;
      sa.bits = int(v["bits"].i);
      sa.weights = v["weights"].s;
      sa.secrets = v["secrets"].s;
      sa.where = p.loc(root["secure_aggregation"], "secure_aggregation");
      c.secure_aggregation = sa;
    }
  }

  if (c.federation.min_sites > 0 && c.data.partition.scheme != "none" &&
      c.federation.min_sites > c.data.partition.sites)
    p.error(root["federation"]["min_sites"], "federation.min_sites",
            "'federation.min_sites' = " + std::to_string(c.federation.min_sites) +
                " exceeds the number of sites made by data.partition (" +
                std::to_string(c.data.partition.sites) + ")");

  if (!p.diags.empty()) {
    std::stable_sort(p.diags.begin(), p.diags.end(), [](const Diagnostic& a, const Diagnostic& b) {
      return a.where.file == b.where.file && a.where.line != b.where.line
                 ? a.where.line < b.where.line
                 : false;
    });
    throw ValidationError(p.diags);
  }
  YAML::Emitter em;
  em.SetDoublePrecision(15);  // 0.9, not 0.90000000000000002
  em << out;
  c.resolved_yaml = std::string(em.c_str()) + "\n";
  return c;
}

PipelineConfig load_pipeline(const std::string& file, const std::vector<std::string>& overrides,
                             const Registry& registry) {
  std::ifstream in(file);
  if (!in) throw ValidationError({{SourceLoc{file, 0, 0}, "cannot read pipeline file"}});
  std::stringstream ss;
  ss << in.rdbuf();
  return parse_pipeline(ss.str(), file, overrides, registry);
}

}  // namespace concord
