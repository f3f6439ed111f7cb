// Starts the ranks of this machine as child processes (`ultramem train --nproc N`), each the same
// program with the rendezvous environment set: RANK, WORLD_SIZE, LOCAL_RANK, LOCAL_WORLD_SIZE,
// MASTER_ADDR, MASTER_PORT and ULTRAMEM_LAUNCHED=1. Their output lines are forwarded with a
// "[rank r] " prefix. When a rank fails (non-zero exit or a signal), the others get `grace_seconds` to
// notice (they fail their next collective) and are then terminated; the launch fails with the first
// failing rank's status (of ranks seen ending together, one whose error does not say that a peer failed). Children die with the launcher (PR_SET_PDEATHSIG).
//
// Several machines: run the launcher on each with the same nnodes, master_addr and master_port, and
// node_rank 0..nnodes-1; rank = node_rank * nproc + local rank.
#pragma once
#include <sys/types.h>

#include <cstdint>
#include <functional>
#include <map>
#include <string>
#include <vector>

namespace ultramem::dist {

struct LaunchOptions {
  int64_t nproc = 1;                     // ranks on this machine
  int64_t nnodes = 1;                    // machines
  int64_t node_rank = 0;                 // this machine, in [0, nnodes)
  std::string master_addr = "127.0.0.1"; // rank 0's machine
  int64_t master_port = 0;               // 0: a free port of this machine (single machine only)
  double grace_seconds = 10;             // after a failure, before SIGTERM (SIGKILL 5 s later)
  std::map<std::string, std::string> extra_env;  // further variables for every rank
  // Receives every output line (without '\n') of every rank; default: "[rank r] line" to the
  // launcher's stdout or stderr, matching the stream the rank wrote to.
  std::function<void(int64_t rank, bool is_stderr, const std::string& line)> on_line;

  void validate() const;  // std::invalid_argument naming the field
};

struct LaunchResult {
  int exit_code = 0;          // 0: every rank exited 0; else the first failure (128 + signal if killed)
  int64_t failed_rank = -1;   // global rank of the first failure
  std::vector<int> exit_codes;  // per local rank, same convention
};

class Launcher {
 public:
  explicit Launcher(LaunchOptions options);
  ~Launcher();  // terminates ranks still running
  Launcher(const Launcher&) = delete;
  Launcher& operator=(const Launcher&) = delete;

  // Forks nproc children that execute `exe` with `args` (args[0] is the program name they see).
  // std::runtime_error when a fork/pipe fails (the children started so far are killed).
  void start(const std::string& exe, const std::vector<std::string>& args);
  // Forwards output until every rank has exited; handles failures as described above. SIGINT/SIGTERM
  // received meanwhile are passed on to the ranks.
  LaunchResult wait();

  const std::vector<pid_t>& pids() const { return pids_; }  // per local rank
  int64_t master_port() const { return port_; }

 private:
  LaunchOptions opt_;
  int64_t port_ = 0;
  std::vector<pid_t> pids_;
  std::vector<int> out_fds_, err_fds_;  // -1 once closed
};

// This program's path (/proc/self/exe).
std::string self_executable();
// A TCP port that was free a moment ago (bind to port 0).
int64_t pick_free_port();
// Exit code convention of LaunchResult for a waitpid status.
int exit_code_of(int wait_status);

}  // namespace ultramem::dist
