// Deterministic document-level train/validation split.
//
// Rule: document d goes to validation when u(d) < val_fraction, where
//   u(d) = top 53 bits of splitmix64(FNV-1a64(d.name) ^ splitmix64(seed)) / 2^53,  in [0, 1).
// u depends only on the document's name and the seed, so adding or removing other documents never moves
// a document between the splits. Guarantee: with at least 2 documents both splits are non-empty; if the
// rule leaves validation empty, the document with the smallest u moves there; if it leaves train empty,
// the document with the largest u moves to train. Within each split documents keep the corpus order.
#pragma once
#include <cstddef>
#include <cstdint>
#include <string>
#include <vector>

#include "ultramem/data/corpus.h"

namespace ultramem::data {

struct SplitIndices {
  std::vector<size_t> train;  // indices into the document list, ascending
  std::vector<size_t> val;
};

// u(d) above.
double split_key(const std::string& name, uint64_t seed);

// Splits `docs` by the rule above. val_fraction must be in (0, 1) (std::invalid_argument otherwise);
// fewer than 2 documents is a std::runtime_error (a split needs two).
SplitIndices split_documents(const std::vector<Document>& docs, double val_fraction, uint64_t seed);

}  // namespace ultramem::data
