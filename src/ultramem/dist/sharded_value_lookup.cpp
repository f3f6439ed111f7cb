#include "ultramem/dist/sharded_value_lookup.h"

#include <torch/custom_class.h>
#include <torch/torch.h>

#include <algorithm>
#include <numeric>
#include <stdexcept>

#include "ultramem/dist/process_group.h"
#include "ultramem/ops/ops.h"

namespace ultramem::dist {
namespace {

using torch::autograd::AutogradContext;
using torch::autograd::tensor_list;

// The group travels through autograd contexts as a capsule.
struct GroupHandle : torch::CustomClassHolder {
  explicit GroupHandle(std::shared_ptr<Group> g) : group(std::move(g)) {}
  std::shared_ptr<Group> group;
};

Group& group_of(AutogradContext* ctx) {
  return *c10::static_intrusive_pointer_cast<GroupHandle>(ctx->saved_data["group"].toCapsule())->group;
}

std::vector<int64_t> same_for_all(int64_t v, int64_t world) { return std::vector<int64_t>(world, v); }

// Rows of [W*maxT, ...] holding rank j's first counts[j] rows at j*maxT -> [sum counts, ...].
at::Tensor unpad(const at::Tensor& padded, const std::vector<int64_t>& counts, int64_t max_t) {
  std::vector<at::Tensor> parts;
  for (size_t j = 0; j < counts.size(); ++j)
    parts.push_back(padded.narrow(0, static_cast<int64_t>(j) * max_t, counts[j]));
  return at::cat(parts, 0);
}

// (scores [T, K, C], index [T, K]) of this rank -> (scores [S, K, C], index [S, K]) of all ranks in
// rank order, S = sum of the ranks' T. Backward: score gradients return to their owners and are summed.
struct GatherHits : public torch::autograd::Function<GatherHits> {
  // counts: every rank's T, in rank order.
  static tensor_list forward(AutogradContext* ctx, at::Tensor scores, at::Tensor index,
                             c10::intrusive_ptr<GroupHandle> handle, std::vector<int64_t> counts) {
    Group& g = *handle->group;
    const int64_t T = scores.size(0), K = scores.size(1), C = scores.size(2);
    const int64_t max_t = *std::max_element(counts.begin(), counts.end());
    // One byte row per token: K int64 indices, then K*C scores.
    const at::Tensor idx_bytes = index.contiguous().view(at::kByte);                      // [T, 8K]
    const at::Tensor sc_bytes = scores.detach().contiguous().reshape({T, K * C}).view(at::kByte);  // [T, K*C*es]
    const int64_t ib = idx_bytes.size(1), row = ib + sc_bytes.size(1);
    at::Tensor packed = at::zeros({max_t, row}, at::kByte);
    packed.narrow(0, 0, T).narrow(1, 0, ib).copy_(idx_bytes);
    packed.narrow(0, 0, T).narrow(1, ib, row - ib).copy_(sc_bytes);
    const at::Tensor all = unpad(g.all_gather(packed, "memory.hits"), counts, max_t);  // [S, row]
    const int64_t S = all.size(0);
    at::Tensor index_all = all.narrow(1, 0, ib).contiguous().view(at::kLong);            // [S, K]
    at::Tensor scores_all =
        all.narrow(1, ib, row - ib).contiguous().view(scores.scalar_type()).reshape({S, K, C});  // [S, K, C]
    ctx->saved_data["group"] = c10::IValue::make_capsule(handle);
    ctx->saved_data["counts"] = counts;
    ctx->mark_non_differentiable({index_all});
    return {scores_all, index_all};
  }

