// Distributed training on loopback: the ranks are copies of this binary started by dist::Launcher
// (`test_dist --worker SCENARIO JSON`); the test process compares what they wrote with a single-process
// run computed here.
//   - the sharded UltraMem layer's forward and backward equal the unsharded layer's (uneven token
//     counts; rank slices aligned with, spanning, and cutting across the MCS core slices; 2 and 3 ranks);
//     the same for the sharded Engram layer;
//   - 2 ranks train like 1 process on the same global batch (losses, grad norms, validation loss), with
//     UltraMem and with Engram memories;
//   - a checkpoint saved by 2 ranks gives the same validation loss loaded by 1 and by 2 ranks, training
//     resumed from it on 1 or 2 ranks continues like the uninterrupted run, and a one-file checkpoint
//     loads into 2 ranks;
//   - a killed or hung rank makes the other exit non-zero with a clear message (and the checkpoint
//     written before stays readable); a group size that does not divide Dv is a clear error;
//   - `ultramem train --nproc 2`, then eval and a single-process resume of the sharded run folder.
#include <gtest/gtest.h>
#include <torch/torch.h>

#include <signal.h>
#include <unistd.h>

#include <atomic>
#include <chrono>
#include <cstdlib>
#include <filesystem>
#include <fstream>
#include <mutex>
#include <nlohmann/json.hpp>
#include <sstream>
#include <thread>

#include "ultramem/dist/data_parallel.h"
#include "ultramem/dist/launcher.h"
#include "ultramem/dist/memory_sharding.h"
#include "ultramem/dist/process_group.h"
#include "ultramem/io/safetensors.h"
#include "ultramem/nn/engram.h"
#include "ultramem/nn/transformer.h"
#include "ultramem/nn/ultramem.h"
#include "ultramem/ops/runtime.h"
#include "ultramem/checkpoint/checkpoint.h"
#include "ultramem/train/trainer.h"
#include "ultramem/train/transformer_model.h"

namespace fs = std::filesystem;
using nlohmann::json;
using namespace ultramem;

