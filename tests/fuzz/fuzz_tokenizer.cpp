// data::Tokenizer::load, the reader of a sentencepiece model file (data/spm_model.h reads the protobuf wire
// format itself) in a prepared folder or a run folder; a model it loads encodes a few texts and decodes
// every id. Refusals: std::runtime_error (tokenizer.h, spm_model.h).
#include <stdexcept>
#include <vector>

#include "fuzz_common.h"
#include "ultramem/data/tokenizer.h"

using namespace ultramem;

extern "C" int LLVMFuzzerTestOneInput(const uint8_t* data, size_t size) {
  const std::string path = fuzz::write_input("tokenizer.model", data, size);
  fuzz::refused_or_ok<std::runtime_error>("tokenizer", [&] {
    const data::Tokenizer t = data::Tokenizer::load(path);
    if (t.vocab_size() < 1) fuzz::finding("tokenizer", "a loaded model with no pieces");
    for (const char* text : {"", "the nation", "  café 東京\n\tx", "\xff\xfe broken utf-8 \xc3"}) {
      const std::vector<int32_t> ids = t.encode(text);
      for (const int32_t id : ids)
        if (id < 0 || id >= t.vocab_size()) fuzz::finding("tokenizer", "encode gave an id outside the vocabulary");
      (void)t.decode(ids);
    }
    std::vector<int32_t> all;
    for (int32_t id = 0; id < t.vocab_size() && id < 4096; ++id) all.push_back(id);
    (void)t.decode(all);
  });
  return 0;
}
