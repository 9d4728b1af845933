"""Depthwise causal convolution over time for (batch, time, channels) tensors, with an optional carried tail.

y_t = bias + sum_k w[:, k] * x_{t - (K - 1) + k}: the last tap sees the current step. Written as K shifted
multiply-adds, so it needs no transposes and fuses under torch.compile. The tail (the last K - 1 inputs of the
previous call) lets a stateful caller continue a sequence exactly where the previous window stopped.
"""

import torch


def causal_conv(
    x: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor | None, tail: torch.Tensor | None = None
) -> tuple[torch.Tensor, torch.Tensor]:
    """x (B, T, C); weight (C, 1, K) as nn.Conv1d(groups=C) stores it; bias (C,); tail (B, K - 1, C) or None
    (zeros). Returns (y (B, T, C) in x's dtype, the new tail (B, K - 1, C))."""
    taps = weight.shape[-1]
    steps = x.shape[1]
    if tail is None:
        tail = x.new_zeros(x.shape[0], taps - 1, x.shape[2])
    padded = torch.cat((tail.to(x.dtype), x), dim=1)
    w = weight.view(weight.shape[0], taps).to(x.dtype)
    y = padded[:, 0:steps] * w[:, 0]
    for k in range(1, taps):
        y = y + padded[:, k : k + steps] * w[:, k]
    if bias is not None:
        y = y + bias.to(x.dtype)
    return y, padded[:, padded.shape[1] - (taps - 1) :]


def conv_init_(weight: torch.Tensor, bias: torch.Tensor | None, zero_bias: bool) -> None:
    """nn.Conv1d's default range for a depthwise kernel of K taps: uniform in +-1/sqrt(K); the bias too, or zero."""
    bound = weight.shape[-1] ** -0.5
    with torch.no_grad():
        weight.uniform_(-bound, bound)
        if bias is not None:
            bias.zero_() if zero_bias else bias.uniform_(-bound, bound)
