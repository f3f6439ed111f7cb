// Where the ranks of a distributed run meet: master address and port of the c10d TCPStore (hosted by
// rank 0), world size, this process's rank, and the timeout after which a missing or silent peer is an
// error. Read from command-line values first, then the usual environment variables (the names torchrun
// uses), then defaults.
#pragma once
#include <cstdint>
#include <string>

namespace ultramem::dist {

// Part of the error of a collective whose peer failed (Group); the launcher reads it to tell the rank that
// failed first from the ranks that noticed.
inline constexpr const char* kPeerFailedMessage = "another rank died, hung or left";

struct RendezvousConfig {
  std::string master_addr = "127.0.0.1";  // host of rank 0's TCPStore (env MASTER_ADDR)
  int64_t master_port = 29500;            // its TCP port (env MASTER_PORT)
  int64_t world_size = 1;                 // processes in the run (env WORLD_SIZE)
  int64_t rank = 0;                       // this process, in [0, world_size) (env RANK)
  int64_t local_rank = 0;                 // this process among those of its machine (env LOCAL_RANK)
  double timeout_seconds = 300;           // rendezvous and every collective (env ULTRAMEM_DIST_TIMEOUT)
  std::string interface;                  // network interface for Gloo (env GLOO_SOCKET_IFNAME); empty:
                                          // loopback when master_addr is loopback, else this host's name

  // std::invalid_argument naming the field: world_size < 1, rank outside [0, world_size), port outside
  // [1, 65535], timeout <= 0, empty master_addr.
  void validate() const;
  bool distributed() const { return world_size > 1; }
};

// Values given on the command line; -1 / empty / <= 0 mean "not given".
struct RendezvousFlags {
  std::string master_addr;
  int64_t master_port = -1;
  int64_t world_size = -1;
  int64_t rank = -1;
  int64_t local_rank = -1;
  double timeout_seconds = -1;
  std::string interface;
};

// Flags, else environment (MASTER_ADDR, MASTER_PORT, WORLD_SIZE, RANK, LOCAL_RANK, ULTRAMEM_DIST_TIMEOUT,
// GLOO_SOCKET_IFNAME), else defaults; validated. A non-numeric environment value is an
// std::invalid_argument naming the variable.
RendezvousConfig resolve_rendezvous(const RendezvousFlags& flags);

}  // namespace ultramem::dist
