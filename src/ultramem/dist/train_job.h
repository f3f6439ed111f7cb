// `ultramem train` as a library call: reads the config, applies the command line's settings, and
// trains in this process, or as one rank of a data-parallel run (memory values sharded by columns),
// or starts the ranks of this machine first (--nproc). The run itself is built by train::TrainingRun.
#pragma once
#include <cstdint>
#include <string>
#include <vector>

#include <nlohmann/json.hpp>

#include "ultramem/dist/rendezvous.h"

namespace ultramem::dist {

struct LaunchArgs {
  int64_t nproc = 1;        // ranks to start on this machine (> 1 or nnodes > 1: act as launcher)
  int64_t nnodes = 1;       // machines
  int64_t node_rank = 0;    // this machine
  RendezvousFlags rendezvous;  // --master-addr/--master-port/--rank/--world-size/--dist-timeout/--dist-iface
};

struct TrainJob {
  std::string config;                  // model config or {"model", "train"} file
  std::string data_dir;                // prepared data folder
  std::string out_dir;                 // run folder ("" : the train config's, else runs/<model name>)
  std::string train_config;            // extra JSON file of TrainConfig keys ("" : none)
  std::vector<std::string> sets;       // KEY=VALUE TrainConfig overrides (value parsed as JSON when it is)
  nlohmann::json overrides = nlohmann::json::object();  // TrainConfig keys set by dedicated flags
  std::vector<std::string> compare;    // run folders whose final val loss to print next to this one
  bool resume = false;
  int64_t stop_at = -1;
  LaunchArgs launch;
};

// Runs the job and returns the process exit code (0: success). Errors of a single process are thrown
// (std::invalid_argument for bad settings); a launched rank that fails prints the error naming the rank
// and ends the process at once.
int run_train_job(const TrainJob& job);

// When `a` asks for a launch (--nproc > 1 or --nnodes > 1) and this process is not itself a launched
// rank (ULTRAMEM_LAUNCHED unset): starts the ranks as copies of this command line (with --threads set
// to cores / nproc unless given), forwards their output, and returns the exit code to end with.
// Returns -1 when this process should train itself.
int launch_if_requested(const LaunchArgs& a);

}  // namespace ultramem::dist
