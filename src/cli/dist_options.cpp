#include "dist_options.h"

#include <CLI/CLI.hpp>

namespace ultramem::cli {

void add_dist_options(CLI::App* cmd, dist::LaunchArgs& a) {
  const char* g = "Distributed";
  cmd->add_option("--nproc", a.nproc, "Ranks to start on this machine (data parallel, memory values sharded)")
      ->check(CLI::Range(1, 4096))
      ->group(g);
  cmd->add_option("--nnodes", a.nnodes, "Machines taking part (each runs this command with its --node-rank)")
      ->check(CLI::Range(1, 65536))
      ->group(g);
  cmd->add_option("--node-rank", a.node_rank, "This machine's index in [0, nnodes)")
      ->check(CLI::NonNegativeNumber)
      ->group(g);
  cmd->add_option("--master-addr", a.rendezvous.master_addr, "Address of rank 0's machine (env MASTER_ADDR)")->group(g);
  cmd->add_option("--master-port", a.rendezvous.master_port,
                  "Rendezvous TCP port on rank 0's machine (env MASTER_PORT; --nproc on one machine picks a free one)")
      ->group(g);
  cmd->add_option("--rank", a.rendezvous.rank, "Run as this rank (env RANK), started by another launcher")
      ->check(CLI::NonNegativeNumber)
      ->group(g);
  cmd->add_option("--world-size", a.rendezvous.world_size, "Ranks in the run (env WORLD_SIZE)")
      ->check(CLI::Range(1, 1 << 20))
      ->group(g);
  cmd->add_option("--dist-timeout", a.rendezvous.timeout_seconds,
                  "Seconds after which a missing, dead or hung rank is an error (env ULTRAMEM_DIST_TIMEOUT; default 300)")
      ->check(CLI::PositiveNumber)
      ->group(g);
  cmd->add_option("--dist-iface", a.rendezvous.interface, "Network interface for Gloo (env GLOO_SOCKET_IFNAME)")
      ->group(g);
}

}  // namespace ultramem::cli
