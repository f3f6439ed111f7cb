// Learning-rate schedules: cosine decay with linear warmup, and the memory-value lr multiplier that
// starts at T and decays linearly to 1 (spec section 6). Steps are 0-based indices of optimizer steps:
// step s is the (s+1)-th update. Exact formulas in docs/training.md.
#pragma once
#include <cstdint>

namespace ultramem::train {

// lr(s) = peak * (s + 1) / warmup                                          for s < warmup
//       = floor + (peak - floor) * (1 + cos(pi * p)) / 2,  p = min(1, (s - warmup) / (total - warmup))
//                                                                           for s >= warmup
// with floor = min_lr_ratio * peak. After `total` steps it stays at floor.
class CosineSchedule {
 public:
  // Throws std::invalid_argument naming the field: peak > 0, 0 <= min_lr_ratio <= 1,
  // 0 <= warmup_steps <= total_steps, total_steps >= 1.
  CosineSchedule(double peak_lr, int64_t warmup_steps, int64_t total_steps, double min_lr_ratio);
  double operator()(int64_t step) const;

  double peak() const { return peak_; }
  int64_t warmup_steps() const { return warmup_; }
  int64_t total_steps() const { return total_; }
  double min_lr_ratio() const { return min_ratio_; }

 private:
  double peak_;
  int64_t warmup_;
  int64_t total_;
  double min_ratio_;
};

// Value lr multiplier: mult(s) = 1 + (T - 1) * max(0, 1 - s / decay_steps). Never below 1: T >= 1 is
// required and the decay term is clamped at 0, so it reaches exactly 1 at s = decay_steps and stays
// there. decay_steps == 0 means no decay window: the multiplier is 1 from the first step.
class ValueLrMultiplier {
 public:
  // Throws std::invalid_argument: T >= 1 (and finite), decay_steps >= 0.
  ValueLrMultiplier(double T, int64_t decay_steps);
  double operator()(int64_t step) const;

  double T() const { return T_; }
  int64_t decay_steps() const { return decay_steps_; }

 private:
  double T_;
  int64_t decay_steps_;
};

}  // namespace ultramem::train