namespace {

// ---------------------------------------------------------------------------------------------------
// Shared by the workers and the single-process references.

nn::UltraMemConfig layer_config(int64_t Dv, int64_t C, bool sparse) {
  nn::UltraMemConfig c;
  c.D = 16;
  c.n = 8;
  c.E = 4;
  c.Dk = 8;
  c.Dv = Dv;
  c.r = 2;
  c.C = C;
  c.H = 2;
  c.m = 4;
  c.m_first = 6;
  c.num_layers = 2;
  c.sparse_value_grad = sparse;
  c.track_stats = false;
  c.seed = 3;
  return c;
}

// Rank r's tokens (uneven counts: 3 + 2r) and the weights of its loss sum(out * w).
torch::Tensor layer_input(int64_t rank, int64_t D) {
  auto gen = at::detail::createCPUGenerator(100 + static_cast<uint64_t>(rank));
  return at::normal(0.0, 1.0, {3 + 2 * rank, D}, gen);
}
torch::Tensor layer_weight(int64_t rank, int64_t D) {
  auto gen = at::detail::createCPUGenerator(200 + static_cast<uint64_t>(rank));
  return at::normal(0.0, 1.0, {3 + 2 * rank, D}, gen);
}

// Engram's sharded-layer test: row width 16 / (2*2) = 4, random taps so that every branch carries gradient.
nn::EngramConfig engram_layer_config(bool sparse) {
  nn::EngramConfig c;
  c.D = 16;
  c.heads = 2;
  c.d_e = 16;
  c.rows = 13;
  c.kernel = 3;
  c.conv_std = 0.3;
  c.value_std = 0.5;
  c.sparse_value_grad = sparse;
  c.seed = 4;
  return c;
}

// Rank r's Engram input: [1 + r, 5] sequences (uneven batches), u ~ N(0, 1), tokens in [0, 20).
std::pair<torch::Tensor, torch::Tensor> engram_input(int64_t rank, int64_t D) {
  auto gen = at::detail::createCPUGenerator(300 + static_cast<uint64_t>(rank));
  return {at::normal(0.0, 1.0, {1 + rank, 5, D}, gen), torch::randint(20, {1 + rank, 5}, gen, torch::kLong)};
}

nn::ModelConfig tiny_model(bool engram = false) {
  nn::ModelConfig c;
  c.name = "dist-tiny";
  c.vocab_size = 48;
  c.d_model = 32;
  c.n_layers = 2;
  c.n_heads = 2;
  c.max_seq_len = 16;
  c.ffn_hidden = 48;
  c.dropout = 0.0;
  c.ffn = {nn::FfnKind::Dense};
  c.memory_placement = nn::parse_placement("1:2", 2);
  c.ultramem.n = 16;
  c.ultramem.E = 4;
  c.ultramem.Dk = 8;
  c.ultramem.Dv = 16;
  c.ultramem.H = 2;
  c.ultramem.m = 4;
  c.ultramem.m_first = 6;
  c.ultramem.stats_window = 64;
  c.ultramem_sparse_value_grad = true;
  c.seed = 5;
  if (engram) {  // one Engram memory in block 1 (tables of 8 columns: 4 per rank)
    c.memory_kind = nn::MemoryKind::Engram;
    c.memory_placement = nn::parse_placement("1:1", 2);
    c.engram.heads = 2;
    c.engram.d_e = 32;
    c.engram.rows = 29;
    c.engram.sparse_value_grad = true;
  }
  return c;
}

constexpr int64_t kGlobalBatch = 4, kSeq = 12, kVocab = 48;

// Global batch k (a learnable pattern: every other token is a function of the previous one).
train::Batch global_batch(int64_t k) {
  auto gen = at::detail::createCPUGenerator(1000 + static_cast<uint64_t>(k + 100));
  const auto x = torch::randint(kVocab, {kGlobalBatch, kSeq + 1}, gen, torch::kLong);
  auto seq = x.clone();
  using torch::indexing::Slice;
  seq.index_put_({Slice(), Slice(1, torch::indexing::None, 2)}, (x.index({Slice(), Slice(0, -1, 2)}) * 7 + 3) % kVocab);
  return {seq.index({Slice(), Slice(0, kSeq)}).contiguous(), seq.index({Slice(), Slice(1, kSeq + 1)}).contiguous()};
}

struct TrainSpec {
  std::string out_dir;
  int64_t steps = 4;
  int64_t stop_at = -1;
  bool engram = false;          // the tiny model with an Engram memory instead of UltraMem
  std::string resume;           // checkpoint to resume from, or empty
  int64_t checkpoint_every = 0;
  bool eval_only = false;       // resume (weights) and evaluate, no training
};

struct TrainOutcome {
  std::vector<double> losses, grad_norms;  // per step run here
  double val = 0;
  int64_t step = 0;
};

train::TrainConfig train_config(const TrainSpec& s) {
  train::TrainConfig c;
  c.lr = 3e-3;
  c.steps = s.steps;
  c.warmup_steps = 2;
  c.batch_size = kGlobalBatch;
  c.seq_len = kSeq;
  c.grad_accum = 2;
  c.value_lr_T = 4;
  c.eval_every = 0;
  c.eval_batches = 2;
  c.log_every = 0;
  c.checkpoint_every = s.checkpoint_every;
  c.keep_best = false;
  c.seed = 9;
  c.out_dir = s.out_dir;
  return c;
}

// One process's part of a training run: the whole global batch alone, or rows [r*B/W, (r+1)*B/W) as
// rank r of `group`. Writes out_dir/progress.rank<r> (the last step done) after every step.
TrainOutcome run_training(const TrainSpec& s, const std::shared_ptr<dist::Group>& group) {
  const int64_t rank = group ? group->rank() : 0, world = group ? group->size() : 1;
  auto model = train::as_trainable(nn::Transformer(tiny_model(s.engram)));
  std::shared_ptr<train::ParallelContext> parallel;
  if (group) parallel = std::make_shared<dist::DataParallel>(group, dist::shard_memory_values(model->module(), group));
  auto pos = std::make_shared<int64_t>(0);
  train::BatchSource src;
  src.next = [pos, rank, world] {
    const auto b = global_batch((*pos)++);
    const int64_t rows = kGlobalBatch / world;
    return train::Batch{b.inputs.narrow(0, rank * rows, rows).contiguous(), b.targets.narrow(0, rank * rows, rows).contiguous()};
  };
  src.position = [pos] { return *pos; };
  src.set_position = [pos](int64_t k) { *pos = k; };
  std::vector<train::Batch> eval = {global_batch(-1), global_batch(-2)};
  train::Trainer tr(model, train_config(s), src, eval, nullptr, parallel);
  if (!s.resume.empty()) tr.resume(s.resume);
  TrainOutcome o;
  const std::string progress = (fs::path(s.out_dir) / ("progress.rank" + std::to_string(rank))).string();
  tr.on_step = [&](const train::StepStats& st) {
    o.losses.push_back(st.loss);
    o.grad_norms.push_back(st.grad_norm);
    std::ofstream(progress) << st.step << "\n";
  };
  if (!s.eval_only) tr.run(s.stop_at);
  o.val = tr.evaluate();
  o.step = tr.state().step;
  return o;
}

// ---------------------------------------------------------------------------------------------------
// Workers.

void layer_worker(const json& a, const std::shared_ptr<dist::Group>& group) {
  const auto cfg = layer_config(a.at("Dv"), a.at("C"), a.at("sparse"));
  nn::UltraMem layer(cfg);
  const auto sharded = dist::shard_memory_values(*layer, group);
  if (sharded.size() != 1) throw std::runtime_error("expected one sharded table");
  const auto x = layer_input(group->rank(), cfg.D).requires_grad_(true);
  const auto out = layer->forward(x);
  (out * layer_weight(group->rank(), cfg.D)).sum().backward();
  auto grad = layer->values.grad();
  std::vector<std::pair<std::string, at::Tensor>> t = {
      {"out", out.detach()}, {"dx", x.grad()}, {"values", layer->values.detach()},
      {"values.grad", grad.is_sparse() ? grad.to_dense() : grad}, {"wq.grad", layer->wq.grad()},
      {"keys.grad", layer->keys.grad()}, {"cores.grad", layer->cores.grad()}, {"wo.grad", layer->wo.grad()},
      {"q_scale.grad", layer->q_scale.grad()}, {"k_scale.grad", layer->k_scale.grad()}};
  io::save_safetensors(a.at("out").get<std::string>() + "/rank" + std::to_string(group->rank()) + ".safetensors", t);
}

void engram_layer_worker(const json& a, const std::shared_ptr<dist::Group>& group) {
  const auto cfg = engram_layer_config(a.at("sparse"));
  nn::Engram layer(cfg);
  const auto sharded = dist::shard_memory_values(*layer, group);
  if (sharded.size() != 1) throw std::runtime_error("expected one sharded table");
  auto [u, tokens] = engram_input(group->rank(), cfg.D);
  u.requires_grad_(true);
  const auto out = layer->forward(u, tokens);
  (out * out.detach().cos()).sum().backward();
  auto grad = layer->values.grad();
  std::vector<std::pair<std::string, at::Tensor>> t = {
      {"out", out.detach()}, {"du", u.grad()}, {"values", layer->values.detach()},
      {"values.grad", grad.is_sparse() ? grad.to_dense() : grad}};
  for (const auto& p : layer->named_parameters())
    if (p.key() != "values") t.push_back({p.key() + ".grad", p.value().grad()});
  io::save_safetensors(a.at("out").get<std::string>() + "/rank" + std::to_string(group->rank()) + ".safetensors", t);
}

void train_worker(const json& a, const std::shared_ptr<dist::Group>& group) {
  TrainSpec s;
  s.engram = a.value("engram", false);
  s.out_dir = a.at("out");
  s.steps = a.value("steps", int64_t(4));
  s.stop_at = a.value("stop_at", int64_t(-1));
  s.resume = a.value("resume", std::string());
  s.checkpoint_every = a.value("checkpoint_every", int64_t(0));
  s.eval_only = a.value("eval_only", false);
  const auto o = run_training(s, group);
  const json r = {{"losses", o.losses}, {"grad_norms", o.grad_norms}, {"val", o.val}, {"step", o.step}};
  std::ofstream(s.out_dir + "/result.rank" + std::to_string(group->rank()) + ".json") << r.dump();
}

int worker_main(const std::string& scenario, const std::string& args) {
  try {
    set_threads(1);
    const json a = json::parse(args);
    dist::RendezvousFlags f;
    f.timeout_seconds = a.value("timeout", 20.0);
    auto group = dist::Group::join(dist::resolve_rendezvous(f));
    if (scenario == "layer") {
      layer_worker(a, group);
    } else if (scenario == "engram_layer") {
      engram_layer_worker(a, group);
    } else if (scenario == "train") {
      train_worker(a, group);
    } else {
      throw std::invalid_argument("unknown scenario " + scenario);
    }
    group->barrier("end");
  } catch (const std::exception& e) {
    std::cerr << "worker error: " << e.what() << std::endl;
    ::_exit(1);
  }
  std::cout.flush();
  ::_exit(0);
}

// ---------------------------------------------------------------------------------------------------
// Test side.

struct TempDir {
  fs::path path;
  explicit TempDir(const std::string& tag) {
    path = fs::temp_directory_path() / ("ultramem_dist_" + tag + "_" + std::to_string(::getpid()));
    fs::remove_all(path);
    fs::create_directories(path);
  }
  ~TempDir() { fs::remove_all(path); }
  std::string str() const { return path.string(); }
  std::string file(const std::string& n) const { return (path / n).string(); }
};

struct Ranks {
  dist::LaunchResult result;
  std::vector<std::string> lines;  // "[rank r] line" of every rank, in arrival order
  std::string text() const {
    std::string s;
    for (const auto& l : lines) s += l + "\n";
    return s;
  }
};

// Runs `nproc` workers of `scenario`; `during(pids)` runs on a thread while they run. A watchdog kills
// the ranks after 240 s so that a hang fails the test instead of blocking it.
Ranks run_ranks(int64_t nproc, const std::string& scenario, const json& args, double grace = 30,
                const std::function<void(std::vector<pid_t>)>& during = {}) {
  Ranks r;
  std::mutex mu;
  dist::LaunchOptions o;
  o.nproc = nproc;
  o.grace_seconds = grace;
  o.on_line = [&](int64_t rank, bool, const std::string& line) {
    std::lock_guard<std::mutex> lock(mu);
    r.lines.push_back("[rank " + std::to_string(rank) + "] " + line);
  };
  dist::Launcher launcher(o);
  launcher.start(dist::self_executable(), {"test_dist", "--worker", scenario, args.dump()});
  const std::vector<pid_t> pids = launcher.pids();
  std::atomic<bool> done{false};
  std::thread watchdog([&] {
    for (int i = 0; i < 2400 && !done; ++i) std::this_thread::sleep_for(std::chrono::milliseconds(100));
    if (!done)
      for (pid_t p : pids) ::kill(p, SIGKILL);
  });
  std::thread helper;
  if (during) helper = std::thread([&] { during(pids); });
  r.result = launcher.wait();
  done = true;
  if (helper.joinable()) helper.join();
  watchdog.join();
  return r;
}

json read_json(const std::string& path) {
  std::ifstream in(path);
  if (!in) throw std::runtime_error("missing " + path);
  return json::parse(in);
}

std::map<std::string, at::Tensor> read_tensors(const std::string& path) {
  std::map<std::string, at::Tensor> m;
  for (auto& [n, t] : io::load_safetensors(path)) m[n] = t;
  return m;
}

void expect_close(const at::Tensor& a, const at::Tensor& b, double tol, const std::string& what) {
  ASSERT_EQ(a.sizes(), b.sizes()) << what;
  const double err = (a.to(torch::kDouble) - b.to(torch::kDouble)).abs().max().item<double>();
  const double scale = std::max(1.0, b.abs().max().item<double>());
  EXPECT_LE(err, tol * scale) << what << ": max abs difference " << err;
}

// Rank r's file against the one-process reference: rows [row, row + n) of the output and of the input
// gradient (saved as `in_name`), column slice [r*w, (r+1)*w) of the table and of its gradient. Returns
// the file's tensors.
std::map<std::string, at::Tensor> expect_rank_matches(const TempDir& dir, int64_t r, int64_t row, int64_t n,
                                                      const at::Tensor& out, const std::string& in_name,
                                                      const at::Tensor& in_grad, const at::Tensor& values,
                                                      const at::Tensor& vgrad, int64_t w) {
  auto t = read_tensors(dir.file("rank" + std::to_string(r) + ".safetensors"));
  const std::string of = " of rank " + std::to_string(r);
  expect_close(t["out"], out.narrow(0, row, n), 1e-5, "output" + of);
  expect_close(t[in_name], in_grad.narrow(0, row, n), 1e-5, "input gradient" + of);
  EXPECT_TRUE(t["values"].equal(values.narrow(1, r * w, w))) << "table slice" << of;
  expect_close(t["values.grad"], vgrad.narrow(1, r * w, w), 1e-5, "table gradient slice" + of);
  return t;
}

// The sharded layer on `world` ranks against the unsharded layer on all their tokens.
void check_sharded_layer(int64_t world, int64_t Dv, int64_t C, bool sparse) {
  SCOPED_TRACE("world " + std::to_string(world) + ", Dv " + std::to_string(Dv) + ", C " + std::to_string(C) +
               (sparse ? ", sparse" : ", dense"));
  TempDir dir("layer");
  const auto ranks = run_ranks(world, "layer", {{"out", dir.str()}, {"Dv", Dv}, {"C", C}, {"sparse", sparse}});
  ASSERT_EQ(ranks.result.exit_code, 0) << ranks.text();

  const auto cfg = layer_config(Dv, C, sparse);
  nn::UltraMem ref(cfg);
  std::vector<at::Tensor> xs, ws;
  for (int64_t r = 0; r < world; ++r) {
    xs.push_back(layer_input(r, cfg.D));
    ws.push_back(layer_weight(r, cfg.D));
  }
  const auto x = torch::cat(xs).requires_grad_(true);
  const auto out = ref->forward(x);
  (out * torch::cat(ws)).sum().backward();
  const auto vgrad = ref->values.grad().is_sparse() ? ref->values.grad().to_dense() : ref->values.grad();

  std::map<std::string, at::Tensor> summed;  // gradients of the shared parameters, summed over ranks
  int64_t row = 0;
  const int64_t w = Dv / world;
  for (int64_t r = 0; r < world; ++r) {
    const int64_t T = xs[static_cast<size_t>(r)].size(0);
    auto t = expect_rank_matches(dir, r, row, T, out.detach(), "dx", x.grad(), ref->values.detach(), vgrad, w);
    for (const char* n : {"wq.grad", "keys.grad", "cores.grad", "wo.grad", "q_scale.grad", "k_scale.grad"})
      summed[n] = summed.count(n) ? summed[n] + t[n] : t[n];
    row += T;
  }
  expect_close(summed["wq.grad"], ref->wq.grad(), 1e-5, "wq gradient");
  expect_close(summed["keys.grad"], ref->keys.grad(), 1e-5, "keys gradient");
  expect_close(summed["cores.grad"], ref->cores.grad(), 1e-5, "cores gradient");
  expect_close(summed["wo.grad"], ref->wo.grad(), 1e-5, "wo gradient");
  expect_close(summed["q_scale.grad"], ref->q_scale.grad(), 1e-5, "q_scale gradient");
  expect_close(summed["k_scale.grad"], ref->k_scale.grad(), 1e-5, "k_scale gradient");
  // The reference gradient is not trivially zero: the check above can fail.
  EXPECT_GT(vgrad.abs().sum().item<double>(), 0.0);
}

// The sharded Engram layer on `world` ranks against the unsharded layer on all their sequences.
void check_sharded_engram(int64_t world, bool sparse) {
  SCOPED_TRACE("Engram, world " + std::to_string(world) + (sparse ? ", sparse" : ", dense"));
  TempDir dir("engram");
  const auto ranks = run_ranks(world, "engram_layer", {{"out", dir.str()}, {"sparse", sparse}});
  ASSERT_EQ(ranks.result.exit_code, 0) << ranks.text();

  const auto cfg = engram_layer_config(sparse);
  nn::Engram ref(cfg);
  std::vector<at::Tensor> us, toks;
  for (int64_t r = 0; r < world; ++r) {
    auto [u, tok] = engram_input(r, cfg.D);
    us.push_back(u);
    toks.push_back(tok);
  }
  const auto u = torch::cat(us).requires_grad_(true);
  const auto out = ref->forward(u, torch::cat(toks));
  (out * out.detach().cos()).sum().backward();
  const auto vgrad = ref->values.grad().is_sparse() ? ref->values.grad().to_dense() : ref->values.grad();

  std::map<std::string, at::Tensor> summed;  // gradients of the shared parameters, summed over ranks
  int64_t row = 0;
  const int64_t w = cfg.row_width() / world;
  for (int64_t r = 0; r < world; ++r) {
    const int64_t B = us[static_cast<size_t>(r)].size(0);
    auto t = expect_rank_matches(dir, r, row, B, out.detach(), "du", u.grad(), ref->values.detach(), vgrad, w);
    for (const auto& [n, g] : t)
      if (n != "values.grad" && n.size() > 5 && n.substr(n.size() - 5) == ".grad") summed[n] = summed.count(n) ? summed[n] + g : g;
    row += B;
  }
  EXPECT_EQ(summed.size(), 6u);  // wk, wv, gate_u, gate_k, conv_norm, conv
  for (const auto& p : ref->named_parameters())
    if (p.key() != "values") expect_close(summed[p.key() + ".grad"], p.value().grad(), 1e-5, p.key() + " gradient");
  // The reference gradient is not trivially zero: the check above can fail.
  EXPECT_GT(vgrad.abs().sum().item<double>(), 0.0);
}

std::vector<double> as_vector(const json& j) { return j.get<std::vector<double>>(); }

void expect_same_series(const std::vector<double>& a, const std::vector<double>& b, double rel, const std::string& what) {
  ASSERT_EQ(a.size(), b.size()) << what;
  for (size_t i = 0; i < a.size(); ++i)
    EXPECT_NEAR(a[i], b[i], rel * std::max(1.0, std::abs(b[i]))) << what << " at step " << i + 1;
}

}  // namespace

