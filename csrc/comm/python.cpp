// pybind11 face of the Communicator: Work, the error types, the backends' factories.
// Blocking calls release the GIL.
#include "comm/python.h"

#include <torch/csrc/distributed/c10d/ProcessGroup.hpp>
#include <torch/extension.h>

#include "comm/c10d_communicator.h"
#include "comm/errors.h"
#ifdef TANDEM_WITH_CUDA
#include "comm/nccl_communicator.h"
#endif

namespace py = pybind11;

namespace tandem::comm {

namespace {

PyObject* g_comm_error = nullptr;
PyObject* g_timeout_error = nullptr;

void bind_errors(py::module_& m) {
  g_comm_error = PyErr_NewExceptionWithDoc(
      "tandem._C.CommError", "A communication operation failed (names this rank, the peer, the operation).",
      PyExc_RuntimeError, nullptr);
  py::tuple bases = py::make_tuple(py::handle(g_comm_error), py::handle(PyExc_TimeoutError));
  g_timeout_error = PyErr_NewExceptionWithDoc(
      "tandem._C.CommTimeoutError", "A communication operation did not complete within its timeout.",
      bases.ptr(), nullptr);
  m.attr("CommError") = py::handle(g_comm_error);
  m.attr("CommTimeoutError") = py::handle(g_timeout_error);
  py::register_exception_translator([](std::exception_ptr p) {
    try {
      if (p) std::rethrow_exception(p);
    } catch (const CommTimeout& e) {
      PyErr_SetString(g_timeout_error, e.what());
    } catch (const CommError& e) {
      PyErr_SetString(g_comm_error, e.what());
    }
  });
}

std::vector<P2POp> to_p2p_ops(const std::vector<std::tuple<std::string, at::Tensor, int>>& ops) {
  std::vector<P2POp> out;
  out.reserve(ops.size());
  for (const auto& [kind, tensor, peer] : ops) {
    TORCH_CHECK_VALUE(kind == "send" || kind == "recv", "tandem.comm: batch_p2p: op kind must be \"send\" or \"recv\", got \"",
                      kind, "\"");
    out.push_back(P2POp{kind == "send" ? P2PKind::kSend : P2PKind::kRecv, tensor, peer});
  }
  return out;
}

}  // namespace

void bind(py::module_& m) {
  bind_errors(m);
  using Release = py::call_guard<py::gil_scoped_release>;

  py::class_<Work, std::shared_ptr<Work>>(m, "Work", "Handle of one in-flight communication operation.")
      .def("wait", &Work::wait, py::arg("timeout") = py::none(), Release(),
           "CPU: block until done (timeout in s, default the communicator's). CUDA: the current stream "
           "waits, the host does not.")
      .def("synchronize", &Work::synchronize, py::arg("timeout") = py::none(), Release(),
           "Block the host until done, on every backend.")
      .def("is_completed", &Work::is_completed, Release())
      .def("wait_for", &Work::wait_for, py::arg("timeout"), Release(),
           "Block the host up to timeout s; return is_completed() (never raises).")
      .def_property_readonly("what", &Work::what)
      .def("__repr__", [](const Work& w) { return "<tandem.comm.Work " + w.what() + ">"; });

  py::class_<Communicator, std::shared_ptr<Communicator>>(m, "_Communicator")
      .def_property_readonly("rank", &Communicator::rank)
      .def_property_readonly("size", &Communicator::size)
      .def_property_readonly("device", [](const Communicator& c) { return c.device().str(); })
      .def_property_readonly("timeout", &Communicator::timeout_s)
      .def_property_readonly("backend", &Communicator::backend)
      .def("who", &Communicator::who)
      .def("all_reduce", [](Communicator& c, const at::Tensor& t, const std::string& op) {
             const ReduceOp o = parse_reduce_op(op);
             py::gil_scoped_release release;
             return c.all_reduce(t, o);
           })
      .def("all_gather", &Communicator::all_gather, Release())
      .def("reduce_scatter", [](Communicator& c, const at::Tensor& out, const at::Tensor& in, const std::string& op) {
             const ReduceOp o = parse_reduce_op(op);
             py::gil_scoped_release release;
             return c.reduce_scatter(out, in, o);
           })
      .def("send", &Communicator::send, Release())
      .def("recv", &Communicator::recv, Release())
      .def("batch_p2p", [](Communicator& c, const std::vector<std::tuple<std::string, at::Tensor, int>>& ops) {
             auto p2p = to_p2p_ops(ops);
             py::gil_scoped_release release;
             return c.batch_p2p(p2p);
           })
      .def("fork", &Communicator::fork, py::arg("timeout") = py::none(), Release())
      .def("abort", &Communicator::abort, Release())
      .def("close", &Communicator::close, py::arg("timeout") = py::none(), Release())
      .def("release", &Communicator::release, py::arg("timeout") = py::none(), Release())
      .def("check", &Communicator::check, Release())
      .def("synchronize", &Communicator::synchronize, py::arg("timeout") = py::none(), Release());

  m.def("_abort_all", &abort_all, py::arg("comms"), py::arg("failure_domains"), Release(),
        "Abort communicators: NCCL ones all revoked first, then aborted.");
  m.def("_share_failure_domain", &share_failure_domain, py::arg("comm"), py::arg("other"), Release(),
        "other (and its failure domain) joins comm's failure domain (NCCL only).");

  m.def("_c10d_communicator",
        [](const c10::intrusive_ptr<c10d::ProcessGroup>& pg, const std::string& device, double timeout_s) {
          return std::static_pointer_cast<Communicator>(
              std::make_shared<C10dCommunicator>(pg, at::Device(device), timeout_s));
        },
        py::arg("group"), py::arg("device"), py::arg("timeout"));

#ifdef TANDEM_WITH_CUDA
  m.def("_nccl_unique_id", []() { return py::bytes(nccl_unique_id()); },
        "A fresh ncclUniqueId (as bytes) to broadcast to the group.");
  m.def("_nccl_communicator",
        [](const py::bytes& unique_id, int rank, int size, int device_index, double timeout_s) {
          std::string id = unique_id;
          py::gil_scoped_release release;
          return std::static_pointer_cast<Communicator>(
              NcclCommunicator::create(id, rank, size, device_index, timeout_s));
        },
        py::arg("unique_id"), py::arg("rank"), py::arg("size"), py::arg("device_index"), py::arg("timeout"));
#endif
}

}  // namespace tandem::comm
