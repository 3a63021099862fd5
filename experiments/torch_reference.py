"""PyTorch reference of Hetero-SplitEE's Averaging round, for benchmarks.

What a researcher would otherwise write: the same CIFAR ResNet-18 units, cut
layers, exit head, losses (exit loss on the client, server loss on the
detached activations), SGD with momentum and weight decay, a Python loop over
clients, and cross-layer averaging of every unit over its holders.

Variants (:data:`VARIANTS`, the benchmark's columns):

* ``torch``: the first reference, NCHW float32, reading both losses on the
  host (``.item()``) after every step: a device synchronisation per step;
* ``torch_fair``: what a careful PyTorch user writes: no host read inside a
  round (the losses are summed on the device and read once, after the
  round), ``channels_last`` weights and images, float32;
* ``torch_amp``: ``torch_fair`` under ``torch.autocast`` in bfloat16
  (parameters, optimiser and batch-norm statistics stay float32);
* ``torch_compile``: ``torch_amp`` with each client and server part and
  head compiled by ``torch.compile``.
"""
from __future__ import annotations

import torch
import torch.nn as nn
import torch.nn.functional as F


class BasicBlock(nn.Module):
  def __init__(self, cin, cout, stride):
    super().__init__()
    self.c1 = nn.Conv2d(cin, cout, 3, stride, 1, bias=False)
    self.b1 = nn.BatchNorm2d(cout)
    self.c2 = nn.Conv2d(cout, cout, 3, 1, 1, bias=False)
    self.b2 = nn.BatchNorm2d(cout)
    self.short = None
    if stride != 1 or cin != cout:
      self.short = nn.Sequential(nn.Conv2d(cin, cout, 1, stride, bias=False), nn.BatchNorm2d(cout))

  def forward(self, x):
    y = F.relu(self.b1(self.c1(x)))
    y = self.b2(self.c2(y))
    return F.relu(y + (x if self.short is None else self.short(x)))


def make_unit(k: int, width: float) -> nn.Module:
  ch = lambda j: max(1, int(round(64 * 2 ** (0 if j == 1 else (j - 2) // 2) * width)))
  if k == 1:
    return nn.Sequential(nn.Conv2d(3, ch(1), 3, 1, 1, bias=False), nn.BatchNorm2d(ch(1)), nn.ReLU())
  return BasicBlock(ch(k - 1), ch(k), 2 if k in (4, 6, 8) else 1)


class Head(nn.Module):
  def __init__(self, cin, classes):
    super().__init__()
    self.fc = nn.Linear(cin, classes)

  def forward(self, x):
    return self.fc(x.mean((2, 3)))


VARIANTS = {
    "torch": dict(sync_every_step=True, channels_last=False, amp=False, compile=False),
    "torch_fair": dict(sync_every_step=False, channels_last=True, amp=False, compile=False),
    "torch_amp": dict(sync_every_step=False, channels_last=True, amp=True, compile=False),
    "torch_compile": dict(sync_every_step=False, channels_last=True, amp=True, compile=True),
}


class Client:
  """Client part + exit head and (Averaging) its own server part + classifier,
  trained as ``variant`` says (a key of :data:`VARIANTS`)."""

  def __init__(self, cut: int, width: float, classes: int, lr=0.05, device="cpu",
               variant: str = "torch"):
    self.cut, self.device = cut, device
    self.options = VARIANTS[variant]
    self.units = {k: make_unit(k, width).to(device) for k in range(1, 10)}
    ch = lambda k: self.units[k].b2.num_features if k > 1 else self.units[1][1].num_features
    self.exit_head = Head(ch(cut), classes).to(device)
    self.classifier = Head(ch(9), classes).to(device)
    self.client = nn.Sequential(*[self.units[k] for k in range(1, cut + 1)])
    self.server = nn.Sequential(*[self.units[k] for k in range(cut + 1, 10)])
    if self.options["channels_last"]:
      for m in list(self.units.values()) + [self.exit_head, self.classifier]:
        m.to(memory_format=torch.channels_last)
    self.parts = (self.client, self.exit_head, self.server, self.classifier)
    if self.options["compile"]:
      self.parts = tuple(torch.compile(m) for m in self.parts)
    opt = lambda ps: torch.optim.SGD(ps, lr=lr, momentum=0.9, weight_decay=5e-4)
    self.opt_c = opt(list(self.client.parameters()) + list(self.exit_head.parameters()))
    self.opt_s = opt(list(self.server.parameters()) + list(self.classifier.parameters()))

  def step(self, x, y):
    """One local step; the two losses, as floats (``torch``: read on the host
    now) or as device tensors (the others: summed on the device)."""
    client, exit_head, server, classifier = self.parts
    if self.options["channels_last"]:
      x = x.contiguous(memory_format=torch.channels_last)
    autocast = torch.autocast(x.device.type, torch.bfloat16, enabled=self.options["amp"])
    with autocast:
      h = client(x)
      loss_c = F.cross_entropy(exit_head(h).float(), y)
    self.opt_c.zero_grad(set_to_none=True)
    loss_c.backward()
    self.opt_c.step()
    with autocast:
      loss_s = F.cross_entropy(classifier(server(h.detach())).float(), y)
    self.opt_s.zero_grad(set_to_none=True)
    loss_s.backward()
    self.opt_s.step()
    if self.options["sync_every_step"]:
      return loss_c.item(), loss_s.item()
    return loss_c.detach(), loss_s.detach()


@torch.no_grad()
def cross_layer_average(clients: list[Client]):
  """Average every unit (and the classifier) over all clients; equal weights."""
  modules = [[c.units[k] for c in clients] for k in range(1, 10)] + [[c.classifier for c in clients]]
  for group in modules:
    states = [m.state_dict() for m in group]
    for name, t in states[0].items():
      if t.dtype.is_floating_point:
        avg = torch.stack([s[name] for s in states]).mean(0)
        for s in states:
          s[name].copy_(avg)


def run_round(clients, images, labels, steps: int, batch: int, generator) -> float:
  """One Averaging round; ``images``/``labels`` on the clients' device.
  Returns the mean of the clients' losses over the round, read once at its end."""
  total = 0.0
  per_step = clients[0].options["sync_every_step"]
  if not per_step:  # the round's minibatch indices in one transfer
    every = torch.randint(0, len(labels), (len(clients), steps, batch), generator=generator)
    every = every.to(images.device)
  for i, c in enumerate(clients):
    for t in range(steps):
      idx = (torch.randint(0, len(labels), (batch,), generator=generator).to(images.device)
             if per_step else every[i, t])
      loss_c, loss_s = c.step(images[idx], labels[idx])
      total = total + loss_c + loss_s
  cross_layer_average(clients)
  total = float(total)  # the round's one host read (a device synchronisation)
  if images.is_cuda:
    torch.cuda.synchronize()
  return total / (2 * steps * len(clients))