TEST(ShardedLayer, ForwardAndBackwardEqualUnshardedTwoRanksOnCoreBoundaries) {
  check_sharded_layer(2, 16, 2, /*sparse=*/true);   // each rank owns one core's slice
  check_sharded_layer(2, 16, 4, /*sparse=*/false);  // each rank owns two cores' slices
}

TEST(ShardedLayer, ForwardAndBackwardEqualUnshardedAcrossCoreBoundaries) {
  check_sharded_layer(2, 12, 3, /*sparse=*/true);   // rank slices of 6 columns, cores of 4: rank 0 holds 1.5 cores
  check_sharded_layer(3, 12, 2, /*sparse=*/false);  // 3 ranks of 4 columns, cores of 6: rank 1 straddles them
}

TEST(ShardedLayer, EngramForwardAndBackwardEqualUnsharded) {
  check_sharded_engram(2, /*sparse=*/true);
  check_sharded_engram(4, /*sparse=*/false);  // one column of each row per rank
}

TEST(ShardedLayer, GroupSizeNotDividingDvIsAClearError) {
  TempDir dir("baddv");
  const auto ranks = run_ranks(3, "layer", {{"out", dir.str()}, {"Dv", 16}, {"C", 2}, {"sparse", false}});
  EXPECT_NE(ranks.result.exit_code, 0);
  EXPECT_NE(ranks.text().find("is not divisible by the 3 ranks"), std::string::npos) << ranks.text();
}

