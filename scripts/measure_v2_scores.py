"""The kept scores of every UltraMem(V2) memory of a freshly initialised model on validation text: their mean
and variance (sigma_s^2 of the V2 value init, spec section 11) and the mean top-1 score.

usage: PYTHONPATH=python /usr/bin/python3 scripts/measure_v2_scores.py CONFIG.json PREPARED_DIR
"""
import sys, json, torch
import os
sys.path.insert(0, os.path.join(os.path.dirname(os.path.dirname(os.path.abspath(__file__))), "python"))
import ultramem
from ultramem import data
from ultramem.layers import first_stage_m, filter_negatives
cfg = json.load(open(sys.argv[1]))
model = ultramem.TransformerLM(cfg["model"] if "model" in cfg else cfg)
tokens, _ = data.validation_tokens(sys.argv[2])
seq = model.cfg["max_seq_len"]
x = tokens[: 8 * seq].view(8, seq)
inputs = {}
for k, m in enumerate(model.memories):
    m.register_forward_hook(lambda mod, inp, out, k=k: inputs.__setitem__(k, inp[0].detach()))
with torch.no_grad():
    model(x)
    for k, m in enumerate(model.memories):
        u = inputs[k].reshape(-1, m.config["D"])
        s_row, s_col = m.key_scores(u)
        fu, fv = m.filter_vectors()
        ultramem.load_ops()
        sc, _ = torch.ops.ultramem.tdqkr(s_row, s_col, m.cores, fu, fv, first_stage_m(m.config), m.config["m"], filter_negatives(m.config))
        s = sc.sum(-1)
        print(json.dumps({"memory": k, "kept_score_mean": round(float(s.mean()), 4), "kept_score_var": round(float(s.var()), 4), "top1_mean": round(float(s.view(s.shape[0], m.config["H"], -1)[:, :, 0].mean()), 4)}))
