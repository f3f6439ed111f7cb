// Command-line options of distributed training (`ultramem train --nproc N ...`): launching the ranks of
// this machine, and the rendezvous of a rank (docs/distributed.md).
#pragma once
#include <cstdint>
#include <string>

#include "ultramem/dist/rendezvous.h"

namespace CLI {
class App;
}

namespace ultramem::cli {

struct DistArgs {
  int64_t nproc = 1;        // ranks to start on this machine (> 1 or nnodes > 1: act as launcher)
  int64_t nnodes = 1;       // machines
  int64_t node_rank = 0;    // this machine
  dist::RendezvousFlags rendezvous;  // --master-addr/--master-port/--rank/--world-size/--dist-timeout/--dist-iface
};

void add_dist_options(CLI::App* cmd, DistArgs& a);

// When `a` asks for a launch (--nproc > 1 or --nnodes > 1) and this process is not itself a launched
// rank (ULTRAMEM_LAUNCHED unset): starts the ranks as copies of this command line (with --threads set
// to cores / nproc unless given), forwards their output, and returns the exit code to end with.
// Returns -1 when this process should train itself.
int launch_if_requested(const DistArgs& a);

// This process's rendezvous: flags, then the environment (MASTER_ADDR, ...), then one process.
dist::RendezvousConfig resolve_rank(const DistArgs& a);

}  // namespace ultramem::cli
