"""Hetero-SplitEE on a Flax network of your own, in your own loop, through hsee_jax's API."""
import dataclasses
from typing import ClassVar

import flax.linen as nn
import jax
import numpy as np

import hsee_jax as hsee


class Block(nn.Module):  # one unit: conv, batch norm, ReLU, 2x2 max-pool
  features: int

  @nn.compact
  def __call__(self, x, train: bool):
    x = nn.BatchNorm(not train, momentum=0.9)(nn.Conv(self.features, (3, 3))(x))
    return nn.max_pool(nn.relu(x), (2, 2), (2, 2))


@dataclasses.dataclass(frozen=True)
class SmallNet(hsee.SplitNetwork):  # the interface: a name, num_units and unit(k)
  name: ClassVar[str] = "smallnet"
  num_units: ClassVar[int] = 3

  def unit(self, k):
    return Block(int(16 * 2 ** (k - 1) * self.width))


def main(rounds=3, steps=4, batch=32, cuts=(1, 2)):
  data = hsee.load_dataset(hsee.Config(train_subset=1024, test_subset=500))  # shipped CIFAR-10
  net, key, train_set = SmallNet(10), jax.random.PRNGKey(0), hsee.put_train_set(data)
  tx, shards = hsee.direction("sgd", False, 0.9, 5e-4), hsee.partition(data.train_labels, len(cuts))
  parts = {(side, i): hsee.init_part(tx, *net.init_span(key, *span(c), data.image_shape))
           for i, c in enumerate(cuts)  # client part + exit head, and its own server part
           for side, span in (("client", net.client_span), ("server", net.server_span))}
  runners = {c: hsee.ClientRunner(hsee.split_update(net, c), "loop") for c in cuts}
  hparams = np.tile(np.float32([0.05, 0.9, 5e-4, 1.0]), (steps, 1))  # lr, momentum, wd, exit weight
  for rnd in range(rounds):
    for i, c in enumerate(cuts):
      idx = np.random.default_rng([rnd, i]).choice(shards[i], (steps, batch)).astype(np.int32)
      state = (parts["client", i], parts["server", i], jax.random.PRNGKey(rnd * 9 + i))
      (parts["client", i], parts["server", i]), m = runners[c].one(
          train_set, state, (idx, hparams))
      print(f"round {rnd + 1} cut {c}:", *(f"{k} {v:.3f}" for k, v in zip(hsee.METRIC_NAMES, m)))
    parts = {k: jax.tree.map(lambda a: a[0], p) for k, p in hsee.cross_layer_average(  # aggregation
        {k: jax.tree.map(lambda a: a[None], p) for k, p in parts.items()},
        {k: np.float32([len(shards[k[1]])]) for k in parts}).items()}
  images, acc = np.float32((data.test_images / 255.0 - data.mean) / data.std), []
  for i, c in enumerate(cuts):
    variables = [(p.params, p.batch_stats) for p in (parts["client", i], parts["server", i])]
    exits, logits, _, _ = net.split_forward(variables[:1], variables[1], images, [c], train=False)
    acc += [float(np.mean(np.argmax(x, -1) == data.test_labels)) for x in (exits[0], logits)]
    print(f"cut {c}: test exit_acc {acc[-2]:.3f} full_acc {acc[-1]:.3f}")
  return acc


if __name__ == "__main__":
  main()