TEST(DataParallel, TwoRanksTrainLikeOneProcessOnTheSameGlobalBatch) {
  TempDir one("one"), two("two");
  TrainSpec s;
  s.out_dir = one.str();
  s.steps = 5;
  const auto ref = run_training(s, nullptr);
  const auto ranks = run_ranks(2, "train", {{"out", two.str()}, {"steps", 5}});
  ASSERT_EQ(ranks.result.exit_code, 0) << ranks.text();
  const auto r0 = read_json(two.file("result.rank0.json")), r1 = read_json(two.file("result.rank1.json"));
  expect_same_series(as_vector(r0["losses"]), ref.losses, 1e-5, "loss, rank 0 vs one process");
  expect_same_series(as_vector(r0["grad_norms"]), ref.grad_norms, 1e-4, "grad norm, rank 0 vs one process");
  EXPECT_NEAR(r0["val"].get<double>(), ref.val, 1e-5);
  // Every rank reports the same global numbers.
  EXPECT_EQ(r0["losses"], r1["losses"]);
  EXPECT_EQ(r0["val"], r1["val"]);
  // The run learns (the comparison is not between two untrained models).
  EXPECT_LT(ref.losses.back(), ref.losses.front());
  // The trainer on rank 0 alone wrote the metrics file.
  EXPECT_TRUE(fs::exists(two.file("metrics.jsonl")));
}

