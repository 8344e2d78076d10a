#include "commands.h"

#include <concord/error.h>

namespace concord::cli {

void add_harmonize_command(CLI::App& app, Globals&) {
  auto* sub = app.add_subcommand("harmonize", "(under construction)");
  sub->callback([] { throw Error("'harmonize' is under construction"); });
}

}  // namespace concord::cli
