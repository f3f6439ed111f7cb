#include "ultramem/io/atomic_file.h"

#include <dirent.h>
#include <fcntl.h>
#include <signal.h>
#include <sys/stat.h>
#include <unistd.h>

#include <cerrno>
#include <cstdio>
#include <cstring>
#include <stdexcept>
#include <string>

namespace ultramem::io {
namespace {

std::string errno_str() { return std::strerror(errno); }

std::string dir_of(const std::string& path) {
  const auto slash = path.find_last_of('/');
  if (slash == std::string::npos) return ".";
  if (slash == 0) return "/";
  return path.substr(0, slash);
}

}  // namespace

std::string temporary_path(const std::string& path) { return path + ".tmp." + std::to_string(::getpid()); }

std::vector<std::string> stale_temporaries(const std::string& path) {
  const std::string dir = dir_of(path);
  const auto slash = path.find_last_of('/');
  const std::string prefix = (slash == std::string::npos ? path : path.substr(slash + 1)) + ".tmp.";
  std::vector<std::string> out;
  DIR* d = ::opendir(dir.c_str());
  if (!d) return out;
  while (const dirent* e = ::readdir(d)) {
    const std::string name = e->d_name;
    if (name.size() <= prefix.size() || name.compare(0, prefix.size(), prefix) != 0) continue;
    const std::string digits = name.substr(prefix.size());
    if (digits.size() > 9 || digits.find_first_not_of("0123456789") != std::string::npos) continue;
    const pid_t pid = static_cast<pid_t>(std::stol(digits));
    if (pid <= 0 || pid == ::getpid()) continue;
    if (::kill(pid, 0) == -1 && errno == ESRCH) out.push_back(dir + "/" + name);
  }
  ::closedir(d);
  return out;
}

void write_file_atomically(const std::string& path, const std::vector<std::string_view>& parts) {
  // A kill during a write leaves a full-size temporary behind: the next write of the file removes it.
  for (const auto& stale : stale_temporaries(path)) ::unlink(stale.c_str());
  const std::string tmp = temporary_path(path);
  // The error is the failing call's errno (read before fclose, which may set its own); the partial
  // temporary is removed, so a full disk leaves the old file and nothing else.
  auto fail = [&](const std::string& what, const std::string& err) {
    std::remove(tmp.c_str());
    throw std::runtime_error(path + ": " + what + ": " + err);
  };
  std::FILE* f = std::fopen(tmp.c_str(), "wb");
  if (!f) throw std::runtime_error(path + ": cannot create temporary file " + tmp + ": " + errno_str());
  for (const auto& p : parts) {
    if (!p.empty() && std::fwrite(p.data(), 1, p.size(), f) != p.size()) {
      const std::string err = errno_str();
      std::fclose(f);
      fail("write to " + tmp + " failed", err);
    }
  }
  if (std::fflush(f) != 0 || ::fsync(::fileno(f)) != 0) {
    const std::string err = errno_str();
    std::fclose(f);
    fail("flushing " + tmp + " failed", err);
  }
  if (std::fclose(f) != 0) fail("closing " + tmp + " failed", errno_str());
  if (std::rename(tmp.c_str(), path.c_str()) != 0) fail("renaming " + tmp + " failed", errno_str());
  const int dfd = ::open(dir_of(path).c_str(), O_RDONLY | O_DIRECTORY);
  if (dfd >= 0) {  // best effort: the data itself is already durable
    ::fsync(dfd);
    ::close(dfd);
  }
}

std::string read_file(const std::string& path) {
  std::FILE* f = std::fopen(path.c_str(), "rb");
  if (!f) throw std::runtime_error(path + ": cannot open: " + errno_str());
  std::string out;
  char buf[1 << 16];
  size_t n;
  while ((n = std::fread(buf, 1, sizeof buf, f)) > 0) out.append(buf, n);
  const bool err = std::ferror(f) != 0;
  std::fclose(f);
  if (err) throw std::runtime_error(path + ": read error");
  return out;
}

}  // namespace ultramem::io
