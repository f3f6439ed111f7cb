#include "ultramem/data/facts.h"

#include <nlohmann/json.hpp>

#include <torch/torch.h>

#include <cmath>
#include <stdexcept>
#include <string>
#include <unordered_set>

namespace ultramem::data {
namespace {

// Counter-based generator (SplitMix64 finaliser): the same numbers on every platform.
struct Rng {
  uint64_t state;
  explicit Rng(uint64_t seed) : state(seed) {}
  uint64_t next() {
    uint64_t z = (state += 0x9E3779B97F4A7C15ULL);
    z = (z ^ (z >> 30)) * 0xBF58476D1CE4E5B9ULL;
    z = (z ^ (z >> 27)) * 0x94D049BB133111EBULL;
    return z ^ (z >> 31);
  }
  int64_t below(int64_t n) { return int64_t(next() % uint64_t(n)); }  // n > 0
};

uint64_t mix(uint64_t a, uint64_t b) { return Rng(a * 0x9E3779B97F4A7C15ULL ^ (b + 0x632BE59BD9B4E019ULL)).next(); }

void require(bool ok, const std::string& msg) {
  if (!ok) throw std::invalid_argument("FactTaskConfig." + msg);
}

}  // namespace

FactTaskConfig fact_task_config_from_json(const nlohmann::json& j) {
  FactTaskConfig c;
  if (!j.is_object()) throw std::invalid_argument("facts: expected an object of FactTaskConfig keys");
  for (auto it = j.begin(); it != j.end(); ++it) {
    const auto& k = it.key();
    if (!it->is_number_integer()) throw std::invalid_argument("facts." + k + ": expected an integer");
    const auto v = it->get<int64_t>();
    if (k == "subjects") c.subjects = v;
    else if (k == "subject_len") c.subject_len = v;
    else if (k == "alphabet") c.alphabet = v;
    else if (k == "relations") c.relations = v;
    else if (k == "objects") c.objects = v;
    else if (k == "context_facts") c.context_facts = v;
    else if (k == "max_queries") c.max_queries = v;
    else if (k == "seed") c.seed = uint64_t(v);
    else throw std::invalid_argument("facts." + k + ": unknown key");
  }
  c.validate();
  return c;
}

void FactTaskConfig::validate() const {
  require(subjects >= 1, "subjects: must be >= 1");
  require(subject_len >= 1 && subject_len <= 8, "subject_len: must be in [1, 8]");
  require(alphabet >= 2, "alphabet: must be >= 2");
  require(relations >= 1, "relations: must be >= 1");
  require(objects >= 2, "objects: must be >= 2");
  require(context_facts >= 0, "context_facts: must be >= 0");
  require(max_queries >= 1, "max_queries: must be >= 1");
  const double names = std::pow(double(alphabet), double(subject_len));
  require(names >= 2.0 * double(subjects),
          "subjects: " + std::to_string(subjects) + " needs at least twice as many possible names; alphabet^subject_len = " +
              std::to_string(int64_t(names)));
}

FactTask::FactTask(FactTaskConfig cfg) : cfg_(cfg) {
  cfg_.validate();
  const auto& c = cfg_;
  Rng rng(mix(c.seed, 1));
  std::unordered_set<uint64_t> seen;
  names_.reserve(size_t(c.subjects * c.subject_len));
  while (int64_t(seen.size()) < c.subjects) {
    uint64_t code = 0;
    std::vector<int64_t> name(size_t(c.subject_len));
    for (auto& tok : name) {
      const int64_t a = rng.below(c.alphabet);
      code = code * uint64_t(c.alphabet) + uint64_t(a);
      tok = 2 + a;
    }
    if (seen.insert(code).second) names_.insert(names_.end(), name.begin(), name.end());
  }
  objects_.resize(size_t(c.num_facts()));
  for (auto& o : objects_) o = 2 + c.alphabet + c.relations + rng.below(c.objects);
}

void FactTask::render(int64_t fact, std::vector<int64_t>& out) const {
  const auto& c = cfg_;
  const int64_t s = fact / c.relations, r = fact % c.relations;
  out.insert(out.end(), names_.begin() + s * c.subject_len, names_.begin() + (s + 1) * c.subject_len);
  out.push_back(2 + c.alphabet + r);
  out.push_back(objects_[size_t(fact)]);
  out.push_back(1);
}

int64_t FactTask::object_token(int64_t fact) const { return objects_.at(size_t(fact)); }

void FactTask::batch(int64_t index, int64_t batch_size, int64_t seq_len, uint64_t stream, torch::Tensor& inputs,
                     torch::Tensor& targets) const {
  if (batch_size < 1 || seq_len < 1) throw std::invalid_argument("FactTask::batch: batch_size and seq_len must be >= 1");
  inputs = torch::empty({batch_size, seq_len}, torch::kLong);
  targets = torch::empty({batch_size, seq_len}, torch::kLong);
  auto* in = inputs.data_ptr<int64_t>();
  auto* tg = targets.data_ptr<int64_t>();
  std::vector<int64_t> seq;
  for (int64_t b = 0; b < batch_size; ++b) {
    Rng rng(mix(mix(cfg_.seed, 2 + stream), uint64_t(index * batch_size + b)));
    seq.clear();
    // Start at a random offset inside the first fact so that every position of a fact is trained.
    const int64_t skip = rng.below(cfg_.fact_len());
    while (int64_t(seq.size()) < skip + seq_len + 1) render(rng.below(cfg_.num_facts()), seq);
    for (int64_t t = 0; t < seq_len; ++t) {
      in[b * seq_len + t] = seq[size_t(skip + t)];
      tg[b * seq_len + t] = seq[size_t(skip + t + 1)];
    }
  }
}

FactQueries FactTask::queries() const {
  const auto& c = cfg_;
  const int64_t F = c.num_facts();
  const int64_t Q = std::min(F, c.max_queries);
  // A fixed sample of distinct facts: a partial Fisher-Yates shuffle of [0, F).
  std::vector<int64_t> order(static_cast<size_t>(F));
  for (int64_t f = 0; f < F; ++f) order[size_t(f)] = f;
  Rng rng(mix(c.seed, 3));
  for (int64_t i = 0; i < Q; ++i) std::swap(order[size_t(i)], order[size_t(i + rng.below(F - i))]);

  const int64_t L = (c.context_facts + 1) * c.fact_len() - 2;  // ends at the query's relation token
  FactQueries q;
  q.inputs = torch::empty({Q, L}, torch::kLong);
  q.positions = torch::full({Q}, L - 1, torch::kLong);
  q.objects = torch::empty({Q}, torch::kLong);
  auto* in = q.inputs.data_ptr<int64_t>();
  std::vector<int64_t> seq;
  for (int64_t i = 0; i < Q; ++i) {
    seq.clear();
    for (int64_t k = 0; k < c.context_facts; ++k) render(rng.below(F), seq);
    const int64_t f = order[size_t(i)];
    render(f, seq);
    std::copy(seq.begin(), seq.begin() + L, in + i * L);
    q.objects.data_ptr<int64_t>()[i] = object_token(f);
  }
  return q;
}

}  // namespace ultramem::data
