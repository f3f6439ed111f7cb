#include "dist_options.h"

#include <CLI/CLI.hpp>

#include <algorithm>
#include <cstdlib>
#include <fstream>
#include <iostream>
#include <iterator>
#include <stdexcept>
#include <vector>

#include "ultramem/dist/launcher.h"
#include "ultramem/runtime.h"

namespace ultramem::cli {
namespace {

// This process's command line (argv[0] first).
std::vector<std::string> own_command_line() {
  std::ifstream in("/proc/self/cmdline", std::ios::binary);
  const std::string all((std::istreambuf_iterator<char>(in)), std::istreambuf_iterator<char>());
  std::vector<std::string> out;
  size_t start = 0;
  for (size_t i = 0; i < all.size(); ++i) {
    if (all[i] == '\0') {
      out.push_back(all.substr(start, i - start));
      start = i + 1;
    }
  }
  if (out.empty()) throw std::runtime_error("cannot read this process's command line from /proc/self/cmdline");
  return out;
}

}  // namespace

void add_dist_options(CLI::App* cmd, DistArgs& a) {
  const char* g = "Distributed";
  cmd->add_option("--nproc", a.nproc, "Ranks to start on this machine (data parallel, memory values sharded)")
      ->group(g);
  cmd->add_option("--nnodes", a.nnodes, "Machines taking part (each runs this command with its --node-rank)")->group(g);
  cmd->add_option("--node-rank", a.node_rank, "This machine's index in [0, nnodes)")->group(g);
  cmd->add_option("--master-addr", a.rendezvous.master_addr, "Address of rank 0's machine (env MASTER_ADDR)")->group(g);
  cmd->add_option("--master-port", a.rendezvous.master_port,
                  "Rendezvous TCP port on rank 0's machine (env MASTER_PORT; --nproc on one machine picks a free one)")
      ->group(g);
  cmd->add_option("--rank", a.rendezvous.rank, "Run as this rank (env RANK), started by another launcher")->group(g);
  cmd->add_option("--world-size", a.rendezvous.world_size, "Ranks in the run (env WORLD_SIZE)")->group(g);
  cmd->add_option("--dist-timeout", a.rendezvous.timeout_seconds,
                  "Seconds after which a missing, dead or hung rank is an error (env ULTRAMEM_DIST_TIMEOUT; default 300)")
      ->group(g);
  cmd->add_option("--dist-iface", a.rendezvous.interface, "Network interface for Gloo (env GLOO_SOCKET_IFNAME)")
      ->group(g);
}

int launch_if_requested(const DistArgs& a) {
  if (a.nproc <= 1 && a.nnodes <= 1) return -1;
  if (const char* l = std::getenv("ULTRAMEM_LAUNCHED"); l && *l) return -1;  // a launched rank
  dist::LaunchOptions o;
  o.nproc = a.nproc;
  o.nnodes = a.nnodes;
  o.node_rank = a.node_rank;
  if (!a.rendezvous.master_addr.empty()) o.master_addr = a.rendezvous.master_addr;
  if (a.rendezvous.master_port > 0) o.master_port = a.rendezvous.master_port;
  if (a.rendezvous.timeout_seconds > 0) o.grace_seconds = std::min(o.grace_seconds, a.rendezvous.timeout_seconds);
  std::vector<std::string> args = own_command_line();
  const bool has_threads = std::any_of(args.begin(), args.end(), [](const std::string& s) {
    return s == "--threads" || s.rfind("--threads=", 0) == 0;
  });
  if (!has_threads) {
    const int per_rank = std::max(1, default_threads() / static_cast<int>(a.nproc));
    args.insert(args.begin() + 1, "--threads=" + std::to_string(per_rank));
  }
  dist::Launcher launcher(o);
  launcher.start(dist::self_executable(), args);
  std::cerr << "ultramem: started " << a.nproc << " of " << a.nproc * a.nnodes << " ranks on this machine (rendezvous "
            << o.master_addr << ":" << launcher.master_port() << ")" << std::endl;
  const auto r = launcher.wait();
  if (r.exit_code != 0)
    std::cerr << "ultramem: error: rank " << r.failed_rank << " failed with exit code " << r.exit_code
              << "; the run stopped (the last checkpoint, if any, is intact)" << std::endl;
  return r.exit_code;
}

dist::RendezvousConfig resolve_rank(const DistArgs& a) { return dist::resolve_rendezvous(a.rendezvous); }

}  // namespace ultramem::cli
