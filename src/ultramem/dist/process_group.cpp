#include "ultramem/dist/process_group.h"

#include <torch/csrc/distributed/c10d/ProcessGroupGloo.hpp>
#include <torch/csrc/distributed/c10d/TCPStore.hpp>
#include <torch/torch.h>

#include <chrono>
#include <cstdio>
#include <numeric>
#include <stdexcept>
#include <thread>

#include "ultramem/io/error_message.h"

namespace ultramem::dist {
namespace {

std::chrono::milliseconds to_ms(double seconds) {
  return std::chrono::milliseconds(static_cast<int64_t>(seconds * 1000.0 + 0.5));
}

bool is_loopback(const std::string& host) {
  return host == "localhost" || host.rfind("127.", 0) == 0 || host == "::1";
}

std::string seconds_str(double s) {
  char buf[32];
  std::snprintf(buf, sizeof buf, "%g", s);
  return buf;
}

int64_t nbytes(const at::Tensor& t) { return t.numel() * static_cast<int64_t>(t.element_size()); }

void check_cpu_dense(const at::Tensor& t, const char* op) {
  if (!t.defined() || t.is_sparse() || !t.device().is_cpu())
    throw std::invalid_argument(std::string("Group::") + op + ": tensors must be defined, dense and on the CPU");
}

// Text values in the rendezvous store (which holds bytes).
void set_text(c10d::Store& store, const std::string& key, const std::string& value) {
  store.set(key, std::vector<uint8_t>(value.begin(), value.end()));
}
std::string get_text(c10d::Store& store, const std::string& key) {  // waits for the key (store timeout)
  const auto v = store.get(key);
  return std::string(v.begin(), v.end());
}

}  // namespace

struct Group::Impl {
  c10::intrusive_ptr<c10d::Store> store;           // rank 0 hosts it
  c10::intrusive_ptr<c10d::ProcessGroupGloo> pg;   // the collectives
};

Group::Group(std::unique_ptr<Impl> impl, int64_t rank, int64_t size, double timeout_s)
    : impl_(std::move(impl)), rank_(rank), size_(size), timeout_s_(timeout_s) {}

Group::~Group() = default;

std::string Group::describe() const { return "rank " + std::to_string(rank_) + " of " + std::to_string(size_); }

std::shared_ptr<Group> Group::join(const RendezvousConfig& cfg) {
  cfg.validate();
  using Clock = std::chrono::steady_clock;
  const auto deadline = Clock::now() + to_ms(cfg.timeout_seconds);
  const std::string who = "distributed: rank " + std::to_string(cfg.rank) + " of " + std::to_string(cfg.world_size);
  const std::string where = cfg.master_addr + ":" + std::to_string(cfg.master_port);
  const std::string within = " within " + seconds_str(cfg.timeout_seconds) + " s (--dist-timeout)";
  auto impl = std::make_unique<Impl>();
  try {
    c10d::TCPStoreOptions so;
    so.port = static_cast<uint16_t>(cfg.master_port);
    so.isServer = cfg.rank == 0;
    so.numWorkers = static_cast<size_t>(cfg.world_size);
    so.waitWorkers = false;  // the arrival check below counts them, and compares the world sizes
    so.timeout = to_ms(cfg.timeout_seconds);
    impl->store = c10::make_intrusive<c10d::TCPStore>(cfg.master_addr, so);
  } catch (const std::exception& e) {
    throw std::runtime_error(who + ": rendezvous at " + where + " failed" + within +
                             ": rank 0 is not listening there, or the address/port is wrong or taken: " +
                             io::error_message(e));
  }

  // Arrival: every rank checks in under its own key after comparing its world size with rank 0's; a
  // mismatch, or two processes with one rank, is reported to all through the store.
  auto& store = *impl->store;
  const std::string mismatch_key = "ultramem/rendezvous_error";
  const auto fail_all = [&](const std::string& msg) {
    try {
      set_text(store, mismatch_key, msg);
    } catch (const std::exception&) {
    }
    throw std::runtime_error(who + ": " + msg);
  };
  const auto reported = [&]() -> std::string {
    return store.check({mismatch_key}) ? get_text(store, mismatch_key) : std::string();
  };
  try {
    // Another rank checks in only once its world size matches rank 0's: a rank that does not match never
    // counts as arrived, so rank 0 keeps polling until that rank's report (it could go on to Gloo's
    // connection with the mismatching rank counted, and wait out the timeout there).
    if (cfg.rank != 0) {
      const std::string theirs = get_text(store, "ultramem/world_size");
      if (theirs != std::to_string(cfg.world_size))
        fail_all("the world sizes differ: rank " + std::to_string(cfg.rank) + " was started with " +
                 std::to_string(cfg.world_size) + " ranks, rank 0 with " + theirs +
                 " (--world-size / WORLD_SIZE must be the same on every rank)");
    }
    if (store.add("ultramem/rank/" + std::to_string(cfg.rank), 1) > 1)
      fail_all("two processes were started as rank " + std::to_string(cfg.rank));
    if (cfg.rank == 0) {
      set_text(store, "ultramem/world_size", std::to_string(cfg.world_size));
      std::vector<std::string> keys;
      for (int64_t r = 1; r < cfg.world_size; ++r) keys.push_back("ultramem/rank/" + std::to_string(r));
      while (!keys.empty() && !store.check(keys)) {
        if (const std::string msg = reported(); !msg.empty()) throw std::runtime_error(who + ": " + msg);
        if (Clock::now() > deadline) {
          int64_t arrived = 0;
          for (const auto& k : keys) arrived += store.check({k}) ? 1 : 0;
          throw std::runtime_error(who + ": rendezvous at " + where + ": " + std::to_string(arrived + 1) + " of " +
                                   std::to_string(cfg.world_size) + " ranks arrived" + within);
        }
        std::this_thread::sleep_for(std::chrono::milliseconds(10));
      }
    }
    if (const std::string msg = reported(); !msg.empty()) throw std::runtime_error(who + ": " + msg);
  } catch (const std::runtime_error&) {
    throw;
  } catch (const std::exception& e) {
    throw std::runtime_error(who + ": rendezvous at " + where + " failed" + within + ": " + io::error_message(e));
  }

  // Gloo's connection waits on the store for every rank's address: give the store what is left of the
  // timeout, so that joining takes about --dist-timeout in all (it took twice that when the arrival and
  // the connection each had the whole timeout).
  try {
    const auto left = std::max(std::chrono::milliseconds(50), std::chrono::duration_cast<std::chrono::milliseconds>(
                                                                  deadline - Clock::now()));
    store.setTimeout(left);
    auto opts = c10d::ProcessGroupGloo::Options::create(to_ms(cfg.timeout_seconds));  // collectives' timeout
    if (!cfg.interface.empty()) {
      opts->devices.push_back(c10d::ProcessGroupGloo::createDeviceForInterface(cfg.interface));
    } else if (is_loopback(cfg.master_addr)) {
      opts->devices.push_back(c10d::ProcessGroupGloo::createDeviceForHostname("127.0.0.1"));
    } else {
      opts->devices.push_back(c10d::ProcessGroupGloo::createDefaultDevice());
    }
    impl->pg = c10::make_intrusive<c10d::ProcessGroupGloo>(impl->store, static_cast<int>(cfg.rank),
                                                           static_cast<int>(cfg.world_size), opts);
    store.setTimeout(to_ms(cfg.timeout_seconds));
  } catch (const std::exception& e) {
    throw std::runtime_error(who + ": connecting the Gloo process group (store " + where + ") failed" + within + ": " +
                             io::error_message(e));
  }
  return std::shared_ptr<Group>(new Group(std::move(impl), cfg.rank, cfg.world_size, cfg.timeout_seconds));
}

std::vector<std::string> Group::exchange(const std::string& topic, const std::string& mine) {
  const std::string prefix = "ultramem/exchange/" + topic + "/";
  std::vector<std::string> out(static_cast<size_t>(size_));
  try {
    set_text(*impl_->store, prefix + std::to_string(rank_), mine);
    for (int64_t r = 0; r < size_; ++r) out[size_t(r)] = get_text(*impl_->store, prefix + std::to_string(r));
  } catch (const std::exception& e) {
    fail("exchange", topic, e);
  }
  return out;
}

void Group::fail(const std::string& op, const std::string& what, const std::exception& e) const {
  throw std::runtime_error("distributed: " + describe() + ": " + op + " (" + what +
                           ") failed: " + kPeerFailedMessage + " (timeout " + seconds_str(timeout_s_) +
                           " s, --dist-timeout). Gloo: " + io::error_message(e));
}

void Group::count(const std::string& what, int64_t bytes) { sent_[what] += bytes; }

std::map<std::string, int64_t> Group::bytes_sent() const { return sent_; }
void Group::reset_bytes_sent() { sent_.clear(); }

void Group::all_reduce_sum(std::vector<torch::Tensor>& tensors, const std::string& what) {
  if (tensors.empty()) return;
  std::vector<c10::intrusive_ptr<c10d::Work>> works;
  int64_t bytes = 0;
  try {
    for (auto& t : tensors) {
      check_cpu_dense(t, "all_reduce_sum");
      if (!t.is_contiguous()) throw std::invalid_argument("Group::all_reduce_sum: tensors must be contiguous");
      std::vector<at::Tensor> one = {t};
      works.push_back(impl_->pg->allreduce(one));
      bytes += nbytes(t);
    }
    for (auto& w : works) w->wait();
  } catch (const std::invalid_argument&) {
    throw;
  } catch (const std::exception& e) {
    fail("all_reduce", what, e);
  }
  count(what, bytes * 2 * (size_ - 1) / size_);
}

torch::Tensor Group::all_gather(const torch::Tensor& local, const std::string& what) {
  check_cpu_dense(local, "all_gather");
  const at::Tensor in = local.contiguous();
  auto sizes = in.sizes().vec();
  if (sizes.empty()) throw std::invalid_argument("Group::all_gather: the tensor needs at least one dimension");
  const int64_t R = sizes[0];
  sizes[0] = R * size_;
  at::Tensor out = at::empty(sizes, in.options());
  std::vector<std::vector<at::Tensor>> outs(1);
  for (int64_t j = 0; j < size_; ++j) outs[0].push_back(out.narrow(0, j * R, R));
  std::vector<at::Tensor> ins = {in};
  try {
    impl_->pg->allgather(outs, ins)->wait();
  } catch (const std::exception& e) {
    fail("all_gather", what, e);
  }
  count(what, nbytes(in) * (size_ - 1));
  return out;
}

torch::Tensor Group::all_to_all(const torch::Tensor& input, const std::vector<int64_t>& send_rows,
                                const std::vector<int64_t>& recv_rows, const std::string& what) {
  check_cpu_dense(input, "all_to_all");
  if (static_cast<int64_t>(send_rows.size()) != size_ || static_cast<int64_t>(recv_rows.size()) != size_)
    throw std::invalid_argument("Group::all_to_all: send_rows and recv_rows need one entry per rank");
  at::Tensor in = input.contiguous();
  const int64_t total_send = std::accumulate(send_rows.begin(), send_rows.end(), int64_t(0));
  const int64_t total_recv = std::accumulate(recv_rows.begin(), recv_rows.end(), int64_t(0));
  if (in.dim() < 1 || in.size(0) != total_send)
    throw std::invalid_argument("Group::all_to_all: input has " + std::to_string(in.dim() ? in.size(0) : 0) +
                                " rows, send_rows sum to " + std::to_string(total_send));
  auto sizes = in.sizes().vec();
  sizes[0] = total_recv;
  at::Tensor out = at::empty(sizes, in.options());
  const int64_t row_bytes = in.size(0) > 0 ? nbytes(in) / in.size(0) : 0;
  if (size_ == 1) {
    out.copy_(in);
    return out;
  }
  std::vector<int64_t> send = send_rows, recv = recv_rows;
  try {
    impl_->pg->alltoall_base(out, in, recv, send)->wait();
  } catch (const std::exception& e) {
    fail("all_to_all", what, e);
  }
  count(what, (total_send - send_rows[static_cast<size_t>(rank_)]) * row_bytes);
  return out;
}

void Group::broadcast(torch::Tensor& t, int64_t root, const std::string& what) {
  check_cpu_dense(t, "broadcast");
  if (!t.is_contiguous()) throw std::invalid_argument("Group::broadcast: the tensor must be contiguous");
  std::vector<at::Tensor> one = {t};
  c10d::BroadcastOptions o;
  o.rootRank = static_cast<int>(root);
  try {
    impl_->pg->broadcast(one, o)->wait();
  } catch (const std::exception& e) {
    fail("broadcast", what, e);
  }
  if (rank_ == root) count(what, nbytes(t) * (size_ - 1));
}

void Group::barrier(const std::string& what) {
  try {
    impl_->pg->barrier()->wait();
  } catch (const std::exception& e) {
    fail("barrier", what, e);
  }
}

}  // namespace ultramem::dist
