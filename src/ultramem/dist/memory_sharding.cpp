#include "ultramem/dist/memory_sharding.h"

#include <torch/torch.h>

#include <stdexcept>

#include "ultramem/dist/process_group.h"
#include "ultramem/nn/engram.h"
#include "ultramem/nn/ultramem.h"

namespace ultramem::dist {

namespace {

// Installs `lookup` on a layer (UltraMemImpl or EngramImpl) and keeps only its column slice of `values`.
template <typename Layer>
ShardedParameter shard_layer(Layer& layer, const std::string& key, const std::shared_ptr<Group>& group,
                             int64_t width, int64_t cores) {
  const std::string where = key.empty() ? std::string("memory layer") : key;
  if (layer.value_lookup())
    throw std::invalid_argument(where + ": already has a value lookup installed (sharded twice?)");
  const auto st = layer.values.scalar_type();
  if ((st != torch::kFloat && st != torch::kDouble) || !layer.values.requires_grad())
    throw std::invalid_argument(where + ": only a trainable float32/float64 value table can be sharded");
  auto lookup = std::make_shared<ShardedValueLookup>(group, width, cores, where);
  const ColumnSlice cols = lookup->columns();
  layer.values.set_data(layer.values.narrow(1, cols.begin, cols.width()).clone(at::MemoryFormat::Contiguous));
  layer.set_value_lookup(lookup);
  const std::string name = key.empty() ? std::string("values") : key + ".values";
  return {name, layer.values, width, cols};
}

}  // namespace

std::vector<ShardedParameter> shard_memory_values(torch::nn::Module& model, const std::shared_ptr<Group>& group) {
  if (!group) throw std::invalid_argument("shard_memory_values: group is null");
  std::vector<ShardedParameter> out;
  torch::NoGradGuard no_grad;
  for (const auto& item : model.named_modules("", /*include_self=*/true)) {
    if (auto layer = std::dynamic_pointer_cast<nn::UltraMemImpl>(item.value())) {
      const auto& c = layer->config();
      out.push_back(shard_layer(*layer, item.key(), group, c.Dv, c.C));
    } else if (auto engram = std::dynamic_pointer_cast<nn::EngramImpl>(item.value())) {
      out.push_back(shard_layer(*engram, item.key(), group, engram->config().row_width(), 1));
    }
  }
  return out;
}

}  // namespace ultramem::dist
