// Autograd for linear_bias_gelu. Forward calls linear_bias_gelu_fwd to keep the
// pre-activation; backward calls the two split backward ops through the dispatcher, so
// each runs its device kernel and torch.compile sees registered ops only. Without grad,
// the plain op runs below autograd and keeps no pre-activation.
#include <torch/autograd.h>

#include "ops/linear_gelu.h"

namespace tandem::ops {

namespace {

using torch::autograd::AutogradContext;
using torch::autograd::variable_list;

c10::OperatorHandle op(const char* name) {
  return c10::Dispatcher::singleton().findSchemaOrThrow(name, "");
}

class LinearBiasGelu : public torch::autograd::Function<LinearBiasGelu> {
 public:
  static Tensor forward(AutogradContext* ctx, const Tensor& input, const Tensor& weight,
                        const std::optional<Tensor>& bias, c10::string_view approximate) {
    static const auto fwd = op("tandem::linear_bias_gelu_fwd")
                                .typed<std::tuple<Tensor, Tensor>(const Tensor&, const Tensor&,
                                                                  const std::optional<Tensor>&,
                                                                  c10::string_view)>();
    auto [out, pre] = fwd.call(input, weight, bias, approximate);
    ctx->save_for_backward({input, weight, pre});
    ctx->saved_data["approximate"] = std::string(approximate);
    ctx->saved_data["has_bias"] = bias.has_value();
    return out;
  }

  static variable_list backward(AutogradContext* ctx, variable_list grads) {
    static const auto bwd_input =
        op("tandem::linear_bias_gelu_backward_input")
            .typed<std::tuple<Tensor, Tensor, Tensor>(const Tensor&, const Tensor&, const Tensor&,
                                                      c10::string_view)>();
    static const auto bwd_weight = op("tandem::linear_bias_gelu_backward_weight")
                                       .typed<Tensor(const Tensor&, const Tensor&)>();
    const auto saved = ctx->get_saved_variables();
    const Tensor& input = saved[0];
    const Tensor& weight = saved[1];
    const Tensor& pre = saved[2];
    const std::string approximate = ctx->saved_data["approximate"].toStringRef();
    auto [grad_input, grad_pre, grad_bias] =
        bwd_input.call(grads[0].contiguous(), pre, weight, approximate);
    Tensor grad_weight = bwd_weight.call(grad_pre, input);
    if (!ctx->saved_data["has_bias"].toBool()) grad_bias = Tensor();
    return {grad_input, grad_weight, grad_bias, Tensor()};
  }
};

}  // namespace

Tensor linear_bias_gelu_autograd(const Tensor& input, const Tensor& weight,
                                 const std::optional<Tensor>& bias, c10::string_view approximate) {
  const bool needs_grad = at::GradMode::is_enabled() &&
                          (input.requires_grad() || weight.requires_grad() ||
                           (bias.has_value() && bias->requires_grad()));
  if (!needs_grad) {
    static const auto plain = op("tandem::linear_bias_gelu")
                                  .typed<Tensor(const Tensor&, const Tensor&, const std::optional<Tensor>&,
                                                c10::string_view)>();
    at::AutoDispatchBelowADInplaceOrView guard;
    return plain.call(input, weight, bias, approximate);
  }
  return LinearBiasGelu::apply(input, weight, bias, approximate);
}

}  // namespace tandem::ops