  static tensor_list backward(AutogradContext* ctx, tensor_list grads) {
    Group& g = group_of(ctx);
    const std::vector<int64_t> counts = ctx->saved_data["counts"].toIntVector();
    const int64_t T = counts[static_cast<size_t>(g.rank())];
    at::Tensor d = grads[0];  // [S, K, C]
    if (!d.defined()) return {at::Tensor(), at::Tensor(), at::Tensor(), at::Tensor()};
    const at::Tensor recv = g.all_to_all(d.contiguous(), counts, same_for_all(T, g.size()), "memory.score_grads");
    // [W*T, K, C]: every rank's partial gradient for this rank's tokens, summed in rank order.
    at::Tensor sum = recv.narrow(0, 0, T).clone();
    for (int64_t j = 1; j < g.size(); ++j) sum.add_(recv.narrow(0, j * T, T));
    return {sum, at::Tensor(), at::Tensor(), at::Tensor()};
  }
};

// pooled slices [S, E*w] of all tokens -> this rank's tokens' full outputs [T, E*W*w]; backward reverses.
struct ExchangeOutputs : public torch::autograd::Function<ExchangeOutputs> {
  static tensor_list forward(AutogradContext* ctx, at::Tensor pooled, c10::intrusive_ptr<GroupHandle> handle,
                             std::vector<int64_t> counts, int64_t E) {
    Group& g = *handle->group;
    const int64_t W = g.size(), T = counts[static_cast<size_t>(g.rank())];
    const int64_t w = pooled.size(1) / E;
    const at::Tensor recv = g.all_to_all(pooled.detach().contiguous(), counts, same_for_all(T, W), "memory.outputs");
    // [W*T, E*w] -> [W, T, E, w] -> [T, E, W, w] -> [T, E*Dv]: rank j's slice at columns j*w of each group.
    at::Tensor out = recv.view({W, T, E, w}).permute({1, 2, 0, 3}).reshape({T, E * W * w});
    ctx->saved_data["group"] = c10::IValue::make_capsule(handle);
    ctx->saved_data["counts"] = counts;
    ctx->saved_data["E"] = E;
    return {out};
  }

