#include "ultramem/dist/process_group.h"

#include <torch/csrc/distributed/c10d/ProcessGroupGloo.hpp>
#include <torch/csrc/distributed/c10d/TCPStore.hpp>
#include <torch/torch.h>

#include <chrono>
#include <cstdio>
#include <numeric>
#include <stdexcept>

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
  const std::string who = "distributed: rank " + std::to_string(cfg.rank) + " of " + std::to_string(cfg.world_size);
  const std::string where = cfg.master_addr + ":" + std::to_string(cfg.master_port);
  auto impl = std::make_unique<Impl>();
  try {
    c10d::TCPStoreOptions so;
    so.port = static_cast<uint16_t>(cfg.master_port);
    so.isServer = cfg.rank == 0;
    so.numWorkers = static_cast<size_t>(cfg.world_size);
    so.waitWorkers = true;
    so.timeout = to_ms(cfg.timeout_seconds);
    impl->store = c10::make_intrusive<c10d::TCPStore>(cfg.master_addr, so);
  } catch (const std::exception& e) {
    throw std::runtime_error(who + ": rendezvous at " + where + " failed within " + seconds_str(cfg.timeout_seconds) +
                             " s (--dist-timeout): not every rank arrived, or the address/port is wrong or taken: " +
                             e.what());
  }
  try {
    auto opts = c10d::ProcessGroupGloo::Options::create(to_ms(cfg.timeout_seconds));
    if (!cfg.interface.empty()) {
      opts->devices.push_back(c10d::ProcessGroupGloo::createDeviceForInterface(cfg.interface));
    } else if (is_loopback(cfg.master_addr)) {
      opts->devices.push_back(c10d::ProcessGroupGloo::createDeviceForHostname("127.0.0.1"));
    } else {
      opts->devices.push_back(c10d::ProcessGroupGloo::createDefaultDevice());
    }
    impl->pg = c10::make_intrusive<c10d::ProcessGroupGloo>(impl->store, static_cast<int>(cfg.rank),
                                                           static_cast<int>(cfg.world_size), opts);
  } catch (const std::exception& e) {
    throw std::runtime_error(who + ": connecting the Gloo process group (store " + where + ") failed within " +
                             seconds_str(cfg.timeout_seconds) + " s (--dist-timeout): " + e.what());
  }
  return std::shared_ptr<Group>(new Group(std::move(impl), cfg.rank, cfg.world_size, cfg.timeout_seconds));
}

void Group::fail(const std::string& op, const std::string& what, const std::exception& e) const {
  throw std::runtime_error("distributed: " + describe() + ": " + op + " (" + what +
                           ") failed: another rank died, hung or left (timeout " + seconds_str(timeout_s_) +
                           " s, --dist-timeout). Gloo: " + e.what());
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
