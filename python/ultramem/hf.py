"""Model folders written by `ultramem export --format hf DIR` (docs/python.md, "Exported model folders"):

    config.json              {"model_type": "ultramem", "format": "ultramem-hf", "format_version": 1,
                              familiar summary fields (hidden_size, num_hidden_layers, ...), and
                              "ultramem": the full model config as the checkpoints store it}
    model.safetensors        one tensor per matrix, [out, in] layout, descriptive names (below)
    tokenizer.model          the sentencepiece model the run was trained with (when it was found)
    generation_config.json   the CLI's sampling defaults, EOS id, context length

Names: embed_tokens.weight, lm_head.weight (untied), norm.weight; per block i
layers.i.input_layernorm.weight, layers.i.self_attn.{q,k,v,o}_proj.weight,
layers.i.post_attention_layernorm.weight, layers.i.mlp.{gate,up,down}_proj.weight (dense FFN) or
layers.i.moe.router.weight and layers.i.moe.experts.e.{gate,up,down}_proj.weight; per memory k
memories.k.query_proj.weight, memories.k.out_proj.weight, memories.k.keys, memories.k.values
(+ values_scale for int8), and for UltraMem memories.k.{query_norm,key_norm}.weight,
memories.k.tucker_cores, memories.k.ive_permutation, memories.k.filter_{u,v} (UltraMemV2 also
memories.k.prevalue_proj.weight and memories.k.pre_values); for PKM
memories.k.query_batchnorm.* or memories.k.query_layernorm.*. An Engram memory k has
memories.k.values (+ values_scale), memories.k.{key,value}_proj.weight,
memories.k.{gate_input,gate_key,conv}_norm.weight and memories.k.short_conv.weight.
"""
import json
import os

import torch

from . import safetensors as st

FORMAT = "ultramem-hf"
VERSION = 1


class ExportFormatError(ValueError):
    """A folder that is not an ultramem export, or one that does not fit its config."""


def _t(x):
    return x.t().contiguous()


