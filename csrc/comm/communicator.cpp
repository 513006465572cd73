// Argument checks and operation descriptions shared by every Communicator backend.
#include "comm/communicator.h"

#include <cstdio>
#include <sstream>

#include "comm/errors.h"

namespace tandem::comm {

ReduceOp parse_reduce_op(const std::string& name) {
  if (name == "sum") return ReduceOp::kSum;
  if (name == "prod" || name == "product") return ReduceOp::kProduct;
  if (name == "max") return ReduceOp::kMax;
  if (name == "min") return ReduceOp::kMin;
  TORCH_CHECK_VALUE(false, "tandem.comm: unknown reduce op \"", name, "\"; expected \"sum\", \"prod\", \"max\" or \"min\"");
}

const char* reduce_op_name(ReduceOp op) {
  switch (op) {
    case ReduceOp::kSum: return "sum";
    case ReduceOp::kProduct: return "prod";
    case ReduceOp::kMax: return "max";
    case ReduceOp::kMin: return "min";
  }
  return "?";
}

namespace {

const char* dtype_name(at::ScalarType t) {
  switch (t) {
    case at::kFloat: return "float32";
    case at::kDouble: return "float64";
    case at::kHalf: return "float16";
    case at::kBFloat16: return "bfloat16";
    case at::kLong: return "int64";
    case at::kInt: return "int32";
    case at::kShort: return "int16";
    case at::kChar: return "int8";
    case at::kByte: return "uint8";
    case at::kBool: return "bool";
    default: return c10::toString(t);
  }
}

}  // namespace

std::string tensor_signature(at::ScalarType dtype, at::IntArrayRef shape) {
  std::ostringstream s;
  s << dtype_name(dtype) << shape;
  return s.str();
}

std::string tensor_signature(const at::Tensor& t) { return tensor_signature(t.scalar_type(), t.sizes()); }

Communicator::Communicator(int rank, int size, at::Device device, double timeout_s)
    : rank_(rank), size_(size), device_(device), timeout_s_(timeout_s) {
  TORCH_CHECK_VALUE(size >= 1 && rank >= 0 && rank < size, "tandem.comm: rank ", rank,
                    " is not in a group of size ", size);
  TORCH_CHECK_VALUE(timeout_s > 0, "tandem.comm: timeout must be positive, got ", timeout_s, " s");
}

std::string Communicator::who() const {
  return "rank " + std::to_string(rank_) + " of " + std::to_string(size_);
}

std::string Communicator::describe(const std::string& op, const at::Tensor& t, int peer,
                                   const char* preposition) const {
  std::string s = who() + ": " + op + " of " + tensor_signature(t);
  if (peer >= 0) s += std::string(" ") + preposition + " rank " + std::to_string(peer);
  return s;
}

void Communicator::check_tensor(const char* op, const at::Tensor& t) const {
  TORCH_CHECK_VALUE(t.defined(), "tandem.comm (", who(), "): ", op, ": the tensor is undefined");
  TORCH_CHECK_VALUE(t.device() == device_, "tandem.comm (", who(), "): ", op, ": tensor is on ", t.device(),
                    " but the communicator is on ", device_);
  TORCH_CHECK_VALUE(t.is_contiguous(), "tandem.comm (", who(), "): ", op, ": tensor ", tensor_signature(t),
                    " must be contiguous (call .contiguous() first)");
  TORCH_CHECK_VALUE(!t.is_sparse(), "tandem.comm (", who(), "): ", op, ": sparse tensors are not supported");
}

void Communicator::check_peer(const char* op, int peer) const {
  TORCH_CHECK_VALUE(peer >= 0 && peer < size_, "tandem.comm (", who(), "): ", op, ": peer rank ", peer,
                    " is not in the group (ranks 0..", size_ - 1, ")");
}

WorkPtr Communicator::all_reduce(const at::Tensor& t, ReduceOp op) {
  check_tensor("all_reduce", t);
  TORCH_CHECK_TYPE(op == ReduceOp::kSum || t.scalar_type() != at::kBool, "tandem.comm (", who(),
                   "): all_reduce: op ", reduce_op_name(op), " is not defined for bool tensors");
  return do_all_reduce(t, op, describe(std::string("all_reduce(") + reduce_op_name(op) + ")", t));
}

WorkPtr Communicator::all_gather(const at::Tensor& out, const at::Tensor& in) {
  check_tensor("all_gather (out)", out);
  check_tensor("all_gather (in)", in);
  TORCH_CHECK_TYPE(out.scalar_type() == in.scalar_type(), "tandem.comm (", who(), "): all_gather: out dtype ",
                   out.scalar_type(), " differs from in dtype ", in.scalar_type());
  TORCH_CHECK_VALUE(in.dim() >= 1 && out.dim() == in.dim() && out.size(0) == size_ * in.size(0) &&
                        out.sizes().slice(1) == in.sizes().slice(1),
                    "tandem.comm (", who(), "): all_gather: out shape ", out.sizes(), " must be [size * n0, ...] = [",
                    size_, " * ", in.dim() >= 1 ? in.size(0) : 0, ", ...] for in shape ", in.sizes());
  return do_all_gather(out, in, describe("all_gather", in));
}

WorkPtr Communicator::reduce_scatter(const at::Tensor& out, const at::Tensor& in, ReduceOp op) {
  check_tensor("reduce_scatter (out)", out);
  check_tensor("reduce_scatter (in)", in);
  TORCH_CHECK_TYPE(out.scalar_type() == in.scalar_type(), "tandem.comm (", who(),
                   "): reduce_scatter: out dtype ", out.scalar_type(), " differs from in dtype ", in.scalar_type());
  TORCH_CHECK_VALUE(out.dim() >= 1 && out.dim() == in.dim() && in.size(0) == size_ * out.size(0) &&
                        out.sizes().slice(1) == in.sizes().slice(1),
                    "tandem.comm (", who(), "): reduce_scatter: in shape ", in.sizes(),
                    " must be [size * n0, ...] for out shape ", out.sizes(), " (size ", size_, ")");
  return do_reduce_scatter(out, in, op, describe(std::string("reduce_scatter(") + reduce_op_name(op) + ")", in));
}

WorkPtr Communicator::send(const at::Tensor& t, int dst) {
  check_peer("send", dst);
  TORCH_CHECK_VALUE(dst != rank_, "tandem.comm (", who(), "): send to this rank (", dst,
                    ") cannot complete on its own; pair it with the recv in one batch_p2p");
  return batch_p2p({P2POp{P2PKind::kSend, t, dst}}).front();
}

WorkPtr Communicator::recv(const at::Tensor& t, int src) {
  check_peer("recv", src);
  TORCH_CHECK_VALUE(src != rank_, "tandem.comm (", who(), "): recv from this rank (", src,
                    ") cannot complete on its own; pair it with the send in one batch_p2p");
  return batch_p2p({P2POp{P2PKind::kRecv, t, src}}).front();
}

std::vector<WorkPtr> Communicator::batch_p2p(const std::vector<P2POp>& ops) {
  std::vector<std::string> whats;
  std::vector<const at::Tensor*> self_sends, self_recvs;
  for (const auto& op : ops) {
    const bool is_send = op.kind == P2PKind::kSend;
    const char* name = is_send ? "send" : "recv";
    check_peer(name, op.peer);
    check_tensor(name, op.tensor);
    whats.push_back(describe(name, op.tensor, op.peer, is_send ? "to" : "from"));
    if (op.peer == rank_) (is_send ? self_sends : self_recvs).push_back(&op.tensor);
  }
  TORCH_CHECK_VALUE(self_sends.size() == self_recvs.size(), "tandem.comm (", who(), "): batch_p2p has ",
                    self_sends.size(), " sends to this rank but ", self_recvs.size(), " recvs from it");
  for (size_t i = 0; i < self_sends.size(); ++i) {
    const at::Tensor& s = *self_sends[i];
    const at::Tensor& r = *self_recvs[i];
    TORCH_CHECK_VALUE(s.sizes() == r.sizes() && s.scalar_type() == r.scalar_type(), "tandem.comm (", who(),
                      "): batch_p2p: send to self #", i, " is ", tensor_signature(s), " but the recv is ",
                      tensor_signature(r));
  }
  if (ops.empty()) return {};
  return do_batch_p2p(ops, whats);
}

void Communicator::synchronize(std::optional<double> timeout_s) {
  const double limit = timeout_s.value_or(timeout_s_);
  TORCH_CHECK_VALUE(limit > 0, "tandem.comm (", who(), "): synchronize: timeout must be positive, got ", limit, " s");
  const bool idle = wait_idle(limit);
  check();  // a failure explains more than the timeout
  if (!idle) {
    char buf[32];
    std::snprintf(buf, sizeof(buf), "%.3g s", limit);
    throw CommTimeout(who() + ": synchronize: operations still in flight after " + buf);
  }
}

}  // namespace tandem::comm