TEST(DataParallel, TwoRanksTrainAnEngramModelLikeOneProcess) {
  TempDir one("one_engram"), two("two_engram");
  TrainSpec s;
  s.out_dir = one.str();
  s.steps = 4;
  s.engram = true;
  const auto ref = run_training(s, nullptr);
  const auto ranks = run_ranks(2, "train", {{"out", two.str()}, {"steps", 4}, {"engram", true}});
  ASSERT_EQ(ranks.result.exit_code, 0) << ranks.text();
  const auto r0 = read_json(two.file("result.rank0.json"));
  expect_same_series(as_vector(r0["losses"]), ref.losses, 1e-5, "Engram loss, rank 0 vs one process");
  expect_same_series(as_vector(r0["grad_norms"]), ref.grad_norms, 1e-4, "Engram grad norm, rank 0 vs one process");
  EXPECT_NEAR(r0["val"].get<double>(), ref.val, 1e-5);
  EXPECT_LT(ref.losses.back(), ref.losses.front());
}

TEST(ShardedCheckpoint, SavedByTwoRanksLoadsIntoOneAndTwoWithTheSameEvalLoss) {
  TempDir dir("ckpt");
  const auto saved = run_ranks(2, "train", {{"out", dir.str()}, {"steps", 4}});
  ASSERT_EQ(saved.result.exit_code, 0) << saved.text();
  const double val_saved = read_json(dir.file("result.rank0.json"))["val"];
  const std::string ckpt = dir.file("checkpoint.safetensors");
  // The main file holds no value table; each rank's shard holds its columns.
  int shards = 0;
  for (const auto& e : fs::directory_iterator(dir.path)) {
    const std::string n = e.path().filename().string();
    if (n.rfind("checkpoint.step", 0) == 0 && n.find(".rank") != std::string::npos) ++shards;
  }
  EXPECT_EQ(shards, 2);
  const auto full = checkpoint::read_checkpoint(ckpt);
  EXPECT_EQ(full.shard_world, 2);
  ASSERT_TRUE(full.model.count("memories.0.values"));
  EXPECT_EQ(full.model.at("memories.0.values").sizes(), (std::vector<int64_t>{64, 16}));
  EXPECT_EQ(full.optim.at("memories.0.values.exp_avg").sizes(), (std::vector<int64_t>{64, 16}));

  // One process (assembled checkpoint), through the trainer's resume.
  TempDir one("ckpt1");
  TrainSpec s;
  s.out_dir = one.str();
  s.resume = ckpt;
  s.eval_only = true;
  const auto single = run_training(s, nullptr);
  // Two ranks again (each reads its columns).
  TempDir two("ckpt2");
  const auto again = run_ranks(2, "train", {{"out", two.str()}, {"resume", ckpt}, {"eval_only", true}});
  ASSERT_EQ(again.result.exit_code, 0) << again.text();
  const double val_two = read_json(two.file("result.rank0.json"))["val"];
  EXPECT_NEAR(single.val, val_saved, 1e-6);
  EXPECT_NEAR(val_two, val_saved, 1e-6);

  // A corrupt shard is a clear error naming the file.
  std::string shard0;
  for (const auto& e : fs::directory_iterator(dir.path))
    if (e.path().filename().string().find(".rank0-of-2") != std::string::npos) shard0 = e.path().string();
  ASSERT_FALSE(shard0.empty());
  {
    std::fstream f(shard0, std::ios::in | std::ios::out | std::ios::binary);
    f.seekp(-3, std::ios::end);
    f.put('\x7f');
  }
  try {
    checkpoint::read_checkpoint(ckpt);
    ADD_FAILURE() << "a corrupt shard was accepted";
  } catch (const std::runtime_error& e) {
    EXPECT_NE(std::string(e.what()).find(fs::path(shard0).filename().string()), std::string::npos) << e.what();
  }
}

