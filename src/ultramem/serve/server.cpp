#include "ultramem/serve/server.h"

#include <httplib.h>
#include <signal.h>
#include <unistd.h>

#include <cerrno>

#include <atomic>
#include <chrono>
#include <condition_variable>
#include <ctime>
#include <deque>
#include <filesystem>
#include <iostream>
#include <map>
#include <mutex>
#include <random>
#include <sstream>
#include <thread>

#include "ultramem/checkpoint/run_folder.h"
#include "ultramem/data/prepared.h"
#include "ultramem/data/tokenizer.h"
#include "ultramem/infer/value_table_files.h"
#include "ultramem/infer/model_loading.h"
#include "ultramem/infer/scheduler.h"
#include "ultramem/nn/memory_config.h"
#include "ultramem/serve/metrics.h"
#include "ultramem/serve/openai_api.h"

namespace ultramem::serve {

using nlohmann::json;
using Clock = std::chrono::steady_clock;

void ServeOptions::validate() const {
  if (model.empty()) throw std::invalid_argument("MODEL: a checkpoint file or run folder is required");
  if (port < 0 || port > 65535) throw std::invalid_argument("--port: must be in [0, 65535], got " + std::to_string(port));
  if (max_batch < 1 || max_batch > 4096)
    throw std::invalid_argument("--max-batch: must be in [1, 4096], got " + std::to_string(max_batch));
  if (max_queue < 0 || max_queue > 1000000)
    throw std::invalid_argument("--max-queue: must be in [0, 1000000], got " + std::to_string(max_queue));
  if (ctx < 0) throw std::invalid_argument("--ctx: must be >= 0 (0: the model's max_seq_len), got " + std::to_string(ctx));
  if (threads < 0) throw std::invalid_argument("--threads: must be >= 0, got " + std::to_string(threads));
  if (http_threads < 0 || http_threads > 4096)
    throw std::invalid_argument("--http-threads: must be in [0, 4096], got " + std::to_string(http_threads));
  if (!(drain_seconds >= 0)) throw std::invalid_argument("--drain-timeout: must be >= 0 seconds");
}

namespace {

// One choice of a request, as the scheduler thread fills it in.
struct ChoiceState {
  int64_t seq = -1;                // scheduler sequence id
  std::vector<int32_t> ids;        // generated token ids (the completion's tokens)
  std::unique_ptr<StopText> text;
  bool ended = false;
  std::string end_reason, error;
};

// A request in flight, shared by its HTTP thread and the scheduler's callbacks.
struct RequestState {
  std::mutex mu;
  std::condition_variable cv;
  std::vector<ChoiceState> choices;
  int64_t ended = 0;
  std::deque<std::string> events;  // streaming: SSE payloads ready to send
  double first_token_seconds = 0;
};

std::string random_hex(int n) {
  static thread_local std::mt19937_64 rng{std::random_device{}()};
  static const char* digits = "0123456789abcdef";
  std::string s(n, '0');
  for (auto& c : s) c = digits[rng() & 15];
  return s;
}

uint64_t random_seed() {
  static thread_local std::mt19937_64 rng{std::random_device{}()};
  return rng() >> 1;  // fits int64, as a seed a client could send
}

// The message of a choice that ended without its text ("" when it ended normally).
std::string failure_of(const std::string& end_reason, const std::string& error) {
  if (end_reason == "error") return "generation failed: " + error;
  if (end_reason == "cancelled") return "generation cancelled (server shutdown)";
  return "";
}

std::string sse(const json& j) { return "data: " + j.dump(-1, ' ', false, json::error_handler_t::replace) + "\n\n"; }

}  // namespace

struct Server::Impl {
  ServeOptions opt;
  std::ostream& log;
  std::mutex log_mu;
  nn::Transformer model{nullptr};
  std::shared_ptr<const data::Tokenizer> tok;
  std::string name;
  std::unique_ptr<infer::Scheduler> sched;
  httplib::Server http;
  int port = 0;
  int listen_fd = -1;
  std::atomic<bool> draining{false};
  std::atomic<int64_t> in_flight{0};
  std::atomic<uint64_t> request_counter{0};
  HttpCounters counters;
  std::mutex stop_mu;
  bool stopped = false;

