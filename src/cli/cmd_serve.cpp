// `ultramem serve MODEL`: flags -> serve::serve_model (serve/server.h), an OpenAI-compatible HTTP server
// with continuous batching.
#include <CLI/CLI.hpp>

#include <iostream>
#include <memory>

#include "commands.h"
#include "value_table_options.h"
#include "ultramem/serve/server.h"

namespace ultramem::cli {

void add_serve_command(CLI::App& app) {
  auto o = std::make_shared<serve::ServeOptions>();
  auto* cmd = app.add_subcommand(
      "serve",
      "Serve a trained model over an OpenAI-compatible HTTP API (POST /v1/completions, POST /v1/chat/completions, "
      "GET /v1/models, GET /health, GET /metrics), decoding concurrent requests together in one batch "
      "(continuous batching). A request's text does not depend on the others in the batch. SIGTERM or Ctrl-C "
      "stops accepting, lets in-flight requests finish (--drain-timeout) and exits 0. docs/serving.md");
  cmd->add_option("model", o->model, "Checkpoint file, or a run folder holding checkpoint.safetensors")
      ->required()
      ->check(CLI::ExistingPath);
  cmd->add_option("--host", o->host, "Address to listen on")->capture_default_str();
  cmd->add_option("--port", o->port, "Port to listen on (0: any free port, printed at start)")
      ->capture_default_str()
      ->check(CLI::Range(0, 65535));
  cmd->add_option("--max-batch", o->max_batch, "Sequences decoded together (each choice of a request is one)")
      ->capture_default_str()
      ->check(CLI::Range(int64_t(1), int64_t(4096)));
  cmd->add_option("--max-queue", o->max_queue,
                  "Sequences that may wait for a batch slot; beyond, requests get 429 with Retry-After")
      ->capture_default_str()
      ->check(CLI::Range(int64_t(0), int64_t(1000000)));
  cmd->add_option("--ctx", o->ctx, "Context per sequence, prompt and completion (0: the model's max_seq_len)")
      ->capture_default_str()
      ->check(CLI::NonNegativeNumber);
  cmd->add_option("--name", o->name, "Model id in /v1/models and responses (default: the run folder's name)");
  cmd->add_option("--data", o->data_dir, "Prepared data folder holding the tokenizer (default: the run folder's)");
  cmd->add_option("--keys", o->keys, "Key storage of the memory layers: fp32, bf16 or int8 (as in generate)")
      ->check(CLI::IsMember({"fp32", "bf16", "int8"}));
  cmd->add_option("--weights", o->weights, "Storage of the dense matrices: fp32, bf16 or int8 (as in generate)")
      ->check(CLI::IsMember({"fp32", "bf16", "int8"}));
  add_value_table_options(cmd, o->value_tables, o->value_cache_gib);
  cmd->add_flag("--mmap", o->mmap, "Serve the value tables from a read-only mapping of the checkpoint");
  cmd->add_option("--drain-timeout", o->drain_seconds,
                  "Seconds in-flight requests may take to finish after SIGTERM; then they are cancelled")
      ->capture_default_str()
      ->check(CLI::NonNegativeNumber);
  cmd->add_option("--http-threads", o->http_threads,
                  "Connection threads (0: max-batch + max-queue + 8, at most 1024); each open request holds one")
      ->capture_default_str()
      ->check(CLI::Range(0, 4096));
  cmd->add_flag("--no-request-log", [o](int64_t) { o->log_requests = false; },
                "Do not print a JSON line per finished request on stderr");
  cmd->callback([o] { serve::serve_model(*o, std::cerr); });
}

}  // namespace ultramem::cli
