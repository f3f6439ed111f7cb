// `ultramem prepare`: corpus -> tokenizer -> token shards (data/prepare.h).
#include <CLI/CLI.hpp>

#include <cstdlib>
#include <filesystem>
#include <iostream>
#include <memory>

#include "commands.h"
#include "ultramem/data/prepare.h"

namespace ultramem::cli {
namespace {

// The default corpus is fetched on first use when the project's fetch script is at hand.
void fetch_default_corpus_if_missing(const data::PrepareOptions& o) {
  namespace fs = std::filesystem;
  if (!o.input.empty() || fs::exists(data::kDefaultCorpusDir)) return;
  const char* script = "scripts/fetch_corpus.sh";
  if (!fs::exists(script)) return;  // prepare() then explains how to get it
  std::cerr << "prepare: default corpus missing; running " << script << std::endl;
  if (std::system((std::string("bash ") + script).c_str()) != 0)
    throw std::runtime_error(std::string(script) + " failed (see above)");
}

}  // namespace

void add_prepare_command(CLI::App& app) {
  auto o = std::make_shared<data::PrepareOptions>();
  auto* cmd = app.add_subcommand(
      "prepare",
      "Read a text corpus, split it into train/validation documents, train a BPE tokenizer and write "
      "token shards. Without --input it uses the default corpus (State of the Union addresses, fetched "
      "by scripts/fetch_corpus.sh). Reuses existing outputs when inputs and options are unchanged.");
  cmd->add_option("--input", o->input, "Corpus: a folder of .txt files (recursive) or one UTF-8 text file");
  cmd->add_option("--out", o->out_dir, "Output folder (default data/prepared/<corpus>-v<vocab>)");
  cmd->add_option("--vocab", o->vocab_size, "Tokenizer vocabulary size")->capture_default_str();
  cmd->add_option("--val-fraction", o->val_fraction, "Fraction of documents held out for validation")
      ->capture_default_str();
  cmd->add_option("--seed", o->seed, "Split and tokenizer seed (a non-negative integer)")
      ->capture_default_str()
      ->check(CLI::NonNegativeNumber);
  cmd->add_flag("--force", o->force, "Rebuild even when the outputs could be reused");
  cmd->callback([o] {
    fetch_default_corpus_if_missing(*o);
    const auto d = data::prepare(*o, std::cout);
    std::cout << (d.reused ? "reused " : "prepared ") << d.dir << ": vocab " << d.vocab_size << ", train "
              << d.train.tokens << " tokens (" << d.train.documents << " docs), val " << d.val.tokens
              << " tokens (" << d.val.documents << " docs)" << std::endl;
  });
}

}  // namespace ultramem::cli
