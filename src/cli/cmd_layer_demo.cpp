// `ultramem layer-demo`: fits one UltraMem layer to a random target (forward, backward, refresh,
// telemetry), printing JSON lines. A quick check of the layer without data or a model.
#include <CLI/CLI.hpp>
#include <torch/torch.h>

#include <chrono>
#include <iostream>
#include <memory>
#include <nlohmann/json.hpp>

#include "commands.h"
#include "ultramem/ops/runtime.h"
#include "ultramem/nn/ultramem.h"

namespace ultramem::cli {
namespace {

using Clock = std::chrono::steady_clock;
double seconds_since(Clock::time_point t0) {
  return std::chrono::duration<double>(Clock::now() - t0).count();
}

struct DemoArgs {
  ultramem::nn::UltraMemConfig cfg;
  int64_t tokens = 256;
  int64_t steps = 20;
  double lr = 1e-3;
};

// Fits one UltraMem layer to a fixed random regression target with Adam, printing JSON lines with
// loss, timings and memory telemetry. A smoke test of the whole layer: forward, backward, refresh.
void run_layer_demo(const DemoArgs& a) {
  using ultramem::nn::UltraMem;
  torch::manual_seed(a.cfg.seed);
  UltraMem layer(a.cfg);
  const auto& c = layer->config();
  std::cout << nlohmann::json{{"event", "config"},
                              {"isa", ultramem::kernel_isa()},
                              {"threads", at::get_num_threads()},
                              {"D", c.D}, {"n", c.n}, {"E", c.E}, {"N", c.physical_rows()},
                              {"Dk", c.Dk}, {"Dv", c.Dv}, {"r", c.r}, {"C", c.C}, {"H", c.H},
                              {"m", c.m}, {"m_first", c.first_stage_m()},
                              {"value_params", c.physical_rows() * c.Dv}}
                   .dump()
            << std::endl;
  const auto x = torch::randn({a.tokens, c.D});
  const auto target = torch::randn({a.tokens, c.D}) * 0.1;
  torch::optim::Adam opt(layer->parameters(), torch::optim::AdamOptions(a.lr));
  double first_loss = 0, loss_v = 0;
  for (int64_t step = 0; step < a.steps; ++step) {
    const auto t0 = Clock::now();
    opt.zero_grad();
    const auto y = layer->forward(x);
    const double t_fwd = seconds_since(t0);
    auto loss = torch::mse_loss(y, target) + layer->aux_loss();
    loss.backward();
    opt.step();
    layer->refresh_tucker_approx();
    const double t_step = seconds_since(t0);
    loss_v = loss.item<double>();
    if (step == 0) first_loss = loss_v;
    const auto st = layer->stats();
    std::cout << nlohmann::json{{"event", "step"}, {"step", step}, {"loss", loss_v},
                                {"forward_ms", t_fwd * 1e3}, {"step_ms", t_step * 1e3},
                                {"tokens_per_s", a.tokens / t_step},
                                {"coverage", st.coverage}, {"kl_uniform", st.kl_uniform},
                                {"top1_score", st.top1_score}, {"topm_score", st.topm_score},
                                {"output_std", st.output_std}, {"core_l1", st.core_l1},
                                {"core_l2", st.core_l2}}
                     .dump()
              << std::endl;
  }
  std::cout << nlohmann::json{{"event", "done"}, {"first_loss", first_loss}, {"final_loss", loss_v}}.dump()
            << std::endl;
}



}  // namespace

void add_layer_demo_command(CLI::App& app) {
  auto demo = std::make_shared<DemoArgs>();
  auto* cmd = app.add_subcommand(
      "layer-demo", "Fit one UltraMem layer to a random target: checks forward/backward/refresh and "
                    "prints JSON lines with loss, timings and memory telemetry");
  auto& c = demo->cfg;
  cmd->add_option("--D", c.D, "Model width")->capture_default_str();
  cmd->add_option("--n", c.n, "Keys per side (grid n*n = E*N)")->capture_default_str();
  cmd->add_option("--E", c.E, "Implicit value expansion factor (a square)")->capture_default_str();
  cmd->add_option("--Dk", c.Dk, "Key dim")->capture_default_str();
  cmd->add_option("--Dv", c.Dv, "Value dim")->capture_default_str();
  cmd->add_option("--r", c.r, "Tucker rank")->capture_default_str();
  cmd->add_option("--C", c.C, "Tucker cores (multi-core scoring)")->capture_default_str();
  cmd->add_option("--H", c.H, "Key sets (heads)")->capture_default_str();
  cmd->add_option("--m", c.m, "Values kept per head")->capture_default_str();
  cmd->add_option("--m-first", c.m_first, "First-stage top-m per side (0 = m)")->capture_default_str();
  cmd->add_option("--seed", c.seed, "Seed")->capture_default_str();
  cmd->add_option("--tokens", demo->tokens, "Tokens per step")->capture_default_str();
  cmd->add_option("--steps", demo->steps, "Optimizer steps")->capture_default_str();
  cmd->add_option("--lr", demo->lr, "Adam learning rate")->capture_default_str();
  cmd->callback([demo] { run_layer_demo(*demo); });
}

}  // namespace ultramem::cli
