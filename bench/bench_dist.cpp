// Distributed training on this machine: communication volume of the dimension-sharded memory and
// throughput from 1 to 2 ranks.
//
// The driver starts the configurations one after another as child processes (dist::Launcher, loopback
// Gloo), each running `--warmup` + `--steps` full Trainer::train_step's of a small transformer with one
// UltraMem layer on a fixed global batch of 8 x 64 tokens:
//   ranks=1 threads=1, ranks=1 threads=2, ranks=2 threads=1 (2 cores in all)
// Per rank and step it measures
//   - bytes handed to c10d for other ranks, per traffic class (dist::Group counters: memory.counts,
//     memory.hits (indices + scores all-gather), memory.outputs / memory.output_grads (all-to-all of
//     the pooled slices and their gradients), memory.score_grads (all-to-all of partial score
//     gradients), grads.allreduce (bucketed dense gradients, counted as 2(W-1)/W of the buffer),
//     scalars);
//   - bytes actually written to sockets (wchar of /proc/self/io over the step: Gloo's framing included,
//     no file I/O happens inside a step);
// and compares the memory part with the formulas (per rank, per step, T_r tokens of this rank, K = H m
// kept values per token, C cores, E IVE groups, W ranks, 4-byte floats, 8-byte indices):
//   dimension-wise  (W-1) T_r [K (8 + 4C) + 4C K + 2 * 4 E Dv / W] + 8 (W-1) per lookup
//   row-wise        (W-1)/W T_r K (8 + 2 * 4 Dv)      (fetch the remote rows, send back their gradients)
// The memory layer's `memory.*` counters are exactly what the dimension-wise formula predicts.
// Rank 0 prints JSON lines; the driver prints a summary with the tokens/s ratios.
//
//   ./build/<dir>/bench/bench_dist [--steps=8] [--warmup=2] [--n=256] [--dv=128] [--d-model=256]
#include <sys/resource.h>

#include <torch/torch.h>

#include <algorithm>
#include <chrono>
#include <cstdio>
#include <cstdlib>
#include <fstream>
#include <iostream>
#include <map>
#include <nlohmann/json.hpp>
#include <sstream>
#include <string>
#include <vector>

#include "ultramem/dist/data_parallel.h"
#include "ultramem/dist/launcher.h"
#include "ultramem/dist/memory_sharding.h"
#include "ultramem/dist/process_group.h"
#include "ultramem/nn/model_config.h"
#include "ultramem/nn/transformer.h"
#include "ultramem/ops/runtime.h"
#include "ultramem/train/trainer.h"
#include "ultramem/train/transformer_model.h"

