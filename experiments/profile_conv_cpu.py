"""Where XLA:CPU loses to PyTorch on the training step: one 3x3 convolution
(batch 32, 16x16, 32->64 channels, a width-0.5 stage-2 shape), timed as forward,
forward + input gradient, forward + kernel gradient, and forward + both, against
PyTorch's forward + backward of the same convolution.

    python experiments/profile_conv_cpu.py --out runs/profile_conv

Writes profile_conv.json. Also tries the kernel gradient as an im2col matmul
(``lax.conv_general_dilated_patches`` + einsum) to see whether it beats XLA's own.
"""
from __future__ import annotations

import argparse
import json
import time
from pathlib import Path

import jax
import jax.numpy as jnp
from jax import lax

DN = ("NHWC", "HWIO", "NHWC")


def _conv(x, w):
  return lax.conv_general_dilated(x, w, (1, 1), ((1, 1), (1, 1)), dimension_numbers=DN)


@jax.custom_vjp
def conv_im2col_wgrad(x, w):
  return _conv(x, w)


def _fwd(x, w):
  return _conv(x, w), (x, w)


def _bwd(res, g):
  x, w = res
  dx, = jax.vjp(lambda x_: _conv(x_, w), x)[1](g)
  kh, kw, cin, cout = w.shape
  patches = lax.conv_general_dilated_patches(x, (kh, kw), (1, 1), ((1, 1), (1, 1)),
                                             dimension_numbers=DN)
  dw = jnp.einsum("bhwp,bhwo->po", patches, g).reshape(cin, kh, kw, cout).transpose(1, 2, 0, 3)
  return dx, dw


conv_im2col_wgrad.defvjp(_fwd, _bwd)


def _time(fn, *args, reps=30):
  jax.block_until_ready(fn(*args))
  t = time.perf_counter()
  for _ in range(reps):
    r = fn(*args)
  jax.block_until_ready(r)
  return (time.perf_counter() - t) / reps * 1e3


def main():
  p = argparse.ArgumentParser()
  p.add_argument("--out", required=True)
  args = p.parse_args()
  x = jax.random.normal(jax.random.PRNGKey(0), (32, 16, 16, 32))
  w = jax.random.normal(jax.random.PRNGKey(1), (3, 3, 32, 64))
  loss = lambda f: (lambda x, w: (f(x, w) ** 2).sum())
  res = {
      "xla_forward_ms": _time(jax.jit(loss(_conv)), x, w),
      "xla_forward_dx_ms": _time(jax.jit(jax.grad(loss(_conv), 0)), x, w),
      "xla_forward_dw_ms": _time(jax.jit(jax.grad(loss(_conv), 1)), x, w),
      "xla_forward_dx_dw_ms": _time(jax.jit(jax.grad(loss(_conv), (0, 1))), x, w),
      "im2col_wgrad_forward_dx_dw_ms": _time(jax.jit(jax.grad(loss(conv_im2col_wgrad), (0, 1))), x, w),
  }
  try:
    import torch
    xt = torch.randn(32, 32, 16, 16, requires_grad=True)
    wt = torch.randn(64, 32, 3, 3, requires_grad=True)
    step = lambda: (torch.nn.functional.conv2d(xt, wt, padding=1) ** 2).sum().backward()
    for _ in range(3):
      step()
    t = time.perf_counter()
    for _ in range(30):
      step()
    res["torch_forward_backward_ms"] = (time.perf_counter() - t) / 30 * 1e3
    with torch.no_grad():
      t = time.perf_counter()
      for _ in range(30):
        torch.nn.functional.conv2d(xt, wt, padding=1)
      res["torch_forward_ms"] = (time.perf_counter() - t) / 30 * 1e3
  except ImportError:
    pass
  res["jax"] = jax.__version__
  res["backend"] = jax.default_backend()
  out = Path(args.out)
  out.mkdir(parents=True, exist_ok=True)
  (out / "profile_conv.json").write_text(json.dumps(res, indent=2))
  for k, v in res.items():
    print(f"{k:34s} {v:.2f}" if isinstance(v, float) else f"{k:34s} {v}")


if __name__ == "__main__":
  main()
