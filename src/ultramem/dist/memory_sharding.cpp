#include "ultramem/dist/memory_sharding.h"

#include <torch/torch.h>

#include <stdexcept>

#include "ultramem/dist/process_group.h"
#include "ultramem/nn/ultramem.h"

namespace ultramem::dist {

std::vector<ShardedParameter> shard_memory_values(torch::nn::Module& model, const std::shared_ptr<Group>& group) {
  if (!group) throw std::invalid_argument("shard_memory_values: group is null");
  std::vector<ShardedParameter> out;
  torch::NoGradGuard no_grad;
  for (const auto& item : model.named_modules("", /*include_self=*/true)) {
    auto layer = std::dynamic_pointer_cast<nn::UltraMemImpl>(item.value());
    if (!layer) continue;
    const std::string where = item.key().empty() ? std::string("UltraMem layer") : item.key();
    const auto& c = layer->config();
    if (layer->value_lookup())
      throw std::invalid_argument(where + ": already has a value lookup installed (sharded twice?)");
    const auto st = layer->values.scalar_type();
    if ((st != torch::kFloat && st != torch::kDouble) || !layer->values.requires_grad())
      throw std::invalid_argument(where + ": only a trainable float32/float64 value table can be sharded");
    auto lookup = std::make_shared<ShardedValueLookup>(group, c.Dv, c.C, where);
    const ColumnSlice cols = lookup->columns();
    layer->values.set_data(layer->values.narrow(1, cols.begin, cols.width()).clone(at::MemoryFormat::Contiguous));
    layer->set_value_lookup(lookup);
    const std::string name = item.key().empty() ? std::string("values") : item.key() + ".values";
    out.push_back({name, layer->values, c.Dv, cols});
  }
  return out;
}

}  // namespace ultramem::dist
