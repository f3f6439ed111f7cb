#include "ultramem/infer/value_table_files.h"
#include "ultramem/infer/text_generation.h"

#include <algorithm>
#include <chrono>
#include <fstream>
#include <iostream>
#include <stdexcept>
#include <numeric>
#include <vector>

#include "ultramem/checkpoint/run_folder.h"
#include "ultramem/data/prepared.h"
#include "ultramem/data/tokenizer.h"
#include "ultramem/infer/model_loading.h"
#include "ultramem/nn/memory_config.h"

namespace ultramem::infer {
namespace {

double median(std::vector<double> v) {
  if (v.empty()) return 0;
  std::sort(v.begin(), v.end());
  return v[v.size() / 2];
}

// Documents are separated by EOS in the training data, so EOS first marks a document start.
std::vector<int64_t> encode_prompt(const data::Tokenizer& tok, const std::string& text) {
  std::vector<int64_t> ids = {tok.eos_id()};
  for (int32_t id : tok.encode(text)) ids.push_back(id);
  return ids;
}

// The prompts of a file (or stdin), one per line, empty lines skipped.
std::vector<std::string> read_prompts(const std::string& path) {
  std::ifstream file;
  if (path != "-") {
    file.open(path);
    if (!file) throw std::runtime_error(path + ": cannot open the prompts file");
  }
  std::istream& in = path == "-" ? std::cin : file;
  std::vector<std::string> out;
  for (std::string line; std::getline(in, line);) {
    if (!line.empty() && line.back() == '\r') line.pop_back();
    if (!line.empty()) out.push_back(line);
  }
  if (out.empty()) throw std::invalid_argument((path == "-" ? std::string("standard input") : path) + ": no prompts");
  return out;
}

nlohmann::json generate_lines(const GenerateOptions& a, nn::Transformer& model, const data::Tokenizer& tok,
                              const LoadedModel& loaded, std::ostream& text_out, std::ostream& log) {
  if (a.batch < 1) throw std::invalid_argument("--batch must be >= 1, got " + std::to_string(a.batch));
  const auto prompts = read_prompts(a.prompts_file);
  int64_t tokens = 0, steps = 0;
  double prefill_s = 0, decode_s = 0;
  const auto t0 = std::chrono::steady_clock::now();
  for (size_t i0 = 0; i0 < prompts.size(); i0 += size_t(a.batch)) {
    const size_t i1 = std::min(prompts.size(), i0 + size_t(a.batch));
    std::vector<std::vector<int64_t>> ids;
    for (size_t i = i0; i < i1; ++i) ids.push_back(encode_prompt(tok, prompts[i]));
    const auto r = generate_batch(model, ids, a.sampling, tok.eos_id());
    for (size_t i = i0; i < i1; ++i) {
      const auto& out = r.tokens[i - i0];
      const std::vector<int32_t> ids32(out.begin(), out.end());
      text_out << nlohmann::json{{"index", i},
                                 {"prompt", prompts[i]},
                                 {"completion", tok.decode(ids32)},
                                 {"tokens", out.size()},
                                 {"stop_reason", r.stop_reasons[i - i0]}}
                      .dump(-1, ' ', false, nlohmann::json::error_handler_t::replace)
               << std::endl;
      tokens += int64_t(out.size());
    }
    steps += r.steps;
    prefill_s += r.prefill_seconds;
    decode_s += r.decode_seconds;
  }
  const double seconds = std::chrono::duration<double>(std::chrono::steady_clock::now() - t0).count();
  const nlohmann::json stats = {{"prompts", prompts.size()},
                                {"batch", a.batch},
                                {"tokens", tokens},
                                {"seconds", seconds},
                                {"tokens_per_second", seconds > 0 ? double(tokens) / seconds : 0.0},
                                {"decode_steps", steps},
                                {"prefill_ms", 1e3 * prefill_s},
                                {"decode_ms", 1e3 * decode_s},
                                {"value_format", nn::to_string(loaded.value_format)},
                                {"key_format", nn::to_string(loaded.key_format)},
                                {"weight_format", nn::to_string(loaded.weight_format)},
                                {"value_prefetch_bytes", loaded.model->value_prefetch()}};
  log << "generate: " << tokens << " tokens for " << prompts.size() << " prompts in " << seconds << " s ("
      << stats["tokens_per_second"].get<double>() << " tokens/s, batches of up to " << a.batch << ")\n"
      << stats.dump() << std::endl;
  return stats;
}

}  // namespace

nlohmann::json generate_from_checkpoint(const GenerateOptions& a, std::ostream& text_out, std::ostream& log) {
  a.sampling.validate();
  LoadOptions lo;
  lo.mmap = a.mmap;
  lo.value_tables = a.value_tables;
  if (!a.value_tables.empty()) lo.value_cache_bytes = value_cache_bytes(a.value_cache_gib);
  if (!a.keys.empty()) lo.key_format = nn::parse_value_format(a.keys);
  if (!a.weights.empty()) lo.weight_format = nn::parse_value_format(a.weights);
  lo.warn = [&log](const std::string& s) { log << "note: " << s << std::endl; };
  auto loaded = load_model(a.checkpoint, lo);
  auto& model = loaded.model;
  if (a.value_prefetch >= 0) model->set_value_prefetch(a.value_prefetch);
  // The run folder's own tokenizer, else the prepared data's.
  std::string tok_path = a.data_dir.empty() ? checkpoint::run_tokenizer_path(a.checkpoint) : std::string();
  if (tok_path.empty())
    tok_path = data::load_prepared(checkpoint::data_dir_for_checkpoint(a.checkpoint, a.data_dir)).tokenizer_path;
  const auto tok = data::Tokenizer::load(tok_path);
  const int64_t ctx = model->config().max_seq_len;
  if (a.sampling.max_tokens >= ctx)
    log << "note: --max-tokens " << a.sampling.max_tokens << " reaches the model's context of " << ctx
        << " tokens (prompt included); generation stops when the context is full" << std::endl;
  if (tok.vocab_size() != model->config().vocab_size)
    throw std::invalid_argument("the tokenizer's vocabulary (" + std::to_string(tok.vocab_size()) +
                                ") differs from the checkpoint's vocab_size");
  if (!a.prompts_file.empty()) return generate_lines(a, model, tok, loaded, text_out, log);
  const std::vector<int64_t> prompt = encode_prompt(tok, a.prompt);

  std::vector<int32_t> produced;
  std::string shown;
  text_out << a.prompt << std::flush;
  infer::GenerateTiming timing;
  const auto t0 = std::chrono::steady_clock::now();
  infer::generate(model, prompt, a.sampling, tok.eos_id(), [&](int64_t id) {
    produced.push_back(static_cast<int32_t>(id));
    const std::string text = tok.decode(produced);
    // Print what is new; a byte-fallback piece may complete a character only with the next token.
    if (text.size() > shown.size() && text.compare(0, shown.size(), shown) == 0) {
      text_out << text.substr(shown.size()) << std::flush;
      shown = text;
    }
  }, &timing);
  const double seconds = std::chrono::duration<double>(std::chrono::steady_clock::now() - t0).count();
  const std::string text = tok.decode(produced);
  if (text.size() > shown.size() && text.compare(0, shown.size(), shown) == 0) text_out << text.substr(shown.size());
  text_out << std::endl;
  // Speed on stderr (the text stays clean on stdout). The first decode step is the first to touch the
  // value rows of a new token; with --mmap and a cold page cache it pays the page faults.
  const auto& steps = timing.step_seconds;
  const double decode_s = std::accumulate(steps.begin(), steps.end(), 0.0);
  std::vector<double> later(steps.begin() + (steps.empty() ? 0 : 1), steps.end());
  const nlohmann::json stats = {
      {"tokens", produced.size()},
      {"seconds", seconds},
      {"tokens_per_second", seconds > 0 ? double(produced.size()) / seconds : 0.0},
      {"decode_tokens_per_second", decode_s > 0 ? double(steps.size()) / decode_s : 0.0},
      {"prompt_tokens", timing.prompt_tokens},
      {"prompt_ms", 1e3 * timing.prompt_seconds},
      {"first_step_ms", steps.empty() ? 0.0 : 1e3 * steps.front()},
      {"median_later_step_ms", 1e3 * median(later)},
      {"value_format", nn::to_string(loaded.value_format)},
      {"value_mib", double(loaded.value_bytes) / double(1 << 20)},
      {"mmap", a.mmap},
      {"key_format", nn::to_string(loaded.key_format)},
      {"weight_format", nn::to_string(loaded.weight_format)},
      {"value_prefetch_bytes", model->value_prefetch()},
      {"stop_reason", timing.stop_reason},
      {"context", ctx}};
  if (timing.stop_reason == "context_full")
    log << "generate: stopped after " << produced.size() << " tokens: the model's context of " << ctx
        << " tokens is full (prompt " << timing.prompt_tokens << " + generated)" << std::endl;
  log << "generate: " << produced.size() << " tokens in " << seconds << " s ("
            << stats["tokens_per_second"].get<double>() << " tokens/s; decode steps: first "
            << stats["first_step_ms"].get<double>() << " ms, median of later " << stats["median_later_step_ms"].get<double>()
            << " ms)\n"
            << stats.dump() << std::endl;
  return stats;
}

}  // namespace ultramem::infer
