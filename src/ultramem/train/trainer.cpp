#include "ultramem/train/trainer.h"

#include <torch/torch.h>

#include <chrono>
#include <cmath>
#include <cstdio>
#include <filesystem>
#include <fstream>
#include <iostream>
#include <limits>
#include <nlohmann/json.hpp>
#include <sstream>
#include <stdexcept>
#include <unordered_map>

#include "ultramem/checkpoint/checkpoint.h"
#include "ultramem/train/grad_clip.h"

namespace ultramem::train {
namespace {

using nlohmann::json;
using Clock = std::chrono::steady_clock;

double seconds_since(Clock::time_point t0) { return std::chrono::duration<double>(Clock::now() - t0).count(); }

const TrainConfig& validated(const TrainConfig& c) {
  c.validate();
  return c;
}

std::string human_duration(double s) {
  if (!std::isfinite(s) || s < 0) return "?";
  const int64_t t = static_cast<int64_t>(s + 0.5);
  char buf[32];
  if (t >= 3600) {
    std::snprintf(buf, sizeof buf, "%lldh%02lldm", static_cast<long long>(t / 3600),
                  static_cast<long long>((t % 3600) / 60));
  } else if (t >= 60) {
    std::snprintf(buf, sizeof buf, "%lldm%02llds", static_cast<long long>(t / 60), static_cast<long long>(t % 60));
  } else {
    std::snprintf(buf, sizeof buf, "%llds", static_cast<long long>(t));
  }
  return buf;
}

void check_batch(const Batch& b, const char* what) {
  if (!b.inputs.defined() || !b.targets.defined())
    throw std::invalid_argument(std::string(what) + " batch: inputs/targets undefined");
  if (b.inputs.dim() != 2 || b.inputs.sizes() != b.targets.sizes())
    throw std::invalid_argument(std::string(what) + " batch: inputs and targets must both be [B, T]");
  if (b.inputs.scalar_type() != torch::kLong || b.targets.scalar_type() != torch::kLong)
    throw std::invalid_argument(std::string(what) + " batch: inputs and targets must be int64");
}

// Mean cross-entropy of logits [B, T, V] against targets [B, T].
torch::Tensor lm_loss(const torch::Tensor& logits, const torch::Tensor& targets) {
  const int64_t V = logits.size(-1);
  return torch::nn::functional::cross_entropy(logits.reshape({-1, V}), targets.reshape({-1}));
}

}  // namespace

nlohmann::json trainer_state_to_json(const TrainerState& s) {
  json j = {{"step", s.step},
            {"tokens_seen", s.tokens_seen},
            {"data_position", s.data_position},
            {"has_val_loss", s.has_val_loss},
            {"best_step", s.best_step},
            {"train_seconds", s.train_seconds}};
  // JSON has no inf/nan; the losses are only meaningful with has_val_loss.
  j["last_val_loss"] = s.has_val_loss && std::isfinite(s.last_val_loss) ? json(s.last_val_loss) : json();
  j["best_val_loss"] = s.has_val_loss && std::isfinite(s.best_val_loss) ? json(s.best_val_loss) : json();
  return j;
}

TrainerState trainer_state_from_json(const nlohmann::json& j) {
  if (!j.is_object()) throw std::runtime_error("trainer state: expected a JSON object");
  TrainerState s;
  auto get_int = [&](const char* k, int64_t& out) {
    if (!j.contains(k) || !j.at(k).is_number_integer())
      throw std::runtime_error(std::string("trainer state: '") + k + "' missing or not an integer");
    out = j.at(k).get<int64_t>();
  };
  auto get_num = [&](const char* k, double& out) {
    if (!j.contains(k)) throw std::runtime_error(std::string("trainer state: '") + k + "' missing");
    const auto& v = j.at(k);
    if (v.is_null()) {
      out = std::numeric_limits<double>::quiet_NaN();
    } else if (v.is_number()) {
      out = v.get<double>();
    } else {
      throw std::runtime_error(std::string("trainer state: '") + k + "' is not a number");
    }
  };
  get_int("step", s.step);
  get_int("tokens_seen", s.tokens_seen);
  get_int("data_position", s.data_position);
  get_int("best_step", s.best_step);
  get_num("train_seconds", s.train_seconds);
  get_num("last_val_loss", s.last_val_loss);
  get_num("best_val_loss", s.best_val_loss);
  if (!j.contains("has_val_loss") || !j.at("has_val_loss").is_boolean())
    throw std::runtime_error("trainer state: 'has_val_loss' missing or not a boolean");
  s.has_val_loss = j.at("has_val_loss").get<bool>();
  if (s.step < 0) throw std::runtime_error("trainer state: negative step");
  return s;
}

Trainer::Trainer(std::shared_ptr<TrainableModel> model, TrainConfig cfg, BatchSource train,
                 std::vector<Batch> eval, std::ostream* log, std::shared_ptr<ParallelContext> parallel)
    : model_(std::move(model)),
      parallel_(std::move(parallel)),
      cfg_(validated(cfg)),
      source_(std::move(train)),
      eval_(std::move(eval)),
      log_(log),
      schedule_(cfg_.lr, cfg_.resolved_warmup_steps(), cfg_.steps, cfg_.min_lr_ratio),
      value_mult_(cfg_.value_lr_T, cfg_.resolved_value_lr_decay_steps()),
      expert_mult_(cfg_.expert_lr_T, cfg_.resolved_expert_lr_decay_steps()) {
  if (!model_) throw std::invalid_argument("Trainer: model is null");
  if (!source_.next) throw std::invalid_argument("Trainer: the batch source has no next()");
  for (const auto& b : eval_) check_batch(b, "validation");

  // Parameter names for the optimizer state, and a check that the groups cover every trainable
  // parameter exactly once.
  std::unordered_map<const void*, std::string> names;
  for (const auto& p : model_->module().named_parameters(true))
    names.emplace(p.value().unsafeGetTensorImpl(), p.key());
  const nn::ParamGroups pg = model_->param_groups();
  std::vector<ParamGroup> groups(4);
  groups[0].name = "decay";
  groups[0].params = pg.decay;
  groups[0].weight_decay = cfg_.weight_decay;
  groups[1].name = "no_decay";
  groups[1].params = pg.no_decay;
  groups[2].name = "memory_values";
  groups[2].params = pg.memory_values;
  groups[2].weight_decay = cfg_.memory_weight_decay;
  groups[2].row_sparse = cfg_.value_sparse_adam;
  groups[3].name = "experts";
  groups[3].params = pg.experts;
  groups[3].weight_decay = cfg_.weight_decay;
  std::unordered_map<const void*, int> covered;
  for (auto& g : groups) {
    for (const auto& p : g.params) {
      auto it = names.find(p.unsafeGetTensorImpl());
      if (it == names.end())
        throw std::invalid_argument("Trainer: a parameter of group '" + g.name +
                                    "' is not a parameter of the model module");
      if (covered[p.unsafeGetTensorImpl()]++)
        throw std::invalid_argument("Trainer: parameter '" + it->second + "' is in more than one group");
      g.param_names.push_back(it->second);
      all_params_.push_back(p);
    }
  }
  for (const auto& p : model_->module().named_parameters(true))
    if (p.value().requires_grad() && !covered.count(p.value().unsafeGetTensorImpl()))
      throw std::invalid_argument("Trainer: trainable parameter '" + p.key() + "' is in no parameter group");
  opt_ = std::make_unique<AdamW>(std::move(groups), AdamWOptions{cfg_.beta1, cfg_.beta2, cfg_.eps});

  metrics_path_ = (std::filesystem::path(cfg_.out_dir) / "metrics.jsonl").string();
  const uint64_t rank = parallel_ ? static_cast<uint64_t>(parallel_->rank()) : 0;
  torch::manual_seed(cfg_.seed + rank * 0x9E3779B97F4A7C15ULL);
}

void Trainer::resume(const std::string& path) {
  const checkpoint::Checkpoint ckpt = parallel_ ? parallel_->read_checkpoint(path) : checkpoint::read_checkpoint(path);
  if (ckpt.optim.empty())
    throw std::runtime_error("checkpoint " + path +
                             ": no optimizer state (a weights-only checkpoint such as best.safetensors); "
                             "cannot resume from it");
  if (ckpt.trainer_state.is_null() || ckpt.train_config.is_null())
    throw std::runtime_error("checkpoint " + path + ": no trainer state or train config; cannot resume");
  const json mine = train_config_to_json(cfg_);
  std::vector<std::string> diffs;
  const json defaults = train_config_to_json(TrainConfig{});
  for (const auto& key : trajectory_keys()) {
    // A key the checkpoint's config lacks (written before the key existed) had its default.
    const json a = ckpt.train_config.contains(key) ? ckpt.train_config.at(key) : defaults.at(key);
    if (a != mine.at(key)) diffs.push_back(key + ": " + a.dump() + " (checkpoint) vs " + mine.at(key).dump());
  }
  if (!diffs.empty()) {
    std::string msg = "Trainer::resume: " + path + ": the train config differs on keys that change the run:";
    for (const auto& d : diffs) msg += "\n  " + d;
    throw std::invalid_argument(msg);
  }
  TrainerState st;
  try {
    st = trainer_state_from_json(ckpt.trainer_state);
  } catch (const std::exception& e) {
    throw std::runtime_error("checkpoint " + path + ": " + e.what());
  }
  checkpoint::load_model_state(ckpt, model_->module(), model_->config_json());
  try {
    opt_->load_state_tensors(ckpt.optim);
  } catch (const std::exception& e) {
    throw std::runtime_error("checkpoint " + path + ": " + e.what());
  }
  if (opt_->step_count() != st.step)
    throw std::runtime_error("checkpoint " + path + ": optimizer step " + std::to_string(opt_->step_count()) +
                             " differs from trainer step " + std::to_string(st.step));
  if (ckpt.rng.defined()) checkpoint::set_rng_state(ckpt.rng);
  if (st.data_position >= 0) {
    if (source_.set_position) {
      source_.set_position(st.data_position);
    } else if (log_ && lead()) {
      *log_ << "warning: the batch source cannot restore its position; the resumed run sees other data\n";
    }
  }
  state_ = st;
  resumed_ = true;
}

StepStats Trainer::train_step() {
  const auto t0 = Clock::now();
  StepStats s;
  auto& module = model_->module();
  module.train();
  opt_->zero_grad();
  const double scale = 1.0 / static_cast<double>(cfg_.grad_accum);
  const int64_t world = parallel_ ? parallel_->world_size() : 1;
  for (int64_t micro = 0; micro < cfg_.grad_accum; ++micro) {
    const Batch b = source_.next();
    check_batch(b, "training");
    const torch::Tensor logits = model_->forward(b.inputs);
    torch::Tensor loss = lm_loss(logits, b.targets);
    s.ce += loss.item<double>() * scale;
    for (const auto& [name, a] : model_->aux_losses()) {
      if (!a.defined()) continue;
      s.aux[name] += a.item<double>() * scale;
      loss = loss + a;
    }
    (loss * scale).backward();
    state_.tokens_seen += b.inputs.numel() * world;
  }
  if (parallel_) {
    // Global means over the ranks (the aux names are the same on every rank: same model).
    std::vector<double> v = {s.ce};
    for (const auto& [name, a] : s.aux) v.push_back(a);
    parallel_->all_reduce_sum(v);
    s.ce = v[0] / static_cast<double>(world);
    size_t i = 1;
    for (auto& [name, a] : s.aux) a = v[i++] / static_cast<double>(world);
  }
  s.loss = s.ce;
  for (const auto& [name, v] : s.aux) s.loss += v;
  const int64_t step = state_.step;  // 0-based index of this update
  if (!std::isfinite(s.loss))
    throw std::runtime_error("training diverged: loss is " + std::to_string(s.loss) + " at step " +
                             std::to_string(step + 1) + " (weights not updated)");
  const auto t_update = Clock::now();
  if (parallel_) {
    parallel_->synchronize_gradients(all_params_);
    s.grad_norm = scale_grads_to_max_norm(all_params_, parallel_->grad_norm(all_params_), cfg_.grad_clip);
  } else {
    s.grad_norm = clip_grad_norm(all_params_, cfg_.grad_clip);
  }
  s.lr = schedule_(step);
  s.value_lr_mult = value_mult_(step);
  opt_->group("memory_values").lr_mult = s.value_lr_mult;
  opt_->group("experts").lr_mult = expert_mult_(step);
  opt_->step(s.lr);
  opt_->zero_grad();
  model_->after_optimizer_step();
  s.update_seconds = seconds_since(t_update);
  state_.step = step + 1;
  if (source_.position) state_.data_position = source_.position();
  s.step = state_.step;
  s.seconds = seconds_since(t0);
  state_.train_seconds += s.seconds;
  return s;
}

double Trainer::evaluate() {
  const int64_t n = std::min<int64_t>(cfg_.eval_batches, static_cast<int64_t>(eval_.size()));
  if (n == 0) return std::numeric_limits<double>::quiet_NaN();
  auto& module = model_->module();
  torch::NoGradGuard no_grad;
  module.eval();
  double sum = 0;
  for (int64_t i = 0; i < n; ++i) {
    const Batch& b = eval_[static_cast<size_t>(i)];
    sum += lm_loss(model_->forward(b.inputs), b.targets).item<double>();
  }
  module.train();
  std::vector<double> mean = {sum / static_cast<double>(n)};
  if (parallel_) parallel_->broadcast_from_rank0(mean);  // every rank evaluated the same batches
  return mean[0];
}

void Trainer::save_checkpoint(const std::string& path) {
  if (source_.position) state_.data_position = source_.position();
  checkpoint::CheckpointWriteOptions o;
  o.optim = opt_->state_tensors();
  o.train_config = train_config_to_json(cfg_);
  o.trainer_state = trainer_state_to_json(state_);
  o.rng = true;
  write_checkpoint(path, o);
}

void Trainer::write_checkpoint(const std::string& path, const checkpoint::CheckpointWriteOptions& options) {
  if (parallel_) {
    parallel_->save_checkpoint(path, model_->module(), model_->config_json(), options);
  } else {
    checkpoint::save_checkpoint(path, model_->module(), model_->config_json(), options);
  }
}

void Trainer::write_metrics(const nlohmann::json& record) {
  if (!lead()) return;
  std::ofstream out(metrics_path_, std::ios::app);
  if (!out) throw std::runtime_error("cannot append to " + metrics_path_);
  out << record.dump() << '\n';
}

void Trainer::log_progress(const StepStats& s, double window_loss, double tokens_per_s, double step_seconds) {
  if (!log_ || !lead()) return;
  const double eta = static_cast<double>(cfg_.steps - s.step) * step_seconds;
  char buf[256];
  std::snprintf(buf, sizeof buf,
                "step %lld/%lld | loss %.4f | lr %.3e | vmult %.2f | gnorm %.3f | %.0f tok/s | ETA %s",
                static_cast<long long>(s.step), static_cast<long long>(cfg_.steps), window_loss, s.lr,
                s.value_lr_mult, s.grad_norm, tokens_per_s, human_duration(eta).c_str());
  *log_ << buf << std::endl;
}

const TrainerState& Trainer::run(int64_t stop_at_step) {
  namespace fs = std::filesystem;
  std::error_code ec;
  fs::create_directories(cfg_.out_dir, ec);
  if (ec) throw std::runtime_error("cannot create out_dir " + cfg_.out_dir + ": " + ec.message());
  const int64_t end = (stop_at_step > 0 && stop_at_step < cfg_.steps) ? stop_at_step : cfg_.steps;
  const std::string ckpt_path = (fs::path(cfg_.out_dir) / "checkpoint.safetensors").string();
  const std::string best_path = (fs::path(cfg_.out_dir) / "best.safetensors").string();

  if (!resumed_ && state_.step == 0 && lead()) std::ofstream(metrics_path_, std::ios::trunc);
  write_metrics({{"event", resumed_ ? "resume" : "start"},
                 {"step", state_.step},
                 {"train_config", train_config_to_json(cfg_)},
                 {"model_config", model_->config_json()}});
  resumed_ = true;  // a second run() call on this trainer continues the same metrics file

  // Logging window.
  double win_loss = 0, win_ce = 0, win_seconds = 0, win_update = 0, win_norm = 0;
  std::map<std::string, double> win_aux;
  int64_t win_steps = 0;
  auto win_start = Clock::now();
  int64_t win_tokens = 0;

  while (state_.step < end) {
    const StepStats s = train_step();
    win_loss += s.loss;
    win_ce += s.ce;
    win_norm += s.grad_norm;
    for (const auto& [k, v] : s.aux) win_aux[k] += v;
    win_seconds += s.seconds;
    win_update += s.update_seconds;
    win_tokens += cfg_.tokens_per_step();
    ++win_steps;
    if (on_step) on_step(s);

    const bool last = state_.step == end;
    if (cfg_.log_every > 0 && (state_.step % cfg_.log_every == 0 || last)) {
      const double wall = seconds_since(win_start);
      const double tps = wall > 0 ? static_cast<double>(win_tokens) / wall : 0.0;
      const double k = static_cast<double>(win_steps);
      json aux = json::object();
      for (const auto& [name, v] : win_aux) aux[name] = v / k;
      json rec = {{"event", "train"},
                  {"step", state_.step},
                  {"loss", win_loss / k},
                  {"ce", win_ce / k},
                  {"aux", aux},
                  {"lr", s.lr},
                  {"value_lr_mult", s.value_lr_mult},
                  {"grad_norm", win_norm / k},
                  {"grad_norm_last", s.grad_norm},
                  {"tokens_per_s", tps},
                  {"step_seconds", win_seconds / k},
                  {"update_seconds", win_update / k},
                  {"tokens_seen", state_.tokens_seen},
                  {"telemetry", model_->telemetry()}};
      write_metrics(rec);
      log_progress(s, win_loss / k, tps, win_seconds / k);
      win_loss = win_ce = win_seconds = win_update = win_norm = 0;
      win_aux.clear();
      win_steps = 0;
      win_tokens = 0;
      win_start = Clock::now();
    }
    const bool final_step = state_.step == cfg_.steps;
    if (!eval_.empty() && cfg_.eval_batches > 0 &&
        ((cfg_.eval_every > 0 && state_.step % cfg_.eval_every == 0) || final_step)) {
      const double val = evaluate();
      const bool improved = !state_.has_val_loss || val < state_.best_val_loss;
      state_.last_val_loss = val;
      if (improved) {
        state_.best_val_loss = val;
        state_.best_step = state_.step;
      }
      state_.has_val_loss = true;
      write_metrics({{"event", "eval"},
                     {"step", state_.step},
                     {"val_loss", val},
                     {"best_val_loss", state_.best_val_loss},
                     {"best_step", state_.best_step}});
      if (log_ && lead()) {
        char buf[160];
        std::snprintf(buf, sizeof buf, "eval step %lld: val loss %.4f (best %.4f at step %lld)",
                      static_cast<long long>(state_.step), val, state_.best_val_loss,
                      static_cast<long long>(state_.best_step));
        *log_ << buf << std::endl;
      }
      if (improved && cfg_.keep_best) {
        checkpoint::CheckpointWriteOptions o;
        o.train_config = train_config_to_json(cfg_);
        o.trainer_state = trainer_state_to_json(state_);
        o.rng = false;
        write_checkpoint(best_path, o);
      }
    }
    if ((cfg_.checkpoint_every > 0 && state_.step % cfg_.checkpoint_every == 0) || last) {
      save_checkpoint(ckpt_path);
      write_metrics({{"event", "checkpoint"}, {"step", state_.step}, {"path", ckpt_path}});
    }
  }
  return state_;
}

}  // namespace ultramem::train