namespace {

using namespace ultramem;
using nlohmann::json;
using Clock = std::chrono::steady_clock;

struct Args {
  int steps = 8;
  int warmup = 2;
  int64_t n = 256;  // keys per side; N = n^2 / E value rows
  int64_t dv = 128;
  int64_t d_model = 256;
  int threads = 1;  // per rank (rank mode)
};

constexpr int64_t kBatch = 8, kSeq = 64, kVocab = 2048, kE = 4, kH = 2, kM = 32, kC = 2;

Args parse(int argc, char** argv) {
  Args a;
  for (int i = 1; i < argc; ++i) {
    const std::string s = argv[i];
    auto val = [&](const char* key) -> const char* {
      const std::string k = std::string(key) + "=";
      return s.rfind(k, 0) == 0 ? argv[i] + k.size() : nullptr;
    };
    if (auto v = val("--steps")) a.steps = std::atoi(v);
    else if (auto v = val("--warmup")) a.warmup = std::atoi(v);
    else if (auto v = val("--n")) a.n = std::atoll(v);
    else if (auto v = val("--dv")) a.dv = std::atoll(v);
    else if (auto v = val("--d-model")) a.d_model = std::atoll(v);
    else if (auto v = val("--threads")) a.threads = std::atoi(v);
    else if (s == "--rank-mode") {
    } else {
      std::cerr << "bench_dist: unknown argument " << s << "\n";
      std::exit(2);
    }
  }
  return a;
}

nn::ModelConfig model_config(const Args& a) {
  nn::ModelConfig c;
  c.name = "bench_dist";
  c.vocab_size = kVocab;
  c.d_model = a.d_model;
  c.n_layers = 4;
  c.n_heads = 4;
  c.max_seq_len = kSeq;
  c.ffn_hidden = (8 * a.d_model + 2) / 3;
  c.ffn = {nn::FfnKind::Dense};
  c.memory_placement = nn::parse_placement("2:3", 4);
  auto& u = c.ultramem;
  u.E = kE;
  u.n = a.n;
  u.Dk = 32;
  u.Dv = a.dv;
  u.r = 2;
  u.C = kC;
  u.H = kH;
  u.m = kM;
  u.m_first = kM;
  c.ultramem_sparse_value_grad = true;
  c.seed = 1;
  return c;
}

int64_t wchar() {
  std::ifstream in("/proc/self/io");
  std::string key;
  int64_t v = 0;
  while (in >> key >> v)
    if (key == "wchar:") return v;
  return -1;
}

double peak_rss_mib() {
  rusage u{};
  getrusage(RUSAGE_SELF, &u);
  return u.ru_maxrss / 1024.0;
}

// One configuration, as one rank of WORLD_SIZE (from the environment; 1 without it).
int rank_main(const Args& a) {
  set_threads(a.threads);
  const auto rdv = dist::resolve_rendezvous({});
  const int64_t W = rdv.world_size, rank = rdv.rank;
  const auto cfg = model_config(a);
  auto model = train::as_trainable(nn::Transformer(cfg));
  std::shared_ptr<dist::Group> group;
  std::shared_ptr<dist::DataParallel> parallel;
  if (W > 1) {
    group = dist::Group::join(rdv);
    parallel = std::make_shared<dist::DataParallel>(group, dist::shard_memory_values(model->module(), group));
  }
  int64_t value_bytes = 0;
  for (const auto& p : model->param_groups().memory_values) value_bytes += p.numel() * p.element_size();
  const int64_t rows = kBatch / W;
  int64_t k = 0;
  train::BatchSource src;
  src.next = [&] {
    auto gen = at::detail::createCPUGenerator(static_cast<uint64_t>(k++));
    const auto x = torch::randint(kVocab, {kBatch, kSeq + 1}, gen, torch::kLong);
    return train::Batch{x.narrow(0, rank * rows, rows).narrow(1, 0, kSeq).contiguous(),
                        x.narrow(0, rank * rows, rows).narrow(1, 1, kSeq).contiguous()};
  };
  train::TrainConfig tc;
  tc.steps = a.warmup + a.steps;
  tc.batch_size = kBatch;
  tc.seq_len = kSeq;
  tc.eval_every = 0;
  tc.log_every = 0;
  tc.out_dir = "/tmp";
  train::Trainer tr(model, tc, src, {}, nullptr, parallel);
  std::vector<double> secs;
  std::map<std::string, double> bytes;  // mean per step
  double socket_bytes = 0;
  for (int s = 0; s < a.warmup + a.steps; ++s) {
    if (group) group->reset_bytes_sent();
    const int64_t w0 = wchar();
    const auto t0 = Clock::now();
    tr.train_step();
    const double dt = std::chrono::duration<double>(Clock::now() - t0).count();
    const int64_t w1 = wchar();
    if (s < a.warmup) continue;
    secs.push_back(dt);
    socket_bytes += static_cast<double>(w1 - w0) / a.steps;
    if (group)
      for (const auto& [cls, b] : group->bytes_sent()) bytes[cls] += static_cast<double>(b) / a.steps;
  }
  std::sort(secs.begin(), secs.end());
  const double median = secs[secs.size() / 2];
  // Formulas, per rank and step (one memory layer, one lookup per micro-batch).
  const double Tr = static_cast<double>(rows * kSeq), K = kH * kM, Wd = static_cast<double>(W);
  const double dim_formula = (Wd - 1) * Tr * (K * (8 + 4 * kC) + 4 * kC * K + 2 * 4.0 * kE * a.dv / Wd) + 8 * (Wd - 1);
  const double row_formula = (Wd - 1) / Wd * Tr * K * (8 + 2 * 4.0 * a.dv);
  double memory_measured = 0;
  for (const auto& [cls, b] : bytes)
    if (cls.rfind("memory.", 0) == 0) memory_measured += b;
  json out = {{"bench", "dist"},
              {"ranks", W},
              {"rank", rank},
              {"threads_per_rank", a.threads},
              {"tokens_per_step", kBatch * kSeq},
              {"tokens_per_rank", rows * kSeq},
              {"N", cfg.ultramem.n * cfg.ultramem.n / kE},
              {"Dv", a.dv},
              {"K", kH * kM},
              {"median_step_s", median},
              {"min_step_s", secs.front()},
              {"tokens_per_s", kBatch * kSeq / median},
              {"bytes_sent_per_step", bytes},
              {"memory_bytes_measured", memory_measured},
              {"memory_bytes_formula_dimension_wise", dim_formula},
              {"memory_bytes_formula_row_wise", row_formula},
              {"socket_bytes_written_per_step", socket_bytes},
              {"value_table_bytes_this_rank", value_bytes},
              {"peak_rss_mib", peak_rss_mib()}};
  if (group) group->barrier("end");
  if (rank == 0) std::cout << out.dump() << std::endl;
  std::cout.flush();
  std::_Exit(0);
}

}  // namespace

