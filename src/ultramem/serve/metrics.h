// The server's /metrics: Prometheus text exposition (version 0.0.4) of the HTTP counters and the
// scheduler's statistics.
#pragma once
#include <cstdint>
#include <map>
#include <mutex>
#include <string>
#include <utility>

#include "ultramem/infer/scheduler.h"

namespace ultramem::serve {

// Requests by endpoint and status, and tokens in and out; thread-safe.
class HttpCounters {
 public:
  // endpoint: a route of the server; anything else is counted as "other" (no label per client path).
  void add(const std::string& endpoint, int status);
  void add_tokens(int64_t prompt, int64_t completion);
  std::map<std::pair<std::string, int>, int64_t> requests() const;
  int64_t prompt_tokens() const;
  int64_t completion_tokens() const;

 private:
  mutable std::mutex mu_;
  std::map<std::pair<std::string, int>, int64_t> requests_;
  int64_t prompt_tokens_ = 0, completion_tokens_ = 0;
};

// The exposition text: ultramem_requests_total{endpoint,status}, ultramem_prompt_tokens_total,
// ultramem_completion_tokens_total, ultramem_queue_length, ultramem_active_sequences, ultramem_max_batch,
// ultramem_batch_occupancy (active / max_batch), ultramem_decode_steps_total,
// ultramem_decode_step_rows_total, ultramem_step_seconds (histogram), ultramem_prefill_seconds_total,
// ultramem_time_to_first_token_seconds (sum and count), ultramem_sequences_total{reason},
// ultramem_refused_sequences_total, ultramem_draining.
std::string prometheus_text(const infer::SchedulerStats& s, const HttpCounters& http, bool draining);

}  // namespace ultramem::serve
