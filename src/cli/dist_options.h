// The command-line flags of distributed training (`ultramem train --nproc N ...`, docs/distributed.md).
#pragma once
#include "ultramem/dist/train_job.h"

namespace CLI {
class App;
}

namespace ultramem::cli {

void add_dist_options(CLI::App* cmd, dist::LaunchArgs& a);

}  // namespace ultramem::cli