int main(int argc, char** argv) {
  const Args a = parse(argc, argv);
  for (int i = 1; i < argc; ++i)
    if (std::string(argv[i]) == "--rank-mode") return rank_main(a);
  // Driver: 1 rank x 1 thread, 1 rank x 2 threads, 2 ranks x 1 thread.
  struct Run {
    int64_t ranks;
    int threads;
  };
  std::vector<json> results;
  for (const Run r : {Run{1, 1}, Run{1, 2}, Run{2, 1}}) {
    dist::LaunchOptions o;
    o.nproc = r.ranks;
    std::string line0;
    o.on_line = [&](int64_t rank, bool is_err, const std::string& line) {
      if (!is_err && rank == 0 && !line.empty() && line[0] == '{') {
        line0 = line;
        std::cout << line << std::endl;
      } else {
        std::cerr << "[rank " << rank << "] " << line << std::endl;
      }
    };
    dist::Launcher l(o);
    l.start(dist::self_executable(),
            {"bench_dist", "--rank-mode", "--threads=" + std::to_string(r.threads), "--steps=" + std::to_string(a.steps),
             "--warmup=" + std::to_string(a.warmup), "--n=" + std::to_string(a.n), "--dv=" + std::to_string(a.dv),
             "--d-model=" + std::to_string(a.d_model)});
    const auto res = l.wait();
    if (res.exit_code != 0 || line0.empty()) {
      std::cerr << "bench_dist: the run with " << r.ranks << " ranks failed (exit " << res.exit_code << ")\n";
      return 1;
    }
    results.push_back(json::parse(line0));
  }
  const double t11 = results[0]["tokens_per_s"], t12 = results[1]["tokens_per_s"], t21 = results[2]["tokens_per_s"];
  const auto& two = results[2];
  const double Dv = static_cast<double>(a.dv), K = kH * kM;
  json summary = {{"bench", "dist_summary"},
                  {"tokens_per_s_1rank_1thread", t11},
                  {"tokens_per_s_1rank_2threads", t12},
                  {"tokens_per_s_2ranks_1thread", t21},
                  {"speedup_2ranks_vs_1rank_1thread", t21 / t11},
                  {"speedup_2ranks_vs_1rank_2threads", t21 / t12},
                  {"memory_bytes_measured_over_dimension_formula",
                   two["memory_bytes_measured"].get<double>() / two["memory_bytes_formula_dimension_wise"].get<double>()},
                  {"row_wise_over_dimension_wise_formula",
                   two["memory_bytes_formula_row_wise"].get<double>() / two["memory_bytes_formula_dimension_wise"].get<double>()},
                  // W at which the two formulas cross: W (8 + 8C) K + 8 E Dv = K (8 + 8 Dv) (large-W limit).
                  {"crossover_ranks_formula", (K * (8 + 8 * Dv) - 8 * kE * Dv) / (K * (8 + 8.0 * kC))}};
  std::cout << summary.dump() << std::endl;
  return 0;
}
