#include <concord/error.h>
#include <concord/json_text.h>
#include <concord/message.h>
#include <concord/net/kit.h>

#include "net_common.h"

#include <yaml-cpp/yaml.h>
#include <nlohmann/json.hpp>

#include <sys/stat.h>

#include <algorithm>
#include <filesystem>
#include <set>

namespace concord::net {

namespace fs = std::filesystem;
using nlohmann::json;

namespace {

constexpr const char* kManifest = "manifest.json";
constexpr const char* kSignature = "manifest.sig";

std::string at(const std::string& file, const YAML::Node& n) {
  return n.Mark().is_null() ? file : file + ":" + std::to_string(n.Mark().line + 1);
}

// Site and kit names become folder names and certificate names.
void check_name(const std::string& what, const std::string& name) {
  const bool ok =
      !name.empty() && name.size() <= 64 && name[0] != '.' && name[0] != '-' &&
      std::all_of(name.begin(), name.end(), [](char c) {
        return std::isalnum(static_cast<unsigned char>(c)) || c == '-' || c == '_' || c == '.';
      });
  if (!ok)
    throw Error(what + " '" + name +
                "': use 1-64 letters, digits, '-', '_' or '.', not starting with '.' or '-'");
  if (name == "ca" || name == "server")
    throw Error(what + " '" + name + "': the names 'ca' and 'server' are taken by the kits");
}

void write_private(const std::string& file, const std::string& text) {
  // The kit folder is 0700, so the moment before chmod exposes nothing.
  write_file_atomic(file, text);
  fs::permissions(file, fs::perms::owner_read | fs::perms::owner_write, fs::perm_options::replace);
}

void make_kit_dir(const std::string& dir) {
  if (fs::exists(dir) && !fs::is_empty(dir)) throw Error(dir + " exists and is not empty");
  fs::create_directories(dir);
  fs::permissions(dir, fs::perms::owner_all, fs::perm_options::replace);
}

// Writes manifest.json (SHA-256 of every file listed) and its signature by the CA.
void sign_kit(const std::string& dir, const CertKey& ca, const std::string& project,
              const std::string& name, const std::string& role,
              const std::vector<std::string>& files) {
  json m;
  m["format"] = 1;
  m["project"] = project;
  m["kit"] = name;
  m["role"] = role;
  json f = json::object();
  for (const auto& file : files) f[file] = sha256_hex(read_text(dir + "/" + file));
  m["files"] = f;
  const std::string text = json_text(m, 2) + "\n";
  write_file_atomic(dir + "/" + kManifest, text);
  write_file_atomic(dir + "/" + kSignature, sign_bytes(ca.key, text));
}

struct CaState {
  std::string dir;
  CertKey ca;
  json state;
  void save() const { write_file_atomic(dir + "/state.json", json_text(state, 2) + "\n"); }
};

CaState load_ca(const std::string& kits_dir) {
  CaState s;
  s.dir = kits_dir + "/ca";
  if (!fs::is_directory(s.dir))
    throw Error(kits_dir + ": no ca/ folder (the CA that `concord provision` created)");
  s.ca.cert = read_text(s.dir + "/ca.pem");
  s.ca.key = read_text(s.dir + "/ca.key");
  try {
    s.state = json::parse(read_text(s.dir + "/state.json"));
  } catch (const json::exception& e) {
    throw Error(s.dir + "/state.json: " + e.what());
  }
  return s;
}

std::time_t ca_expiry(const CertKey& ca) {
  return certificate_info(ca.cert).not_after;
}

void write_crl(const std::string& kits_dir, CaState& s) {
  std::vector<uint64_t> serials;
  for (const auto& v : s.state["revoked"]) serials.push_back(v.get<uint64_t>());
  const std::string crl = make_crl(s.ca, serials, ca_expiry(s.ca));
  write_file_atomic(s.dir + "/crl.pem", crl);
  const std::string server = kits_dir + "/server";
  if (fs::is_directory(server)) {
    write_file_atomic(server + "/crl.pem", crl);
    sign_kit(server, s.ca, s.state["project"], "server", "server",
             {"ca.pem", "cert.pem", "key.pem", "crl.pem", "server.txt"});
  }
}

std::string issue_site_kit(const std::string& kits_dir, CaState& s, const std::string& site,
                           int validity_days) {
  check_name("site", site);
  if (s.state["issued"].contains(site))
    throw Error("site '" + site + "' already has a kit (serial " +
                std::to_string(s.state["issued"][site]["serial"].get<uint64_t>()) +
                "); revoke it first to issue a new one under another name");
  const std::string dir = kits_dir + "/" + site;
  make_kit_dir(dir);
  CertSpec spec;
  spec.common_name = site;
  spec.role = CertRole::Site;
  spec.serial = s.state["next_serial"].get<uint64_t>();
  spec.validity_days = validity_days > 0 ? validity_days : s.state["validity_days"].get<int>();
  spec.key = key_type_from_name(s.state["key"]);
  CertKey c = issue_certificate(s.ca, spec);
  write_file_atomic(dir + "/cert.pem", c.cert);
  write_private(dir + "/key.pem", c.key);
  write_file_atomic(dir + "/ca.pem", s.ca.cert);
  write_file_atomic(dir + "/server.txt", s.state["server_address"].get<std::string>() + "\n");
  sign_kit(dir, s.ca, s.state["project"], site, "site",
           {"ca.pem", "cert.pem", "key.pem", "server.txt"});
  s.state["issued"][site] = {{"serial", spec.serial}, {"role", "site"}};
  s.state["next_serial"] = spec.serial + 1;
  s.save();
  return dir;
}

std::string trimmed(std::string s) {
  while (!s.empty() && (s.back() == '\n' || s.back() == '\r' || s.back() == ' ')) s.pop_back();
  return s;
}

}  // namespace

ProjectSpec load_project(const std::string& file) {
  YAML::Node root;
  try {
    root = YAML::LoadFile(file);
  } catch (const YAML::Exception& e) {
    throw Error(file + ":" + std::to_string(e.mark.line + 1) + ": " + e.msg);
  }
  if (!root.IsMap()) throw Error(file + ": expected a map with project, server and sites");
  ProjectSpec p;
  const std::set<std::string> known{"project", "server", "sites", "validity_days", "key"};
  for (const auto& kv : root) {
    const std::string k = kv.first.as<std::string>();
    if (!known.count(k))
      throw Error(at(file, kv.first) + ": unknown key '" + k +
                  "' (expected project, server, sites, validity_days, key)");
  }
  try {
    if (!root["project"]) throw Error(file + ": no 'project' name");
    p.name = root["project"].as<std::string>();
    check_name("project", p.name);
    const YAML::Node server = root["server"];
    if (!server || !server.IsMap() || !server["hosts"] || !server["hosts"].IsSequence() ||
        server["hosts"].size() == 0)
      throw Error(at(file, server) + ": 'server' needs 'hosts' (a list of host names or IPs)");
    for (const auto& h : server["hosts"]) p.server_hosts.push_back(h.as<std::string>());
    if (server["port"]) p.port = server["port"].as<int>();
    if (p.port <= 0 || p.port > 65535)
      throw Error(at(file, server["port"]) + ": port must be 1..65535");
    const YAML::Node sites = root["sites"];
    if (!sites || !sites.IsSequence() || sites.size() == 0)
      throw Error(at(file, sites) + ": 'sites' must be a non-empty list of site names");
    std::set<std::string> seen;
    for (const auto& s : sites) {
      std::string name = s.as<std::string>();
      try {
        check_name("site", name);
      } catch (const Error& e) {
        throw Error(at(file, s) + ": " + e.what());
      }
      if (!seen.insert(name).second) throw Error(at(file, s) + ": site '" + name + "' twice");
      p.sites.push_back(name);
    }
    if (root["validity_days"]) p.validity_days = root["validity_days"].as<int>();
    if (p.validity_days < 1 || p.validity_days > 3650)
      throw Error(at(file, root["validity_days"]) + ": validity_days must be 1..3650");
    if (root["key"]) {
      try {
        p.key = key_type_from_name(root["key"].as<std::string>());
      } catch (const Error& e) {
        throw Error(at(file, root["key"]) + ": " + e.what());
      }
    }
  } catch (const YAML::Exception& e) {
    throw Error(file + ":" + std::to_string(e.mark.line + 1) + ": " + e.msg);
  }
  return p;
}

ProvisionResult provision(const ProjectSpec& p, const std::string& out) {
  if (fs::exists(out) && !fs::is_empty(out))
    throw Error(out + " exists and is not empty: kits are never overwritten");
  ProvisionResult result;
  const std::string address = p.server_hosts.front() + ":" + std::to_string(p.port);
  CaState s;
  s.dir = out + "/ca";
  make_kit_dir(s.dir);
  CertSpec ca_spec;
  ca_spec.common_name = p.name + " root CA";
  // The CA outlives the certificates it signs, so they can be renewed under it.
  ca_spec.validity_days = std::max(p.validity_days * 2, 3650);
  ca_spec.key = p.key;
  s.ca = make_ca(ca_spec);
  write_file_atomic(s.dir + "/ca.pem", s.ca.cert);
  write_private(s.dir + "/ca.key", s.ca.key);
  s.state = {{"format", 1},
             {"project", p.name},
             {"server_address", address},
             {"validity_days", p.validity_days},
             {"key", p.key == KeyType::EcdsaP256 ? "ecdsa-p256" : "rsa-2048"},
             {"next_serial", 2},
             {"issued", json::object()},
             {"revoked", json::array()}};
  result.ca_fingerprint = certificate_info(s.ca.cert).sha256;

  // Server kit.
  const std::string server = out + "/server";
  make_kit_dir(server);
  CertSpec sv;
  sv.common_name = p.server_hosts.front();
  sv.role = CertRole::Server;
  sv.hosts = p.server_hosts;
  sv.serial = 1;
  sv.validity_days = p.validity_days;
  sv.key = p.key;
  CertKey sc = issue_certificate(s.ca, sv);
  write_file_atomic(server + "/cert.pem", sc.cert);
  write_private(server + "/key.pem", sc.key);
  write_file_atomic(server + "/ca.pem", s.ca.cert);
  write_file_atomic(server + "/server.txt", "0.0.0.0:" + std::to_string(p.port) + "\n");
  s.state["issued"]["server"] = {{"serial", 1}, {"role", "server"}};
  s.save();
  write_crl(out, s);  // an empty list, signed: the server checks against it from the start
  result.kits.push_back(server);
  for (const auto& site : p.sites) result.kits.push_back(issue_site_kit(out, s, site, 0));
  return result;
}

std::string add_site(const std::string& kits_dir, const std::string& site, int validity_days) {
  CaState s = load_ca(kits_dir);
  return issue_site_kit(kits_dir, s, site, validity_days);
}

uint64_t revoke_site(const std::string& kits_dir, const std::string& site) {
  CaState s = load_ca(kits_dir);
  if (!s.state["issued"].contains(site))
    throw Error("no kit was issued to '" + site + "' (" + s.dir + "/state.json)");
  const uint64_t serial = s.state["issued"][site]["serial"].get<uint64_t>();
  auto& revoked = s.state["revoked"];
  if (std::find(revoked.begin(), revoked.end(), json(serial)) == revoked.end())
    revoked.push_back(serial);
  s.state["issued"].erase(site);
  s.state["revoked_names"][std::to_string(serial)] = site;
  s.save();
  write_crl(kits_dir, s);
  return serial;
}

Kit load_kit(const std::string& dir) {
  Kit k;
  k.dir = dir;
  const std::string manifest_file = dir + "/" + kManifest;
  const std::string manifest = read_text(manifest_file);
  const std::string signature = read_text(dir + "/" + kSignature);
  const std::string ca = read_text(dir + "/ca.pem");
  if (!verify_bytes(ca, manifest, signature))
    throw Error(manifest_file + ": signature does not match (the kit was modified after " +
                "provisioning, or signed by another CA)");
  json m;
  try {
    m = json::parse(manifest);
    k.name = m.at("kit").get<std::string>();
    k.role = m.at("role").get<std::string>();
  } catch (const json::exception& e) {
    throw Error(manifest_file + ": " + e.what());
  }
  std::set<std::string> listed;
  for (const auto& [file, sha] : m.at("files").items()) {
    if (file.find('/') != std::string::npos || file.empty() || file[0] == '.')
      throw Error(manifest_file + ": bad file name '" + file + "'");
    const std::string path = dir + "/" + file;
    if (!fs::exists(path)) throw Error(path + ": missing from the kit");
    if (sha256_hex(read_text(path)) != sha.get<std::string>())
      throw Error(path + ": does not match the kit's signed manifest (modified or replaced)");
    listed.insert(file);
  }
  for (const char* need : {"ca.pem", "cert.pem", "key.pem", "server.txt"})
    if (!listed.count(need)) throw Error(manifest_file + ": does not list " + need);
  k.ca_cert = dir + "/ca.pem";
  k.cert = dir + "/cert.pem";
  k.key = dir + "/key.pem";
  if (listed.count("crl.pem")) k.crl = dir + "/crl.pem";
  struct stat st {};
  if (::stat(k.key.c_str(), &st) == 0 && (st.st_mode & 077))
    throw Error(k.key + ": the private key is readable by other users (mode " +
                std::to_string((st.st_mode >> 6) & 7) + std::to_string((st.st_mode >> 3) & 7) +
                std::to_string(st.st_mode & 7) + "): chmod 600 " + k.key);
  const std::string cert = read_text(k.cert);
  if (!key_matches_certificate(read_text(k.key), cert))
    throw Error(k.key + ": does not belong to " + k.cert);
  if (k.role == "site" && certificate_info(cert).common_name != k.name)
    throw Error(k.cert + ": is for '" + certificate_info(cert).common_name + "', the kit is '" +
                k.name + "'");
  k.server = trimmed(read_text(dir + "/server.txt"));
  k.ca_fingerprint = certificate_info(ca).sha256;
  return k;
}

SiteClientOptions site_options(const Kit& kit) {
  if (kit.role != "site") throw Error(kit.dir + ": is a " + kit.role + " kit, not a site kit");
  SiteClientOptions o;
  o.server = kit.server;
  o.site = kit.name;
  o.ca_cert = kit.ca_cert;
  o.cert = kit.cert;
  o.key = kit.key;
  return o;
}

ServerOptions server_options(const Kit& kit, const std::vector<std::string>& sites) {
  if (kit.role != "server") throw Error(kit.dir + ": is a " + kit.role + " kit, not the server's");
  ServerOptions o;
  o.listen = kit.server;
  o.ca_cert = kit.ca_cert;
  o.server_cert = kit.cert;
  o.server_key = kit.key;
  o.crl = kit.crl;
  o.sites = sites;
  return o;
}

}  // namespace concord::net
