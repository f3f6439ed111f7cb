// Writes the seed corpora (corpus/<target>/) and the fixtures (fixtures/) of the fuzz targets with the
// project's own writers: `fuzz_make_seeds <tests/fuzz folder>` (scripts/fuzz.sh --seeds). Valid inputs of
// several shapes, plus a few edge cases made from them (a truncated file, an empty one).
#include <torch/torch.h>

#include <filesystem>
#include <fstream>
#include <iostream>
#include <map>
#include <sstream>

#include "ultramem/checkpoint/checkpoint.h"
#include "ultramem/data/prepare.h"
#include "ultramem/data/shard.h"
#include "ultramem/io/json_file.h"
#include "ultramem/io/safetensors.h"
#include "ultramem/nn/model_config.h"
#include "ultramem/train/train_config.h"

using namespace ultramem;
namespace fs = std::filesystem;
using nlohmann::json;

namespace {

std::string read_bytes(const fs::path& p) {
  std::ifstream f(p, std::ios::binary);
  std::stringstream ss;
  ss << f.rdbuf();
  return ss.str();
}

void write_bytes(const fs::path& p, const std::string& bytes) {
  fs::create_directories(p.parent_path());
  std::ofstream f(p, std::ios::binary | std::ios::trunc);
  f << bytes;
  if (!f) throw std::runtime_error("cannot write " + p.string());
}

// The first half of a valid file: a truncated one.
void write_truncated(const fs::path& from, const fs::path& to) {
  const std::string b = read_bytes(from);
  write_bytes(to, b.substr(0, b.size() / 2));
}

// A module with two parameters and a buffer, for checkpoints.
struct Small : torch::nn::Module {
  Small() {
    torch::manual_seed(3);
    values = register_parameter("values", torch::randn({4, 6}));
    bias = register_parameter("bias", torch::randn({3}));
    steps = register_buffer("steps", torch::arange(5, torch::kInt64));
  }
  torch::Tensor values, bias, steps;
};

void safetensors_seeds(const fs::path& out) {
  fs::create_directories(out);
  io::save_safetensors((out / "f32.safetensors").string(), {{"w", torch::arange(6, torch::kFloat32).reshape({2, 3})}},
                       {{"note", "seed"}});
  std::vector<std::pair<std::string, at::Tensor>> all;
  for (const auto dt : {torch::kFloat64, torch::kFloat32, torch::kFloat16, torch::kBFloat16, torch::kInt64,
                        torch::kInt32, torch::kInt16, torch::kInt8, torch::kUInt8, torch::kBool})
    all.emplace_back(std::string("t_") + c10::toString(dt), torch::arange(3).to(dt));
  io::save_safetensors((out / "dtypes.safetensors").string(), all);
  io::save_safetensors((out / "edge.safetensors").string(),
                       {{"empty", torch::zeros({0, 4})}, {"scalar", torch::tensor(2.5)}, {"odd", torch::ones({3}, torch::kInt8)}});
  io::save_safetensors((out / "none.safetensors").string(), {});
  write_truncated(out / "f32.safetensors", out / "truncated.safetensors");
}

// One-file checkpoints into corpus/checkpoint; a 2-rank sharded save whose shard files are the fixtures
// and whose main file is a seed.
void checkpoint_seeds(const fs::path& out, const fs::path& fixtures) {
  fs::create_directories(out);
  Small m;
  const json cfg = nn::model_config_to_json(nn::ModelConfig{});
  checkpoint::CheckpointWriteOptions full;
  full.optim = std::vector<std::pair<std::string, torch::Tensor>>{{"values.exp_avg", torch::zeros({4, 6})},
                                                                  {"step", torch::tensor(int64_t{7})}};
  full.train_config = train::train_config_to_json(train::TrainConfig{});
  full.trainer_state = {{"step", 7}, {"best_val_loss", 3.5}};
  full.metadata = {{"value_format", "fp32"}};
  checkpoint::save_checkpoint((out / "full.safetensors").string(), m, cfg, full);
  checkpoint::CheckpointWriteOptions weights;
  weights.rng = false;
  checkpoint::save_checkpoint((out / "weights.safetensors").string(), m, cfg, weights);
  write_truncated(out / "weights.safetensors", out / "truncated.safetensors");

  // The sharded save, as dist/sharded_checkpoint.cpp lays it out: "model.values" split in columns [0, 3)
  // and [3, 6), each rank's slice and generator state in its shard file, the rest in the main file.
  fs::remove_all(fixtures);
  fs::create_directories(fixtures);
  const std::string main = (fixtures / "ckpt.safetensors").string();
  const std::string stem = checkpoint::checkpoint_stem(main);
  json files = json::array();
  for (int64_t r = 0; r < 2; ++r) {
    const std::string name = checkpoint::shard_file_name(stem, 7, "seed", r, 2);
    const std::string sum = checkpoint::save_checkpoint_shard(
        (fixtures / name).string(),
        {{"model.values", m.values.detach().narrow(1, 3 * r, 3).contiguous()}, {"rng.cpu", checkpoint::get_rng_state()}},
        json{{"rank", r}, {"world", 2}, {"step", 7}, {"main", "ckpt.safetensors"}});
    files.push_back({{"file", name}, {"checksum", sum}});
  }
  checkpoint::CheckpointWriteOptions sharded;
  sharded.exclude = {"model.values"};
  sharded.shards = {{"world", 2},
                    {"step", 7},
                    {"files", files},
                    {"tensors", {{"model.values", {{"shape", {4, 6}}, {"columns", {{0, 3}, {3, 6}}}}}}}};
  checkpoint::save_checkpoint(main, m, cfg, sharded);
  const fs::path manifests = out.parent_path() / "checkpoint_manifest";
  write_bytes(manifests / "manifest.json", sharded.shards.dump(1));
  json escaping = sharded.shards;  // edge cases: a file name leaving the folder, a tensor no shard holds
  escaping["files"][1]["file"] = "../" + escaping["files"][1]["file"].get<std::string>();
  write_bytes(manifests / "escaping-name.json", escaping.dump(1));
  json absent = sharded.shards;
  absent["tensors"]["optim.values.exp_avg"] = absent["tensors"]["model.values"];
  write_bytes(manifests / "absent-tensor.json", absent.dump(1));
  checkpoint::read_checkpoint(main);  // the writers agree with the reader
  fs::rename(main, out / "sharded-main.safetensors");
}

void shard_seeds(const fs::path& out) {
  fs::create_directories(out);
  data::write_shard((out / "u16.bin").string(), {1, 2, 3, 0, 259, 7, 2}, 260);
  data::write_shard((out / "u32.bin").string(), {70000, 1, 65536, 2}, 70001);
  data::write_shard((out / "empty.bin").string(), {}, 16);
  write_truncated(out / "u16.bin", out / "truncated.bin");
}

// A small prepared folder (prepare() on a made-up corpus, vocabulary 320): its tokenizer and shards are the
// fixtures, its manifest and its tokenizer seeds.
void manifest_seeds(const fs::path& out, const fs::path& fixtures, const fs::path& work) {
  static const char* words[] = {"the", "nation", "people", "of", "and", "to", "a", "public", "year", "states",
                                "war", "peace", "trade", "law", "we", "our", "must", "naïve", "café", "東京"};
  fs::create_directories(work / "corpus");
  uint32_t x = 12345;
  for (int d = 0; d < 40; ++d) {
    std::string text;
    for (int i = 0; i < 150; ++i) {
      x = x * 1664525u + 1013904223u;
      text += std::string(i ? " " : "") + words[(x >> 16) % (sizeof words / sizeof words[0])];
    }
    write_bytes(work / "corpus" / ("doc" + std::to_string(d) + ".txt"), text + "\n");
  }
  data::PrepareOptions o;
  o.input = (work / "corpus").string();
  o.out_dir = (work / "prepared").string();
  o.vocab_size = 320;
  o.val_fraction = 0.2;
  std::ostringstream log;
  data::prepare(o, log);
  fs::remove_all(fixtures);
  fs::create_directories(fixtures);
  for (const char* f : {"tokenizer.model", "train.bin", "val.bin"}) fs::copy_file(work / "prepared" / f, fixtures / f);
  fs::create_directories(out);
  // The input path is the maker's scratch folder: record a stable one instead (load_prepared does not read it).
  json m = io::read_json_file((work / "prepared" / "manifest.json").string());
  m["options"]["input"] = "data/corpus";
  write_bytes(out / "manifest.json", m.dump(2) + "\n");
  write_truncated(out / "manifest.json", out / "truncated.json");
  const fs::path tok = out.parent_path() / "tokenizer";
  fs::create_directories(tok);
  fs::copy_file(fixtures / "tokenizer.model", tok / "prepared-320.model", fs::copy_options::overwrite_existing);
  write_truncated(tok / "prepared-320.model", tok / "truncated.model");
}

void config_seeds(const fs::path& out_model, const fs::path& out_train, const fs::path& configs) {
  fs::create_directories(out_model);
  fs::create_directories(out_train);
  for (const char* name : {"tiny-dense", "tiny-moe", "tiny-pkm", "tiny-ultramem"})
    write_bytes(out_model / (std::string(name) + ".json"),
                nn::model_config_to_json(nn::load_model_config((configs / (std::string(name) + ".json")).string())).dump(2));
  write_bytes(out_model / "default.json", nn::model_config_to_json(nn::ModelConfig{}).dump(2));
  write_bytes(out_model / "empty-object.json", "{}");
  write_bytes(out_train / "default.json", train::train_config_to_json(train::TrainConfig{}).dump(2));
  write_bytes(out_train / "short.json", R"({"steps": 10, "batch_size": 2, "seq_len": 16, "lr": 0.001})");
  write_bytes(out_train / "empty-object.json", "{}");
}

}  // namespace

int main(int argc, char** argv) {
  if (argc != 3) {
    std::cerr << "usage: fuzz_make_seeds <tests/fuzz folder> <configs folder>\n";
    return 2;
  }
  const fs::path root = argv[1], configs = argv[2];
  const fs::path work = fs::temp_directory_path() / ("ultramem-make-seeds-" + std::to_string(::getpid()));
  try {
    safetensors_seeds(root / "corpus/safetensors");
    checkpoint_seeds(root / "corpus/checkpoint", root / "fixtures/checkpoint");
    shard_seeds(root / "corpus/shard");
    manifest_seeds(root / "corpus/manifest", root / "fixtures/prepared", work);
    config_seeds(root / "corpus/model_config", root / "corpus/train_config", configs);
  } catch (const std::exception& e) {
    std::cerr << "fuzz_make_seeds: " << e.what() << "\n";
    fs::remove_all(work);
    return 1;
  }
  fs::remove_all(work);
  return 0;
}
