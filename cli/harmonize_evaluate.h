// `concord harmonize evaluate`: harmonizers compared against ground truth on brainsim, which
// renders the same test subjects under every site's scanner and under a neutral reference
// (`same_test_subjects`). Per harmonizer (a row): cross-site agreement of one subject (MAE,
// SSIM between sites), fidelity to the neutral rendering (SSIM, PSNR after a least-squares
// linear intensity fit) and the site shift of `harmonize apply` (SiteShiftReport).
#pragma once

#include "commands.h"

namespace concord::cli {

// Adds `evaluate` to the `harmonize` subcommand.
void add_harmonize_evaluate(CLI::App& harmonize, Globals& g);

}  // namespace concord::cli
