// Training-step time against the size of the memory value table, at equal activated compute.
//
// One full training step (Trainer::train_step: forward, backward, clipping, AdamW, rank-1 refresh) of a
// small transformer with one UltraMem layer of N = 2^16 and N = 2^22 physical rows: same D, Dv, E, H,
// m, Dk, r, C, so every token reads the same number of value rows (only n = sqrt(E N), the number of
// keys per side, grows). Two optimizer set-ups:
//   row_sparse: sparse COO value gradients + row-sparse (lazy) AdamW: cost ~ rows touched
//   dense:      dense value gradients + dense AdamW: every step touches the whole table
// The two sizes of one set-up are measured interleaved (step of A, step of B, ...), so that a change
// of machine load affects both alike. With row_sparse, the memory layer alone (forward + backward of
// the same tokens, outside the model) is timed too, to show where the growth with n comes from.
// Prints one JSON line per configuration and a summary line with the ratios t(2^22) / t(2^16) of the
// median and of the fastest step.
//
//   ./build/<dir>/bench/bench_train [--steps=12] [--warmup=3] [--threads=0] [--small=16] [--large=22]
//                                   [--modes=row_sparse,dense] [--d-model=256] [--layers=4] [--dk=32]
#include <torch/torch.h>

#include <algorithm>
#include <chrono>
#include <cstdio>
#include <cstdlib>
#include <iostream>
#include <memory>
#include <nlohmann/json.hpp>
#include <string>
#include <vector>

#include "ultramem/nn/model_config.h"
#include "ultramem/nn/transformer.h"
#include "ultramem/nn/ultramem.h"
#include "ultramem/ops/runtime.h"
#include "ultramem/train/trainer.h"
#include "ultramem/train/transformer_model.h"

