// `ultramem serve`: an OpenAI-compatible HTTP API (cpp-httplib) over the continuous-batching scheduler
// (infer::Scheduler). The HTTP threads parse and validate requests (openai_api.h), tokenise, submit one
// sequence per choice and wait for (or stream) its text; the scheduler thread alone runs the model.
//
//   POST /v1/completions        prompt -> text; stream as server-sent events
//   POST /v1/chat/completions   messages -> the chat template (openai_api.h) -> the reply
//   GET  /v1/models             the one model served
//   GET  /health                200 {"status":"ok"}; 503 while draining
//   GET  /metrics               Prometheus text: requests, tokens, queue, batch occupancy, step latency
#pragma once
#include <cstdint>
#include <iosfwd>
#include <memory>
#include <string>

namespace ultramem::nn {
class TransformerImpl;
}
namespace ultramem::data {
class Tokenizer;
}

namespace ultramem::serve {

struct ServeOptions {
  std::string model;             // checkpoint file, or a run folder holding checkpoint.safetensors
  std::string data_dir;          // prepared data for the tokenizer ("": the run folder's)
  std::string name;              // the model id clients send and /v1/models lists ("": the run folder's name)
  std::string host = "127.0.0.1";
  int port = 8080;               // 0: any free port (printed, and Server::port())
  int64_t max_batch = 64;        // sequences decoded together
  int64_t max_queue = 256;       // sequences waiting beyond those; more -> 429 with Retry-After
  int64_t ctx = 0;               // context per sequence (prompt + generated); 0: the model's max_seq_len
  int threads = 0;               // compute threads of the model; 0: the calling thread's (--threads)
  int http_threads = 0;          // connection threads; 0: max_batch + max_queue + 8, at most 1024
  bool mmap = false;             // value tables mapped from the checkpoint
  std::string value_tables;  // a folder of value-table files (export-tables) served behind row caches; "": none
  double value_cache_gib = 4;  // the row caches' cap with value_tables
  std::string keys, weights;     // key / dense-weight storage as in `generate` ("": the checkpoint's)
  double drain_seconds = 30;     // on SIGTERM: how long in-flight requests may take to finish
  bool log_requests = true;      // one JSON line per finished request on the log
  void validate() const;         // std::invalid_argument naming the flag
};

class Server {
 public:
  // Serves `model` (takes it; eval mode) with `tokenizer`. Binds host:port now (std::runtime_error when
  // it cannot) but answers only once run() is called.
  Server(std::shared_ptr<nn::TransformerImpl> model, std::shared_ptr<const data::Tokenizer> tokenizer,
         const ServeOptions& options, std::ostream& log);
  ~Server();
  int port() const;
  const std::string& model_name() const;
  // Answers requests until stop() has drained: blocks the calling thread.
  void run();
  // From any thread (a signal watcher): new requests get 503; in-flight ones finish (at most
  // drain_seconds, then they are cancelled); then run() returns.
  void stop();

 private:
  struct Impl;
  std::unique_ptr<Impl> impl_;
};

// `ultramem serve` as a call: loads the model and its tokenizer, prints the address, serves until SIGTERM
// or SIGINT, drains and returns 0.
int serve_model(const ServeOptions& options, std::ostream& log);

}  // namespace ultramem::serve
