// pybind11 face of StageLink. Blocking calls release the GIL.
#include <torch/csrc/distributed/c10d/Store.hpp>
#include <torch/extension.h>

#include "comm/python.h"
#include "comm/wait_watch.h"
#include "p2p/stage_link.h"

namespace py = pybind11;

namespace tandem::p2p {

void bind(py::module_& m) {
  using Release = py::call_guard<py::gil_scoped_release>;
  py::class_<ErrorBoard>(m, "_ErrorBoard")
      .def(py::init([](c10::intrusive_ptr<c10d::Store> store, const std::string& key) {
             return store ? ErrorBoard(std::move(store), key) : ErrorBoard();
           }),
           py::arg("store"), py::arg("key"))
      .def("post", &ErrorBoard::post, Release())
      .def("check", &ErrorBoard::check, py::arg("force") = false, Release(),
           "Raise CommError with the posted message, if any.");
  // with _WaitWatch(board, timeout): this thread's host waits for c10d collectives also stop
  // when the board holds a failure, and after timeout seconds
  struct PyWaitWatch {
    ErrorBoard* board;
    double timeout_s;
    std::unique_ptr<comm::ScopedWaitWatch> scope;
  };
  py::class_<PyWaitWatch>(m, "_WaitWatch")
      .def(py::init([](ErrorBoard& board, double timeout_s) {
             TORCH_CHECK_VALUE(timeout_s > 0, "_WaitWatch: timeout must be > 0, got ", timeout_s);
             return PyWaitWatch{&board, timeout_s, nullptr};
           }),
           py::arg("board"), py::arg("timeout"), py::keep_alive<1, 2>())
      .def("__enter__", [](PyWaitWatch& w) {
        TORCH_CHECK(!w.scope, "_WaitWatch: already entered");
        ErrorBoard* board = w.board;
        w.scope = std::make_unique<comm::ScopedWaitWatch>(comm::WaitWatch{[board] { board->check(false); }, w.timeout_s});
      })
      .def("__exit__", [](PyWaitWatch& w, py::args) { w.scope.reset(); });
  py::class_<RecvHandle, std::shared_ptr<RecvHandle>>(m, "RecvHandle", "One posted StageLink receive.")
      .def("is_completed", &RecvHandle::is_completed, Release())
      .def("wait", &RecvHandle::wait, py::arg("timeout") = py::none(), Release(),
           "The received tensor (CUDA: ordered on the current stream); once per handle.")
      .def_property_readonly("what", &RecvHandle::what)
      .def("__repr__", [](const RecvHandle& h) { return "<tandem.comm.RecvHandle " + h.what() + ">"; });

  py::class_<StageLink, std::shared_ptr<StageLink>>(m, "_StageLink")
      .def(py::init([](comm::CommunicatorPtr comm, std::optional<int> prev, std::optional<int> next,
                       const std::string& shapes, double timeout_s, c10::intrusive_ptr<c10d::Store> store,
                       const std::string& board_key) {
             const ShapeMode mode = parse_shape_mode(shapes);
             py::gil_scoped_release release;
             ErrorBoard board = store ? ErrorBoard(std::move(store), board_key) : ErrorBoard();
             return std::make_shared<StageLink>(std::move(comm), prev, next, mode, timeout_s, std::move(board));
           }),
           py::arg("comm"), py::arg("prev_rank"), py::arg("next_rank"), py::arg("shapes"), py::arg("timeout"),
           py::arg("store") = nullptr, py::arg("board_key") = "")
      .def("send_forward", &StageLink::send_forward, Release())
      .def("send_backward", &StageLink::send_backward, Release())
      .def("irecv_forward", &StageLink::irecv_forward, Release())
      .def("irecv_backward", &StageLink::irecv_backward, Release())
      .def("recv_forward", &StageLink::recv_forward, py::arg("timeout") = py::none(), Release())
      .def("recv_backward", &StageLink::recv_backward, py::arg("timeout") = py::none(), Release())
      .def("send_forward_recv_backward", &StageLink::send_forward_recv_backward, py::arg("activation"),
           py::arg("timeout") = py::none(), Release())
      .def("send_backward_recv_forward", &StageLink::send_backward_recv_forward, py::arg("grad"),
           py::arg("timeout") = py::none(), Release())
      .def("wait_sends", &StageLink::wait_sends, py::arg("timeout") = py::none(), Release())
      .def("post_error", &StageLink::post_error, Release())
      .def("abort", &StageLink::abort, Release())
      .def("synchronize", &StageLink::synchronize, py::arg("timeout") = py::none(), Release())
      .def("release", &StageLink::release, py::arg("timeout") = py::none(), Release())
      .def("progress", py::overload_cast<>(&StageLink::progress), Release())
      .def_property_readonly("stage", &StageLink::stage)
      .def_property_readonly("prev_rank", &StageLink::prev)
      .def_property_readonly("next_rank", &StageLink::next)
      .def_property_readonly("shapes",
                             [](const StageLink& l) { return l.mode() == ShapeMode::kStatic ? "static" : "dynamic"; })
      .def_property_readonly("timeout", &StageLink::timeout_s)
      .def_property_readonly("board_key", &StageLink::board_key)
      .def_property_readonly("pending_sends", &StageLink::pending_sends);
}

}  // namespace tandem::p2p
