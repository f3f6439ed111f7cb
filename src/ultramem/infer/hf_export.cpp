#include "ultramem/infer/hf_export.h"

#include <torch/torch.h>

#include <filesystem>
#include <stdexcept>

#include "ultramem/checkpoint/run_folder.h"
#include "ultramem/data/prepared.h"
#include "ultramem/data/tokenizer.h"
#include "ultramem/infer/sampling.h"
#include "ultramem/io/json_file.h"
#include "ultramem/io/safetensors.h"
#include "ultramem/nn/model_config.h"

namespace ultramem::infer {

namespace fs = std::filesystem;
using NamedTensors = std::vector<std::pair<std::string, torch::Tensor>>;

namespace {

// [in, out] -> [out, in], contiguous.
torch::Tensor out_in(const torch::Tensor& t) { return t.t().contiguous(); }

}  // namespace

NamedTensors hf_tensors(const checkpoint::Checkpoint& ckpt) {
  const nn::ModelConfig c = nn::model_config_from_json(ckpt.model_config);
  auto take = [&](const std::string& name) -> const torch::Tensor& {
    const auto it = ckpt.model.find(name);
    if (it == ckpt.model.end())
      throw std::invalid_argument(ckpt.path + ": tensor '" + name + "' is missing (its config needs it)");
    return it->second;
  };
  NamedTensors out;
  const int64_t D = c.d_model;
  out.emplace_back("embed_tokens.weight", take("embedding"));                        // [V, D]
  if (!c.tie_embeddings) out.emplace_back("lm_head.weight", take("lm_head"));        // [V, D]
  out.emplace_back("norm.weight", take("final_norm.weight"));
  std::vector<bool> reads(size_t(c.n_layers), false);
  for (const auto& p : c.memory_placement) reads[size_t(p.read_block - 1)] = true;
  for (int64_t b = 0; b < c.n_layers; ++b) {
    const std::string src = "blocks." + std::to_string(b) + ".", dst = "layers." + std::to_string(b) + ".";
    out.emplace_back(dst + "input_layernorm.weight", take(src + "attn_norm.weight"));
    const auto& wqkv = take(src + "attn.wqkv");                                      // [D, 3D]
    const char* names[3] = {"q", "k", "v"};
    for (int64_t j = 0; j < 3; ++j)
      out.emplace_back(dst + "self_attn." + names[j] + "_proj.weight", out_in(wqkv.narrow(1, j * D, D)));
    out.emplace_back(dst + "self_attn.o_proj.weight", out_in(take(src + "attn.wo")));
    const nn::FfnKind kind = c.ffn_kind(b);
    if (kind != nn::FfnKind::None || reads[size_t(b)])
      out.emplace_back(dst + "post_attention_layernorm.weight", take(src + "ffn_norm.weight"));
    // w_in [D, 2h] = gate | up, w_out [h, D].
    auto swiglu = [&](const std::string& prefix, const torch::Tensor& w_in, const torch::Tensor& w_out) {
      const int64_t h = w_in.size(1) / 2;
      out.emplace_back(prefix + "gate_proj.weight", out_in(w_in.narrow(1, 0, h)));   // [h, D]
      out.emplace_back(prefix + "up_proj.weight", out_in(w_in.narrow(1, h, h)));     // [h, D]
      out.emplace_back(prefix + "down_proj.weight", out_in(w_out));                  // [D, h]
    };
    if (kind == nn::FfnKind::Dense) {
      swiglu(dst + "mlp.", take(src + "ffn.w_in"), take(src + "ffn.w_out"));
    } else if (kind == nn::FfnKind::MoE) {
      out.emplace_back(dst + "moe.router.weight", out_in(take(src + "moe.router")));  // [K, D]
      const auto& w_in = take(src + "moe.w_in");                                      // [K, D, 2h]
      const auto& w_out = take(src + "moe.w_out");                                    // [K, h, D]
      for (int64_t e = 0; e < w_in.size(0); ++e)
        swiglu(dst + "moe.experts." + std::to_string(e) + ".", w_in[e], w_out[e]);
    }
  }
  const bool ultramem = nn::is_ultramem(c.memory_kind);
  for (size_t k = 0; k < c.memory_placement.size(); ++k) {
    const std::string src = "memories." + std::to_string(k) + ".", dst = src;
    if (c.memory_kind == nn::MemoryKind::Engram) {
      out.emplace_back(dst + "values", take(src + "values"));                       // [rows, d_e/(2*heads)] as stored
      if (ckpt.model.count(src + "values_scale")) out.emplace_back(dst + "values_scale", take(src + "values_scale"));
      out.emplace_back(dst + "key_proj.weight", out_in(take(src + "wk")));         // [D, d_e]
      out.emplace_back(dst + "value_proj.weight", out_in(take(src + "wv")));       // [D, d_e]
      out.emplace_back(dst + "gate_input_norm.weight", take(src + "gate_u"));      // [D]
      out.emplace_back(dst + "gate_key_norm.weight", take(src + "gate_k"));        // [D]
      out.emplace_back(dst + "conv_norm.weight", take(src + "conv_norm"));         // [D]
      out.emplace_back(dst + "short_conv.weight", take(src + "conv"));             // [D, kernel]
      continue;
    }
    out.emplace_back(dst + "query_proj.weight", out_in(take(src + "wq")));           // [2Dk or H*2Dk, D]
    if (ultramem) {
      out.emplace_back(dst + "query_norm.weight", take(src + "q_scale"));           // [2, Dk]
      out.emplace_back(dst + "keys", take(src + "keys"));                           // [H, 2, n, Dk, r]
      out.emplace_back(dst + "key_norm.weight", take(src + "k_scale"));             // [2, Dk]
      out.emplace_back(dst + "tucker_cores", take(src + "cores"));                  // [C, H, r, r]
    } else {
      out.emplace_back(dst + "keys", take(src + "keys"));                           // [H, 2, n, Dk]
    }
    out.emplace_back(dst + "values", take(src + "values"));                         // [N, Dv] as stored
    if (ckpt.model.count(src + "values_scale")) out.emplace_back(dst + "values_scale", take(src + "values_scale"));
    if (ckpt.model.count(src + "wo")) out.emplace_back(dst + "out_proj.weight", out_in(take(src + "wo")));  // [D, E*Dv]
    if (ckpt.model.count(src + "wp")) {  // UltraMemV2 pre-values
      out.emplace_back(dst + "prevalue_proj.weight", out_in(take(src + "wp")));     // [Dp, D]
      out.emplace_back(dst + "pre_values", take(src + "pre_values"));                // [N, Dp]
    }
    if (ultramem) {
      out.emplace_back(dst + "ive_permutation", take(src + "perm"));                // [n*n] int64
      out.emplace_back(dst + "filter_u", take(src + "u"));                          // [H, r]
      out.emplace_back(dst + "filter_v", take(src + "v"));
    } else {
      for (const auto& [name, t] : ckpt.model) {
        if (name.rfind(src + "bn.", 0) == 0) out.emplace_back(dst + "query_batchnorm." + name.substr(src.size() + 3), t);
        if (name.rfind(src + "ln.", 0) == 0) out.emplace_back(dst + "query_layernorm." + name.substr(src.size() + 3), t);
      }
    }
  }
  return out;
}

nlohmann::json export_hf(const HfExportOptions& o, std::ostream& log) {
  if (o.out_dir.empty()) throw std::invalid_argument("export: the output folder is empty");
  const checkpoint::Checkpoint ckpt = checkpoint::read_checkpoint(o.checkpoint);
  if (ckpt.shard_world > 0)
    log << "consolidating the " << ckpt.shard_world << " shard files of " << o.checkpoint << "\n";
  const NamedTensors tensors = hf_tensors(ckpt);
  const nn::ModelConfig c = nn::model_config_from_json(ckpt.model_config);

  std::error_code ec;
  fs::create_directories(o.out_dir, ec);
  if (ec) throw std::runtime_error(o.out_dir + ": cannot create the folder: " + ec.message());
  int64_t bytes = 0;
  for (const auto& [name, t] : tensors) bytes += t.numel() * int64_t(t.element_size());
  const auto space = fs::space(o.out_dir, ec);
  if (!ec && uint64_t(bytes) > space.available)
    throw std::runtime_error(o.out_dir + ": " + std::to_string(bytes >> 20) + " MiB to write, " +
                             std::to_string(space.available >> 20) + " MiB free");
  const std::string model_file = (fs::path(o.out_dir) / "model.safetensors").string();
  const auto vf = ckpt.metadata.find("value_format");
  const std::string value_format = vf == ckpt.metadata.end() ? "fp32" : vf->second;
  io::save_safetensors(model_file, tensors, {{"format", "pt"}, {"ultramem_format", kHfExportFormat}});

  // The tokenizer: as given, else the run folder's, else the prepared data's.
  std::string tok = o.tokenizer;
  if (tok.empty()) tok = checkpoint::run_tokenizer_path(o.checkpoint);
  if (tok.empty()) {
    try {
      tok = data::load_prepared(checkpoint::data_dir_for_checkpoint(o.checkpoint, o.data_dir)).tokenizer_path;
    } catch (const std::exception& e) {
      log << "note: no tokenizer found (" << e.what() << "); the folder has none (pass --tokenizer FILE)\n";
    }
  }
  std::string tok_out;
  int32_t eos = 2, bos = 1;  // the prepared tokenizers' ids (data/prepared.h), used when there is no tokenizer
  if (!tok.empty()) {
    const auto t = data::Tokenizer::load(tok);
    eos = t.eos_id();
    bos = t.bos_id();
    tok_out = (fs::path(o.out_dir) / "tokenizer.model").string();
    fs::copy_file(tok, tok_out, fs::copy_options::overwrite_existing, ec);
    if (ec) throw std::runtime_error(tok + ": cannot copy the tokenizer to " + tok_out + ": " + ec.message());
  }

  const SamplingOptions sampling;
  nlohmann::json config = {
      {"model_type", "ultramem"},
      {"architectures", {"UltraMemForCausalLM"}},
      {"format", kHfExportFormat},
      {"format_version", kHfExportVersion},
      {"vocab_size", c.vocab_size},
      {"hidden_size", c.d_model},
      {"num_hidden_layers", c.n_layers},
      {"num_attention_heads", c.n_heads},
      {"intermediate_size", c.ffn_hidden},
      {"max_position_embeddings", c.max_seq_len},
      {"rope_theta", c.rope_theta},
      {"rms_norm_eps", c.norm_eps},
      {"tie_word_embeddings", c.tie_embeddings},
      {"torch_dtype", "float32"},
      {"value_format", value_format},
      {"memory_kind", c.has_memory() ? nn::to_string(c.memory_kind) : "none"},
      {"memory_placement", nn::placement_to_string(c.memory_placement)},
      {"ultramem", ckpt.model_config},
  };
  io::write_json_file((fs::path(o.out_dir) / "config.json").string(), config);
  // A prompt starts with EOS, which separates documents in the training data (infer/text_generation.cpp).
  const nlohmann::json generation = {{"eos_token_id", eos},         {"bos_token_id", bos},
                                     {"prompt_prefix_token_id", eos},
                                     {"max_length", c.max_seq_len}, {"do_sample", true},
                                     {"temperature", sampling.temperature}, {"top_k", sampling.top_k},
                                     {"top_p", sampling.top_p},     {"max_new_tokens", sampling.max_tokens}};
  io::write_json_file((fs::path(o.out_dir) / "generation_config.json").string(), generation);
  return {{"out_dir", o.out_dir},
          {"tensors", tensors.size()},
          {"bytes", bytes},
          {"value_format", value_format},
          {"tokenizer", tok_out.empty() ? nlohmann::json(nullptr) : nlohmann::json(tok_out)},
          {"shards_consolidated", ckpt.shard_world}};
}

}  // namespace ultramem::infer
