"""What crosses the link from a client to its server part: the cut layer's
activations, compressed or not (``Config.link``).

Each image's activation ``h`` [H, W, C] is one message. :class:`Link` is
the round trip the server part sees (compress, then decompress), applied in
training and in the full-path evaluation; :meth:`Link.message_bytes` is
what the message costs on the link (the cost table and the simulated clock
count it). No gradient goes back from the server, so the client's own
training never sees the compression and nothing has to be differentiated
through it.

* ``none``: the activations as computed (4 bytes a value in float32, 2 in bfloat16);
* ``bfloat16``: rounded to bfloat16 (2 bytes a value);
* ``int8``: ``round(h / s)`` in [-127, 127] with one float32 scale per image,
  ``s = max|h| / 127`` (1 byte a value + 4); the error of a value is at most ``s / 2``;
* ``int8_channel``: the same with a scale per channel (1 byte a value + 4 per channel);
* ``topk``: the ``ceil(topk * H*W*C)`` values of largest magnitude, each
  with its int32 position (the value's bytes + 4 each), the rest zero.
"""
from __future__ import annotations

import dataclasses
import math

import jax
import jax.numpy as jnp

KINDS = ("none", "bfloat16", "int8", "int8_channel", "topk")


@dataclasses.dataclass(frozen=True)
class Link:
  """The link of ``kind`` (:data:`KINDS`); ``topk``: the share of values
  sent by ``topk``. Called on activations [B, H, W, C]: what the server
  part receives."""
  kind: str = "none"
  topk: float = 0.1

  def __post_init__(self):
    if self.kind not in KINDS:
      raise ValueError(f"link: unknown kind {self.kind!r}; expected one of {', '.join(KINDS)}")
    if not 0 < self.topk <= 1:
      raise ValueError(f"link: topk is a share of the values in (0, 1], got {self.topk}")

  @property
  def lossless(self) -> bool:
    return self.kind == "none"

  def __call__(self, h):
    if self.kind == "none":
      return h
    if self.kind == "bfloat16":
      return h.astype(jnp.bfloat16).astype(h.dtype)
    if self.kind in ("int8", "int8_channel"):
      axes = tuple(range(1, h.ndim)) if self.kind == "int8" else tuple(range(1, h.ndim - 1))
      x = h.astype(jnp.float32)
      scale = jnp.max(jnp.abs(x), axis=axes, keepdims=True) / 127.0
      scale = jnp.where(scale > 0, scale, 1.0)
      return (jnp.clip(jnp.round(x / scale), -127, 127) * scale).astype(h.dtype)
    flat = h.reshape(h.shape[0], -1)
    k = self.kept(flat.shape[1])
    _, idx = jax.lax.top_k(jnp.abs(flat), k)
    rows = jnp.arange(flat.shape[0])[:, None]
    return jnp.zeros_like(flat).at[rows, idx].set(flat[rows, idx]).reshape(h.shape)

  def kept(self, values: int) -> int:
    """Values sent per message by ``topk``."""
    return max(1, math.ceil(self.topk * values - 1e-9))

  def message_bytes(self, shape, itemsize: int) -> int:
    """Bytes of one image's activation of ``shape`` (H, W, C) on the link,
    ``itemsize``: bytes of a value as computed (4 float32, 2 bfloat16)."""
    n = math.prod(shape)
    if self.kind == "none":
      return itemsize * n
    if self.kind == "bfloat16":
      return 2 * n
    if self.kind == "int8":
      return n + 4
    if self.kind == "int8_channel":
      return n + 4 * shape[-1]
    return self.kept(n) * (itemsize + 4)
