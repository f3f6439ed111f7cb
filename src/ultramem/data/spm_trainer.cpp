#include "ultramem/data/spm_trainer.h"

#include <fcntl.h>
#include <spawn.h>
#include <sys/wait.h>
#include <unistd.h>

#include <cerrno>
#include <cstdlib>
#include <cstring>
#include <filesystem>
#include <stdexcept>
#include <string_view>

#include "ultramem/io/atomic_file.h"

extern char** environ;

namespace ultramem::data {
namespace {

namespace fs = std::filesystem;

// Removes a directory tree at scope exit.
struct ScopedDir {
  fs::path path;
  ~ScopedDir() {
    std::error_code ec;
    if (!path.empty()) fs::remove_all(path, ec);
  }
};

std::string last_lines(const std::string& text, int n) {
  size_t pos = text.size();
  while (n-- > 0 && pos > 0) {
    const size_t nl = text.rfind('\n', pos - 1);
    if (nl == std::string::npos) return text;
    pos = nl;
  }
  return text.substr(pos);
}

}  // namespace

std::string find_spm_train() {
  if (const char* env = std::getenv("ULTRAMEM_SPM_TRAIN"); env && *env) {
    if (::access(env, X_OK) != 0)
      throw std::runtime_error(std::string("tokenizer: ULTRAMEM_SPM_TRAIN=") + env + " is not an executable file");
    return env;
  }
  const char* path = std::getenv("PATH");
  std::string_view dirs = path && *path ? path : "/usr/local/bin:/usr/bin:/bin";
  while (true) {
    const size_t colon = dirs.find(':');
    const std::string dir(dirs.substr(0, colon));
    const std::string candidate = (dir.empty() ? "." : dir) + "/spm_train";
    if (::access(candidate.c_str(), X_OK) == 0) return candidate;
    if (colon == std::string_view::npos) break;
    dirs.remove_prefix(colon + 1);
  }
  throw std::runtime_error(
      "tokenizer: the sentencepiece trainer `spm_train` is not on PATH: install the Debian package "
      "`sentencepiece` (scripts/setup.sh does), or point ULTRAMEM_SPM_TRAIN at it");
}

std::string run_spm_train(const std::vector<std::string>& sentences, const std::vector<std::string>& flags) {
  const std::string exe = find_spm_train();
  std::string tmpl = (fs::temp_directory_path() / "ultramem_spm_XXXXXX").string();
  if (!::mkdtemp(tmpl.data())) throw std::runtime_error("tokenizer: cannot create a temporary directory: " + std::string(std::strerror(errno)));
  ScopedDir dir{tmpl};

  std::string text;
  size_t total = 0;
  for (const auto& s : sentences) total += s.size() + 1;
  text.reserve(total);
  for (const auto& s : sentences) {
    if (s.find('\n') != std::string::npos) throw std::invalid_argument("tokenizer: a training sentence contains '\\n'");
    text += s;
    text += '\n';
  }
  io::write_file_atomically((dir.path / "sentences.txt").string(), {text});

  std::vector<std::string> args = {exe, "--input=sentences.txt", "--model_prefix=model"};
  args.insert(args.end(), flags.begin(), flags.end());
  std::vector<char*> argv;
  for (auto& a : args) argv.push_back(a.data());
  argv.push_back(nullptr);

  const std::string log_path = (dir.path / "train.log").string();
  posix_spawn_file_actions_t actions;
  posix_spawn_file_actions_init(&actions);
  posix_spawn_file_actions_addchdir_np(&actions, dir.path.c_str());
  posix_spawn_file_actions_addopen(&actions, STDIN_FILENO, "/dev/null", O_RDONLY, 0);
  posix_spawn_file_actions_addopen(&actions, STDOUT_FILENO, log_path.c_str(), O_WRONLY | O_CREAT | O_TRUNC, 0644);
  posix_spawn_file_actions_adddup2(&actions, STDOUT_FILENO, STDERR_FILENO);
  pid_t pid = 0;
  const int rc = ::posix_spawn(&pid, exe.c_str(), &actions, nullptr, argv.data(), environ);
  posix_spawn_file_actions_destroy(&actions);
  if (rc != 0) throw std::runtime_error("tokenizer: cannot start " + exe + ": " + std::strerror(rc));
  int status = 0;
  while (::waitpid(pid, &status, 0) < 0) {
    if (errno != EINTR) throw std::runtime_error("tokenizer: waiting for " + exe + " failed: " + std::strerror(errno));
  }
  const bool ok = WIFEXITED(status) && WEXITSTATUS(status) == 0;
  if (!ok) {
    std::string log;
    try {
      log = io::read_file(log_path);
    } catch (const std::exception&) {
    }
    const std::string how = WIFEXITED(status) ? "exited with status " + std::to_string(WEXITSTATUS(status))
                                              : "was killed by signal " + std::to_string(WTERMSIG(status));
    throw std::runtime_error("tokenizer: sentencepiece training failed: " + exe + " " + how + "; its last output:" +
                             last_lines(log, 6));
  }
  return io::read_file((dir.path / "model.model").string());
}

}  // namespace ultramem::data
