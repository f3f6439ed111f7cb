#include "ultramem/dist/rendezvous.h"

#include <cmath>
#include <cstdlib>
#include <stdexcept>

namespace ultramem::dist {
namespace {

const char* env(const char* name) {
  const char* v = std::getenv(name);
  return v && *v ? v : nullptr;
}

int64_t env_int(const char* name, int64_t fallback) {
  const char* v = env(name);
  if (!v) return fallback;
  char* end = nullptr;
  const long long x = std::strtoll(v, &end, 10);
  if (end == v || *end != '\0')
    throw std::invalid_argument(std::string("environment variable ") + name + "=\"" + v + "\" is not an integer");
  return x;
}

double env_double(const char* name, double fallback) {
  const char* v = env(name);
  if (!v) return fallback;
  char* end = nullptr;
  const double x = std::strtod(v, &end);
  if (end == v || *end != '\0')
    throw std::invalid_argument(std::string("environment variable ") + name + "=\"" + v + "\" is not a number");
  return x;
}

}  // namespace

void RendezvousConfig::validate() const {
  if (world_size < 1)
    throw std::invalid_argument("distributed: world size must be >= 1, got " + std::to_string(world_size));
  if (rank < 0 || rank >= world_size)
    throw std::invalid_argument("distributed: rank must be in [0, " + std::to_string(world_size) + "), got " +
                                std::to_string(rank));
  if (local_rank < 0)
    throw std::invalid_argument("distributed: local rank must be >= 0, got " + std::to_string(local_rank));
  if (master_port < 1 || master_port > 65535)
    throw std::invalid_argument("distributed: master port must be in [1, 65535], got " + std::to_string(master_port));
  if (!(timeout_seconds > 0) || !std::isfinite(timeout_seconds))
    throw std::invalid_argument("distributed: timeout must be a positive number of seconds");
  if (master_addr.empty()) throw std::invalid_argument("distributed: master address is empty");
}

RendezvousConfig resolve_rendezvous(const RendezvousFlags& f) {
  RendezvousConfig c;
  c.master_addr = !f.master_addr.empty() ? f.master_addr : (env("MASTER_ADDR") ? env("MASTER_ADDR") : c.master_addr);
  c.master_port = f.master_port > 0 ? f.master_port : env_int("MASTER_PORT", c.master_port);
  c.world_size = f.world_size > 0 ? f.world_size : env_int("WORLD_SIZE", c.world_size);
  c.rank = f.rank >= 0 ? f.rank : env_int("RANK", c.rank);
  c.local_rank = f.local_rank >= 0 ? f.local_rank : env_int("LOCAL_RANK", c.local_rank);
  c.timeout_seconds = f.timeout_seconds > 0 ? f.timeout_seconds : env_double("ULTRAMEM_DIST_TIMEOUT", c.timeout_seconds);
  c.interface = !f.interface.empty() ? f.interface : (env("GLOO_SOCKET_IFNAME") ? env("GLOO_SOCKET_IFNAME") : "");
  c.validate();
  return c;
}

}  // namespace ultramem::dist
