// Builds a small UltraMem or PKM layer, runs one forward/backward on random data and dumps everything to a
// safetensors file, for the independent pure-PyTorch reference (tests/python/test_parity.py).
//
// usage: dump_layer OUT.safetensors [--kind ultramem|pkm] [--dtype float|double] [--config KEY=VALUE ...]
//        dump_layer --load FILE...         (prints what ultramem::io::load_safetensors reads)
//        dump_layer --write-dtypes FILE    (writes one tensor of every supported dtype)
//
// Saved tensors: every parameter and buffer under its module name as it was before the forward
// ("wq", "values", "perm", "u", "bn.weight", "bn.running_mean", ...), every buffer after the forward as
// "post.<name>", the input "x" [T, B, D], the cotangent "g", "out", "aux_loss" (0 for PKM),
// "grad.<param>" for every parameter (dense) and "grad.x", where loss = (out * g).sum() + aux_loss.
// Metadata: "kind", "dtype" and every config value as a string.
#include <torch/torch.h>

#include <cstdlib>
#include <exception>
#include <functional>
#include <iostream>
#include <map>
#include <sstream>
#include <stdexcept>
#include <string>
#include <vector>

#include "ultramem/io/safetensors.h"
#include "ultramem/nn/memory_config.h"
#include "ultramem/nn/pkm.h"
#include "ultramem/nn/ultramem.h"

