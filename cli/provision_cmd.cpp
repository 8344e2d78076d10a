// `concord provision`: a project's certificates and startup kits
// (core/net/include/concord/net/kit.h).
//   concord provision PROJECT.yaml --out KITS/       CA, server kit, one kit per site
//   concord provision add-site --kits KITS/ NAME     a kit for a new site
//   concord provision revoke --kits KITS/ NAME       revoke a site's certificate (CRL)
//   concord provision check KIT/                     verify a kit; print its CA fingerprint
#include "commands.h"

#include <concord/error.h>
#include <concord/net/kit.h>

#include <iostream>

namespace concord::cli {

void add_provision_command(CLI::App& app, Globals&) {
  auto* sub = app.add_subcommand(
      "provision", "Create a project's CA and startup kits (mutual TLS for concord server/site)");
  auto project = std::make_shared<std::string>();
  auto out = std::make_shared<std::string>();
  sub->add_option("project", *project, "PROJECT.yaml: project, server hosts and port, sites");
  sub->add_option("--out", *out, "Folder for the kits (must not exist or be empty)");
  sub->require_subcommand(0, 1);

  auto kits = std::make_shared<std::string>();
  auto name = std::make_shared<std::string>();
  auto days = std::make_shared<int>(0);
  auto* add = sub->add_subcommand("add-site", "Issue a kit for a new site, signed by KITS/ca");
  add->add_option("--kits", *kits, "The kits folder `concord provision` wrote")->required();
  add->add_option("name", *name, "The new site's name")->required();
  add->add_option("--validity-days", *days, "Certificate validity (default: the project's)");
  auto* revoke = sub->add_subcommand("revoke", "Revoke a site's certificate (server CRL)");
  revoke->add_option("--kits", *kits, "The kits folder `concord provision` wrote")->required();
  revoke->add_option("name", *name, "The site to revoke")->required();
  auto kit = std::make_shared<std::string>();
  auto* check = sub->add_subcommand("check", "Verify a kit's signed manifest and files");
  check->add_option("kit", *kit, "A kit folder")->required();

  add->callback([kits, name, days] {
    const std::string dir = net::add_site(*kits, *name, *days);
    std::cout << "wrote " << dir << "\nadd '" << *name
              << "' to the pipeline's site list; hand the folder to the site over a secure "
                 "channel\n";
  });
  revoke->callback([kits, name] {
    const uint64_t serial = net::revoke_site(*kits, *name);
    std::cout << "revoked '" << *name << "' (serial " << serial << "): " << *kits
              << "/server/crl.pem updated; copy it to the server (a running server re-reads "
                 "it at the next connection)\n";
  });
  check->callback([kit] {
    const net::Kit k = net::load_kit(*kit);
    std::cout << k.dir << ": " << k.role << " kit '" << k.name << "', server " << k.server
              << "\nCA fingerprint (SHA-256): " << k.ca_fingerprint << "\n";
  });
  sub->callback([sub, project, out] {
    if (!sub->get_subcommands().empty()) return;
    if (project->empty() || out->empty())
      throw Error("concord provision PROJECT.yaml --out KITS/ (or add-site, revoke, check)");
    const net::ProjectSpec p = net::load_project(*project);
    const net::ProvisionResult r = net::provision(p, *out);
    for (const auto& k : r.kits) std::cout << "wrote " << k << "\n";
    std::cout << "the CA key is " << *out << "/ca/ca.key: keep it offline, never ship it\n"
              << "CA fingerprint (SHA-256): " << r.ca_fingerprint
              << "\n(tell each site this fingerprint out of band; `concord provision check KIT` "
                 "prints it)\n";
  });
}

}  // namespace concord::cli
