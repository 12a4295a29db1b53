// Runtime values as template parameters (the BOOL_SWITCH of flash-attention, written as functions): the CPU and
// CUDA launchers pick a kernel variant -- storage dtype, history depth, guidance, stored outputs, noise source --
// from what the caller passes, and each variant is compiled with those values as constants.
//
//   bool_switch(t.f_uncond != nullptr, [&](auto guided) { kernel<decltype(guided)::value>(...); });
//   int_switch<0, 1, 2, 3>(n_hist, [&](auto nh) { kernel<decltype(nh)::value>(...); });
//
// The callable gets a std::integral_constant; what it returns is returned.  Host code only.
#pragma once

#include <type_traits>
#include <utility>

namespace zsnr {

template <typename F>
inline decltype(auto) bool_switch(bool value, F&& f) {
  if (value) return f(std::true_type{});
  return f(std::false_type{});
}

// f(integral_constant<int, V>) for the first V of Vs equal to `value`; the last V when none is (the default).
template <int V, int... Rest, typename F>
inline decltype(auto) int_switch(int value, F&& f) {
  if constexpr (sizeof...(Rest) == 0) {
    return f(std::integral_constant<int, V>{});
  } else {
    if (value == V) return f(std::integral_constant<int, V>{});
    return int_switch<Rest...>(value, std::forward<F>(f));
  }
}

}  // namespace zsnr
