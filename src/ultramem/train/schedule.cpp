#include "ultramem/train/schedule.h"

#include <algorithm>
#include <cmath>
#include <stdexcept>
#include <string>

namespace ultramem::train {
namespace {

constexpr double kPi = 3.14159265358979323846;

[[noreturn]] void bad(const std::string& what) { throw std::invalid_argument(what); }

}  // namespace

CosineSchedule::CosineSchedule(double peak_lr, int64_t warmup_steps, int64_t total_steps,
                               double min_lr_ratio)
    : peak_(peak_lr), warmup_(warmup_steps), total_(total_steps), min_ratio_(min_lr_ratio) {
  if (!(std::isfinite(peak_lr) && peak_lr > 0))
    bad("CosineSchedule: lr must be finite and > 0, got " + std::to_string(peak_lr));
  if (total_steps < 1) bad("CosineSchedule: total steps must be >= 1, got " + std::to_string(total_steps));
  if (warmup_steps < 0 || warmup_steps > total_steps)
    bad("CosineSchedule: warmup_steps must be in [0, steps=" + std::to_string(total_steps) + "], got " +
        std::to_string(warmup_steps));
  if (!(min_lr_ratio >= 0 && min_lr_ratio <= 1))
    bad("CosineSchedule: min_lr_ratio must be in [0, 1], got " + std::to_string(min_lr_ratio));
}

double CosineSchedule::operator()(int64_t step) const {
  if (step < 0) bad("CosineSchedule: negative step " + std::to_string(step));
  if (step < warmup_) return peak_ * static_cast<double>(step + 1) / static_cast<double>(warmup_);
  const double floor = min_ratio_ * peak_;
  const int64_t span = total_ - warmup_;
  if (span <= 0) return floor;
  const double p = std::min(1.0, static_cast<double>(step - warmup_) / static_cast<double>(span));
  return floor + (peak_ - floor) * 0.5 * (1.0 + std::cos(kPi * p));
}

ValueLrMultiplier::ValueLrMultiplier(double T, int64_t decay_steps) : T_(T), decay_steps_(decay_steps) {
  if (!(std::isfinite(T) && T >= 1.0))
    bad("ValueLrMultiplier: value_lr_T must be finite and >= 1 (the multiplier never goes below 1), got " +
        std::to_string(T));
  if (decay_steps < 0)
    bad("ValueLrMultiplier: value_lr_decay_steps must be >= 0, got " + std::to_string(decay_steps));
}

double ValueLrMultiplier::operator()(int64_t step) const {
  if (step < 0) bad("ValueLrMultiplier: negative step " + std::to_string(step));
  if (decay_steps_ == 0) return 1.0;
  const double rest = std::max(0.0, 1.0 - static_cast<double>(step) / static_cast<double>(decay_steps_));
  return std::max(1.0, 1.0 + (T_ - 1.0) * rest);
}

}  // namespace ultramem::train
