#include "ultramem/infer/evaluate.h"

#include <torch/torch.h>

#include <stdexcept>

namespace ultramem::infer {

LossResult mean_loss(nn::Transformer& model, const std::vector<data::Batch>& batches,
                     const std::function<void(size_t, size_t)>& progress) {
  if (batches.empty()) throw std::invalid_argument("mean_loss: no batches to evaluate");
  torch::NoGradGuard no_grad;
  model->eval();
  double nll = 0;
  LossResult r;
  for (size_t i = 0; i < batches.size(); ++i) {
    const auto& b = batches[i];
    const auto logits = model->forward(b.inputs);
    nll += torch::nn::functional::cross_entropy(
               logits.reshape({-1, logits.size(-1)}), b.targets.reshape(-1),
               torch::nn::functional::CrossEntropyFuncOptions().reduction(torch::kSum))
               .item<double>();
    r.tokens += b.targets.numel();
    if (progress) progress(i + 1, batches.size());
  }
  r.loss = nll / double(r.tokens);
  return r;
}

}  // namespace ultramem::infer
