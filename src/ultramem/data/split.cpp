#include "ultramem/data/split.h"

#include <stdexcept>

#include "ultramem/data/hash.h"

namespace ultramem::data {

double split_key(const std::string& name, uint64_t seed) {
  return hash_to_unit(splitmix64(fnv1a64(name) ^ splitmix64(seed)));
}

SplitIndices split_documents(const std::vector<Document>& docs, double val_fraction, uint64_t seed) {
  if (!(val_fraction > 0.0 && val_fraction < 1.0))
    throw std::invalid_argument("val_fraction: must be in (0, 1), got " + std::to_string(val_fraction));
  if (docs.size() < 2)
    throw std::runtime_error("split: the corpus has " + std::to_string(docs.size()) +
                             " document(s); a train/validation split needs at least 2 (use a directory of "
                             ".txt files, or separate documents in a single file with form-feed lines)");
  std::vector<double> u(docs.size());
  std::vector<bool> is_val(docs.size());
  size_t n_val = 0, lo = 0, hi = 0;
  for (size_t i = 0; i < docs.size(); ++i) {
    u[i] = split_key(docs[i].name, seed);
    is_val[i] = u[i] < val_fraction;
    n_val += is_val[i];
    if (u[i] < u[lo]) lo = i;
    if (u[i] > u[hi]) hi = i;
  }
  if (n_val == 0) is_val[lo] = true;
  if (n_val == docs.size()) is_val[hi] = false;
  SplitIndices out;
  for (size_t i = 0; i < docs.size(); ++i) (is_val[i] ? out.val : out.train).push_back(i);
  return out;
}

}  // namespace ultramem::data
