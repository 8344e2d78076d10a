// Provisioning (`concord provision`): a project's root CA, the server's kit and one startup kit
// per site, each a folder whose files the CA signs (manifest.json + manifest.sig), adding a site
// later and revoking one (the server's revocation list).
//
//   KITS/ca/       ca.pem, ca.key (0600), state.json      stays with the operator: never shipped
//   KITS/server/   cert.pem, key.pem, ca.pem, crl.pem, server.txt (listen address), manifest.*
//   KITS/<site>/   cert.pem, key.pem, ca.pem, server.txt (server address), manifest.*
#pragma once

#include <concord/net/pki.h>
#include <concord/net/transport.h>

#include <string>
#include <vector>

namespace concord::net {

// PROJECT.yaml:
//   project: demo                       # name, also the CA's name
//   server: {hosts: [fl.example.org, 127.0.0.1], port: 7443}   # SANs; sites dial hosts[0]
//   sites: [site-A, site-B]
//   validity_days: 365                  # optional (default 365)
//   key: ecdsa-p256                     # optional: ecdsa-p256 (default) or rsa-2048
struct ProjectSpec {
  std::string name;
  std::vector<std::string> server_hosts;
  int port = 7443;
  std::vector<std::string> sites;
  int validity_days = 365;
  KeyType key = KeyType::EcdsaP256;
};
// Reads and checks a project file; errors name FILE:LINE.
ProjectSpec load_project(const std::string& file);

struct ProvisionResult {
  std::vector<std::string> kits;  // folders written
  std::string ca_fingerprint;     // SHA-256 of the CA certificate: give it to sites out of band
};
// Writes KITS (which must not exist or be empty): the CA, the server kit, one kit per site.
ProvisionResult provision(const ProjectSpec& project, const std::string& out_dir);
// A kit for a new site, signed by KITS/ca (validity_days <= 0: the project's).
std::string add_site(const std::string& kits_dir, const std::string& site, int validity_days = 0);
// Puts the site's certificate on the revocation list (KITS/ca/crl.pem and the server kit's
// crl.pem, which a running server re-reads); returns the revoked serial.
uint64_t revoke_site(const std::string& kits_dir, const std::string& site);

// A kit, checked: the manifest's signature by the kit's CA, every listed file's SHA-256, the
// private key readable by its owner only and belonging to the certificate. Throws
// concord::Error naming the file that does not match.
struct Kit {
  std::string dir, name, role;          // role: "server" or "site"
  std::string server;                   // server.txt: listen address (server) or address to dial
  std::string ca_cert, cert, key, crl;  // file paths (crl: server only)
  std::string ca_fingerprint;
};
Kit load_kit(const std::string& dir);

// Transport options from a checked kit (the rest at their defaults).
SiteClientOptions site_options(const Kit& kit);
ServerOptions server_options(const Kit& kit, const std::vector<std::string>& sites);

}  // namespace concord::net
