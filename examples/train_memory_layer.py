"""Adds an UltraMem layer to a small PyTorch language model and trains it on the prepared corpus.

The model is plain PyTorch (an embedding, one causal self-attention block, an MLP, a tied head); the
memory layer sits next to the MLP and reads the same normalised input, as in the paper. Its values get
the boosted, decaying learning rate of spec section 6 through ultramem.param_groups / lr_scheduler.
Prints one JSON line per logged step ({"step", "loss", "lr", "mem.coverage", ...}) and a summary.

    bash scripts/main.sh                        # once: build, prepare data/prepared/sotu-v8192
    PYTHONPATH=python /usr/bin/python3 examples/train_memory_layer.py --steps 300
"""
import argparse
import json
import math
import os
import sys
import time

import torch
from torch import nn
import torch.nn.functional as F

sys.path.insert(0, os.path.join(os.path.dirname(os.path.dirname(os.path.abspath(__file__))), "python"))
import ultramem  # noqa: E402
from ultramem import data  # noqa: E402


class TinyLM(nn.Module):
    def __init__(self, vocab, d_model=128, n_heads=4, seq_len=64, memory=True):
        super().__init__()
        self.embed = nn.Embedding(vocab, d_model)
        nn.init.normal_(self.embed.weight, std=0.02)           # small logits at the start (the head is tied)
        self.pos = nn.Parameter(torch.zeros(seq_len, d_model))
        self.norm1, self.norm2, self.norm_out = nn.LayerNorm(d_model), nn.LayerNorm(d_model), nn.LayerNorm(d_model)
        self.attn = nn.MultiheadAttention(d_model, n_heads, batch_first=True)
        self.mlp = nn.Sequential(nn.Linear(d_model, 2 * d_model), nn.GELU(), nn.Linear(2 * d_model, d_model))
        # The memory: 64 x 64 = 4,096 virtual slots over 1,024 rows of 64 values (E = 4), 16 kept per token.
        self.memory = ultramem.UltraMem(D=d_model, n=64, E=4, Dk=32, Dv=64, r=2, C=2, H=2, m=16, m_first=16,
                                        num_layers=1, seed=1) if memory else None
        self.register_buffer("mask", torch.triu(torch.ones(seq_len, seq_len, dtype=torch.bool), 1))

    def forward(self, tokens):                                  # [B, T] -> logits [B, T, V]
        T = tokens.shape[1]
        h = self.embed(tokens) + self.pos[:T]
        a = self.norm1(h)
        h = h + self.attn(a, a, a, attn_mask=self.mask[:T, :T], need_weights=False)[0]
        u = self.norm2(h)
        h = h + self.mlp(u)
        if self.memory is not None:
            h = h + self.memory(u)                              # the memory layer: one line
        return self.norm_out(h) @ self.embed.weight.t()

    def aux_loss(self):
        return self.memory.aux_loss() if self.memory is not None else torch.zeros(())


def batches(tokens, batch, seq_len, gen):
    while True:
        starts = torch.randint(0, tokens.numel() - seq_len - 1, (batch,), generator=gen)
        rows = torch.stack([tokens[s:s + seq_len + 1] for s in starts.tolist()])
        yield rows[:, :-1], rows[:, 1:]


def main():
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--data", default="data/prepared/sotu-v8192", help="prepared data folder (ultramem prepare)")
    ap.add_argument("--steps", type=int, default=300, help="optimizer steps")
    ap.add_argument("--batch-size", type=int, default=16)
    ap.add_argument("--seq-len", type=int, default=64)
    ap.add_argument("--lr", type=float, default=3e-3, help="peak learning rate")
    ap.add_argument("--log-every", type=int, default=10)
    ap.add_argument("--no-memory", action="store_true", help="train the same model without the memory layer")
    ap.add_argument("--seed", type=int, default=0)
    a = ap.parse_args()
    torch.manual_seed(a.seed)
    manifest = data.read_manifest(a.data)
    train = data.read_shard(os.path.join(a.data, manifest["splits"]["train"]["file"]), manifest["vocab_size"])
    model = TinyLM(manifest["vocab_size"], seq_len=a.seq_len, memory=not a.no_memory)
    opt = torch.optim.AdamW(ultramem.param_groups(model, weight_decay=0.1), lr=a.lr, betas=(0.9, 0.95))
    sched = ultramem.lr_scheduler(opt, steps=a.steps, value_lr_T=10.0)
    it = batches(train, a.batch_size, a.seq_len, torch.Generator().manual_seed(a.seed))
    t0, first, last = time.time(), None, None
    for step in range(a.steps):
        x, y = next(it)
        logits = model(x)
        ce = F.cross_entropy(logits.reshape(-1, logits.shape[-1]), y.reshape(-1))
        loss = ce + model.aux_loss()
        opt.zero_grad()
        loss.backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
        opt.step()
        sched.step()
        if model.memory is not None:
            model.memory.refresh_tucker_approx()            # the rank-1 filter follows the cores
        first = ce.item() if first is None else first
        last = ce.item()
        if step % a.log_every == 0 or step == a.steps - 1:
            rec = {"step": step, "loss": round(ce.item(), 4), "lr": opt.param_groups[0]["lr"],
                   "tokens_per_s": round((step + 1) * x.numel() / (time.time() - t0))}
            if model.memory is not None:
                st = model.memory.stats()
                rec.update({"mem.coverage": round(st["coverage"], 4), "mem.recall": st["recall"]})
            print(json.dumps(rec), flush=True)
    print(json.dumps({"summary": True, "first_loss": first, "final_loss": last, "steps": a.steps,
                      "ppl_final": math.exp(last), "seconds": round(time.time() - t0, 1)}), flush=True)


if __name__ == "__main__":
    main()