TEST(ShardedCheckpoint, ResumesOnOneOrTwoRanksLikeTheUninterruptedRun) {
  TempDir straight("straight"), first("first"), two("resume2"), one("resume1");
  const auto a = run_ranks(2, "train", {{"out", straight.str()}, {"steps", 6}});
  ASSERT_EQ(a.result.exit_code, 0) << a.text();
  const auto b = run_ranks(2, "train", {{"out", first.str()}, {"steps", 6}, {"stop_at", 3}});
  ASSERT_EQ(b.result.exit_code, 0) << b.text();
  const std::string ckpt = first.file("checkpoint.safetensors");
  const auto c = run_ranks(2, "train", {{"out", two.str()}, {"steps", 6}, {"resume", ckpt}});
  ASSERT_EQ(c.result.exit_code, 0) << c.text();
  TrainSpec s;
  s.out_dir = one.str();
  s.steps = 6;
  s.resume = ckpt;
  const auto single = run_training(s, nullptr);

  const auto full = as_vector(read_json(straight.file("result.rank0.json"))["losses"]);
  const std::vector<double> tail(full.begin() + 3, full.end());
  expect_same_series(as_vector(read_json(two.file("result.rank0.json"))["losses"]), tail, 1e-6,
                     "2 ranks resumed vs uninterrupted");
  expect_same_series(single.losses, tail, 1e-5, "1 process resumed from 2 ranks vs uninterrupted");

  // And back: the one-file checkpoint the single process wrote, loaded into 2 ranks.
  TempDir back("back");
  const auto d = run_ranks(2, "train", {{"out", back.str()}, {"resume", one.file("checkpoint.safetensors")},
                                        {"eval_only", true}});
  ASSERT_EQ(d.result.exit_code, 0) << d.text();
  EXPECT_NEAR(read_json(back.file("result.rank0.json"))["val"].get<double>(), single.val, 1e-6);
}

TEST(Failure, KilledRankMakesTheOtherExitWithAClearErrorAndKeepsTheCheckpoint) {
  TempDir dir("kill");
  const auto ranks = run_ranks(
      2, "train", {{"out", dir.str()}, {"steps", 100000}, {"checkpoint_every", 2}, {"timeout", 5.0}}, /*grace=*/120,
      [&](std::vector<pid_t> pids) {
        // Once rank 1 has done 3 steps (a checkpoint exists), kill it.
        for (int i = 0; i < 1200; ++i) {
          std::ifstream in(dir.file("progress.rank1"));
          int64_t step = 0;
          if (in >> step && step >= 3) break;
          std::this_thread::sleep_for(std::chrono::milliseconds(50));
        }
        ::kill(pids[1], SIGKILL);
      });
  EXPECT_EQ(ranks.result.failed_rank, 1);
  EXPECT_EQ(ranks.result.exit_codes.at(1), 128 + SIGKILL);
  EXPECT_EQ(ranks.result.exit_codes.at(0), 1) << ranks.text();
  const std::string text = ranks.text();
  EXPECT_NE(text.find("[rank 0] worker error: distributed: rank 0 of 2"), std::string::npos) << text;
  EXPECT_NE(text.find("another rank died, hung or left"), std::string::npos) << text;
  // What was checkpointed before is intact.
  const auto ckpt = checkpoint::read_checkpoint(dir.file("checkpoint.safetensors"));
  EXPECT_GE(train::trainer_state_from_json(ckpt.trainer_state).step, 2);
}

// The launcher names the rank that failed first even when the peer that noticed has ended too by the time
// it looks (it checked ranks in index order and blamed the surviving rank 0). Deterministic: wait() is
// called only after both children have ended.
TEST(Failure, LauncherBlamesTheRankThatFailedFirstWhenBothEndedBeforeItLooked) {
  dist::LaunchOptions o;
  o.nproc = 2;
  o.grace_seconds = 1;
  std::vector<std::string> lines;
  o.on_line = [&](int64_t rank, bool, const std::string& line) { lines.push_back(std::to_string(rank) + ": " + line); };
  dist::Launcher launcher(o);
  const std::string script = std::string("if [ \"$RANK\" = 1 ]; then sleep 0.2; kill -9 $$; else sleep 0.5; ") +
                             "echo \"rank 0: all_reduce failed: " + dist::kPeerFailedMessage + "\" >&2; exit 1; fi";
  launcher.start("/bin/sh", {"sh", "-c", script});
  std::this_thread::sleep_for(std::chrono::milliseconds(1500));
  const auto r = launcher.wait();
  EXPECT_EQ(r.failed_rank, 1);
  EXPECT_EQ(r.exit_code, 128 + SIGKILL);
  EXPECT_EQ(r.exit_codes.at(0), 1);
  EXPECT_EQ(r.exit_codes.at(1), 128 + SIGKILL);
  ASSERT_EQ(lines.size(), 1u);
  EXPECT_NE(lines[0].find(dist::kPeerFailedMessage), std::string::npos);
}

TEST(Failure, HungRankMakesTheOtherTimeOut) {
  TempDir dir("hang");
  const auto ranks = run_ranks(2, "train", {{"out", dir.str()}, {"steps", 100000}, {"timeout", 3.0}}, /*grace=*/1,
                               [&](std::vector<pid_t> pids) {
                                 for (int i = 0; i < 1200; ++i) {
                                   std::ifstream in(dir.file("progress.rank1"));
                                   int64_t step = 0;
                                   if (in >> step && step >= 2) break;
                                   std::this_thread::sleep_for(std::chrono::milliseconds(50));
                                 }
                                 ::kill(pids[1], SIGSTOP);  // alive but silent
                               });
  EXPECT_EQ(ranks.result.failed_rank, 0) << ranks.text();
  EXPECT_EQ(ranks.result.exit_code, 1);
  EXPECT_NE(ranks.text().find("timeout 3 s"), std::string::npos) << ranks.text();
  EXPECT_EQ(ranks.result.exit_codes.at(1), 128 + SIGKILL);  // stopped: only SIGKILL ends it
}

