// A group of processes that communicate through PyTorch c10d (ProcessGroupGloo over TCP, rendezvous
// through a c10d TCPStore). The c10d types stay inside process_group.cpp; callers see CPU tensors only.
//
// Every collective must be called by every rank of the group, in the same order, with matching
// shapes. A collective that does not complete within the group's timeout (a peer died, hung or never
// arrived) throws std::runtime_error naming this rank, the operation and the timeout.
//
// Bytes sent to other ranks are counted per traffic class (the `what` argument), as the algorithm-free
// volume each rank must put on the wire: all_gather sends the local buffer to each of the W-1 peers,
// all_to_all sends every block addressed to another rank, all_reduce counts 2 (W-1)/W of the buffer
// (a ring reduce-scatter + all-gather). The benchmark compares these counters to the spec's formulas.
#pragma once
#include <torch/types.h>

#include <cstdint>
#include <map>
#include <memory>
#include <string>
#include <vector>

#include "ultramem/dist/rendezvous.h"

namespace ultramem::dist {

class Group {
 public:
  // Joins the group described by `cfg` (rank 0 hosts the TCPStore at master_addr:master_port). Blocks
  // until all world_size ranks have arrived, or throws std::runtime_error after cfg.timeout_seconds.
  static std::shared_ptr<Group> join(const RendezvousConfig& cfg);
  ~Group();
  Group(const Group&) = delete;
  Group& operator=(const Group&) = delete;

  int64_t rank() const { return rank_; }
  int64_t size() const { return size_; }
  double timeout_seconds() const { return timeout_s_; }
  std::string describe() const;  // "rank 1 of 2"

  // Sums every tensor (dense, contiguous, CPU) element-wise over the ranks, in place. The tensors are
  // sent concurrently and waited for together.
  void all_reduce_sum(std::vector<torch::Tensor>& tensors, const std::string& what);

  // local: [R, ...] with the same shape on every rank -> [W*R, ...], rank j's rows at [j*R, (j+1)*R).
  torch::Tensor all_gather(const torch::Tensor& local, const std::string& what);

  // input: [sum(send_rows), ...], block j (send_rows[j] rows, in rank order) goes to rank j.
  // Returns [sum(recv_rows), ...] holding rank j's block for this rank at rows
  // [sum(recv_rows[:j]), ...). recv_rows[j] must equal rank j's send_rows[this rank].
  torch::Tensor all_to_all(const torch::Tensor& input, const std::vector<int64_t>& send_rows,
                           const std::vector<int64_t>& recv_rows, const std::string& what);

  // Copies rank `root`'s tensor into every rank's `t` (same shape and dtype everywhere).
  void broadcast(torch::Tensor& t, int64_t root, const std::string& what);

  void barrier(const std::string& what);

  // Every rank's `mine`, in rank order, through the rendezvous store (small values: settings, hashes).
  // Each topic may be exchanged once per group.
  std::vector<std::string> exchange(const std::string& topic, const std::string& mine);

  // Logical bytes this rank sent to other ranks, per traffic class, since the last reset.
  std::map<std::string, int64_t> bytes_sent() const;
  void reset_bytes_sent();

 private:
  struct Impl;
  Group(std::unique_ptr<Impl> impl, int64_t rank, int64_t size, double timeout_s);
  [[noreturn]] void fail(const std::string& op, const std::string& what, const std::exception& e) const;
  void count(const std::string& what, int64_t bytes);

  std::unique_ptr<Impl> impl_;
  int64_t rank_, size_;
  double timeout_s_;
  std::map<std::string, int64_t> sent_;
};

}  // namespace ultramem::dist