  Impl(std::shared_ptr<nn::TransformerImpl> m, std::shared_ptr<const data::Tokenizer> t, const ServeOptions& o,
       std::ostream& l)
      : opt(o), log(l), model(std::move(m)), tok(std::move(t)) {
    name = opt.name.empty() ? "ultramem" : opt.name;
    infer::Scheduler::Options so;
    so.max_batch = opt.max_batch;
    so.max_queue = opt.max_queue;
    so.ctx = opt.ctx;
    so.threads = opt.threads;
    sched = std::make_unique<infer::Scheduler>(model, tok->eos_id(), so);
    const int threads = opt.http_threads > 0 ? opt.http_threads
                                             : static_cast<int>(std::min<int64_t>(1024, opt.max_batch + opt.max_queue + 8));
    http.new_task_queue = [threads] { return new httplib::ThreadPool(static_cast<size_t>(threads)); };
    http.set_payload_max_length(8 << 20);
    http.set_keep_alive_max_count(1000);
    http.set_keep_alive_timeout(2);
    routes();
    // cpp-httplib 0.11 listens with a backlog of 5: 64 clients connecting at once overflow it (SYNs
    // dropped and retried a second later, or connections reset). Remember the listening socket and
    // widen its backlog after the bind (listen() again updates it).
    http.set_socket_options([this](socket_t sock) {
      httplib::default_socket_options(sock);
      listen_fd = sock;
    });
    if (opt.port == 0) {
      port = http.bind_to_any_port(opt.host);
      if (port <= 0) throw std::runtime_error("serve: cannot bind " + opt.host + " to a free port");
    } else {
      if (!http.bind_to_port(opt.host, opt.port))
        throw std::runtime_error("serve: cannot bind " + opt.host + ":" + std::to_string(opt.port) +
                                 " (in use, or not an address of this machine)");
      port = opt.port;
    }
    if (listen_fd >= 0) ::listen(listen_fd, 1024);
  }

  void log_line(const json& j) {
    std::lock_guard<std::mutex> lock(log_mu);
    log << j.dump(-1, ' ', false, json::error_handler_t::replace) << std::endl;
  }

  void reply_json(httplib::Response& res, int status, const json& body) {
    res.status = status;
    res.set_content(body.dump(-1, ' ', false, json::error_handler_t::replace), "application/json");
  }

  void reply_error(httplib::Response& res, const ApiError& e) {
    reply_json(res, e.status, error_body(e));
    if (e.status == 429 || e.status == 503) res.set_header("Retry-After", "1");
  }

  void routes() {
    http.Get("/health", [this](const httplib::Request&, httplib::Response& res) {
      if (draining) {
        reply_json(res, 503, {{"status", "draining"}});
        res.set_header("Retry-After", "1");
      } else {
        reply_json(res, 200, {{"status", "ok"}});
      }
      counters.add("/health", res.status);
    });
    http.Get("/v1/models", [this](const httplib::Request&, httplib::Response& res) {
      reply_json(res, 200,
                 {{"object", "list"},
                  {"data", json::array({{{"id", name}, {"object", "model"}, {"created", 0}, {"owned_by", "ultramem"}}})}});
      counters.add("/v1/models", res.status);
    });
    http.Get("/metrics", [this](const httplib::Request&, httplib::Response& res) {
      res.set_content(prometheus_text(sched->stats(), counters, draining), "text/plain; version=0.0.4");
    });
    http.Post("/v1/completions",
              [this](const httplib::Request& req, httplib::Response& res) { completion(req, res, false); });
    http.Post("/v1/chat/completions",
              [this](const httplib::Request& req, httplib::Response& res) { completion(req, res, true); });
    http.set_error_handler([this](const httplib::Request& req, httplib::Response& res) {
      if (!res.body.empty()) return;  // a handler's own error body
      const std::string msg = res.status == 404 ? "no route " + req.method + " " + req.path +
                                                      " (POST /v1/completions, POST /v1/chat/completions, "
                                                      "GET /v1/models, GET /health, GET /metrics)"
                                                : "HTTP error " + std::to_string(res.status);
      reply_json(res, res.status, error_body(ApiError(res.status, msg, "", res.status == 404 ? "not_found_error"
                                                                                            : "invalid_request_error")));
      counters.add(req.path, res.status);
    });
    http.set_exception_handler([this](const httplib::Request& req, httplib::Response& res, std::exception_ptr ep) {
      std::string what = "unknown error";
      try {
        std::rethrow_exception(ep);
      } catch (const std::exception& e) {
        what = e.what();
      } catch (...) {
      }
      reply_json(res, 500, error_body(ApiError(500, "internal error: " + what, "", "server_error")));
      counters.add(req.path, 500);
    });
  }

