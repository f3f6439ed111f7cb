"""Optimizer parameter groups and learning-rate schedules as the C++ trainer uses them (docs/training.md,
spec section 6): AdamW over four groups (decay, no_decay, memory_values, experts), a cosine schedule with
linear warmup, and the memory values' lr multiplier that starts at T and decays linearly to 1 (the MoE
experts can get the same kind of multiplier, expert_lr_T, off by default).

    groups = ultramem.param_groups(model, weight_decay=0.1)
    opt = torch.optim.AdamW(groups, lr=3e-4, betas=(0.9, 0.95))
    sched = ultramem.lr_scheduler(opt, steps=1000, value_lr_T=10)
    ... loss.backward(); opt.step(); sched.step(); model.after_optimizer_step()
"""
import math

import torch

from .layers import PKM, Engram, UltraMem

# Parameters of a memory layer that sit in no_decay although they are matrices or tables.
_MEMORY_NO_DECAY = ("q_scale", "k_scale", "cores")


def group_of(module_name, param_name, param, memory_module, moe_module=False):
    """"decay", "no_decay", "memory_values" or "experts" for one parameter (the C++ Transformer::param_groups
    rule)."""
    if memory_module and param_name in ("values", "pre_values"):
        return "memory_values"
    if moe_module and param_name in ("w_in", "w_out"):
        return "experts"
    if memory_module and param_name in _MEMORY_NO_DECAY:
        return "no_decay"
    return "decay" if param.dim() >= 2 else "no_decay"


def param_groups(model, weight_decay=0.1, memory_weight_decay=0.0):
    """AdamW parameter groups of any module holding UltraMem / PKM / Engram layers: a list of dicts
    {"name", "params", "weight_decay", "lr_mult"} with "name" in decay / no_decay / memory_values.
    `lr_scheduler` sets each group's lr to the schedule times its multiplier. Every trainable parameter
    is in exactly one group. A memory whose sparse_value_grad is on produces sparse value gradients,
    which torch.optim.AdamW refuses: train those with sparse_value_grad=False, or give the
    memory_values group to torch.optim.SparseAdam."""
    from .model import MoE
    memories = {id(m) for m in model.modules() if isinstance(m, (UltraMem, PKM, Engram))}
    moes = {id(m) for m in model.modules() if isinstance(m, MoE)}
    groups = {"decay": [], "no_decay": [], "memory_values": [], "experts": []}
    for mod_name, mod in model.named_modules():
        for p_name, p in mod.named_parameters(recurse=False):
            if p.requires_grad:
                groups[group_of(mod_name, p_name, p, id(mod) in memories, id(mod) in moes)].append(p)
    decay = {"decay": weight_decay, "no_decay": 0.0, "memory_values": memory_weight_decay, "experts": weight_decay}
    return [{"name": k, "params": v, "weight_decay": decay[k], "lr_mult": 1.0} for k, v in groups.items() if v]


def cosine_lr(step, peak=1.0, warmup=0, total=1, min_lr_ratio=0.1):
    """lr at 0-based step: linear warmup to peak over `warmup` steps, then cosine to min_lr_ratio * peak
    at `total`, flat after (train::CosineSchedule)."""
    if step < warmup:
        return peak * (step + 1) / warmup
    floor = min_lr_ratio * peak
    p = min(1.0, (step - warmup) / max(1, total - warmup))
    return floor + (peak - floor) * (1 + math.cos(math.pi * p)) / 2


def value_lr_multiplier(step, T=10.0, decay_steps=1):
    """1 + (T - 1) * max(0, 1 - step / decay_steps); 1 when decay_steps is 0 (train::ValueLrMultiplier)."""
    if not (T >= 1 and math.isfinite(T)):
        raise ValueError("value_lr_T must be finite and >= 1 (the multiplier never goes below 1), got %r" % T)
    if decay_steps < 0:
        raise ValueError("value_lr_decay_steps must be >= 0, got %r" % decay_steps)
    if decay_steps == 0:
        return 1.0
    return 1.0 + (T - 1.0) * max(0.0, 1.0 - step / decay_steps)


def lr_scheduler(optimizer, steps, warmup_steps=-1, min_lr_ratio=0.1, value_lr_T=10.0, value_lr_decay_steps=-1,
                 expert_lr_T=1.0, expert_lr_decay_steps=-1):
    """A LambdaLR giving every group the cosine schedule (warmup -1: 1% of steps, at least 1), the
    memory_values group also the value lr multiplier (decay -1: over all steps) and the experts group the
    expert one (expert_lr_T 1: off). The optimizer's lr is the peak."""
    if steps < 1:
        raise ValueError("steps must be >= 1, got %r" % steps)
    warmup = max(1, steps // 100) if warmup_steps < 0 else warmup_steps
    decay = steps if value_lr_decay_steps < 0 else value_lr_decay_steps
    expert_decay = steps if expert_lr_decay_steps < 0 else expert_lr_decay_steps
    value_lr_multiplier(0, value_lr_T, decay)  # validates
    value_lr_multiplier(0, expert_lr_T, expert_decay)
    mults = {"memory_values": (value_lr_T, decay), "experts": (expert_lr_T, expert_decay)}
    lambdas = []
    for g in optimizer.param_groups:
        T, d = mults.get(g.get("name"), (1.0, 0))
        lambdas.append(lambda s, T=T, d=d: cosine_lr(s, 1.0, warmup, steps, min_lr_ratio) * value_lr_multiplier(s, T, d))
    return torch.optim.lr_scheduler.LambdaLR(optimizer, lambdas)