  static tensor_list backward(AutogradContext* ctx, tensor_list grads) {
    Group& g = group_of(ctx);
    const std::vector<int64_t> counts = ctx->saved_data["counts"].toIntVector();
    const int64_t E = ctx->saved_data["E"].toInt();
    const int64_t W = g.size(), T = counts[static_cast<size_t>(g.rank())];
    at::Tensor d = grads[0];  // [T, E*Dv]
    if (!d.defined()) return {at::Tensor(), at::Tensor(), at::Tensor(), at::Tensor()};
    const int64_t w = d.size(1) / (E * W);
    const at::Tensor blocks = d.reshape({T, E, W, w}).permute({2, 0, 1, 3}).contiguous().view({W * T, E * w});
    at::Tensor dpooled = g.all_to_all(blocks, same_for_all(T, W), counts, "memory.output_grads");  // [S, E*w]
    return {dpooled, at::Tensor(), at::Tensor(), at::Tensor()};
  }
};

// Every rank's token count, in rank order (equal in training, but nothing requires it).
std::vector<int64_t> token_counts(Group& g, int64_t T) {
  const at::Tensor counts_t = g.all_gather(at::full({1}, T, at::kLong), "memory.counts");  // [W]
  return std::vector<int64_t>(counts_t.data_ptr<int64_t>(), counts_t.data_ptr<int64_t>() + g.size());
}

}  // namespace

ColumnSlice value_columns(int64_t Dv, int64_t rank, int64_t world, const std::string& what) {
  if (world < 1 || rank < 0 || rank >= world)
    throw std::invalid_argument(what + ": rank " + std::to_string(rank) + " outside a group of " + std::to_string(world));
  if (Dv % world != 0)
    throw std::invalid_argument(what + ": value width " + std::to_string(Dv) + " (UltraMem: Dv; Engram: d_e / (2*heads)) is not divisible by the " +
                                std::to_string(world) + " ranks of the memory group; dimension-wise sharding "
                                "needs a number of ranks that divides Dv");
  const int64_t w = Dv / world;
  return {rank * w, (rank + 1) * w};
}

ShardedValueLookup::ShardedValueLookup(std::shared_ptr<Group> group, int64_t Dv, int64_t C, std::string name)
    : group_(std::move(group)), Dv_(Dv), C_(C), name_(std::move(name)) {
  if (!group_) throw std::invalid_argument("ShardedValueLookup: group is null");
  if (C < 1 || Dv % C != 0)
    throw std::invalid_argument(name_ + ": Dv = " + std::to_string(Dv) + " is not divisible by C = " + std::to_string(C));
  cols_ = value_columns(Dv, group_->rank(), group_->size(), name_);
  const int64_t w = cols_.width(), Ds = Dv / C;
  const int64_t piece = std::gcd(w, Ds);
  std::vector<int64_t> cores;
  for (int64_t c0 = cols_.begin; c0 < cols_.end; c0 += piece) cores.push_back(c0 / Ds);
  piece_core_ = torch::tensor(cores, torch::kLong);
  identity_pieces_ = static_cast<int64_t>(cores.size()) == C;
  for (int64_t p = 0; identity_pieces_ && p < C; ++p) identity_pieces_ = cores[static_cast<size_t>(p)] == p;
}

torch::Tensor ShardedValueLookup::lookup(const torch::Tensor& values, const torch::Tensor& index,
                                         const torch::Tensor& scores, const torch::Tensor& perm, int64_t E,
                                         bool sparse_grad) {
  TORCH_CHECK(values.dim() == 2 && values.size(1) == cols_.width(), name_, ": the sharded lookup of ",
              group_->describe(), " expects its value slice [N, ", cols_.width(), "], got ", values.sizes());
  TORCH_CHECK(scores.dim() == 3 && scores.size(2) == C_, name_, ": scores must be [T, K, C=", C_, "], got ",
              scores.sizes());
  TORCH_CHECK(index.dim() == 2 && index.size(0) == scores.size(0) && index.size(1) == scores.size(1), name_,
              ": index must be [T, K] matching scores, got ", index.sizes());
  auto handle = c10::make_intrusive<GroupHandle>(group_);
  const std::vector<int64_t> counts = token_counts(*group_, scores.size(0));
  const auto hits = GatherHits::apply(scores, index, handle, counts);
  const at::Tensor& scores_all = hits[0];  // [S, K, C]
  const at::Tensor& index_all = hits[1];   // [S, K]
  const at::Tensor scores_local = identity_pieces_ ? scores_all : scores_all.index_select(2, piece_core_);  // [S, K, P]
  const at::Tensor pooled = ops::pooled_lookup(values, index_all, scores_local, perm, E, sparse_grad);  // [S, E*w]
  return ExchangeOutputs::apply(pooled, handle, counts, E)[0];
}

torch::Tensor ShardedValueLookup::gather_rows(const torch::Tensor& values, const torch::Tensor& rows, bool sparse_grad) {
  TORCH_CHECK(values.dim() == 2 && values.size(1) == cols_.width(), name_, ": the sharded row read of ",
              group_->describe(), " expects its table slice [rows, ", cols_.width(), "], got ", values.sizes());
  TORCH_CHECK(C_ == 1, name_, ": a row read is built with C = 1, this lookup has C = ", C_);
  TORCH_CHECK(rows.dim() == 2 && rows.scalar_type() == at::kLong, name_, ": rows must be [T, J] int64, got ",
              rows.sizes(), " ", rows.scalar_type());
  const int64_t T = rows.size(0), J = rows.size(1);
  const std::vector<int64_t> counts = token_counts(*group_, T);
  const int64_t max_t = *std::max_element(counts.begin(), counts.end());
  at::Tensor padded = at::zeros({max_t, J}, at::kLong);
  padded.narrow(0, 0, T).copy_(rows);
  const at::Tensor rows_all = unpad(group_->all_gather(padded, "memory.rows"), counts, max_t);  // [S, J]
  const int64_t S = rows_all.size(0);
  const at::Tensor read = torch::embedding(values, rows_all.reshape({-1}), -1, false, sparse_grad)
                              .view({S, J * cols_.width()});  // [S, J*w/W]
  return ExchangeOutputs::apply(read, c10::make_intrusive<GroupHandle>(group_), counts, J)[0];
}

}  // namespace ultramem::dist
