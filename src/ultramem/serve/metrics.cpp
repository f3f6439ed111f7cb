#include "ultramem/serve/metrics.h"

#include <set>
#include <sstream>

namespace ultramem::serve {

void HttpCounters::add(const std::string& endpoint, int status) {
  static const std::set<std::string> kRoutes = {"/v1/completions", "/v1/chat/completions", "/v1/models", "/health",
                                                "/metrics"};
  std::lock_guard<std::mutex> lock(mu_);
  ++requests_[{kRoutes.count(endpoint) ? endpoint : "other", status}];
}

void HttpCounters::add_tokens(int64_t prompt, int64_t completion) {
  std::lock_guard<std::mutex> lock(mu_);
  prompt_tokens_ += prompt;
  completion_tokens_ += completion;
}

std::map<std::pair<std::string, int>, int64_t> HttpCounters::requests() const {
  std::lock_guard<std::mutex> lock(mu_);
  return requests_;
}
int64_t HttpCounters::prompt_tokens() const {
  std::lock_guard<std::mutex> lock(mu_);
  return prompt_tokens_;
}
int64_t HttpCounters::completion_tokens() const {
  std::lock_guard<std::mutex> lock(mu_);
  return completion_tokens_;
}

namespace {
void metric(std::ostringstream& o, const char* name, const char* type, const char* help) {
  o << "# HELP " << name << " " << help << "\n# TYPE " << name << " " << type << "\n";
}
// A metric of one unlabelled sample.
template <typename T>
void metric(std::ostringstream& o, const char* name, const char* type, const char* help, T value) {
  metric(o, name, type, help);
  o << name << " " << value << "\n";
}
}  // namespace

std::string prometheus_text(const infer::SchedulerStats& s, const HttpCounters& http, bool draining) {
  std::ostringstream o;
  o.precision(9);
  metric(o, "ultramem_requests_total", "counter", "HTTP requests answered, by endpoint and status (499: client gone).");
  for (const auto& [key, n] : http.requests())
    o << "ultramem_requests_total{endpoint=\"" << key.first << "\",status=\"" << key.second << "\"} " << n << "\n";
  metric(o, "ultramem_prompt_tokens_total", "counter", "Prompt tokens of answered completion requests (per choice).",
         http.prompt_tokens());
  metric(o, "ultramem_completion_tokens_total", "counter", "Tokens generated for answered completion requests.",
         http.completion_tokens());
  metric(o, "ultramem_generated_tokens_total", "counter", "Tokens the scheduler generated (every sequence).",
         s.generated_tokens);
  metric(o, "ultramem_queue_length", "gauge", "Sequences waiting for a batch slot.", s.queued);
  metric(o, "ultramem_active_sequences", "gauge", "Sequences in the running batch.", s.active);
  metric(o, "ultramem_max_batch", "gauge", "Batch slots (--max-batch).", s.max_batch);
  metric(o, "ultramem_batch_occupancy", "gauge", "Active sequences over batch slots, now.",
         s.max_batch > 0 ? double(s.active) / double(s.max_batch) : 0.0);
  metric(o, "ultramem_decode_steps_total", "counter", "Batched decode steps.", s.steps);
  metric(o, "ultramem_decode_step_rows_total", "counter",
         "Sequences over all decode steps (mean batch = this / ultramem_decode_steps_total).", s.step_rows);
  metric(o, "ultramem_step_seconds", "histogram", "Latency of one batched decode step (forward and sampling).");
  for (size_t i = 0; i < s.step_buckets.size(); ++i)
    o << "ultramem_step_seconds_bucket{le=\"" << s.step_buckets[i] << "\"} " << s.step_bucket_counts[i] << "\n";
  o << "ultramem_step_seconds_bucket{le=\"+Inf\"} " << s.steps << "\n";
  o << "ultramem_step_seconds_sum " << s.step_seconds << "\n";
  o << "ultramem_step_seconds_count " << s.steps << "\n";
  metric(o, "ultramem_prefill_seconds_total", "counter", "Time spent prefilling prompts.", s.prefill_seconds);
  metric(o, "ultramem_prefill_tokens_total", "counter", "Prompt tokens prefilled.", s.prompt_tokens);
  metric(o, "ultramem_time_to_first_token_seconds", "summary", "From submission to a sequence's first token.");
  o << "ultramem_time_to_first_token_seconds_sum " << s.first_token_seconds << "\n";
  o << "ultramem_time_to_first_token_seconds_count " << s.first_tokens << "\n";
  metric(o, "ultramem_sequences_total", "counter", "Sequences ended, by reason.");
  for (const auto& [reason, n] : s.ended) o << "ultramem_sequences_total{reason=\"" << reason << "\"} " << n << "\n";
  metric(o, "ultramem_refused_sequences_total", "counter", "Sequences refused: queue full or shutting down.",
         s.refused);
  metric(o, "ultramem_draining", "gauge", "1 while the server drains after SIGTERM.", draining ? 1 : 0);
  return o.str();
}

}  // namespace ultramem::serve