TEST(Cli, TrainWithTwoRanksThenEvalAndResumeInOneProcess) {
  TempDir dir("cli");
  const std::string um = ULTRAMEM_CLI;
  auto sh = [&](const std::string& cmd, const std::string& log) {
    return std::system((cmd + " > " + dir.file(log) + " 2>&1").c_str());
  };
  auto slurp = [&](const std::string& log) {
    std::ifstream in(dir.file(log));
    std::stringstream ss;
    ss << in.rdbuf();
    return ss.str();
  };
  fs::create_directories(dir.path / "corpus");
  for (int d = 0; d < 4; ++d) {
    std::ofstream f(dir.path / "corpus" / ("doc" + std::to_string(d) + ".txt"));
    for (int i = 0; i < 150; ++i) f << "The people of district " << d << " vote on measure " << i % 7 << " in spring.\n";
  }
  ASSERT_EQ(sh(um + " prepare --input " + dir.file("corpus") + " --out " + dir.file("data") +
                   " --vocab 300 --val-fraction 0.25", "prepare.log"), 0)
      << slurp("prepare.log");
  std::ofstream(dir.file("model.json")) << R"({"model": {"name": "cli-dist", "vocab_size": 300, "d_model": 32,
      "n_layers": 2, "n_heads": 2, "max_seq_len": 16, "ffn_hidden": 64, "ffn": "dense",
      "memory": {"kind": "ultramem", "placement": "1:2",
                 "ultramem": {"n": 8, "E": 4, "Dk": 8, "Dv": 16, "r": 2, "C": 2, "H": 2, "m": 4}}},
      "train": {"steps": 6, "batch_size": 4, "seq_len": 16, "eval_every": 3, "eval_batches": 2, "log_every": 2,
                "checkpoint_every": 0}})";
  const std::string train = um + " --threads 1 train " + dir.file("model.json") + " --data " + dir.file("data") +
                            " --out " + dir.file("run") + " --dist-timeout 30";
  ASSERT_EQ(sh(train + " --nproc 2", "train.log"), 0) << slurp("train.log");
  const std::string log = slurp("train.log");
  EXPECT_NE(log.find("[rank 0] final: step 6"), std::string::npos) << log;
  EXPECT_NE(log.find("[rank 0] distributed: 2 ranks"), std::string::npos) << log;
  EXPECT_EQ(log.find("[rank 1] step"), std::string::npos) << "only rank 0 logs progress:\n" << log;
  // Evaluation and generation read the sharded run folder in one process.
  ASSERT_EQ(sh(um + " eval " + dir.file("run/checkpoint.safetensors") + " --batch-size 2", "eval.log"), 0)
      << slurp("eval.log");
  EXPECT_NE(slurp("eval.log").find("\"val_loss\""), std::string::npos);
  ASSERT_EQ(sh(um + " generate " + dir.file("run/checkpoint.safetensors") + " --prompt The --max-tokens 4",
               "generate.log"), 0)
      << slurp("generate.log");
  // Consolidated into one file: nothing sharded, every tensor as assembled from the shards.
  auto shard_files = [&](const std::string& sub) {
    int n = 0;
    for (const auto& e : fs::directory_iterator(dir.path / sub))
      if (checkpoint::is_shard_file_of("checkpoint", e.path().filename().string())) ++n;
    return n;
  };
  EXPECT_EQ(shard_files("run"), 2);
  ASSERT_EQ(sh(um + " consolidate " + dir.file("run/checkpoint.safetensors") + " --out " + dir.file("one.safetensors"),
               "consolidate.log"), 0)
      << slurp("consolidate.log");
  {
    const auto sharded = checkpoint::read_checkpoint(dir.file("run/checkpoint.safetensors"));
    const auto one = checkpoint::read_checkpoint(dir.file("one.safetensors"));
    EXPECT_EQ(sharded.shard_world, 2);
    EXPECT_EQ(one.shard_world, 0);
    ASSERT_EQ(one.model.size(), sharded.model.size());
    for (const auto& [name, t] : sharded.model) EXPECT_TRUE(torch::equal(one.model.at(name), t)) << name;
    ASSERT_EQ(one.optim.size(), sharded.optim.size());
    for (const auto& [name, t] : sharded.optim) EXPECT_TRUE(torch::equal(one.optim.at(name), t)) << name;
  }
  EXPECT_EQ(shard_files("run"), 2) << "--out keeps the sharded original and its shards";
  // In place: the main file becomes one file and the shards it referenced are removed.
  fs::copy(dir.path / "run", dir.path / "run2", fs::copy_options::recursive);
  ASSERT_EQ(sh(um + " consolidate " + dir.file("run2/checkpoint.safetensors"), "consolidate2.log"), 0)
      << slurp("consolidate2.log");
  EXPECT_EQ(shard_files("run2"), 0);
  EXPECT_EQ(checkpoint::read_checkpoint(dir.file("run2/checkpoint.safetensors")).shard_world, 0);
  // One process continues the 2-rank run (the optimizer state is assembled); its one-file checkpoint
  // replaces the sharded one, whose shard files nothing references any more and are gone.
  ASSERT_EQ(sh(train + " --resume --steps 8", "resume.log"), 0) << slurp("resume.log");
  EXPECT_NE(slurp("resume.log").find("final: step 8"), std::string::npos) << slurp("resume.log");
  EXPECT_EQ(shard_files("run"), 0);
  EXPECT_EQ(checkpoint::read_checkpoint(dir.file("run/checkpoint.safetensors")).shard_world, 0);
  // A global batch that the ranks cannot split: every rank fails and so does the launch.
  EXPECT_NE(sh(um + " --threads 1 train " + dir.file("model.json") + " --data " + dir.file("data") + " --out " +
                   dir.file("bad") + " --nproc 2 --batch-size 3", "bad.log"), 0);
  EXPECT_NE(slurp("bad.log").find("not divisible by the 2 ranks"), std::string::npos) << slurp("bad.log");
}

