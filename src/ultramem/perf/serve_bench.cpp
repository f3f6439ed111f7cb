#include "ultramem/perf/bench_common.h"
#include "ultramem/perf/serve_bench.h"

#include <httplib.h>
#include <torch/torch.h>

#include <algorithm>
#include <chrono>
#include <filesystem>
#include <fstream>
#include <iostream>
#include <map>
#include <memory>
#include <sstream>
#include <stdexcept>
#include <thread>

#include <nlohmann/json.hpp>

#include "ultramem/data/prepared.h"
#include "ultramem/data/tokenizer.h"
#include "ultramem/infer/sampling.h"
#include "ultramem/io/gnuplot.h"
#include "ultramem/nn/model_info.h"
#include "ultramem/nn/transformer.h"
#include "ultramem/ops/runtime.h"
#include "ultramem/perf/decode_sizing.h"
#include "ultramem/perf/timing.h"
#include "ultramem/serve/server.h"

namespace ultramem::perf {
namespace {

using nlohmann::json;

const std::vector<std::string> kPrompts = {
    "The people of this nation",
    "Congress shall",
    "Our economy is stronger than",
    "The state of the Union",
    "We must work together to",
    "In the coming year, my administration will",
    "The government of the United States",
    "Fellow citizens,",
};

double percentile(std::vector<double> v, double p) {
  if (v.empty()) return 0;
  std::sort(v.begin(), v.end());
  const size_t i = std::min(v.size() - 1, static_cast<size_t>(p * double(v.size() - 1) + 0.5));
  return v[i];
}

// One streamed request as a client sees it.
struct RequestTiming {
  double seconds = 0;      // request sent -> [DONE]
  double first_token = 0;  // request sent -> first event with text
  int64_t tokens = 0;      // completion_tokens of the usage chunk
  int status = 0;
  std::string error;  // what went wrong, when something did
};

RequestTiming stream_request(httplib::Client& c, const std::string& body) {
  RequestTiming t;
  const auto t0 = Clock::now();
  std::string buf, last_data;
  httplib::Request req;
  req.method = "POST";
  req.path = "/v1/completions";
  req.body = body;
  req.set_header("Content-Type", "application/json");
  req.content_receiver = [&](const char* d, size_t n, uint64_t, uint64_t) {
    if (t.first_token == 0) t.first_token = seconds_since(t0);
    buf.append(d, n);
    return true;
  };
  auto res = c.send(req);
  t.seconds = seconds_since(t0);
  t.status = res ? res->status : -1;
  if (!res) t.error = "no response: " + httplib::to_string(res.error());
  else if (res->status != 200) t.error = "HTTP " + std::to_string(res->status) + ": " + buf.substr(0, 300);
  if (buf.rfind("data: ", 0) != 0) {  // a whole answer: no first token to time
    t.first_token = 0;
    const auto j = json::parse(buf, nullptr, false);
    if (j.is_object() && j.contains("usage")) t.tokens = j["usage"].value("completion_tokens", 0);
    return t;
  }
  // The usage chunk is the last payload before [DONE].
  const size_t done = buf.rfind("data: [DONE]");
  if (done != std::string::npos && done > 2) {
    const size_t start = buf.rfind("data: ", done - 2);
    if (start != std::string::npos) {
      const auto j = json::parse(buf.substr(start + 6, done - start - 8), nullptr, false);
      if (j.is_object() && j.contains("usage")) t.tokens = j["usage"].value("completion_tokens", 0);
    }
  }
  return t;
}

// Counters of the server's /metrics.
struct ServerCounters {
  double steps = 0, rows = 0, step_seconds = 0, prefill_seconds = 0;
};
ServerCounters server_counters(int port) {
  httplib::Client c("127.0.0.1", port);
  auto res = c.Get("/metrics");
  ServerCounters s;
  if (!res) return s;
  auto read = [&](const std::string& name) -> double {
    const size_t at = res->body.find("\n" + name + " ");
    return at == std::string::npos ? 0 : std::stod(res->body.substr(at + name.size() + 2));
  };
  s.steps = read("ultramem_decode_steps_total");
  s.rows = read("ultramem_decode_step_rows_total");
  s.step_seconds = read("ultramem_step_seconds_sum");
  s.prefill_seconds = read("ultramem_prefill_seconds_total");
  return s;
}

struct Row {
  std::string kind;
  int64_t streams = 0;
  double served = 0, decode = 0, decode_invariant = 0;
};

void plot(const std::vector<Row>& rows, const std::string& dir) {
  std::filesystem::create_directories(dir);
  std::ostringstream gp;
  gp << io::chart_preamble(1100, 620) << "set termoption noenhanced\n"
     << "set output 'serve_tokens_per_second.png'\nset logscale x 2\nset logscale y 10\n"
     << "set title 'ultramem bench serve: generated tokens/s vs concurrent streams (solid: served over HTTP; "
        "dashed: the decode step alone at that batch)'\n"
     << "set xlabel 'concurrent streams (decode batch)'\nset ylabel 'tokens/s'\n";
  std::map<std::string, std::vector<const Row*>> by_kind;
  for (const auto& r : rows) by_kind[r.kind].push_back(&r);
  std::ostringstream plots;
  int i = 0;
  for (const auto& [kind, rs] : by_kind) {
    gp << "$d" << i << " << EOD\n";
    for (const Row* r : rs) gp << r->streams << " " << r->served << " " << r->decode << "\n";
    gp << "EOD\n";
    plots << (i ? ", " : "plot ") << "$d" << i << " using 1:2 with linespoints " << io::series_style(i) << " title '"
          << kind << " served', $d" << i << " using 1:3 with linespoints " << io::series_style(i)
          << " dashtype 2 title '" << kind << " decode step'";
    ++i;
  }
  gp << plots.str() << "\n";
  io::run_gnuplot(dir, "serve_tokens_per_second", gp.str());
}

}  // namespace

void run_serve_bench(const ServeBenchOptions& options) {
  ServeBenchOptions a = options;
  if (a.quick) {
    a.streams = {1, 4};
    a.max_tokens = 8;
    a.requests_per_stream = 1;
    a.repeats = 3;
    a.case_seconds = 0.2;
  }
  for (int64_t s : a.streams)
    if (s < 1 || s > a.max_batch)
      throw std::invalid_argument("--streams: each must be in [1, --max-batch = " + std::to_string(a.max_batch) + "]");
  if (a.max_tokens < 1) throw std::invalid_argument("--max-tokens: must be >= 1");
  if (a.requests_per_stream < 1) throw std::invalid_argument("--requests: must be >= 1");
  for (const auto& k : a.kinds)
    if (k != "ultramem" && k != "moe" && k != "dense")
      throw std::invalid_argument("--kinds: '" + k + "' is not one of ultramem, moe, dense");
  JsonLines emit("bench serve", a.out);

  const auto prepared = data::load_prepared(a.data_dir);
  auto tok = std::make_shared<const data::Tokenizer>(data::Tokenizer::load(prepared.tokenizer_path));
  nn::ModelConfig backbone = nn::load_model_config(a.config);
  if (backbone.memory_kind != nn::MemoryKind::UltraMem || backbone.memory_placement.empty())
    throw std::invalid_argument("--config: " + a.config + " has no UltraMem layer to derive the siblings from");
  int64_t longest_prompt = 0;
  for (const auto& p : kPrompts) longest_prompt = std::max<int64_t>(longest_prompt, 1 + int64_t(tok->encode(p).size()));
  const int64_t ctx = longest_prompt + a.max_tokens + 1;
  const int64_t mid = longest_prompt + a.max_tokens / 2;  // the decode step is timed at this position
  const auto um = backbone.ultramem_layer_config(0);
  const auto& pl = backbone.memory_placement[0];
  const std::string placement = std::to_string(pl.read_block) + ":" + std::to_string(pl.write_block);
  backbone.vocab_size = tok->vocab_size();
  backbone.max_seq_len = ctx;
  const auto sizes = derive_model_sizes(backbone, um, placement, mid);
  // One sampled token (temperature 1, the vocabulary of the run): part of every served step per sequence.
  double sample_us = 0;
  {
    const auto logits = torch::randn({backbone.vocab_size});
    infer::SamplingOptions so;
    so.temperature = 1.0;
    auto gen = at::detail::createCPUGenerator(1);
    sample_us = 1e6 * time_calls([&](int64_t) { infer::sample_token(logits.data_ptr<float>(), logits.size(0), so, gen); },
                                 a.repeats, 0.2, 0.05)
                          .median;
  }
  emit({{"config",
         {{"case", "serve"},
          {"shape", a.config},
          {"tokenizer", prepared.tokenizer_path},
          {"vocab", backbone.vocab_size},
          {"placement", placement},
          {"N", um.physical_rows()},
          {"max_tokens", a.max_tokens},
          {"requests_per_stream", a.requests_per_stream},
          {"context", ctx},
          {"decode_position", mid},
          {"max_batch", a.max_batch},
          {"threads", at::get_num_threads()},
          {"stream", a.stream},
          {"sample_token_us", sample_us},
          {"ultramem_cost", cost_to_json(sizes.ultramem_cost)},
          {"moe_cost", cost_to_json(sizes.moe_cost)},
          {"dense_cost", cost_to_json(sizes.dense_cost)}}}});

  std::vector<Row> rows;
  for (const auto& kind : a.kinds) {
    const nn::ModelConfig& mc = kind == "ultramem" ? sizes.ultramem : kind == "moe" ? sizes.moe : sizes.dense;
    auto model = nn::Transformer(mc);
    model->eval();
    // The decode step alone at batch B (as `bench decode` times it: every sequence at one position),
    // with the default products and with the batch-invariant ones the server uses: tokens/s of each.
    auto time_decode = [&](int64_t B) {
      torch::NoGradGuard no_grad;
      const auto step = make_decode_step(model, mc.vocab_size, B, mid, ctx, 1024);
      const bool before = batch_invariant();
      set_batch_invariant(false);
      const auto plain = time_calls(step, a.repeats, a.case_seconds, 0.1);
      set_batch_invariant(true);
      const auto inv = time_calls(step, a.repeats, a.case_seconds, 0.1);
      set_batch_invariant(before);
      return std::make_pair(double(B) / plain.median, double(B) / inv.median);
    };
    serve::ServeOptions so;
    so.model = kind;
    so.name = kind;
    so.port = 0;
    so.max_batch = a.max_batch;
    so.max_queue = 4 * a.max_batch;
    so.log_requests = false;
    std::ostringstream server_log;
    serve::Server server(model.ptr(), tok, so, server_log);
    std::thread runner([&] { server.run(); });
    const int port = server.port();
    {
      httplib::Client warm("127.0.0.1", port);
      warm.set_read_timeout(600, 0);
      stream_request(warm, json({{"prompt", kPrompts[0]}, {"max_tokens", 2}, {"stream", true}}).dump());
    }
    for (int64_t S : a.streams) {
      // The machine drifts: the decode step is timed just before and just after the served phase, and
      // the served rate is compared with their mean.
      const auto pre = time_decode(S);
      std::vector<std::vector<RequestTiming>> per_client(S);
      const auto c0 = server_counters(port);
      const auto t0 = Clock::now();
      std::vector<std::thread> clients;
      for (int64_t c = 0; c < S; ++c)
        clients.emplace_back([&, c] {
          httplib::Client cl("127.0.0.1", port);
          cl.set_read_timeout(600, 0);
          for (int64_t r = 0; r < a.requests_per_stream; ++r) {
            const int64_t i = c * a.requests_per_stream + r;
            const json body = {{"prompt", kPrompts[size_t(i) % kPrompts.size()]},
                               {"max_tokens", a.max_tokens},
                               {"temperature", 1.0},
                               {"seed", i},
                               {"ignore_eos", true},
                               {"stream", a.stream},
                               {"stream_options", {{"include_usage", true}}}};
            per_client[c].push_back(stream_request(cl, body.dump()));
          }
        });
      for (auto& t : clients) t.join();
      const double wall = seconds_since(t0);
      const auto c1 = server_counters(port);
      const double steps = c1.steps - c0.steps;
      std::vector<double> latency, ttft;
      int64_t tokens = 0, failed = 0;
      std::string first_error;
      for (const auto& pc : per_client)
        for (const auto& t : pc) {
          if (t.status != 200 || t.tokens != a.max_tokens) {
            ++failed;
            if (first_error.empty())
              first_error = t.error.empty() ? std::to_string(t.tokens) + " of " + std::to_string(a.max_tokens) + " tokens"
                                            : t.error;
          }
          tokens += t.tokens;
          latency.push_back(t.seconds);
          ttft.push_back(t.first_token);
        }
      const double served = double(tokens) / wall;
      const auto post = time_decode(S);
      const double dec = 0.5 * (pre.first + post.first), dec_inv = 0.5 * (pre.second + post.second);
      rows.push_back({kind, S, served, dec, dec_inv});
      emit({{"case", "serve"},
            {"kind", kind},
            {"streams", S},
            {"requests", S * a.requests_per_stream},
            {"failed_requests", failed},
            {"completion_tokens", tokens},
            {"seconds", wall},
            {"served_tokens_per_second", served},
            {"latency_p50_ms", 1e3 * percentile(latency, 0.5)},
            {"latency_p99_ms", 1e3 * percentile(latency, 0.99)},
            {"first_token_p50_ms", 1e3 * percentile(ttft, 0.5)},
            {"first_token_p99_ms", 1e3 * percentile(ttft, 0.99)},
            {"mean_step_batch", steps > 0 ? (c1.rows - c0.rows) / steps : 0.0},
            // Where the scheduler thread's time went: batched decode steps (forward and sampling, the
            // callbacks included) and prompt prefills, as fractions of the wall time.
            {"server_step_share", (c1.step_seconds - c0.step_seconds) / wall},
            {"server_prefill_share", (c1.prefill_seconds - c0.prefill_seconds) / wall},
            {"server_step_ms", steps > 0 ? 1e3 * (c1.step_seconds - c0.step_seconds) / steps : 0.0},
            {"decode_tokens_per_second", dec},
            {"decode_tokens_per_second_before_after", {pre.first, post.first}},
            {"decode_invariant_tokens_per_second", dec_inv},
            {"ratio", {{"served_over_decode", served / dec}, {"invariant_over_decode", dec_inv / dec}}}});
      if (failed > 0)
        std::cerr << "bench serve: " << failed << " requests of " << kind << " at " << S
                  << " streams failed or came back short; the first: " << first_error << std::endl;
    }
    server.stop();
    runner.join();
  }
  // Targets (issue 15): served tokens/s at 16 and 64 streams >= 0.8x the decode step's at that batch.
  for (const auto& r : rows)
    if (r.streams == 16 || r.streams == 64)
      emit({{"target", "served tokens/s >= 0.8x decode-step tokens/s at batch " + std::to_string(r.streams)},
            {"kind", r.kind},
            {"streams", r.streams},
            {"ratio", r.served / r.decode},
            {"met", r.served / r.decode >= 0.8}});
  if (!a.plot_dir.empty()) {
    plot(rows, a.plot_dir);
    std::cerr << "bench serve: chart written to " << a.plot_dir << "/serve_tokens_per_second.png" << std::endl;
  }
}

}  // namespace ultramem::perf
