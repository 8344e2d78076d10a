#include "commands.h"

#include <concord/error.h>

namespace concord::cli {

void add_validate_command(CLI::App& app, Globals&) {
  auto* sub = app.add_subcommand("validate", "(under construction)");
  sub->callback([] { throw Error("'validate' is under construction"); });
}

}  // namespace concord::cli
