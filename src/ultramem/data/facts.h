// Synthetic fact-recall task for measuring how many facts a model can store (the `capacity`
// experiment). A deterministic generator draws `subjects` distinct multi-token names and, for every
// (subject, relation) pair, one object: F = subjects * relations facts. A fact is rendered as the
// sentence
//     <name_1> ... <name_L> <relation> <object> <sep>
// Names are several tokens from a small alphabet so that a fact cannot be stored in one token
// embedding: the model has to map a token combination to the object inside its layers.
//
// Vocabulary layout (vocab_size() tokens):
//   0                      unused (reserved)
//   1                      <sep>
//   [2, 2+A)               name tokens (A = alphabet)
//   [2+A, 2+A+R)           relation tokens
//   [2+A+R, 2+A+R+O)       object tokens
//
// Training batches are streams of uniformly drawn facts; the query set asks every fact (or a fixed
// sample) once, after a few other random facts as context, and scores the prediction made at the
// relation token: recall = fraction whose arg-max over the whole vocabulary is the object.
#pragma once
#include <nlohmann/json_fwd.hpp>
#include <torch/types.h>

#include <cstdint>
#include <vector>

namespace ultramem::data {

struct FactTaskConfig;
// From JSON keys of the same names (integers); std::invalid_argument naming "facts.<key>" for an unknown
// key, a non-integer or an invalid value.
FactTaskConfig fact_task_config_from_json(const nlohmann::json& j);

struct FactTaskConfig {
  int64_t subjects = 4096;     // distinct subject names
  int64_t subject_len = 3;     // tokens per name
  int64_t alphabet = 24;       // name tokens; alphabet^subject_len >= subjects
  int64_t relations = 4;       // relations per subject
  int64_t objects = 64;        // object tokens
  int64_t context_facts = 2;   // random facts before each query
  int64_t max_queries = 4096;  // queries evaluated (all facts when fewer)
  uint64_t seed = 0;           // names, objects, query sample

  int64_t vocab_size() const { return 2 + alphabet + relations + objects; }
  int64_t num_facts() const { return subjects * relations; }
  int64_t fact_len() const { return subject_len + 3; }  // name, relation, object, <sep>
  void validate() const;  // std::invalid_argument naming the field
};

// A query set: every row holds context facts and then one query fact.
struct FactQueries {
  torch::Tensor inputs;     // [Q, L] int64 tokens fed to the model
  torch::Tensor positions;  // [Q] int64 position of the query's relation token in inputs
  torch::Tensor objects;    // [Q] int64 the expected object token
};

class FactTask {
 public:
  explicit FactTask(FactTaskConfig cfg);  // validates

  const FactTaskConfig& config() const { return cfg_; }

  // Tokens of fact f = subject * relations + relation, appended to `out` (fact_len() tokens).
  void render(int64_t fact, std::vector<int64_t>& out) const;
  int64_t object_token(int64_t fact) const;  // the object token of fact f

  // Training micro-batch `index` (deterministic in (seed, stream, index)): B sequences of seq_len
  // inputs and next-token targets cut from a stream of uniformly drawn facts.
  void batch(int64_t index, int64_t batch_size, int64_t seq_len, uint64_t stream,
             torch::Tensor& inputs,           // [B, seq_len] out
             torch::Tensor& targets) const;   // [B, seq_len] out

  // The query set (deterministic in the seed): min(num_facts, max_queries) distinct facts.
  FactQueries queries() const;

 private:
  FactTaskConfig cfg_;
  std::vector<int64_t> names_;    // [subjects, subject_len] name tokens
  std::vector<int64_t> objects_;  // [subjects * relations] object tokens
};

}  // namespace ultramem::data