namespace {

using namespace ultramem;
using nlohmann::json;

struct Args {
  int steps = 12;
  int warmup = 3;
  int threads = 0;
  int small_log2 = 16;
  int large_log2 = 22;
  int64_t d_model = 256;  // model width (SwiGLU hidden = 8/3 of it); the memory keeps Dv = 128
  int64_t layers = 4;
  int64_t dk = 32;        // key dim of the memory (the key scoring grows with n = sqrt(N))
  std::vector<std::string> modes = {"row_sparse", "dense"};
};

constexpr int64_t kBatch = 8, kSeq = 64, kVocab = 2048;

nn::ModelConfig model_config(const Args& a, int log2_rows, bool sparse) {
  nn::ModelConfig c;
  c.name = "bench_train";
  c.vocab_size = kVocab;
  c.d_model = a.d_model;
  c.n_layers = a.layers;
  c.n_heads = 4;
  c.max_seq_len = kSeq;
  c.ffn_hidden = (8 * a.d_model + 2) / 3;
  c.ffn = {nn::FfnKind::Dense};
  c.memory_placement = nn::parse_placement(c.n_layers >= 3 ? "2:3" : "1:1", c.n_layers);
  auto& u = c.ultramem;
  u.E = 1;  // N = n^2: the smallest n (keys per side) for a given N
  u.n = int64_t(1) << (log2_rows / 2);
  u.Dk = a.dk;
  u.Dv = 128;
  u.r = 2;
  u.C = 2;
  u.H = 2;
  u.m = 32;
  u.m_first = 32;
  c.ultramem_sparse_value_grad = sparse;
  c.seed = 1;
  return c;
}

train::TrainConfig train_config(bool sparse) {
  train::TrainConfig t;
  t.lr = 1e-3;
  t.steps = 1000;
  t.batch_size = kBatch;
  t.seq_len = kSeq;
  t.value_sparse_adam = sparse;
  t.eval_every = 0;
  t.log_every = 0;
  t.checkpoint_every = 0;
  t.out_dir = "/tmp/ultramem_bench_train";
  return t;
}

struct Setup {
  int log2_rows;
  int64_t n;
  std::shared_ptr<train::TrainableModel> model;
  std::unique_ptr<train::Trainer> trainer;
  std::vector<double> ms;         // whole step
  std::vector<double> update_ms;  // clipping + optimizer step + rank-1 refresh
  // The memory layer alone (same config, sparse value gradient): forward + backward of T tokens.
  std::unique_ptr<nn::UltraMem> layer;
  torch::Tensor x, g;             // [T, D] input and output gradient
  std::vector<double> layer_ms;
};


std::unique_ptr<Setup> make_setup(const Args& a, int log2_rows, bool sparse) {
  if (log2_rows % 2 != 0) {
    std::cerr << "bench_train: log2(N) must be even (N = n^2 with E = 1), got " << log2_rows << "\n";
    std::exit(2);
  }
  auto s = std::make_unique<Setup>();
  s->log2_rows = log2_rows;
  const auto cfg = model_config(a, log2_rows, sparse);
  s->n = cfg.ultramem.n;
  s->model = train::as_trainable(nn::Transformer(cfg));
  auto gen = std::make_shared<int64_t>(0);
  train::BatchSource src;
  src.next = [gen] {
    auto g = at::detail::createCPUGenerator(static_cast<uint64_t>(++*gen));
    const auto x = torch::randint(kVocab, {kBatch, kSeq + 1}, g, torch::kLong);
    using torch::indexing::Slice;
    return train::Batch{x.index({Slice(), Slice(0, kSeq)}).contiguous(),
                        x.index({Slice(), Slice(1, kSeq + 1)}).contiguous()};
  };
  s->trainer = std::make_unique<train::Trainer>(s->model, train_config(sparse), src);
  if (sparse) {
    s->layer = std::make_unique<nn::UltraMem>(cfg.ultramem_layer_config(0));
    s->x = torch::randn({kBatch * kSeq, cfg.d_model});
    s->g = torch::randn({kBatch * kSeq, cfg.d_model});
  }
  return s;
}

double median(std::vector<double> v) {
  std::sort(v.begin(), v.end());
  const size_t k = v.size() / 2;
  return v.size() % 2 ? v[k] : 0.5 * (v[k - 1] + v[k]);
}

struct Ratio {
  double median, min;  // t(large) / t(small) of the median and of the fastest step
};

// Measures the two sizes of one optimizer set-up, interleaved.
Ratio run_mode(const std::string& mode, const Args& a) {
  const bool sparse = mode == "row_sparse";
  std::vector<std::unique_ptr<Setup>> setups;
  for (int lg : {a.small_log2, a.large_log2}) setups.push_back(make_setup(a, lg, sparse));
  for (int i = 0; i < a.warmup + a.steps; ++i) {
    for (auto& s : setups) {
      const auto t0 = std::chrono::steady_clock::now();
      const auto st = s->trainer->train_step();
      const double ms = std::chrono::duration<double, std::milli>(std::chrono::steady_clock::now() - t0).count();
      double layer_ms = 0;
      if (s->layer) {
        const auto l0 = std::chrono::steady_clock::now();
        (*s->layer)->zero_grad();
        ((*s->layer)->forward(s->x) * s->g).sum().backward();
        layer_ms = std::chrono::duration<double, std::milli>(std::chrono::steady_clock::now() - l0).count();
      }
      if (i >= a.warmup) {
        if (s->layer) s->layer_ms.push_back(layer_ms);
        s->ms.push_back(ms);
        s->update_ms.push_back(1000.0 * st.update_seconds);
      }
    }
  }
  for (auto& s : setups) {
    const double med = median(s->ms);
    if (s->layer)
      std::cout << json{{"bench", "memory_layer_fwd_bwd"},
                        {"N", int64_t(1) << s->log2_rows},
                        {"n", s->n},
                        {"tokens", kBatch * kSeq},
                        {"ms_median", median(s->layer_ms)},
                        {"ms_min", *std::min_element(s->layer_ms.begin(), s->layer_ms.end())}}
                       .dump()
                << std::endl;
    std::cout << json{{"bench", "train_step"},
                      {"optimizer", mode},
                      {"N", int64_t(1) << s->log2_rows},
                      {"log2_N", s->log2_rows},
                      {"n", s->n},
                      {"value_params", (int64_t(1) << s->log2_rows) * 128},
                      {"tokens_per_step", kBatch * kSeq},
                      {"steps", a.steps},
                      {"step_ms_median", med},
                      {"step_ms_min", *std::min_element(s->ms.begin(), s->ms.end())},
                      {"step_ms_max", *std::max_element(s->ms.begin(), s->ms.end())},
                      {"update_ms_median", median(s->update_ms)},
                      {"update_ms_min", *std::min_element(s->update_ms.begin(), s->update_ms.end())},
                      {"tokens_per_s", 1000.0 * kBatch * kSeq / med}}
                     .dump()
              << std::endl;
  }
  auto fastest = [](const Setup& s) { return *std::min_element(s.ms.begin(), s.ms.end()); };
  return {median(setups[1]->ms) / median(setups[0]->ms), fastest(*setups[1]) / fastest(*setups[0])};
}

bool starts_with(const std::string& s, const std::string& p) { return s.compare(0, p.size(), p) == 0; }

}  // namespace