// Ranks started by hand (no launcher) that disagree: each must stop, naming what differs, instead of
// training an inconsistent model (issue 16: different --lr, --batch-size or --seed all exited 0; a wrong
// world size failed with a Gloo size assertion).
TEST(Cli, RanksStartedByHandWithDifferentSettingsOrWorldSizesStop) {
  TempDir dir("agree");
  const std::string um = ULTRAMEM_CLI;
  fs::create_directories(dir.path / "corpus");
  for (int d = 0; d < 3; ++d) {
    std::ofstream f(dir.path / "corpus" / ("doc" + std::to_string(d) + ".txt"));
    for (int i = 0; i < 120; ++i) f << "The people of district " << d << " vote on measure " << i % 7 << " in spring.\n";
  }
  ASSERT_EQ(std::system((um + " prepare --input " + dir.file("corpus") + " --out " + dir.file("data") +
                         " --vocab 300 --val-fraction 0.25 > " + dir.file("prepare.log") + " 2>&1").c_str()),
            0);
  std::ofstream(dir.file("model.json")) << R"({"model": {"name": "agree", "vocab_size": 300, "d_model": 32,
      "n_layers": 2, "n_heads": 2, "max_seq_len": 16, "ffn_hidden": 64},
      "train": {"steps": 4, "batch_size": 4, "seq_len": 16, "eval_every": 0, "log_every": 0}})";
  // Starts rank 0 and rank 1 with their own extra flags, both in the background; returns their exit codes
  // and the log of each.
  auto two_ranks = [&](const std::string& tag, const std::string& flags0, const std::string& flags1) {
    const int64_t port = dist::pick_free_port();
    auto rank = [&](int r, const std::string& flags) {
      return um + " --threads 1 train " + dir.file("model.json") + " --data " + dir.file("data") + " --out " +
             dir.file(tag) + " --master-addr 127.0.0.1 --master-port " + std::to_string(port) +
             " --dist-timeout 20 --rank " + std::to_string(r) + " " + flags + " > " + dir.file(tag + ".log" +
             std::to_string(r)) + " 2>&1; echo $? > " + dir.file(tag + ".rc" + std::to_string(r));
    };
    const std::string both = "(" + rank(0, flags0) + ") & (" + rank(1, flags1) + ") & wait";
    const auto start = std::chrono::steady_clock::now();
    EXPECT_EQ(std::system(("bash -c '" + both + "'").c_str()), 0);
    const double seconds = std::chrono::duration<double>(std::chrono::steady_clock::now() - start).count();
    std::vector<std::pair<int, std::string>> out;
    for (int r = 0; r < 2; ++r) {
      std::ifstream rc(dir.file(tag + ".rc" + std::to_string(r)));
      int code = -1;
      rc >> code;
      std::ifstream lg(dir.file(tag + ".log" + std::to_string(r)));
      std::stringstream ss;
      ss << lg.rdbuf();
      out.emplace_back(code, ss.str());
    }
    EXPECT_LT(seconds, 20.0) << tag << ": a disagreement is found at the rendezvous, not after the timeout";
    return out;
  };
  // Same settings: both train (the check passes what should pass).
  const auto same = two_ranks("same", "--world-size 2", "--world-size 2");
  EXPECT_EQ(same[0].first, 0) << same[0].second;
  EXPECT_EQ(same[1].first, 0) << same[1].second;
  // Different learning rate, batch and seed: both stop and name every field.
  const auto differ = two_ranks("differ", "--world-size 2", "--world-size 2 --lr 0.001 --batch-size 8 --seed 7");
  for (int r = 0; r < 2; ++r) {
    EXPECT_EQ(differ[size_t(r)].first, 1) << differ[size_t(r)].second;
    for (const char* field : {"train.lr", "train.batch_size", "train.seed", "different settings"})
      EXPECT_NE(differ[size_t(r)].second.find(field), std::string::npos) << field << ":\n" << differ[size_t(r)].second;
  }
  // Different world sizes: both stop, saying so, without Gloo's assertion.
  const auto sizes = two_ranks("sizes", "--world-size 2 --batch-size 12", "--world-size 3 --batch-size 12");
  for (int r = 0; r < 2; ++r) {
    EXPECT_EQ(sizes[size_t(r)].first, 1) << sizes[size_t(r)].second;
    EXPECT_NE(sizes[size_t(r)].second.find("the world sizes differ: rank 1 was started with 3 ranks, rank 0 with 2"),
              std::string::npos)
        << sizes[size_t(r)].second;
    EXPECT_EQ(sizes[size_t(r)].second.find("frame #"), std::string::npos) << "a C++ stack trace:\n" << sizes[size_t(r)].second;
  }
  // A rank alone (its peer never started) stops within about --dist-timeout (8 s here), without a C++
  // stack trace: it printed libtorch's trace and took twice the timeout, the arrival and the Gloo
  // connection each waiting the whole of it.
  const std::string lone = um + " --threads 1 train " + dir.file("model.json") + " --data " + dir.file("data") +
                           " --out " + dir.file("lone") + " --master-addr 127.0.0.1 --master-port " +
                           std::to_string(dist::pick_free_port()) + " --rank 0 --world-size 2 --dist-timeout 8 > " +
                           dir.file("lone.log") + " 2>&1";
  const auto start = std::chrono::steady_clock::now();
  EXPECT_NE(std::system(lone.c_str()), 0);
  const double seconds = std::chrono::duration<double>(std::chrono::steady_clock::now() - start).count();
  std::ifstream lg(dir.file("lone.log"));
  std::stringstream log;
  log << lg.rdbuf();
  EXPECT_NE(log.str().find("1 of 2 ranks arrived within 8 s (--dist-timeout)"), std::string::npos) << log.str();
  EXPECT_EQ(log.str().find("frame #"), std::string::npos) << "a C++ stack trace:\n" << log.str();
  EXPECT_GE(seconds, 8.0);
  EXPECT_LT(seconds, 8.0 + 6.0) << "twice the timeout would be 16 s";
}

int main(int argc, char** argv) {
  if (argc >= 4 && std::string(argv[1]) == "--worker") return worker_main(argv[2], argv[3]);
  testing::InitGoogleTest(&argc, argv);
  return RUN_ALL_TESTS();
}
