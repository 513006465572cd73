// tandem._C._testing: the seams the CPU tests drive (pure decisions of the CUDA paths, the
// scripted NCCL of comm/fake_nccl.h). Bindings only; no logic. Not a public API.
#include <torch/extension.h>

#include "comm/communicator.h"
#include "ops/lt_policy.h"
#ifdef TANDEM_WITH_CUDA
#include "comm/fake_nccl.h"
#include "comm/nccl_state.h"
#endif

namespace py = pybind11;

namespace tandem::testing {

namespace {

#ifdef TANDEM_WITH_CUDA
ncclResult_t nccl_result(const std::string& name) {
  if (name == "success") return ncclSuccess;
  if (name == "in_progress") return ncclInProgress;
  if (name == "system_error") return ncclSystemError;
  if (name == "internal_error") return ncclInternalError;
  if (name == "remote_error") return ncclRemoteError;
  if (name == "invalid_argument") return ncclInvalidArgument;
  TORCH_CHECK_VALUE(false, "unknown NCCL result \"", name, "\"");
}

comm::fake::FakeCommunicator& as_fake(const comm::CommunicatorPtr& c) {
  auto* f = dynamic_cast<comm::fake::FakeCommunicator*>(c.get());
  TORCH_CHECK_VALUE(f != nullptr, "not a fake NCCL communicator");
  return *f;
}

void bind_fake_nccl(py::module_& m) {
  using Release = py::call_guard<py::gil_scoped_release>;
  m.def("fake_nccl_reset",
        [](const std::string& init_result, bool init_makes_comm, const std::string& split_error,
           double ready_after_us, double launch_us, bool launch_thread, double abort_block_limit_s) {
          comm::fake::Script s;
          s.init_result = nccl_result(init_result);
          s.init_makes_comm = init_makes_comm;
          s.split_error = nccl_result(split_error);
          s.ready_after_us = ready_after_us;
          s.launch_us = launch_us;
          s.launch_thread = launch_thread;
          s.abort_block_limit_s = abort_block_limit_s;
          comm::fake::reset(s);
        },
        py::arg("init_result") = "in_progress", py::arg("init_makes_comm") = true, py::arg("split_error") = "success",
        py::arg("ready_after_us") = 0.0,
        py::arg("launch_us") = 0.0, py::arg("launch_thread") = true, py::arg("abort_block_limit_s") = 5.0, Release());
  m.def("fake_nccl_calls", &comm::fake::calls, "[(comm id, call), ...] in order");
  m.def("fake_communicator",
        [](int rank, int size, double timeout_s) {
          const std::string id(sizeof(ncclUniqueId), '\0');
          return std::static_pointer_cast<comm::Communicator>(
              std::make_shared<comm::fake::FakeCommunicator>(id, rank, size, timeout_s));
        },
        py::arg("rank"), py::arg("size"), py::arg("timeout"), Release());
  m.def("fake_id", [](const comm::CommunicatorPtr& c) { return comm::fake::id_of(as_fake(c).handle()); });
  m.def("fake_hold", [](const comm::CommunicatorPtr& c, bool hold) { comm::fake::set_hold(as_fake(c).handle(), hold); });
  m.def("fake_waits_on", [](const comm::CommunicatorPtr& c, const comm::CommunicatorPtr& other) {
    comm::fake::set_waits_on(as_fake(c).handle(), as_fake(other).handle());
  });
  m.def("fake_async_error", [](const comm::CommunicatorPtr& c, const std::string& result) {
    comm::fake::set_async_error(as_fake(c).handle(), nccl_result(result));
  });
  m.def("fake_abort_blocked_s", [](const comm::CommunicatorPtr& c) {
    return comm::fake::abort_blocked_s(as_fake(c).handle());
  });
  m.def("fake_pending", [](const comm::CommunicatorPtr& c) { return as_fake(c).core().pending(); });
  m.def("bench_nccl_post", &comm::fake::bench_post, py::arg("posts"), py::arg("launch_us"), py::arg("launch_thread"),
        py::arg("spin_us"),
        Release(), "Median host microseconds per all-reduce post on the fake NCCL.");
  m.def("nccl_p2p_bytes", [](at::ScalarType dtype, int64_t numel) { return comm::nccl_p2p_bytes(dtype, numel); });
  m.def("nccl_collective_dtype", [](at::ScalarType dtype) {
    return static_cast<int>(comm::nccl_dtype(dtype, "tandem.comm: all_reduce"));
  });
}
#endif

void bind_lt_policy(py::module_& m) {
  m.def("cublaslt_epilogue_eligible", [](at::ScalarType dtype, const std::string& approximate) {
    return ops::cublaslt_epilogue_eligible(dtype, parse_gelu(approximate, "cublaslt_epilogue_eligible"));
  });
  m.def("heuristic_outcome", [](const std::string& status, int results) {
    const auto o = ops::heuristic_outcome(status == "success", status == "not_supported", results);
    return o == ops::HeuristicOutcome::kUse ? "use" : o == ops::HeuristicOutcome::kNoKernel ? "no_kernel" : "error";
  });
  m.def("run_first_working", [](const std::vector<bool>& runs) {
    std::vector<size_t> failed;
    const int ran = ops::run_first_working(runs.size(), [&](size_t i) { return bool(runs[i]); }, &failed);
    return py::make_tuple(ran, failed);
  });
}

}  // namespace

void bind(py::module_& m) {
  bind_lt_policy(m);
#ifdef TANDEM_WITH_CUDA
  bind_fake_nccl(m);
#endif
}

}  // namespace tandem::testing
