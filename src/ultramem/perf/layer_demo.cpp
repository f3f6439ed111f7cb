#include "ultramem/perf/layer_demo.h"

#include <torch/torch.h>

#include <chrono>
#include <nlohmann/json.hpp>
#include <ostream>

#include "ultramem/nn/ultramem.h"
#include "ultramem/ops/runtime.h"
#include "ultramem/perf/timing.h"

namespace ultramem::perf {

void run_layer_demo(const LayerDemoOptions& a, std::ostream& out) {
  using ultramem::nn::UltraMem;
  torch::manual_seed(a.cfg.seed);
  UltraMem layer(a.cfg);
  const auto& c = layer->config();
  out << nlohmann::json{{"event", "config"},
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
    out << nlohmann::json{{"event", "step"}, {"step", step}, {"loss", loss_v},
                                {"forward_ms", t_fwd * 1e3}, {"step_ms", t_step * 1e3},
                                {"tokens_per_s", a.tokens / t_step},
                                {"coverage", st.coverage}, {"kl_uniform", st.kl_uniform},
                                {"top1_score", st.top1_score}, {"topm_score", st.topm_score},
                                {"output_std", st.output_std}, {"core_l1", st.core_l1},
                                {"core_l2", st.core_l2}}
                     .dump()
              << std::endl;
  }
  out << nlohmann::json{{"event", "done"}, {"first_loss", first_loss}, {"final_loss", loss_v}}.dump()
            << std::endl;
}

}  // namespace ultramem::perf