int main(int argc, char** argv) {
  Args a;
  for (int i = 1; i < argc; ++i) {
    const std::string s = argv[i];
    auto val = [&](const std::string& p) { return s.substr(p.size()); };
    if (starts_with(s, "--steps=")) a.steps = std::stoi(val("--steps="));
    else if (starts_with(s, "--warmup=")) a.warmup = std::stoi(val("--warmup="));
    else if (starts_with(s, "--threads=")) a.threads = std::stoi(val("--threads="));
    else if (starts_with(s, "--small=")) a.small_log2 = std::stoi(val("--small="));
    else if (starts_with(s, "--large=")) a.large_log2 = std::stoi(val("--large="));
    else if (starts_with(s, "--d-model=")) a.d_model = std::stoll(val("--d-model="));
    else if (starts_with(s, "--layers=")) a.layers = std::stoll(val("--layers="));
    else if (starts_with(s, "--dk=")) a.dk = std::stoll(val("--dk="));
    else if (starts_with(s, "--modes=")) {
      a.modes.clear();
      std::string m = val("--modes=");
      for (size_t p = 0; p <= m.size();) {
        const size_t q = std::min(m.find(',', p), m.size());
        a.modes.push_back(m.substr(p, q - p));
        p = q + 1;
      }
    } else {
      std::cerr << "bench_train: unknown argument " << s << "\n";
      return 2;
    }
  }
  for (const auto& m : a.modes)
    if (m != "row_sparse" && m != "dense") {
      std::cerr << "bench_train: unknown mode '" << m << "' (row_sparse | dense)\n";
      return 2;
    }
  if (a.steps < 1 || a.warmup < 0) {
    std::cerr << "bench_train: --steps must be >= 1 and --warmup >= 0\n";
    return 2;
  }
  ultramem::set_threads(a.threads);
  std::cout << json{{"bench", "config"},
                    {"threads", at::get_num_threads()},
                    {"batch", kBatch},
                    {"seq_len", kSeq},
                    {"model", nn::model_config_to_json(model_config(a, a.small_log2, true))}}
                   .dump()
            << std::endl;
  json summary = {{"bench", "summary"}};
  for (const auto& m : a.modes) {
    const Ratio r = run_mode(m, a);
    summary["ratio_median_" + m] = r.median;
    summary["ratio_min_" + m] = r.min;
    if (m == "row_sparse") summary["row_sparse_within_1.5x"] = r.median <= 1.5;
  }
  std::cout << summary.dump() << std::endl;
  return 0;
}
