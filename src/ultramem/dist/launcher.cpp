#include "ultramem/dist/launcher.h"

#include "ultramem/dist/rendezvous.h"

#include <fcntl.h>
#include <netinet/in.h>
#include <poll.h>
#include <signal.h>
#include <sys/prctl.h>
#include <sys/socket.h>
#include <sys/wait.h>
#include <unistd.h>

#include <atomic>
#include <cerrno>
#include <chrono>
#include <cstring>
#include <filesystem>
#include <fstream>
#include <iostream>
#include <stdexcept>

extern char** environ;

namespace ultramem::dist {
namespace {

using Clock = std::chrono::steady_clock;

std::atomic<int> g_forward_signal{0};
extern "C" void remember_signal(int sig) { g_forward_signal.store(sig); }

// environ with `overrides` set (replacing existing entries).
std::vector<std::string> make_env(const std::map<std::string, std::string>& overrides) {
  std::vector<std::string> env;
  for (char** e = environ; e && *e; ++e) {
    const std::string kv = *e;
    const auto eq = kv.find('=');
    if (eq != std::string::npos && overrides.count(kv.substr(0, eq))) continue;
    env.push_back(kv);
  }
  for (const auto& [k, v] : overrides) env.push_back(k + "=" + v);
  return env;
}

std::vector<char*> c_strings(std::vector<std::string>& v) {
  std::vector<char*> out;
  for (auto& s : v) out.push_back(s.data());
  out.push_back(nullptr);
  return out;
}

}  // namespace

std::string self_executable() {
  std::error_code ec;
  const auto p = std::filesystem::read_symlink("/proc/self/exe", ec);
  if (ec) throw std::runtime_error("cannot resolve /proc/self/exe: " + ec.message());
  return p.string();
}

int64_t pick_free_port() {
  const int fd = ::socket(AF_INET, SOCK_STREAM, 0);
  if (fd < 0) throw std::runtime_error(std::string("pick_free_port: socket: ") + std::strerror(errno));
  sockaddr_in a{};
  a.sin_family = AF_INET;
  a.sin_addr.s_addr = htonl(INADDR_ANY);
  a.sin_port = 0;
  socklen_t len = sizeof a;
  if (::bind(fd, reinterpret_cast<sockaddr*>(&a), sizeof a) != 0 ||
      ::getsockname(fd, reinterpret_cast<sockaddr*>(&a), &len) != 0) {
    const std::string err = std::strerror(errno);
    ::close(fd);
    throw std::runtime_error("pick_free_port: " + err);
  }
  ::close(fd);
  return ntohs(a.sin_port);
}

int exit_code_of(int status) {
  if (WIFEXITED(status)) return WEXITSTATUS(status);
  if (WIFSIGNALED(status)) return 128 + WTERMSIG(status);
  return 1;
}

void LaunchOptions::validate() const {
  if (nproc < 1) throw std::invalid_argument("launch: --nproc must be >= 1, got " + std::to_string(nproc));
  if (nnodes < 1) throw std::invalid_argument("launch: --nnodes must be >= 1, got " + std::to_string(nnodes));
  if (node_rank < 0 || node_rank >= nnodes)
    throw std::invalid_argument("launch: --node-rank must be in [0, " + std::to_string(nnodes) + "), got " +
                                std::to_string(node_rank));
  if (nnodes > 1 && master_port <= 0)
    throw std::invalid_argument("launch: with several machines, give every one the same --master-port");
  if (master_port < 0 || master_port > 65535)
    throw std::invalid_argument("launch: --master-port must be in [1, 65535], got " + std::to_string(master_port));
  if (!(grace_seconds >= 0)) throw std::invalid_argument("launch: grace period must be >= 0");
}

Launcher::Launcher(LaunchOptions options) : opt_(std::move(options)) {
  opt_.validate();
  port_ = opt_.master_port > 0 ? opt_.master_port : pick_free_port();
  if (!opt_.on_line) {
    opt_.on_line = [](int64_t rank, bool is_err, const std::string& line) {
      (is_err ? std::cerr : std::cout) << "[rank " << rank << "] " << line << std::endl;
    };
  }
}

Launcher::~Launcher() {
  for (pid_t p : pids_)
    if (p > 0) ::kill(p, SIGKILL);
  for (pid_t p : pids_)
    if (p > 0) ::waitpid(p, nullptr, 0);
  for (int fd : out_fds_)
    if (fd >= 0) ::close(fd);
  for (int fd : err_fds_)
    if (fd >= 0) ::close(fd);
}

void Launcher::start(const std::string& exe, const std::vector<std::string>& args) {
  if (!pids_.empty()) throw std::logic_error("Launcher::start called twice");
  const int64_t world = opt_.nproc * opt_.nnodes;
  std::vector<std::string> argv_s = args;
  if (argv_s.empty()) argv_s.push_back(exe);
  auto argv = c_strings(argv_s);
  for (int64_t local = 0; local < opt_.nproc; ++local) {
    std::map<std::string, std::string> env = opt_.extra_env;
    env["RANK"] = std::to_string(opt_.node_rank * opt_.nproc + local);
    env["WORLD_SIZE"] = std::to_string(world);
    env["LOCAL_RANK"] = std::to_string(local);
    env["LOCAL_WORLD_SIZE"] = std::to_string(opt_.nproc);
    env["MASTER_ADDR"] = opt_.master_addr;
    env["MASTER_PORT"] = std::to_string(port_);
    env["ULTRAMEM_LAUNCHED"] = "1";
    auto env_s = make_env(env);
    auto envp = c_strings(env_s);
    int out[2], err[2];
    if (::pipe2(out, O_CLOEXEC) != 0) throw std::runtime_error(std::string("launch: pipe: ") + std::strerror(errno));
    if (::pipe2(err, O_CLOEXEC) != 0) {
      ::close(out[0]);
      ::close(out[1]);
      throw std::runtime_error(std::string("launch: pipe: ") + std::strerror(errno));
    }
    const pid_t launcher = ::getpid();
    const pid_t pid = ::fork();
    if (pid < 0) {
      const std::string e = std::strerror(errno);
      for (int fd : {out[0], out[1], err[0], err[1]}) ::close(fd);
      throw std::runtime_error("launch: fork: " + e);
    }
    if (pid == 0) {
      // Child: only async-signal-safe calls until exec.
      ::prctl(PR_SET_PDEATHSIG, SIGTERM);
      if (::getppid() != launcher) ::_exit(127);
      ::dup2(out[1], STDOUT_FILENO);
      ::dup2(err[1], STDERR_FILENO);
      ::execve(exe.c_str(), argv.data(), envp.data());
      const char msg[] = "launch: exec failed\n";
      ssize_t ignored = ::write(STDERR_FILENO, msg, sizeof msg - 1);
      (void)ignored;
      ::_exit(127);
    }
    ::close(out[1]);
    ::close(err[1]);
    pids_.push_back(pid);
    out_fds_.push_back(out[0]);
    err_fds_.push_back(err[0]);
  }
}

namespace {

// Whether the process is stopped (state T or t in /proc/<pid>/stat).
bool is_stopped(pid_t pid) {
  std::ifstream in("/proc/" + std::to_string(pid) + "/stat");
  std::string stat;
  std::getline(in, stat);
  const size_t paren = stat.rfind(')');  // the command name may hold spaces and parentheses
  return paren != std::string::npos && paren + 2 < stat.size() && (stat[paren + 2] == 'T' || stat[paren + 2] == 't');
}

}  // namespace

LaunchResult Launcher::wait() {
  const int64_t n = static_cast<int64_t>(pids_.size());
  LaunchResult r;
  r.exit_codes.assign(static_cast<size_t>(n), -1);
  std::vector<std::string> partial(static_cast<size_t>(2 * n));
  struct sigaction sa {}, old_int{}, old_term{};
  sa.sa_handler = remember_signal;
  sigemptyset(&sa.sa_mask);
  ::sigaction(SIGINT, &sa, &old_int);
  ::sigaction(SIGTERM, &sa, &old_term);
  g_forward_signal.store(0);

  int64_t running = n;
  bool failed = false, termed = false, killed = false;
  Clock::time_point failed_at;
  // Ranks whose error says that a peer failed (dist::Group's message): when they end in the same round
  // as another failing rank, the other one failed first.
  std::vector<bool> blames_peer(static_cast<size_t>(n), false);
  auto emit = [&](size_t slot, const char* data, size_t len) {
    std::string& buf = partial[slot];
    buf.append(data, len);
    size_t pos;
    while ((pos = buf.find('\n')) != std::string::npos) {
      const std::string line = buf.substr(0, pos);
      if (slot % 2 == 1 && line.find(kPeerFailedMessage) != std::string::npos) blames_peer[slot / 2] = true;
      opt_.on_line(opt_.node_rank * opt_.nproc + static_cast<int64_t>(slot / 2), slot % 2 == 1, line);
      buf.erase(0, pos + 1);
    }
  };
  auto signal_all = [&](int sig) {
    for (int64_t i = 0; i < n; ++i)
      if (r.exit_codes[static_cast<size_t>(i)] < 0) ::kill(pids_[static_cast<size_t>(i)], sig);
  };
  for (;;) {
    std::vector<pollfd> fds;
    std::vector<size_t> slots;
    for (int64_t i = 0; i < n; ++i) {
      for (int e = 0; e < 2; ++e) {
        int fd = e ? err_fds_[static_cast<size_t>(i)] : out_fds_[static_cast<size_t>(i)];
        if (fd < 0) continue;
        fds.push_back({fd, POLLIN, 0});
        slots.push_back(static_cast<size_t>(2 * i + e));
      }
    }
    if (fds.empty() && running == 0) break;
    if (!fds.empty()) {
      ::poll(fds.data(), fds.size(), 100);
      for (size_t k = 0; k < fds.size(); ++k) {
        if (!(fds[k].revents & (POLLIN | POLLHUP | POLLERR))) continue;
        char buf[65536];
        const ssize_t got = ::read(fds[k].fd, buf, sizeof buf);
        if (got > 0) {
          emit(slots[k], buf, static_cast<size_t>(got));
        } else if (got == 0 || (errno != EINTR && errno != EAGAIN)) {
          const size_t slot = slots[k];
          if (!partial[slot].empty()) emit(slot, "\n", 1);
          ::close(fds[k].fd);
          (slot % 2 ? err_fds_ : out_fds_)[slot / 2] = -1;
        }
      }
    } else {
      ::usleep(100 * 1000);
    }
    // Ranks that ended since the last round. Of the failures first seen in one round (a loaded machine
    // can let a peer's reaction end before the launcher looks), the one that does not blame a peer
    // failed first; among equals, the lowest rank.
    int64_t first_failure = -1;
    for (int64_t i = 0; i < n; ++i) {
      if (r.exit_codes[static_cast<size_t>(i)] >= 0) continue;
      int status = 0;
      if (::waitpid(pids_[static_cast<size_t>(i)], &status, WNOHANG) != pids_[static_cast<size_t>(i)]) continue;
      const int code = exit_code_of(status);
      r.exit_codes[static_cast<size_t>(i)] = code;
      pids_[static_cast<size_t>(i)] = -1;
      --running;
      if (code != 0 && (first_failure < 0 || (blames_peer[static_cast<size_t>(first_failure)] &&
                                              !blames_peer[static_cast<size_t>(i)])))
        first_failure = i;
    }
    if (first_failure >= 0 && !failed) {
      failed = true;
      failed_at = Clock::now();
      r.exit_code = r.exit_codes[static_cast<size_t>(first_failure)];
      r.failed_rank = opt_.node_rank * opt_.nproc + first_failure;
      if (running > 0)
        std::cerr << "ultramem launch: rank " << r.failed_rank << " failed (exit code " << r.exit_code
                  << "); stopping the other ranks" << std::endl;
      // A rank that noticed a peer's silence: name a stopped peer (SIGSTOP, a debugger), the likely cause.
      if (blames_peer[static_cast<size_t>(first_failure)])
        for (int64_t i = 0; i < n; ++i)
          if (r.exit_codes[static_cast<size_t>(i)] < 0 && is_stopped(pids_[static_cast<size_t>(i)]))
            std::cerr << "ultramem launch: rank " << opt_.node_rank * opt_.nproc + i
                      << " is stopped (SIGSTOP or a debugger): the other ranks timed out waiting for it" << std::endl;
    }
    if (const int sig = g_forward_signal.exchange(0)) signal_all(sig);
    if (failed && running > 0) {
      const double since = std::chrono::duration<double>(Clock::now() - failed_at).count();
      if (!termed && since >= opt_.grace_seconds) {
        signal_all(SIGTERM);
        termed = true;
      }
      if (!killed && since >= opt_.grace_seconds + 5) {
        signal_all(SIGKILL);
        killed = true;
      }
    }
  }
  ::sigaction(SIGINT, &old_int, nullptr);
  ::sigaction(SIGTERM, &old_term, nullptr);
  pids_.assign(pids_.size(), -1);
  return r;
}

}  // namespace ultramem::dist