  // The HTTP thread of one completion request: validate, tokenise, submit a sequence per choice, then
  // wait for them (or stream their text as it comes).
  void completion(const httplib::Request& req, httplib::Response& res, bool chat) {
    const std::string endpoint = chat ? "/v1/chat/completions" : "/v1/completions";
    const auto t0 = Clock::now();
    CompletionRequest r;
    std::vector<int64_t> prompt;
    try {
      if (draining) throw ApiError(503, "the server is shutting down", "", "server_error");
      r = parse_completion_request(req.body, chat);
      if (!r.model.empty() && r.model != name)
        throw ApiError(404, "the model '" + r.model + "' is not served here (this server serves '" + name + "')",
                       "model", "not_found_error");
      prompt.push_back(tok->eos_id());  // documents start after EOS in the training data
      for (int32_t id : tok->encode(r.prompt)) prompt.push_back(id);
      const int64_t ctx = sched->ctx();
      if (static_cast<int64_t>(prompt.size()) >= ctx)
        throw ApiError(400,
                       "the prompt is " + std::to_string(prompt.size()) + " tokens; the context holds " +
                           std::to_string(ctx) + " (prompt and completion), so at most " + std::to_string(ctx - 1) +
                           " prompt tokens fit",
                       chat ? "messages" : "prompt", "invalid_request_error");
      if (chat && !r.max_tokens_given) r.max_tokens = ctx - static_cast<int64_t>(prompt.size());
    } catch (const ApiError& e) {
      reply_error(res, e);
      counters.add(endpoint, res.status);
      return;
    }
    const std::string id = (chat ? "chatcmpl-" : "cmpl-") + std::to_string(++request_counter) + "-" + random_hex(8);
    const int64_t created = static_cast<int64_t>(std::time(nullptr));
    auto st = std::make_shared<RequestState>();
    st->choices.resize(r.n);
    const uint64_t seed = r.seed ? *r.seed : random_seed();
    int64_t submitted = 0;
    try {
      for (int64_t i = 0; i < r.n; ++i) {
        st->choices[i].text = std::make_unique<StopText>(r.stop);
        infer::SequenceRequest sr;
        sr.prompt = prompt;
        sr.sampling.temperature = r.temperature;
        sr.sampling.top_p = r.top_p;
        sr.sampling.top_k = r.top_k;
        sr.sampling.max_tokens = r.max_tokens;
        sr.sampling.seed = seed + static_cast<uint64_t>(i);
        sr.stop_at_eos = !r.ignore_eos;
        const bool stream = r.stream;
        sr.on_token = [this, st, i, stream, chat, id, created, t0](int64_t tid) {
          std::lock_guard<std::mutex> lock(st->mu);
          auto& c = st->choices[i];
          c.ids.push_back(static_cast<int32_t>(tid));
          if (st->first_token_seconds == 0) st->first_token_seconds = std::chrono::duration<double>(Clock::now() - t0).count();
          const std::string out = c.text->push(tok->decode(c.ids));
          if (stream && !out.empty()) {
            st->events.push_back(sse(chunk_body(id, created, name, i, out, "", chat)));
            st->cv.notify_all();
          }
          return !c.text->stopped();
        };
        sr.on_end = [this, st, i, stream, chat, id, created](const infer::SequenceEnd& e) {
          std::lock_guard<std::mutex> lock(st->mu);
          auto& c = st->choices[i];
          c.ended = true;
          c.end_reason = e.reason;
          c.error = e.error;
          if (stream) {
            if (const std::string f = failure_of(e.reason, e.error); !f.empty()) {
              st->events.push_back(sse(error_body(ApiError(503, f, "", "server_error"))));
            } else {
              const std::string rest = c.text->finish();
              st->events.push_back(sse(chunk_body(id, created, name, i, rest, finish_reason(e.reason), chat)));
            }
          }
          ++st->ended;
          st->cv.notify_all();
        };
        const int64_t seq = sched->submit(std::move(sr));
        if (seq < 0 && (draining || sched->closed()))
          throw ApiError(503, "the server is shutting down", "", "server_error");
        if (seq < 0)
          throw ApiError(429, "the server is busy: its queue of " + std::to_string(opt.max_queue) +
                                  " waiting sequences is full", "", "rate_limit_error");
        std::lock_guard<std::mutex> lock(st->mu);
        st->choices[i].seq = seq;
        ++submitted;
      }
    } catch (const ApiError& e) {
      cancel_all(*st);
      wait_ended(*st, submitted);
      reply_error(res, e);
      counters.add(endpoint, res.status);
      return;
    } catch (const std::invalid_argument& e) {
      cancel_all(*st);
      wait_ended(*st, submitted);
      reply_error(res, ApiError(400, e.what()));
      counters.add(endpoint, res.status);
      return;
    }
    ++in_flight;
    const Usage base{static_cast<int64_t>(prompt.size()) * r.n, 0};
    if (!r.stream) {
      wait_ended(*st, r.n);
      std::vector<Choice> choices;
      Usage usage = base;
      std::string failure;
      for (int64_t i = 0; i < r.n; ++i) {
        auto& c = st->choices[i];
        if (const std::string f = failure_of(c.end_reason, c.error); !f.empty()) failure = f;
        c.text->finish();
        choices.push_back({i, c.text->text(), finish_reason(c.end_reason)});
        usage.completion_tokens += static_cast<int64_t>(c.ids.size());
      }
      if (!failure.empty())
        reply_error(res, ApiError(503, failure, "", "server_error"));
      else
        reply_json(res, 200, completion_body(id, created, name, choices, usage, chat));
      finish_request(endpoint, res.status, id, usage, st->first_token_seconds, t0);
      return;
    }
    // Streaming: the content provider runs on this HTTP thread after the handler returns.
    res.set_header("Cache-Control", "no-cache");
    if (chat) {
      std::lock_guard<std::mutex> lock(st->mu);
      for (int64_t i = 0; i < r.n; ++i) st->events.push_front(sse(chunk_body(id, created, name, r.n - 1 - i, "", "", true, true)));
    }
    auto finished = std::make_shared<bool>(false);
    const bool include_usage = r.include_usage;
    const int64_t n = r.n;
    res.set_chunked_content_provider(
        "text/event-stream",
        [this, st, n, include_usage, id, created, chat, base, finished, endpoint, t0](size_t, httplib::DataSink& sink) {
          std::unique_lock<std::mutex> lock(st->mu);
          auto last_write = Clock::now();
          // Writes without holding the request's lock. A failed write (the client went away) ends the
          // stream; the releaser below then cancels its sequences.
          auto write = [&](const char* data, size_t size) {
            lock.unlock();
            const bool ok = sink.write(data, size);
            lock.lock();
            last_write = Clock::now();
            return ok;
          };
          while (true) {
            st->cv.wait_for(lock, std::chrono::milliseconds(500), [&] { return !st->events.empty() || st->ended == n; });
            while (!st->events.empty()) {
              const std::string ev = std::move(st->events.front());
              st->events.pop_front();
              if (!write(ev.data(), ev.size())) return false;
            }
            if (st->ended == n) break;
            // A comment probes the connection when nothing was sent for a while.
            if (Clock::now() - last_write > std::chrono::seconds(2) && !write(": keep-alive\n\n", 14)) return false;
          }
          Usage usage = base;
          for (const auto& c : st->choices) usage.completion_tokens += static_cast<int64_t>(c.ids.size());
          const double ttft = st->first_token_seconds;
          lock.unlock();
          std::string tail;
          if (include_usage) tail += sse(usage_chunk_body(id, created, name, usage, chat));
          tail += "data: [DONE]\n\n";
          sink.write(tail.data(), tail.size());
          sink.done();
          *finished = true;
          finish_request(endpoint, 200, id, usage, ttft, t0);
          return true;
        },
        [this, st, finished, endpoint, t0, id](bool) {
          if (!*finished) {  // disconnected or failed: cancel what still runs
            cancel_all(*st);
            finish_request(endpoint, 499, id, Usage{}, 0, t0);
          }
        });
  }

