#include "ultramem/data/prepare.h"

#include <algorithm>
#include <chrono>
#include <cstdio>
#include <filesystem>
#include <nlohmann/json.hpp>
#include <stdexcept>
#include <thread>
#include <vector>

#include "ultramem/io/atomic_file.h"
#include "ultramem/data/corpus.h"
#include "ultramem/data/hash.h"
#include "ultramem/data/shard.h"
#include "ultramem/data/split.h"
#include "ultramem/data/tokenizer.h"

namespace ultramem::data {
namespace {

namespace fs = std::filesystem;
using Clock = std::chrono::steady_clock;

double seconds_since(Clock::time_point t0) { return std::chrono::duration<double>(Clock::now() - t0).count(); }

// The tokenizer settings recorded in (and compared with) the manifest. Bump "scheme" whenever the
// training recipe in tokenizer.cpp changes, so that old preparations are rebuilt.
std::string tokenizer_settings(const TokenizerTrainOptions& t) {
  nlohmann::ordered_json s = nlohmann::ordered_json::object();
  s["scheme"] = 1;
  s["library"] = "sentencepiece";
  s["model_type"] = "bpe";
  s["normalization"] = "identity";
  s["byte_fallback"] = true;
  s["add_dummy_prefix"] = false;
  s["max_sentence_bytes"] = t.max_sentence_bytes;
  s["input_sentence_size"] = t.input_sentence_size;
  return s.dump();
}

// Encodes the documents `idx` of `docs`, each followed by EOS, into one token stream. Documents are
// encoded in parallel but concatenated in order, so the stream does not depend on the thread count.
std::vector<int32_t> encode_split(const Tokenizer& tok, const std::vector<Document>& docs,
                                  const std::vector<size_t>& idx, const char* name, std::ostream& log) {
  const auto t0 = Clock::now();
  const size_t n = idx.size();
  const size_t threads = std::max<size_t>(1, std::min<size_t>(std::thread::hardware_concurrency(), 8));
  std::vector<std::vector<int32_t>> encoded(n);
  const size_t block = std::max<size_t>(threads, (n + 9) / 10);  // about ten progress lines
  for (size_t b0 = 0; b0 < n; b0 += block) {
    const size_t b1 = std::min(n, b0 + block);
    std::vector<std::thread> pool;
    std::vector<std::exception_ptr> errors(threads);
    for (size_t t = 0; t < threads; ++t) {
      pool.emplace_back([&, t] {
        try {
          for (size_t i = b0 + t; i < b1; i += threads) encoded[i] = tok.encode(docs[idx[i]].text);
        } catch (...) {
          errors[t] = std::current_exception();
        }
      });
    }
    for (auto& th : pool) th.join();
    for (auto& e : errors)
      if (e) std::rethrow_exception(e);
    log << "encoding " << name << " split: " << b1 << "/" << n << " documents\n" << std::flush;
  }
  size_t total = 0;
  for (const auto& e : encoded) total += e.size() + 1;
  std::vector<int32_t> out;
  out.reserve(total);
  for (auto& e : encoded) {
    out.insert(out.end(), e.begin(), e.end());
    out.push_back(tok.eos_id());
    std::vector<int32_t>().swap(e);
  }
  log << "encoded " << name << " split: " << out.size() << " tokens in " << seconds_since(t0) << " s\n";
  return out;
}

SplitStats stats_of(const std::vector<Document>& docs, const std::vector<size_t>& idx, size_t tokens) {
  SplitStats s;
  s.documents = static_cast<int64_t>(idx.size());
  s.tokens = static_cast<int64_t>(tokens);
  for (size_t i : idx) s.bytes += static_cast<int64_t>(docs[i].text.size());
  return s;
}

// Why an existing preparation cannot be reused, or "" if it can.
std::string reuse_mismatch(const PreparedData& old, const PrepareOptions& o, const std::string& fingerprint,
                           const std::string& settings) {
  if (old.input_fingerprint != fingerprint) return "the input files changed";
  if (old.requested_vocab_size != o.vocab_size) return "vocab_size differs";
  if (old.val_fraction != o.val_fraction) return "val_fraction differs";
  if (old.seed != o.seed) return "seed differs";
  if (old.tokenizer_settings != settings) return "tokenizer settings differ";
  return "";
}

}  // namespace

void PrepareOptions::validate() const {
  if (vocab_size < 260 || vocab_size > (int64_t(1) << 30))
    throw std::invalid_argument("PrepareOptions.vocab_size: must be in [260, 2^30], got " + std::to_string(vocab_size));
  if (!(val_fraction > 0.0 && val_fraction < 1.0))
    throw std::invalid_argument("PrepareOptions.val_fraction: must be in (0, 1), got " + std::to_string(val_fraction));
}

std::string resolved_input(const PrepareOptions& o) { return o.input.empty() ? kDefaultCorpusDir : o.input; }

std::string resolved_out_dir(const PrepareOptions& o) {
  if (!o.out_dir.empty()) return o.out_dir;
  fs::path in = fs::path(resolved_input(o)).lexically_normal();
  if (in.filename().empty()) in = in.parent_path();  // "dir/" -> "dir"
  std::string name = in.filename().string();
  if (in.extension() == ".txt") name = in.stem().string();
  if (name.empty() || name == "." || name == "..") name = "corpus";
  return std::string(kDefaultPreparedRoot) + "/" + name + "-v" + std::to_string(o.vocab_size);
}

namespace {

// out_dir without trailing slashes: the name its staging folder <out_dir>.tmp.<pid> is built from.
std::string without_trailing_slash(std::string dir) {
  while (dir.size() > 1 && dir.back() == '/') dir.pop_back();
  return dir;
}

// Trains the tokenizer, encodes both splits and writes the manifest into `dir`, then validates it.
void build_into(const std::string& dir, const Corpus& corpus, const SplitIndices& split, const PrepareOptions& options,
                const TokenizerTrainOptions& topt, const std::string& input, const std::string& fingerprint,
                const std::string& settings, std::ostream& log) {
  PreparedData d;
  d.dir = dir;
  d.manifest_path = dir + "/manifest.json";
  d.tokenizer_path = dir + "/tokenizer.model";
  d.train_path = dir + "/train.bin";
  d.val_path = dir + "/val.bin";

  std::vector<std::string_view> train_text;
  train_text.reserve(split.train.size());
  for (size_t i : split.train) train_text.emplace_back(corpus.documents[i].text);
  const Tokenizer tok = Tokenizer::train(train_text, d.tokenizer_path, topt, &log);

  const std::vector<int32_t> train_tokens = encode_split(tok, corpus.documents, split.train, "train", log);
  write_shard(d.train_path, train_tokens, tok.vocab_size());
  const std::vector<int32_t> val_tokens = encode_split(tok, corpus.documents, split.val, "val", log);
  write_shard(d.val_path, val_tokens, tok.vocab_size());

  d.vocab_size = tok.vocab_size();
  d.bos_id = tok.bos_id();
  d.eos_id = tok.eos_id();
  d.train = stats_of(corpus.documents, split.train, train_tokens.size());
  d.val = stats_of(corpus.documents, split.val, val_tokens.size());
  d.input = input;
  d.requested_vocab_size = options.vocab_size;
  d.val_fraction = options.val_fraction;
  d.seed = options.seed;
  d.input_fingerprint = fingerprint;
  d.input_files = corpus.files.size();
  d.tokenizer_settings = settings;
  d.tokenizer_hash = hex64(fnv1a64(io::read_file(d.tokenizer_path)));
  write_manifest(d);
  (void)load_prepared(dir);  // validates what was just written, before it replaces anything
}

// Moves the files of the complete preparation in `staging` into `out_dir`: the old manifest goes first (a
// crash among these renames leaves no manifest, so nothing half-replaced is ever reused), the new one last.
void move_into(const std::string& staging, const std::string& out_dir) {
  std::error_code ec;
  fs::create_directories(out_dir, ec);
  if (ec) throw std::runtime_error("prepare: cannot create output directory " + out_dir + ": " + ec.message());
  const std::string manifest = out_dir + "/manifest.json";
  if (std::remove(manifest.c_str()) != 0 && fs::exists(manifest))
    throw std::runtime_error("prepare: cannot remove the old " + manifest);
  auto move = [&](const fs::path& from) {
    fs::rename(from, fs::path(out_dir) / from.filename(), ec);
    if (ec) throw std::runtime_error("prepare: cannot move " + from.string() + " into " + out_dir + ": " + ec.message());
  };
  for (const auto& e : fs::directory_iterator(staging))
    if (e.path().filename() != "manifest.json") move(e.path());
  move(fs::path(staging) / "manifest.json");
}

}  // namespace

PreparedData prepare(const PrepareOptions& options, std::ostream& log) {
  options.validate();
  const auto t_start = Clock::now();
  const std::string input = resolved_input(options);
  const std::string out_dir = resolved_out_dir(options);
  std::error_code ec;
  if (!fs::exists(input, ec))
    throw std::runtime_error("corpus: " + input + ": does not exist" +
                             (options.input.empty() ? " (download the default corpus with scripts/fetch_corpus.sh)" : ""));

  const Corpus corpus = read_corpus(input, &log);
  const std::string fingerprint = hex64(corpus.fingerprint());
  TokenizerTrainOptions topt;
  topt.vocab_size = options.vocab_size;
  topt.seed = options.seed;
  const std::string settings = tokenizer_settings(topt);

  if (!options.force && fs::exists(out_dir + "/manifest.json", ec)) {
    try {
      PreparedData old = load_prepared(out_dir);
      const std::string why = reuse_mismatch(old, options, fingerprint, settings);
      if (why.empty()) {
        old.reused = true;
        log << "reusing prepared data in " << out_dir << " (same input fingerprint " << fingerprint
            << " and options; files validated)\n";
        return old;
      }
      log << "rebuilding " << out_dir << ": " << why << "\n";
    } catch (const std::runtime_error& e) {
      log << "rebuilding " << out_dir << ": existing data is invalid (" << e.what() << ")\n";
    }
  } else if (options.force) {
    log << "rebuilding " << out_dir << " (forced)\n";
  }

  const SplitIndices split = split_documents(corpus.documents, options.val_fraction, options.seed);
  log << "split: " << split.train.size() << " train / " << split.val.size() << " validation documents\n";

  // The new data is built in a sibling folder and moved in only once complete and validated: a run that
  // fails or is killed before that leaves the old data as it was (it used to remove the old manifest
  // first, so a failed rebuild left nothing usable).
  const std::string base = without_trailing_slash(out_dir);
  const std::string staging = io::temporary_path(base);
  for (const auto& stale : io::stale_temporaries(base)) fs::remove_all(stale, ec);  // killed mid-prepare
  fs::remove_all(staging, ec);
  fs::create_directories(staging, ec);
  if (ec) throw std::runtime_error("prepare: cannot create the folder " + staging + ": " + ec.message());
  try {
    build_into(staging, corpus, split, options, topt, input, fingerprint, settings, log);
    move_into(staging, out_dir);
  } catch (...) {
    fs::remove_all(staging, ec);
    throw;
  }
  fs::remove_all(staging, ec);

  PreparedData out = load_prepared(out_dir);  // validates what was just written
  out.reused = false;
  log << "prepared " << out_dir << " in " << seconds_since(t_start) << " s: train " << out.train.documents
      << " docs / " << out.train.tokens << " tokens / " << out.train.bytes << " bytes, val " << out.val.documents
      << " docs / " << out.val.tokens << " tokens / " << out.val.bytes << " bytes\n";
  return out;
}

}  // namespace ultramem::data
