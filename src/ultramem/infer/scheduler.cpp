#include "ultramem/infer/scheduler.h"

#include <ATen/Parallel.h>
#include <torch/torch.h>

#include <algorithm>
#include <chrono>
#include <stdexcept>

#include "ultramem/ops/runtime.h"

namespace ultramem::infer {

using Clock = std::chrono::steady_clock;

namespace {
double seconds_since(Clock::time_point t) { return std::chrono::duration<double>(Clock::now() - t).count(); }
// Upper bounds of the step-latency histogram (seconds).
const std::vector<double> kStepBuckets = {0.001, 0.002, 0.005, 0.01, 0.02, 0.05, 0.1, 0.2, 0.5, 1.0, 2.0};
}  // namespace

struct Scheduler::Sequence {
  int64_t id = 0;
  SequenceRequest req;
  torch::Generator gen;
  int64_t slot = -1;
  int64_t length = 0;      // tokens in its cache slot
  int64_t next = 0;        // the token it feeds at the next step (at position `length`)
  int64_t generated = 0;
  bool cancel = false;     // cancel() asked for it (or shutdown)
  bool ended = false;      // finish() ran: it leaves the batch
  Clock::time_point submitted, started, first_token;
};

void Scheduler::Options::validate() const {
  if (max_batch < 1) throw std::invalid_argument("max_batch: must be >= 1, got " + std::to_string(max_batch));
  if (max_queue < 0) throw std::invalid_argument("max_queue: must be >= 0, got " + std::to_string(max_queue));
  if (ctx < 0) throw std::invalid_argument("ctx: must be >= 0 (0: the model's max_seq_len), got " + std::to_string(ctx));
  if (prefill_tokens < 1)
    throw std::invalid_argument("prefill_tokens: must be >= 1, got " + std::to_string(prefill_tokens));
  if (threads < 0) throw std::invalid_argument("threads: must be >= 0 (0: the constructing thread's), got " + std::to_string(threads));
}

Scheduler::Scheduler(nn::Transformer model, int64_t eos_id, Options o) : model_(std::move(model)), eos_id_(eos_id), opt_(o) {
  opt_.validate();
  const int64_t max_len = model_->config().max_seq_len;
  if (opt_.ctx > max_len)
    throw std::invalid_argument("ctx: " + std::to_string(opt_.ctx) + " exceeds the model's max_seq_len " +
                                std::to_string(max_len));
  ctx_ = opt_.ctx > 0 ? opt_.ctx : max_len;
  if (ctx_ < 2) throw std::invalid_argument("ctx: must leave room for a prompt and one token (>= 2)");
  model_->eval();
  {
    torch::InferenceMode guard;
    cache_ = model_->make_cache(opt_.max_batch, ctx_);
  }
  for (int64_t s = opt_.max_batch - 1; s >= 0; --s) free_slots_.push_back(s);
  stats_.max_batch = opt_.max_batch;
  stats_.step_buckets = kStepBuckets;
  stats_.step_bucket_counts.assign(kStepBuckets.size(), 0);
  set_batch_invariant(true);
  threads_ = opt_.threads > 0 ? opt_.threads : at::get_num_threads();
  thread_ = std::thread([this] { loop(); });
}

Scheduler::~Scheduler() { shutdown(0); }

bool Scheduler::closed() const {
  std::lock_guard<std::mutex> lock(mu_);
  return closed_;
}

int64_t Scheduler::submit(SequenceRequest r) {
  r.sampling.validate();
  const int64_t T = static_cast<int64_t>(r.prompt.size());
  if (T == 0) throw std::invalid_argument("prompt: holds no token");
  if (T >= ctx_)
    throw std::invalid_argument("prompt: " + std::to_string(T) + " tokens leave no room in the context of " +
                                std::to_string(ctx_) + " tokens (at most " + std::to_string(ctx_ - 1) + ")");
  const int64_t V = model_->config().vocab_size;
  for (int64_t t : r.prompt)
    if (t < 0 || t >= V)
      throw std::invalid_argument("prompt: token id " + std::to_string(t) + " outside [0, " + std::to_string(V) + ")");
  auto s = std::make_unique<Sequence>();
  s->gen = at::detail::createCPUGenerator(r.sampling.seed);
  s->req = std::move(r);
  s->submitted = Clock::now();
  std::lock_guard<std::mutex> lock(mu_);
  if (closed_ || static_cast<int64_t>(queue_.size()) >= opt_.max_queue + (opt_.max_batch - running_)) {
    ++stats_.refused;
    return -1;
  }
  s->id = next_id_++;
  ++stats_.submitted;
  const int64_t id = s->id;
  queue_.push_back(std::move(s));
  wake_.notify_one();
  return id;
}

void Scheduler::cancel(int64_t id) {
  std::lock_guard<std::mutex> lock(mu_);
  cancels_.insert(id);
  wake_.notify_one();
}

int64_t Scheduler::shutdown(double drain_seconds) {
  std::unique_lock<std::mutex> lock(mu_);
  closed_ = true;
  if (thread_.joinable()) {
    idle_.wait_for(lock, std::chrono::duration<double>(std::max(0.0, drain_seconds)),
                   [&] { return queue_.empty() && running_ == 0; });
  }
  stopping_ = true;
  const int64_t before = stats_.ended["cancelled"];
  wake_.notify_one();
  lock.unlock();
  if (thread_.joinable()) thread_.join();
  lock.lock();
  return stats_.ended["cancelled"] - before;
}

SchedulerStats Scheduler::stats() const {
  std::lock_guard<std::mutex> lock(mu_);
  SchedulerStats s = stats_;
  s.active = running_;
  s.queued = static_cast<int64_t>(queue_.size());
  return s;
}

void Scheduler::finish(Sequence& s, const std::string& reason, const std::string& error) {
  SequenceEnd e;
  e.reason = reason;
  e.error = error;
  e.prompt_tokens = static_cast<int64_t>(s.req.prompt.size());
  e.generated = s.generated;
  const auto now = Clock::now();
  if (s.started != Clock::time_point()) e.queued_seconds = std::chrono::duration<double>(s.started - s.submitted).count();
  if (s.generated > 0) e.first_token_seconds = std::chrono::duration<double>(s.first_token - s.submitted).count();
  e.total_seconds = std::chrono::duration<double>(now - s.submitted).count();
  {
    std::lock_guard<std::mutex> lock(mu_);
    ++stats_.ended[reason];
    if (s.generated > 0) {
      stats_.first_token_seconds += e.first_token_seconds;
      ++stats_.first_tokens;
    }
  }
  if (s.req.on_end) {
    try {
      s.req.on_end(e);
    } catch (...) {
      // a failing callback must not take the batch down
    }
  }
  s.ended = true;  // the loop removes it and frees its slot
}

void Scheduler::advance(Sequence& s, int64_t id) {
  if (id == eos_id_ && s.req.stop_at_eos) return finish(s, "eos");
  ++s.generated;
  if (s.generated == 1) s.first_token = Clock::now();
  s.next = id;
  {
    std::lock_guard<std::mutex> lock(mu_);
    ++stats_.generated_tokens;
  }
  bool keep = true;
  try {
    if (s.req.on_token) keep = s.req.on_token(id);
  } catch (const std::exception& e) {
    return finish(s, "error", std::string("on_token: ") + e.what());
  }
  if (!keep) return finish(s, "stop");
  if (s.generated >= s.req.sampling.max_tokens) return finish(s, "max_tokens");
  if (s.length >= ctx_) return finish(s, "context_full");
}

void Scheduler::prefill(Sequence& s) {
  const auto t0 = Clock::now();
  s.started = t0;
  const int64_t T = static_cast<int64_t>(s.req.prompt.size());
  s.slot = free_slots_.back();
  free_slots_.pop_back();
  s.length = T;
  if (s.req.sampling.max_tokens == 0) {
    finish(s, "max_tokens");
    return;
  }
  nn::KVCache view = nn::TransformerImpl::slot_view(cache_, s.slot, 0);
  const auto logits =
      model_->forward_cached(torch::tensor(s.req.prompt, torch::kLong).view({1, T}), view, /*last_only=*/true);  // [1, 1, V]
  const auto last = logits[0][0].to(torch::kFloat).contiguous();                                                // [V]
  advance(s, sample_token(last.data_ptr<float>(), last.size(0), s.req.sampling, s.gen));
  std::lock_guard<std::mutex> lock(mu_);
  stats_.prompt_tokens += T;
  stats_.prefill_seconds += seconds_since(t0);
}

void Scheduler::step() {
  const auto t0 = Clock::now();
  const int64_t B = static_cast<int64_t>(active_.size());
  std::vector<int64_t> tokens(B), slots(B), positions(B);
  for (int64_t b = 0; b < B; ++b) {
    tokens[b] = active_[b]->next;
    slots[b] = active_[b]->slot;
    positions[b] = active_[b]->length;
  }
  const auto logits =
      model_->decode_slots(torch::tensor(tokens, torch::kLong), cache_, slots, positions).to(torch::kFloat).contiguous();
  // Sampling in parallel (each sequence draws from its own generator), then the callbacks in order.
  const int64_t V = logits.size(1);
  const float* rows = logits.data_ptr<float>();
  std::vector<int64_t> ids(B);
  at::parallel_for(0, B, 8, [&](int64_t b0, int64_t b1) {
    for (int64_t b = b0; b < b1; ++b) ids[b] = sample_token(rows + b * V, V, active_[b]->req.sampling, active_[b]->gen);
  });
  for (int64_t b = 0; b < B; ++b) {
    ++active_[b]->length;
    advance(*active_[b], ids[b]);
  }
  const double dt = seconds_since(t0);
  std::lock_guard<std::mutex> lock(mu_);
  ++stats_.steps;
  stats_.step_rows += B;
  stats_.step_seconds += dt;
  for (size_t i = 0; i < kStepBuckets.size(); ++i)
    if (dt <= kStepBuckets[i]) ++stats_.step_bucket_counts[i];
}

void Scheduler::loop() {
  set_threads(threads_);
  torch::InferenceMode guard;
  while (true) {
    std::vector<std::unique_ptr<Sequence>> admitted, dropped;
    bool stopping = false;
    {
      std::unique_lock<std::mutex> lock(mu_);
      wake_.wait(lock, [&] { return stopping_ || !queue_.empty() || !active_.empty() || !cancels_.empty(); });
      stopping = stopping_;
      // Cancels: queued sequences leave now, running ones below.
      for (auto it = queue_.begin(); it != queue_.end();) {
        if (stopping || cancels_.count((*it)->id)) {
          cancels_.erase((*it)->id);
          dropped.push_back(std::move(*it));
          it = queue_.erase(it);
        } else {
          ++it;
        }
      }
      for (auto& s : active_)
        if (stopping || cancels_.erase(s->id)) s->cancel = true;
      cancels_.clear();  // ids not found: already ended or unknown
      // Admit queued sequences into free slots, within the prefill budget (at least one).
      int64_t budget = opt_.prefill_tokens;
      while (!queue_.empty() && static_cast<int64_t>(free_slots_.size()) > static_cast<int64_t>(admitted.size())) {
        const int64_t T = static_cast<int64_t>(queue_.front()->req.prompt.size());
        if (!admitted.empty() && T > budget) break;
        budget -= T;
        admitted.push_back(std::move(queue_.front()));
        queue_.pop_front();
      }
      running_ = static_cast<int64_t>(active_.size() + admitted.size());
    }
    for (auto& s : dropped) finish(*s, "cancelled");
    for (auto& s : active_)
      if (s->cancel && !s->ended) finish(*s, "cancelled");
    for (auto& s : admitted) {
      try {
        prefill(*s);
      } catch (const std::exception& e) {
        finish(*s, "error", e.what());
      }
      active_.push_back(std::move(s));
    }
    // Drop the ended sequences (their slots are free again), then run one step for the rest.
    auto remove_ended = [&] {
      for (auto& s : active_)
        if (s->ended && s->slot >= 0) free_slots_.push_back(s->slot);
      active_.erase(std::remove_if(active_.begin(), active_.end(), [](const auto& s) { return s->ended; }),
                    active_.end());
    };
    remove_ended();
    if (!active_.empty() && !stopping) {
      try {
        step();
      } catch (const std::exception& e) {
        for (auto& s : active_)
          if (!s->ended) finish(*s, "error", e.what());
      }
      remove_ended();
    }
    {
      std::lock_guard<std::mutex> lock(mu_);
      running_ = static_cast<int64_t>(active_.size());
      if (queue_.empty() && active_.empty()) idle_.notify_all();
      if (stopping && queue_.empty() && active_.empty()) break;
    }
  }
}

}  // namespace ultramem::infer