  void cancel_all(RequestState& st) {
    std::vector<int64_t> seqs;
    {
      std::lock_guard<std::mutex> lock(st.mu);
      for (const auto& c : st.choices)
        if (c.seq >= 0 && !c.ended) seqs.push_back(c.seq);
    }
    for (int64_t s : seqs) sched->cancel(s);
  }

  void wait_ended(RequestState& st, int64_t count) {
    std::unique_lock<std::mutex> lock(st.mu);
    st.cv.wait(lock, [&] { return st.ended >= count; });
  }

  void finish_request(const std::string& endpoint, int status, const std::string& id, const Usage& usage, double ttft,
                      Clock::time_point t0) {
    counters.add(endpoint, status);
    counters.add_tokens(usage.prompt_tokens, usage.completion_tokens);
    --in_flight;
    if (opt.log_requests)
      log_line({{"event", "request"},
                {"id", id},
                {"endpoint", endpoint},
                {"status", status},
                {"prompt_tokens", usage.prompt_tokens},
                {"completion_tokens", usage.completion_tokens},
                {"first_token_ms", 1e3 * ttft},
                {"ms", 1e3 * std::chrono::duration<double>(Clock::now() - t0).count()}});
  }

  void stop() {
    {
      std::lock_guard<std::mutex> lock(stop_mu);
      if (stopped) return;
      stopped = true;
    }
    draining = true;
    const auto t0 = Clock::now();
    const int64_t cancelled = sched->shutdown(opt.drain_seconds);
    // Streams still write their last events; give them the rest of the drain time.
    while (in_flight > 0 && Clock::now() - t0 < std::chrono::duration<double>(opt.drain_seconds + 1.0))
      std::this_thread::sleep_for(std::chrono::milliseconds(10));
    log_line({{"event", "stopped"},
              {"cancelled_sequences", cancelled},
              {"unfinished_requests", in_flight.load()},
              {"drain_ms", 1e3 * std::chrono::duration<double>(Clock::now() - t0).count()}});
    http.stop();
  }
};

Server::Server(std::shared_ptr<nn::TransformerImpl> model, std::shared_ptr<const data::Tokenizer> tokenizer,
               const ServeOptions& options, std::ostream& log) {
  options.validate();
  if (!model) throw std::invalid_argument("Server: no model");
  if (!tokenizer) throw std::invalid_argument("Server: no tokenizer");
  if (tokenizer->vocab_size() != model->config().vocab_size)
    throw std::invalid_argument("Server: the tokenizer's vocabulary (" + std::to_string(tokenizer->vocab_size()) +
                                ") differs from the model's vocab_size (" + std::to_string(model->config().vocab_size) + ")");
  impl_ = std::make_unique<Impl>(std::move(model), std::move(tokenizer), options, log);
}

Server::~Server() {
  if (impl_) impl_->stop();
}

int Server::port() const { return impl_->port; }
const std::string& Server::model_name() const { return impl_->name; }
void Server::run() { impl_->http.listen_after_bind(); }
void Server::stop() { impl_->stop(); }

namespace {
int g_signal_pipe[2] = {-1, -1};
extern "C" void on_stop_signal(int sig) {
  const char c = static_cast<char>(sig);
  if (::write(g_signal_pipe[1], &c, 1) < 0) {
  }
}
}  // namespace

int serve_model(const ServeOptions& options, std::ostream& log) {
  options.validate();
  namespace fs = std::filesystem;
  std::string checkpoint = options.model;
  if (fs::is_directory(checkpoint)) checkpoint = (fs::path(checkpoint) / "checkpoint.safetensors").string();
  if (!fs::exists(checkpoint)) throw std::invalid_argument("MODEL: " + checkpoint + " does not exist");
  infer::LoadOptions lo;
  lo.mmap = options.mmap;
  lo.value_tables = options.value_tables;
  if (!options.value_tables.empty()) lo.value_cache_bytes = infer::value_cache_bytes(options.value_cache_gib);
  if (!options.keys.empty()) lo.key_format = nn::parse_value_format(options.keys);
  if (!options.weights.empty()) lo.weight_format = nn::parse_value_format(options.weights);
  lo.warn = [&log](const std::string& s) { log << "note: " << s << std::endl; };
  auto loaded = infer::load_model(checkpoint, lo);
  std::string tok_path = options.data_dir.empty() ? checkpoint::run_tokenizer_path(checkpoint) : std::string();
  if (tok_path.empty())
    tok_path = data::load_prepared(checkpoint::data_dir_for_checkpoint(checkpoint, options.data_dir)).tokenizer_path;
  auto tok = std::make_shared<const data::Tokenizer>(data::Tokenizer::load(tok_path));
  ServeOptions o = options;
  if (o.name.empty()) o.name = fs::path(checkpoint::run_dir_of(checkpoint)).filename().string();
  if (o.name.empty()) o.name = fs::path(checkpoint).stem().string();

  // SIGTERM / SIGINT: the handler writes the signal's number to a pipe that a watcher thread reads
  // (any thread may take the signal: libraries start threads before main, so blocking it is not enough).
  if (::pipe(g_signal_pipe) != 0) throw std::runtime_error("serve: cannot create the signal pipe");
  struct sigaction sa {};
  sa.sa_handler = on_stop_signal;
  sigemptyset(&sa.sa_mask);
  sigaction(SIGTERM, &sa, nullptr);
  sigaction(SIGINT, &sa, nullptr);
  signal(SIGPIPE, SIG_IGN);
  Server server(loaded.model.ptr(), tok, o, log);
  log << "serve: " << o.name << " (" << nn::to_string(loaded.value_format) << " values, context "
      << (o.ctx > 0 ? o.ctx : loaded.model->config().max_seq_len) << ", batch " << o.max_batch << ") listening on http://"
      << o.host << ":" << server.port() << std::endl;
  std::thread watcher([&] {
    char sig = 0;
    while (::read(g_signal_pipe[0], &sig, 1) < 0 && errno == EINTR) {
    }
    if (sig == 0) return;  // woken by run()'s end below
    log << "serve: " << (sig == SIGTERM ? "SIGTERM" : "SIGINT") << ": draining (up to " << o.drain_seconds << " s)"
        << std::endl;
    server.stop();
  });
  server.run();
  const char wake = 0;  // run() returned: wake the watcher if no signal did
  if (::write(g_signal_pipe[1], &wake, 1) < 0) {
  }
  watcher.join();
  signal(SIGTERM, SIG_DFL);
  signal(SIGINT, SIG_DFL);
  log << "serve: stopped" << std::endl;
  return 0;
}

}  // namespace ultramem::serve
