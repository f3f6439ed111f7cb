#include "ultramem/dist/train_job.h"

#include <unistd.h>

#include <algorithm>
#include <cmath>
#include <cstdlib>
#include <filesystem>
#include <fstream>
#include <iomanip>
#include <iostream>
#include <iterator>
#include <memory>

#include "ultramem/checkpoint/run_folder.h"
#include "ultramem/dist/data_parallel.h"
#include "ultramem/dist/launcher.h"
#include "ultramem/dist/memory_sharding.h"
#include "ultramem/dist/process_group.h"
#include "ultramem/checkpoint/checkpoint.h"
#include "ultramem/io/error_message.h"
#include "ultramem/io/json_file.h"
#include "ultramem/ops/runtime.h"
#include "ultramem/train/run.h"

namespace ultramem::dist {
namespace {
namespace fs = std::filesystem;
using nlohmann::json;

// "key=value": value parsed as JSON when it is JSON (numbers, true/false), else as a string.
void apply_set(json& train, const std::string& kv) {
  const auto eq = kv.find('=');
  if (eq == std::string::npos || eq == 0) throw std::invalid_argument("--set expects KEY=VALUE, got \"" + kv + "\"");
  const std::string key = kv.substr(0, eq), value = kv.substr(eq + 1);
  try {
    train[key] = json::parse(value);
  } catch (const json::parse_error&) {
    train[key] = value;
  }
}

// Final validation loss recorded in other runs' records, next to this one's.
void print_comparison(const std::string& own_dir, const json& own, const std::vector<std::string>& dirs) {
  std::cout << "\n" << std::left << std::setw(28) << "run" << std::setw(10) << "steps" << std::setw(12) << "val_loss"
            << "\n";
  auto row = [](const std::string& name, const json& f) {
    std::cout << std::left << std::setw(28) << name << std::setw(10) << f.value("step", int64_t(0)) << std::setw(12)
              << std::fixed << std::setprecision(4) << f.value("val_loss", 0.0) << "\n";
  };
  row(own_dir, own);
  for (const auto& d : dirs) {
    const auto rec = checkpoint::run_record_path(d);
    if (!fs::exists(rec)) {
      std::cout << std::left << std::setw(28) << d << "(not trained yet: no " << rec << ")\n";
      continue;
    }
    const auto j = io::read_json_file(rec);
    if (!j.contains("final")) {
      std::cout << std::left << std::setw(28) << d << "(no finished training recorded)\n";
      continue;
    }
    row(d, j["final"]);
  }
  std::cout << std::flush;
}

// This process's command line (argv[0] first).
std::vector<std::string> own_command_line() {
  std::ifstream in("/proc/self/cmdline", std::ios::binary);
  const std::string all((std::istreambuf_iterator<char>(in)), std::istreambuf_iterator<char>());
  std::vector<std::string> out;
  size_t start = 0;
  for (size_t i = 0; i < all.size(); ++i)
    if (all[i] == '\0') {
      out.push_back(all.substr(start, i - start));
      start = i + 1;
    }
  if (out.empty()) throw std::runtime_error("cannot read this process's command line from /proc/self/cmdline");
  return out;
}

// Every rank must train the same model with the same settings on the same data: the ranks exchange
// them through the rendezvous store, and a difference stops every rank with the fields that differ.
void check_ranks_agree(Group& group, const json& settings) {
  const auto all = group.exchange("run_settings", settings.dump());
  const json first = json::parse(all[0]);
  std::string diffs;
  for (size_t r = 1; r < all.size(); ++r)
    for (const auto& d : checkpoint::config_differences(first, json::parse(all[r])))
      diffs += "\n  rank 0 vs rank " + std::to_string(r) + ": " + d;
  if (!diffs.empty())
    throw std::runtime_error("the ranks were started with different settings (start every rank with the same "
                             "config, flags and prepared data):" + diffs);
}

// Trains in this process: alone, or as one rank of the run `rdv` describes (only rank 0 prints and
// writes run.json and metrics).
void train_process(const TrainJob& a, const RendezvousConfig& rdv) {
  const bool lead = rdv.rank == 0;
  auto file = train::read_run_config(a.config);
  json tj = file.train;
  if (!a.train_config.empty()) {
    const json extra = io::read_json_file(a.train_config);
    if (!extra.is_object())
      throw std::runtime_error(a.train_config + ": expected a JSON object of train settings, got " + extra.type_name());
    tj.update(extra);
  }
  for (const auto& kv : a.sets) apply_set(tj, kv);
  tj.update(a.overrides);
  const auto name = file.model.find("name");
  const std::string model_name = name != file.model.end() && name->is_string() ? name->get<std::string>() : "model";
  // A non-string out_dir is left for the train config's check, which names the key.
  if (!a.out_dir.empty())
    tj["out_dir"] = a.out_dir;
  else if (!tj.contains("out_dir"))
    tj["out_dir"] = "runs/" + model_name;

  // The configs' own checks, here so that their errors name the file (TrainingRun repeats them).
  try {
    (void)nn::model_config_from_json(file.model);
  } catch (const std::invalid_argument& e) {
    throw std::invalid_argument(a.config + ": model: " + e.what());
  }
  try {
    (void)train::train_config_from_json(tj);
  } catch (const std::invalid_argument& e) {
    throw std::invalid_argument(a.config + (a.train_config.empty() ? "" : " + " + a.train_config) +
                                " (with the command's flags): " + e.what());
  }

  train::RunOptions o;
  o.model = file.model;
  o.train = tj;
  o.data.task = "lm";
  o.data.data_dir = a.data_dir;
  o.resume = a.resume ? train::Resume::kRequired : train::Resume::kRefuse;
  o.rank = rdv.rank;
  o.world = rdv.world_size;
  o.log = &std::cout;
  o.record = {{"config", fs::absolute(a.config).lexically_normal().string()}};
  std::shared_ptr<Group> group;
  if (rdv.distributed()) {
    o.parallelize = [&group, &rdv, lead](torch::nn::Module& model,
                                         const json& settings) -> std::shared_ptr<train::ParallelContext> {
      group = Group::join(rdv);
      check_ranks_agree(*group, settings);
      auto sharded = shard_memory_values(model, group);
      if (lead)
        std::cout << "distributed: " << rdv.world_size << " ranks, " << sharded.size()
                  << " memory value tables sharded by columns (" << group->timeout_seconds() << " s timeout)"
                  << std::endl;
      return std::make_shared<DataParallel>(group, sharded);
    };
  }
  train::TrainingRun run(std::move(o));
  const bool finished = run.run(a.stop_at);
  if (group) group->barrier("end of training");
  if (!lead) return;
  const auto& st = run.trainer().state();
  if (!finished) {
    std::cout << "stopped at step " << st.step << " of " << run.train_config().steps << "; continue with --resume"
              << std::endl;
    return;
  }
  const double val = run.record()["final"]["val_loss"].get<double>();
  std::cout << "final: step " << st.step << ", val loss " << std::fixed << std::setprecision(4) << val
            << " (perplexity " << std::setprecision(1) << std::exp(val) << "), checkpoint " << run.checkpoint_path()
            << std::endl;
  if (!a.compare.empty()) print_comparison(run.train_config().out_dir, run.record()["final"], a.compare);
}

}  // namespace

int launch_if_requested(const LaunchArgs& a) {
  if (a.nproc <= 1 && a.nnodes <= 1) return -1;
  if (const char* l = std::getenv("ULTRAMEM_LAUNCHED"); l && *l) return -1;  // a launched rank
  LaunchOptions o;
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
  Launcher launcher(o);
  launcher.start(self_executable(), args);
  std::cerr << "ultramem: started " << a.nproc << " of " << a.nproc * a.nnodes << " ranks on this machine (rendezvous "
            << o.master_addr << ":" << launcher.master_port() << ")" << std::endl;
  const auto r = launcher.wait();
  if (r.exit_code != 0)
    std::cerr << "ultramem: error: rank " << r.failed_rank << " failed with exit code " << r.exit_code
              << "; the run stopped (the last checkpoint, if any, is intact)" << std::endl;
  return r.exit_code;
}

int run_train_job(const TrainJob& a) {
  if (const int code = launch_if_requested(a.launch); code >= 0) return code;
  const auto rdv = resolve_rendezvous(a.launch.rendezvous);
  if (!rdv.distributed()) {
    train_process(a, rdv);
    return 0;
  }
  // A rank: any error ends this process at once with a message naming the rank. _exit skips
  // destructors, which could wait on peers that are gone.
  try {
    train_process(a, rdv);
  } catch (const std::exception& e) {
    const std::string who = "rank " + std::to_string(rdv.rank) + " of " + std::to_string(rdv.world_size);
    const std::string msg = io::error_message(e);
    std::cerr << "ultramem: error: " << (msg.find(who) == std::string::npos ? who + ": " : "") << msg << std::endl;
    std::cout.flush();
    ::_exit(1);
  }
  return 0;
}

}  // namespace ultramem::dist
