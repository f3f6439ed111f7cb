// Continuous batching: sequences join and leave one running batch. A scheduler thread owns the model;
// any thread submits. Between two decode steps it prefills new prompts (each alone, into a free cache
// slot); each step runs every active sequence as one batch through the decode path
// (Transformer::decode_slots: per-sequence cache slots and lengths) and samples each sequence with its
// own generator. A finished or cancelled sequence leaves at the step it ends; the others go on.
//
// A sequence's tokens do not depend on what else is in the batch: with ultramem::set_batch_invariant (the
// scheduler turns it on) every row of a decode step gets the bits it would get alone, its prefill runs
// alone, and its sampling draws from its own generator seeded with its seed (tests hold a sequence
// alone and among 15 others to the same tokens, and to infer::generate's).
#pragma once
#include <condition_variable>
#include <cstdint>
#include <deque>
#include <functional>
#include <map>
#include <memory>
#include <mutex>
#include <set>
#include <string>
#include <thread>
#include <vector>

#include "ultramem/infer/sampling.h"
#include "ultramem/nn/transformer.h"

namespace ultramem::infer {

// How a sequence ended.
struct SequenceEnd {
  // "eos" (the model produced eos), "stop" (on_token asked to stop), "max_tokens", "context_full" (its
  // cache slot is full), "cancelled" (cancel(), or the scheduler shut down), "error" (see `error`)
  std::string reason;
  std::string error;              // the exception's message, for "error"
  int64_t prompt_tokens = 0;
  int64_t generated = 0;          // tokens passed to on_token
  double queued_seconds = 0;      // from submit to the start of its prefill
  double first_token_seconds = 0; // from submit to its first token (0 when none)
  double total_seconds = 0;       // from submit to its end
};

struct SequenceRequest {
  std::vector<int64_t> prompt;  // token ids, 1 .. ctx - 1 of them
  SamplingOptions sampling;     // temperature, top-k/p, max_tokens; seed seeds this sequence's generator
  bool stop_at_eos = true;      // false: eos is sampled and passed on like any token (benchmarks)
  // Each new token id, on the scheduler thread; return false to end the sequence ("stop", e.g. a stop
  // string was met). Keep it short: the whole batch waits for it. An exception ends the sequence with
  // "error".
  std::function<bool(int64_t id)> on_token;
  // Once, on the scheduler thread, when the sequence ends (whatever the reason).
  std::function<void(const SequenceEnd&)> on_end;
};

// Counters and gauges for /metrics; a snapshot.
struct SchedulerStats {
  int64_t active = 0;             // sequences in the running batch
  int64_t queued = 0;             // waiting for a slot
  int64_t max_batch = 0;
  int64_t submitted = 0, refused = 0;
  std::map<std::string, int64_t> ended;  // sequences ended, by SequenceEnd::reason
  double first_token_seconds = 0;        // sum over sequences with a token of submit -> first token
  int64_t first_tokens = 0;              // how many
  int64_t prompt_tokens = 0;      // prefilled
  int64_t generated_tokens = 0;   // passed to on_token
  int64_t steps = 0;              // batched decode steps
  int64_t step_rows = 0;          // sum over steps of the batch size (mean occupancy = step_rows / steps)
  double step_seconds = 0;        // sum over steps (forward + sampling)
  double prefill_seconds = 0;     // sum over prefills (forward + first sampling)
  std::vector<double> step_buckets;         // upper bounds (seconds) of the step-latency histogram
  std::vector<int64_t> step_bucket_counts;  // cumulative counts per bound (Prometheus "le")
};

class Scheduler {
 public:
  struct Options {
    int64_t max_batch = 64;       // sequences decoded together (cache slots)
    int64_t max_queue = 256;      // sequences waiting for a slot; submit refuses beyond
    int64_t ctx = 0;              // cache positions per sequence; 0: the model's max_seq_len
    int64_t prefill_tokens = 2048;  // prompt tokens prefilled between two decode steps (>= one prompt)
    int threads = 0;              // the scheduler thread's compute threads; 0: the constructing thread's
    void validate() const;        // std::invalid_argument naming the field
  };

  // Takes the model (eval mode, no grad), allocates the cache (max_batch slots of ctx positions), turns
  // ultramem::set_batch_invariant on and starts the scheduler thread.
  Scheduler(nn::Transformer model, int64_t eos_id, Options o);
  ~Scheduler();  // shutdown(0) and join
  Scheduler(const Scheduler&) = delete;
  Scheduler& operator=(const Scheduler&) = delete;

  // Queues a sequence; returns its id (>= 0), or -1 when the queue is full or the scheduler is closed
  // (nothing queued, no callback called). std::invalid_argument for an empty prompt, a prompt of ctx
  // tokens or more, a token id outside the vocabulary or bad sampling options.
  int64_t submit(SequenceRequest r);
  // Ends a queued or running sequence with "cancelled" before its next step; unknown ids are ignored.
  void cancel(int64_t id);
  // Stops accepting (submit returns -1); waits up to `drain_seconds` for queued and running sequences to
  // finish, then cancels what is left and stops the thread. Returns the number cancelled.
  int64_t shutdown(double drain_seconds);
  bool closed() const;

  SchedulerStats stats() const;
  int64_t ctx() const { return ctx_; }
  int64_t max_batch() const { return opt_.max_batch; }

 private:
  struct Sequence;
  void loop();
  void prefill(Sequence& s);
  void step();
  // Emits s's sampled token `id` or ends s (eos, stop, max_tokens, context_full).
  void advance(Sequence& s, int64_t id);
  void finish(Sequence& s, const std::string& reason, const std::string& error = "");

  nn::Transformer model_;
  int64_t eos_id_;
  Options opt_;
  int64_t ctx_ = 0;
  int threads_ = 1;
  nn::KVCache cache_;                              // [max_batch] slots of ctx positions
  std::vector<std::unique_ptr<Sequence>> active_;  // the running batch (scheduler thread only)
  std::vector<int64_t> free_slots_;                // scheduler thread only

  mutable std::mutex mu_;
  std::condition_variable wake_;  // work arrived, a cancel, or shutdown
  std::condition_variable idle_;  // nothing queued or running
  std::deque<std::unique_ptr<Sequence>> queue_;
  std::set<int64_t> cancels_;
  bool closed_ = false, stopping_ = false;
  int64_t next_id_ = 0;
  int64_t running_ = 0;  // active_.size(), readable under mu_
  SchedulerStats stats_;
  std::thread thread_;
};

}  // namespace ultramem::infer
