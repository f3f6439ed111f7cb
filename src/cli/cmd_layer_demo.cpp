// `ultramem layer-demo`: flags -> perf::run_layer_demo (perf/layer_demo.h).
#include <CLI/CLI.hpp>

#include <cmath>
#include <cstdlib>
#include <iostream>
#include <memory>

#include "commands.h"
#include "ultramem/perf/layer_demo.h"

namespace ultramem::cli {

void add_layer_demo_command(CLI::App& app) {
  auto demo = std::make_shared<perf::LayerDemoOptions>();
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
  cmd->add_option("--seed", c.seed, "Seed (a non-negative integer)")->capture_default_str()->check(CLI::NonNegativeNumber);
  cmd->add_option("--tokens", demo->tokens, "Tokens per step")->capture_default_str()->check(CLI::PositiveNumber);
  cmd->add_option("--steps", demo->steps, "Optimizer steps")->capture_default_str()->check(CLI::PositiveNumber);
  cmd->add_option("--lr", demo->lr, "Adam learning rate (> 0)")
      ->capture_default_str()
      ->check(CLI::Validator(
          [](std::string& s) {
            const double v = std::strtod(s.c_str(), nullptr);
            return std::isfinite(v) && v > 0 ? std::string() : "must be a finite number > 0, got " + s;
          },
          "POSITIVE", "finite and > 0"));
  cmd->callback([demo] { perf::run_layer_demo(*demo, std::cout); });
}

}  // namespace ultramem::cli