namespace {

using ultramem::nn::PKMConfig;
using ultramem::nn::UltraMemConfig;

int64_t to_int(const std::string& key, const std::string& v) {
  size_t pos = 0;
  long long x = 0;
  try {
    x = std::stoll(v, &pos);
  } catch (const std::exception&) {
    pos = 0;
  }
  if (pos == 0 || pos != v.size()) throw std::invalid_argument(key + ": expected an integer, got \"" + v + "\"");
  return x;
}
double to_double(const std::string& key, const std::string& v) {
  size_t pos = 0;
  double x = 0;
  try {
    x = std::stod(v, &pos);
  } catch (const std::exception&) {
    pos = 0;
  }
  if (pos == 0 || pos != v.size()) throw std::invalid_argument(key + ": expected a number, got \"" + v + "\"");
  return x;
}
bool to_bool(const std::string& key, const std::string& v) {
  if (v == "1" || v == "true") return true;
  if (v == "0" || v == "false") return false;
  throw std::invalid_argument(key + ": expected true/false/1/0, got \"" + v + "\"");
}
std::string str(double x) {
  std::ostringstream os;
  os.precision(17);
  os << x;
  return os.str();
}

// Settings of the run itself (not of the layer).
struct RunConfig {
  int64_t T = 5, B = 3;     // x: [T, B, D]
  uint64_t input_seed = 12345;
};

struct Setter {
  std::function<void(const std::string&)> set;
  std::function<std::string()> get;
};

template <typename F>
Setter int_field(const std::string& key, F& field) {
  return {[&field, key](const std::string& v) { field = static_cast<F>(to_int(key, v)); },
          [&field] { return std::to_string(field); }};
}
Setter double_field(const std::string& key, double& field) {
  return {[&field, key](const std::string& v) { field = to_double(key, v); }, [&field] { return str(field); }};
}
Setter bool_field(const std::string& key, bool& field) {
  return {[&field, key](const std::string& v) { field = to_bool(key, v); },
          [&field] { return std::string(field ? "true" : "false"); }};
}

std::map<std::string, Setter> ultramem_fields(UltraMemConfig& c) {
  std::map<std::string, Setter> f;
  f["D"] = int_field("D", c.D);
  f["n"] = int_field("n", c.n);
  f["E"] = int_field("E", c.E);
  f["Dk"] = int_field("Dk", c.Dk);
  f["Dv"] = int_field("Dv", c.Dv);
  f["r"] = int_field("r", c.r);
  f["C"] = int_field("C", c.C);
  f["H"] = int_field("H", c.H);
  f["m"] = int_field("m", c.m);
  f["m_first"] = int_field("m_first", c.m_first);
  f["m_neg"] = int_field("m_neg", c.m_neg);
  f["filter"] = {[&c](const std::string& v) { c.filter = ultramem::nn::parse_retrieval_filter(v); },
                 [&c] { return std::string(ultramem::nn::to_string(c.filter)); }};
  f["aux_reduction"] = {[&c](const std::string& v) { c.aux_reduction = ultramem::nn::parse_aux_reduction(v); },
                        [&c] { return std::string(ultramem::nn::to_string(c.aux_reduction)); }};
  f["qk_norm"] = {[&c](const std::string& v) { c.qk_norm = ultramem::nn::parse_norm_kind(v); },
                  [&c] { return std::string(ultramem::nn::to_string(c.qk_norm)); }};
  f["qk_scale_init"] = double_field("qk_scale_init", c.qk_scale_init);
  f["aux_loss"] = bool_field("aux_loss", c.aux_loss);
  f["aux_alpha"] = double_field("aux_alpha", c.aux_alpha);
  f["aux_tau"] = double_field("aux_tau", c.aux_tau);
  f["value_init"] = {[&c](const std::string& v) { c.value_init = ultramem::nn::parse_value_init(v); },
                     [&c] { return std::string(ultramem::nn::to_string(c.value_init)); }};
  f["value_std"] = double_field("value_std", c.value_std);
  f["num_layers"] = int_field("num_layers", c.num_layers);
  f["sparse_value_grad"] = bool_field("sparse_value_grad", c.sparse_value_grad);
  f["seed"] = int_field("seed", c.seed);
  f["query_per_rank"] = bool_field("query_per_rank", c.query_per_rank);
  f["single_projection"] = bool_field("single_projection", c.single_projection);
  f["Dp"] = int_field("Dp", c.Dp);
  f["filter_rank"] = int_field("filter_rank", c.filter_rank);
  return f;
}

const char* qnorm_name(PKMConfig::QueryNorm q) {
  switch (q) {
    case PKMConfig::QueryNorm::Batch: return "batch";
    case PKMConfig::QueryNorm::Layer: return "layer";
    default: return "none";
  }
}

std::map<std::string, Setter> pkm_fields(PKMConfig& c) {
  std::map<std::string, Setter> f;
  f["D"] = int_field("D", c.D);
  f["n"] = int_field("n", c.n);
  f["Dk"] = int_field("Dk", c.Dk);
  f["Dv"] = int_field("Dv", c.Dv);
  f["H"] = int_field("H", c.H);
  f["m"] = int_field("m", c.m);
  f["query_norm"] = {[&c](const std::string& v) {
                       if (v == "batch") c.query_norm = PKMConfig::QueryNorm::Batch;
                       else if (v == "layer") c.query_norm = PKMConfig::QueryNorm::Layer;
                       else if (v == "none") c.query_norm = PKMConfig::QueryNorm::None;
                       else throw std::invalid_argument("query_norm: expected batch|layer|none, got \"" + v + "\"");
                     },
                     [&c] { return std::string(qnorm_name(c.query_norm)); }};
  f["value_std"] = double_field("value_std", c.value_std);
  f["sparse_value_grad"] = bool_field("sparse_value_grad", c.sparse_value_grad);
  f["seed"] = int_field("seed", c.seed);
  return f;
}

void add_run_fields(std::map<std::string, Setter>& f, RunConfig& rc) {
  f["T"] = int_field("T", rc.T);
  f["B"] = int_field("B", rc.B);
  f["input_seed"] = int_field("input_seed", rc.input_seed);
}

[[noreturn]] void usage(const std::string& why) {
  std::cerr << "dump_layer: " << why << "\n"
            << "usage: dump_layer OUT.safetensors [--kind ultramem|pkm] [--dtype float|double] "
               "[--config KEY=VALUE ...]\n";
  std::exit(2);
}

torch::Tensor dense(const torch::Tensor& t) { return t.is_sparse() ? t.to_dense() : t; }

// `dump_layer --load FILE...`: reads each FILE with ultramem::io::load_safetensors and prints "file PATH",
// then one line per tensor, "tensor NAME DTYPE [d0,d1,...] SUM" (SUM of the values as double), then
// "meta KEY VALUE" lines; or, when reading fails, "error MESSAGE". Exit code 1 when any file failed.
int load_and_print(const std::vector<std::string>& paths) {
  int rc = 0;
  for (const auto& path : paths) {
    std::cout << "file " << path << "\n";
    std::map<std::string, std::string> meta;
    std::vector<std::pair<std::string, torch::Tensor>> tensors;
    try {
      tensors = ultramem::io::load_safetensors(path, &meta);
    } catch (const std::exception& e) {
      std::cout << "error " << e.what() << "\n";
      std::cerr << "dump_layer: " << e.what() << "\n";
      rc = 1;
      continue;
    }
    for (const auto& [name, t] : tensors) {
      std::cout << "tensor " << name << " " << c10::toString(t.scalar_type()) << " [";
      for (int64_t d = 0; d < t.dim(); ++d) std::cout << (d ? "," : "") << t.size(d);
      std::cout << "] " << str(t.numel() ? t.to(torch::kDouble).sum().item<double>() : 0.0) << "\n";
    }
    for (const auto& [k, v] : meta) std::cout << "meta " << k << " " << v << "\n";
  }
  return rc;
}

// `dump_layer --write-dtypes FILE`: one tensor per supported dtype, values arange(numel) % 7 - 3 (bool:
// odd entries true) in shape [2, 3], plus a scalar, an empty tensor and a non-contiguous one.
int write_dtypes(const std::string& path) {
  std::vector<std::pair<std::string, torch::Tensor>> t;
  const auto base = (torch::arange(6, torch::kDouble).remainder(7) - 3).view({2, 3});
  for (auto [name, dt] : std::vector<std::pair<std::string, torch::Dtype>>{
           {"f64", torch::kDouble}, {"f32", torch::kFloat}, {"f16", torch::kHalf}, {"bf16", torch::kBFloat16},
           {"i64", torch::kLong}, {"i32", torch::kInt}, {"i16", torch::kShort}, {"i8", torch::kChar}})
    t.emplace_back(name, base.to(dt));
  t.emplace_back("u8", (base + 3).to(torch::kByte));
  t.emplace_back("bool", torch::arange(6, torch::kLong).remainder(2).eq(1).view({2, 3}));
  t.emplace_back("scalar", torch::tensor(2.5, torch::kDouble));
  t.emplace_back("empty", torch::zeros({0, 4}, torch::kFloat));
  t.emplace_back("transposed", torch::arange(6, torch::kFloat).view({2, 3}).t());
  ultramem::io::save_safetensors(path, t, {{"purpose", "dtype round trip"}, {"answer", "42"}});
  return 0;
}

int run(int argc, char** argv) {
  if (argc < 2) usage("missing OUT.safetensors");
  if (std::string(argv[1]) == "--load") {
    if (argc < 3) usage("--load needs at least one FILE");
    return load_and_print(std::vector<std::string>(argv + 2, argv + argc));
  }
  if (std::string(argv[1]) == "--write-dtypes") {
    if (argc != 3) usage("--write-dtypes needs exactly one FILE");
    return write_dtypes(argv[2]);
  }
  const std::string out_path = argv[1];
  std::string kind = "ultramem", dtype_name = "double";
  std::vector<std::pair<std::string, std::string>> kvs;
  for (int i = 2; i < argc; ++i) {
    const std::string a = argv[i];
    if (a == "--kind" || a == "--dtype") {
      if (i + 1 >= argc) usage(a + " needs a value");
      (a == "--kind" ? kind : dtype_name) = argv[++i];
    } else if (a == "--config") {
      bool any = false;
      while (i + 1 < argc && std::string(argv[i + 1]).rfind("--", 0) != 0) {
        const std::string kv = argv[++i];
        const auto eq = kv.find('=');
        if (eq == std::string::npos || eq == 0) usage("expected KEY=VALUE after --config, got \"" + kv + "\"");
        kvs.emplace_back(kv.substr(0, eq), kv.substr(eq + 1));
        any = true;
      }
      if (!any) usage("--config needs at least one KEY=VALUE");
    } else {
      usage("unknown argument \"" + a + "\"");
    }
  }
  if (kind != "ultramem" && kind != "pkm") usage("--kind must be ultramem or pkm, got \"" + kind + "\"");
  torch::Dtype dtype;
  if (dtype_name == "double") dtype = torch::kDouble;
  else if (dtype_name == "float") dtype = torch::kFloat;
  else usage("--dtype must be float or double, got \"" + dtype_name + "\"");

  // Small defaults (spec notation).
  UltraMemConfig uc;
  uc.D = 32; uc.n = 8; uc.E = 4; uc.Dk = 16; uc.Dv = 16; uc.r = 2; uc.C = 2; uc.H = 2; uc.m = 6;
  uc.m_first = 6; uc.seed = 1;
  PKMConfig pc;
  pc.D = 32; pc.n = 8; pc.Dk = 16; pc.Dv = 24; pc.H = 2; pc.m = 4;
  pc.query_norm = PKMConfig::QueryNorm::Layer; pc.seed = 1;
  RunConfig rc;
  auto fields = kind == "ultramem" ? ultramem_fields(uc) : pkm_fields(pc);
  add_run_fields(fields, rc);
  for (const auto& [k, v] : kvs) {
    auto it = fields.find(k);
    if (it == fields.end()) usage("unknown config key \"" + k + "\" for --kind " + kind);
    it->second.set(v);
  }
  if (rc.T < 0 || rc.B < 0) usage("T and B must be >= 0");

  std::map<std::string, std::string> meta;
  meta["kind"] = kind;
  meta["dtype"] = dtype_name;
  for (const auto& [k, s] : fields) meta[k] = s.get();

  std::shared_ptr<torch::nn::Module> module;
  std::function<torch::Tensor(const torch::Tensor&)> forward;
  std::function<torch::Tensor()> aux;
  int64_t D = 0;
  if (kind == "ultramem") {
    ultramem::nn::UltraMem layer(uc);
    layer->to(dtype);
    layer->refresh_tucker_approx();
    module = layer.ptr();
    forward = [layer](const torch::Tensor& x) mutable { return layer->forward(x); };
    aux = [layer] { return layer->aux_loss(); };
    D = uc.D;
  } else {
    ultramem::nn::PKM layer(pc);
    layer->to(dtype);
    module = layer.ptr();
    forward = [layer](const torch::Tensor& x) mutable { return layer->forward(x); };
    aux = [dtype] { return torch::zeros({}, torch::TensorOptions().dtype(dtype)); };
    D = pc.D;
  }
  module->train();

  std::vector<std::pair<std::string, torch::Tensor>> saved;
  for (const auto& p : module->named_parameters()) saved.emplace_back(p.key(), p.value().detach().clone());
  for (const auto& b : module->named_buffers()) saved.emplace_back(b.key(), b.value().detach().clone());

  torch::Generator gen = at::detail::createCPUGenerator(rc.input_seed);
  auto x = at::normal(0.0, 1.0, {rc.T, rc.B, D}, gen).to(dtype).requires_grad_(true);
  auto out = forward(x);
  auto g = at::normal(0.0, 1.0, out.sizes().vec(), gen).to(dtype);
  auto aux_loss = aux();
  auto loss = (out * g).sum() + aux_loss;
  loss.backward();

  for (const auto& b : module->named_buffers()) saved.emplace_back("post." + b.key(), b.value().detach().clone());
  saved.emplace_back("x", x.detach());
  saved.emplace_back("g", g);
  saved.emplace_back("out", out.detach());
  saved.emplace_back("aux_loss", aux_loss.detach());
  for (const auto& p : module->named_parameters()) {
    const auto& grad = p.value().grad();
    saved.emplace_back("grad." + p.key(), grad.defined() ? dense(grad).detach() : torch::zeros_like(p.value()));
  }
  saved.emplace_back("grad.x", x.grad());
  ultramem::io::save_safetensors(out_path, saved, meta);
  return 0;
}

}  // namespace

int main(int argc, char** argv) {
  try {
    return run(argc, argv);
  } catch (const std::exception& e) {
    std::cerr << "dump_layer: " << e.what() << "\n";
    return 1;
  }
}