def to_checkpoint_names(tensors, cfg):
    """The export's tensors -> the checkpoint's names and layouts (the inverse of the C++ export)."""
    out = {}
    used = set()

    def take(name):
        if name not in tensors:
            raise ExportFormatError("model.safetensors lacks %s" % name)
        used.add(name)
        return tensors[name]

    out["embedding"] = take("embed_tokens.weight")
    if not cfg["tie_embeddings"]:
        out["lm_head"] = take("lm_head.weight")
    out["final_norm.weight"] = take("norm.weight")
    kinds = cfg["_ffn_kinds"]
    reads = {r for r, _ in cfg["_placement"]}
    for b in range(cfg["n_layers"]):
        src, dst = "layers.%d." % b, "blocks.%d." % b
        out[dst + "attn_norm.weight"] = take(src + "input_layernorm.weight")
        out[dst + "attn.wqkv"] = torch.cat([_t(take(src + "self_attn.%s_proj.weight" % p)) for p in "qkv"], 1)
        out[dst + "attn.wo"] = _t(take(src + "self_attn.o_proj.weight"))
        if kinds[b] != "none" or (b + 1) in reads:
            out[dst + "ffn_norm.weight"] = take(src + "post_attention_layernorm.weight")
        if kinds[b] == "dense":
            out[dst + "ffn.w_in"] = torch.cat([_t(take(src + "mlp.gate_proj.weight")),
                                               _t(take(src + "mlp.up_proj.weight"))], 1)
            out[dst + "ffn.w_out"] = _t(take(src + "mlp.down_proj.weight"))
        elif kinds[b] == "moe":
            out[dst + "moe.router"] = _t(take(src + "moe.router.weight"))
            K = cfg["moe"]["num_experts"]
            e_pre = [src + "moe.experts.%d." % e for e in range(K)]
            out[dst + "moe.w_in"] = torch.stack([torch.cat([_t(take(p + "gate_proj.weight")),
                                                            _t(take(p + "up_proj.weight"))], 1) for p in e_pre])
            out[dst + "moe.w_out"] = torch.stack([_t(take(p + "down_proj.weight")) for p in e_pre])
    ultramem = cfg["memory"]["kind"] != "pkm"
    for k in range(len(cfg["_placement"])):
        src = dst = "memories.%d." % k
        if cfg["memory"]["kind"] == "engram":
            out[dst + "values"] = take(src + "values")
            if src + "values_scale" in tensors:
                out[dst + "values_scale"] = take(src + "values_scale")
            out[dst + "wk"] = _t(take(src + "key_proj.weight"))
            out[dst + "wv"] = _t(take(src + "value_proj.weight"))
            out[dst + "gate_u"] = take(src + "gate_input_norm.weight")
            out[dst + "gate_k"] = take(src + "gate_key_norm.weight")
            out[dst + "conv_norm"] = take(src + "conv_norm.weight")
            out[dst + "conv"] = take(src + "short_conv.weight")
            continue
        out[dst + "wq"] = _t(take(src + "query_proj.weight"))
        out[dst + "keys"] = take(src + "keys")
        out[dst + "values"] = take(src + "values")
        if src + "values_scale" in tensors:
            out[dst + "values_scale"] = take(src + "values_scale")
        if src + "out_proj.weight" in tensors:
            out[dst + "wo"] = _t(take(src + "out_proj.weight"))
        if src + "prevalue_proj.weight" in tensors:  # UltraMemV2 pre-values
            out[dst + "wp"] = _t(take(src + "prevalue_proj.weight"))
            out[dst + "pre_values"] = take(src + "pre_values")
        if ultramem:
            out[dst + "q_scale"] = take(src + "query_norm.weight")
            out[dst + "k_scale"] = take(src + "key_norm.weight")
            out[dst + "cores"] = take(src + "tucker_cores")
            out[dst + "perm"] = take(src + "ive_permutation")
            out[dst + "u"] = take(src + "filter_u")
            out[dst + "v"] = take(src + "filter_v")
        else:
            for norm, mod in (("query_batchnorm.", "bn."), ("query_layernorm.", "ln.")):
                for name in [n for n in tensors if n.startswith(src + norm)]:
                    out[dst + mod + name[len(src + norm):]] = take(name)
    extra = sorted(set(tensors) - used)
    if extra:
        raise ExportFormatError("model.safetensors holds tensors the config has no place for: %s" % ", ".join(extra))
    return out


def load_pretrained(cls, folder):
    """An export folder as a `cls` (TransformerLM) in eval mode, with its tokenizer when sentencepiece is
    installed."""
    from .model import load_tokenizer, normalise_config
    folder = os.fspath(folder)
    cfg_path = os.path.join(folder, "config.json")
    if not os.path.isfile(cfg_path):
        raise ExportFormatError("%s: no config.json (write the folder with `ultramem export --format hf`)" % folder)
    with open(cfg_path) as f:
        config = json.load(f)
    if config.get("format") != FORMAT or config.get("format_version") != VERSION or "ultramem" not in config:
        raise ExportFormatError("%s: not an ultramem export (format %r, version %r)"
                                % (cfg_path, config.get("format"), config.get("format_version")))
    cfg = normalise_config(config["ultramem"])
    try:
        tensors, _ = st.load(os.path.join(folder, "model.safetensors"))
        mapped = to_checkpoint_names(tensors, cfg)
    except (st.SafetensorsError, ExportFormatError) as e:
        raise ExportFormatError("%s: %s" % (folder, e)) from None
    model = cls(config["ultramem"], init=False)
    if cfg["memory"]["kind"] == "pkm":  # PKM's constant buffers are not exported: the model builds them
        for name, b in model.named_buffers():
            if name.startswith("memories.") and name.split(".")[2] in ("perm", "cores", "u", "v"):
                mapped[name] = b.clone()
    model.load_tensors(mapped, os.path.join(folder, "model.safetensors"))
    model.tokenizer = load_tokenizer(os.path.join(folder, "tokenizer.model"))
    model.source_path = os.path.abspath(os.path.join(folder, "model.safetensors"))
    model.eval()
    return model
