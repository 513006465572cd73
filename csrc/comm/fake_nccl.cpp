// The scripted NCCL of the CPU tests; see fake_nccl.h.
#ifdef TANDEM_WITH_CUDA
#include "comm/fake_nccl.h"

#include <algorithm>
#include <atomic>
#include <map>
#include <mutex>
#include <thread>

#include "comm/nccl_work.h"

namespace tandem::comm::fake {

namespace {

struct FakeComm {
  int id = 0;
  std::atomic<bool> abort_flag{false};  // revoke / abort: its kernels exit
  std::atomic<bool> hold{false};        // its peer does not answer
  std::atomic<int> launching{0};        // group launch threads still running
  std::atomic<bool> revoked{false}, aborted{false}, destroyed{false};
  std::atomic<int> async_error{ncclSuccess};
  std::atomic<FakeComm*> waits_on{nullptr};
  Clock::time_point ready_at{};
  std::mutex mu;  // guards launchers and ready_at
  std::vector<std::thread> launchers;
  double abort_blocked_s = 0;
};

struct FakeEvent {
  FakeComm* comm = nullptr;
  std::atomic<bool> done{false};
};

struct Registry {
  std::mutex mu;
  Script script;
  std::map<int, std::unique_ptr<FakeComm>> comms;  // kept until reset: handles never dangle
  std::vector<std::unique_ptr<FakeEvent>> events;
  std::vector<std::pair<int, std::string>> calls;
  int next_id = 1;
};

Registry& registry() {
  static auto* r = new Registry();  // never freed: launch threads may outlive static destruction
  return *r;
}

FakeComm* as_fake(ncclComm_t comm) { return reinterpret_cast<FakeComm*>(comm); }
ncclComm_t as_handle(FakeComm* comm) { return reinterpret_cast<ncclComm_t>(comm); }

void log(FakeComm* c, const char* call) {
  std::lock_guard<std::mutex> lock(registry().mu);
  registry().calls.emplace_back(c ? c->id : 0, call);
}

Script script() {
  std::lock_guard<std::mutex> lock(registry().mu);
  return registry().script;
}

Clock::time_point after_us(double us) {
  return Clock::now() + std::chrono::duration_cast<Clock::duration>(std::chrono::duration<double, std::micro>(us));
}

FakeComm* make_comm() {
  auto c = std::make_unique<FakeComm>();
  FakeComm* raw = c.get();
  std::lock_guard<std::mutex> lock(registry().mu);
  raw->id = registry().next_id++;
  raw->ready_at = after_us(registry().script.ready_after_us);
  registry().comms[raw->id] = std::move(c);
  return raw;
}

void join_launchers(FakeComm* c) {
  std::vector<std::thread> done;
  {
    std::lock_guard<std::mutex> lock(c->mu);
    done.swap(c->launchers);
  }
  for (auto& t : done) t.join();
}

thread_local int g_group_depth = 0;
thread_local std::vector<FakeComm*> g_group;

// --- the NcclApi --------------------------------------------------------------------------------

ncclResult_t init_rank_config(ncclComm_t* comm, int, ncclUniqueId, int, ncclConfig_t*) {
  const Script s = script();
  if (s.init_makes_comm || s.init_result == ncclSuccess || s.init_result == ncclInProgress) {
    FakeComm* c = make_comm();
    log(c, "init");
    *comm = as_handle(c);
  } else {
    log(nullptr, "init");
  }
  return s.init_result;
}

ncclResult_t split_comm(ncclComm_t parent, int, int, ncclComm_t* newcomm, ncclConfig_t*) {
  FakeComm* p = as_fake(parent);
  log(p, "split");
  const Script s = script();
  {
    std::lock_guard<std::mutex> lock(p->mu);
    p->ready_at = after_us(s.ready_after_us);
  }
  if (s.split_error != ncclSuccess) p->async_error = s.split_error;  // the split's job failed
  *newcomm = as_handle(make_comm());
  return ncclInProgress;
}

ncclResult_t get_async_error(ncclComm_t comm, ncclResult_t* error) {
  FakeComm* c = as_fake(comm);
  if (c->async_error != ncclSuccess) {
    *error = static_cast<ncclResult_t>(c->async_error.load());
    return ncclSuccess;
  }
  bool ready;
  {
    std::lock_guard<std::mutex> lock(c->mu);
    ready = Clock::now() >= c->ready_at;
  }
  if (!ready || c->launching > 0) {
    *error = ncclInProgress;
    return ncclSuccess;
  }
  join_launchers(c);  // NCCL joins the finished group job here too
  *error = ncclSuccess;
  return ncclSuccess;
}

ncclResult_t finalize_comm(ncclComm_t comm) {
  FakeComm* c = as_fake(comm);
  log(c, "finalize");
  std::lock_guard<std::mutex> lock(c->mu);
  c->ready_at = after_us(script().ready_after_us);
  return ncclInProgress;
}

ncclResult_t destroy_comm(ncclComm_t comm) {
  FakeComm* c = as_fake(comm);
  log(c, "destroy");
  join_launchers(c);
  c->destroyed = true;
  return ncclSuccess;
}

ncclResult_t revoke_comm(ncclComm_t comm, int) {
  FakeComm* c = as_fake(comm);
  log(c, "revoke");
  if (c->revoked || c->aborted || c->destroyed) return ncclInvalidArgument;  // as NCCL 2.30.7
  c->revoked = true;
  c->abort_flag = true;
  return ncclInProgress;
}

ncclResult_t abort_comm(ncclComm_t comm) {
  FakeComm* c = as_fake(comm);
  log(c, "abort");
  c->abort_flag = true;
  // commDestroySync: the comm's streams drain; one that waits for another comm's kernel
  // (through the caller's stream) waits until that kernel ends
  const auto start = Clock::now();
  const auto limit = start + std::chrono::duration_cast<Clock::duration>(
                                 std::chrono::duration<double>(script().abort_block_limit_s));
  while (true) {
    FakeComm* other = c->waits_on;
    if (other == nullptr || !other->hold || other->abort_flag || Clock::now() > limit) break;
    std::this_thread::sleep_for(std::chrono::microseconds(200));
  }
  c->abort_blocked_s = std::chrono::duration<double>(Clock::now() - start).count();
  join_launchers(c);
  c->aborted = true;
  return ncclSuccess;
}

ncclResult_t group_start() {
  ++g_group_depth;
  return ncclSuccess;
}

ncclResult_t group_end() {
  if (--g_group_depth > 0) return ncclSuccess;
  std::vector<FakeComm*> group;
  group.swap(g_group);
  if (group.empty()) return ncclSuccess;
  const Script s = script();
  const double launch_us = s.launch_us;
  for (FakeComm* c : group) {
    log(c, "group");
    if (!s.launch_thread) {
      std::lock_guard<std::mutex> lock(c->mu);
      c->ready_at = after_us(launch_us);
      continue;
    }
    c->launching++;
    std::thread launcher([c, launch_us] {
      const auto until = after_us(launch_us);
      while (Clock::now() < until) cpu_relax();  // NCCL's host work of a launch
      c->launching--;
    });
    std::lock_guard<std::mutex> lock(c->mu);
    c->launchers.push_back(std::move(launcher));
  }
  return ncclInProgress;  // a non-blocking group: launched by its thread
}

const char* last_error(ncclComm_t) { return "fake NCCL"; }

cudaError_t event_query(cudaEvent_t event) {
  auto* e = reinterpret_cast<FakeEvent*>(event);
  if (e->done || e->comm->abort_flag || !e->comm->hold) return cudaSuccess;
  return cudaErrorNotReady;
}

// The data call of a fake operation: joins the current group.
void collective(ncclComm_t comm) {
  if (g_group_depth == 0) return;
  for (FakeComm* c : g_group)
    if (c == as_fake(comm)) return;
  g_group.push_back(as_fake(comm));
}

std::shared_ptr<CudaEvent> new_event(ncclComm_t comm) {
  auto e = std::make_unique<FakeEvent>();
  e->comm = as_fake(comm);
  cudaEvent_t handle = reinterpret_cast<cudaEvent_t>(e.get());
  std::lock_guard<std::mutex> lock(registry().mu);
  registry().events.push_back(std::move(e));
  return CudaEvent::borrow(handle);
}

}  // namespace

const NcclApi& api() {
  static const NcclApi a{init_rank_config, split_comm,  get_async_error, finalize_comm, destroy_comm, abort_comm,
                         revoke_comm,      group_start, group_end,       last_error,    event_query};
  return a;
}

void reset(const Script& s) {
  std::vector<FakeComm*> all;
  {
    std::lock_guard<std::mutex> lock(registry().mu);
    for (auto& [id, c] : registry().comms) all.push_back(c.get());
  }
  for (FakeComm* c : all) join_launchers(c);
  std::lock_guard<std::mutex> lock(registry().mu);
  // comms and events stay allocated (a communicator of an earlier test may still hold one)
  registry().script = s;
  registry().calls.clear();
}

std::vector<std::pair<int, std::string>> calls() {
  std::lock_guard<std::mutex> lock(registry().mu);
  return registry().calls;
}

int id_of(ncclComm_t comm) { return comm ? as_fake(comm)->id : 0; }
void set_hold(ncclComm_t comm, bool hold) { as_fake(comm)->hold = hold; }
void set_waits_on(ncclComm_t comm, ncclComm_t other) { as_fake(comm)->waits_on = as_fake(other); }
void set_async_error(ncclComm_t comm, ncclResult_t error) { as_fake(comm)->async_error = error; }
double abort_blocked_s(ncclComm_t comm) { return as_fake(comm)->abort_blocked_s; }

// --- FakeCommunicator -----------------------------------------------------------------------------

FakeCommunicator::FakeCommunicator(const std::string& unique_id, int rank, int size, double timeout_s)
    : FakeCommunicator(NcclCore::init_rank(api(), unique_id, rank, size, timeout_s), rank, size, timeout_s) {}

FakeCommunicator::FakeCommunicator(std::shared_ptr<NcclState> state, int rank, int size, double timeout_s)
    : Communicator(rank, size, at::Device(at::kCPU), timeout_s),
      timeout_s_(timeout_s),
      handle_(state->comm),
      core_(std::move(state), /*device=*/-1, timeout_s) {}

CommunicatorPtr FakeCommunicator::fork(std::optional<double> timeout_s) {
  auto child = NcclCore::split(core_.state(), rank(), timeout_s_);
  return CommunicatorPtr(new FakeCommunicator(std::move(child), rank(), size(), timeout_s.value_or(timeout_s_)));
}

std::vector<WorkPtr> FakeCommunicator::post(const std::string& what, std::vector<at::Tensor> tensors, size_t works) {
  ncclComm_t comm = nullptr;
  core_.post(what, [&](ncclComm_t c) {
    comm = c;
    collective(c);
  });
  auto end = new_event(comm);
  core_.track(what, end);
  std::vector<WorkPtr> out;
  for (size_t i = 0; i < works; ++i)
    out.push_back(std::make_shared<NcclWork>(what, timeout_s_, core_.state(), end, tensors, /*device=*/-1));
  return out;
}

WorkPtr FakeCommunicator::do_all_reduce(const at::Tensor& t, ReduceOp, std::string what) {
  return post(what, {t}, 1).front();
}

WorkPtr FakeCommunicator::do_all_gather(const at::Tensor& out, const at::Tensor& in, std::string what) {
  return post(what, {out, in}, 1).front();
}

WorkPtr FakeCommunicator::do_reduce_scatter(const at::Tensor& out, const at::Tensor& in, ReduceOp, std::string what) {
  return post(what, {out, in}, 1).front();
}

std::vector<WorkPtr> FakeCommunicator::do_batch_p2p(const std::vector<P2POp>& ops,
                                                    const std::vector<std::string>& whats) {
  std::vector<at::Tensor> tensors;
  for (const auto& op : ops) tensors.push_back(op.tensor);
  return post(whats.front(), tensors, ops.size());
}

double bench_post(int posts, double launch_us, bool launch_thread, double spin_us) {
  TORCH_CHECK_VALUE(posts > 0, "bench_post: posts must be > 0");
  Script s;
  s.launch_us = launch_us;
  s.launch_thread = launch_thread;
  reset(s);
  NcclCore core(NcclCore::init_rank(api(), std::string(sizeof(ncclUniqueId), '\0'), 0, 1, 60.0), -1, 60.0);
  core.set_spin(std::chrono::duration_cast<std::chrono::nanoseconds>(std::chrono::duration<double, std::micro>(spin_us)));
  for (int i = 0; i < 10; ++i) core.post("warm-up", [](ncclComm_t c) { collective(c); });
  std::vector<double> us(posts);
  for (int i = 0; i < posts; ++i) {
    const auto start = Clock::now();
    core.post("all_reduce", [](ncclComm_t c) { collective(c); });
    us[i] = std::chrono::duration<double, std::micro>(Clock::now() - start).count();
  }
  core.release(1.0);
  std::nth_element(us.begin(), us.begin() + posts / 2, us.end());
  return us[posts / 2];  // the median: a preemption of this busy machine is not the cost of a post
}

}  // namespace tandem::comm::fake
#endif  // TANDEM_WITH_CUDA
