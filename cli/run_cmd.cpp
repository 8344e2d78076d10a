#include "commands.h"

#include <concord/error.h>

namespace concord::cli {

void add_run_command(CLI::App& app, Globals&) {
  auto* sub = app.add_subcommand("run", "(under construction)");
  sub->callback([] { throw Error("'run' is under construction"); });
}

}  // namespace concord::cli
