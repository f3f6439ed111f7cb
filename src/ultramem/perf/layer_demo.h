// `ultramem layer-demo`: fits one UltraMem layer to a fixed random regression target with Adam,
// printing JSON lines with loss, timings and memory telemetry. A quick check of the whole layer
// (forward, backward, filter refresh) without data or a model.
#pragma once
#include <cstdint>
#include <iosfwd>

#include "ultramem/nn/memory_config.h"

namespace ultramem::perf {

struct LayerDemoOptions {
  nn::UltraMemConfig cfg;  // the layer
  int64_t tokens = 256;    // tokens per step
  int64_t steps = 20;      // optimizer steps
  double lr = 1e-3;        // Adam learning rate
};

void run_layer_demo(const LayerDemoOptions& options, std::ostream& out);

}  // namespace ultramem::perf
