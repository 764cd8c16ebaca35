"""The training loop's data interface: this process's batches plus a checkpointable iterator state.

A `TrainingData` yields, on each call of `next_batch()`, this process's rows of the next global
batch (numpy arrays with the keys of `nextstep_jax.training.step.BATCH_KEYS`, leading dimension
train.batch_size / process_count). `get_state()` returns a JSON-serialisable dict that
`set_state()` accepts to continue exactly after the last batch returned; the loop saves it, per
process, in the same orbax checkpoint as the model and optimizer.

`make_training_data(config, tokenizer, process_index, process_count)` picks the implementation:
the Grain pipeline (data/grain_pipeline.py: ArrayRecord shards, TFDS, the latent cache, or the
built-in data with `data.grain_builtin`) whenever `grain_pipeline.uses_grain(config)`, whose state
is Grain's iterator state; otherwise the built-in data sets (shapes, digits) in memory from
`BuiltinSource`, whose batches are a pure function of (seed, step), so their state is the next step;
edit triplets (data.source='edit') from `edit_data.EditTrainingData`, stepped the same way.
"""

from typing import Protocol

import numpy as np

from nextstep_jax.data import builtin
from nextstep_jax.data import builtin_source
from nextstep_jax.data import grain_pipeline
from nextstep_jax.data import text_tokenizer
from nextstep_jax.parallel import distributed

BUILTIN_DATASETS = builtin.DATASETS
HELDOUT_SEED_OFFSET = 1_000_003  # Held-out examples are generated from seed + this offset.


class TrainingData(Protocol):
  """What the training loop consumes (see module docstring)."""

  def next_batch(self) -> dict[str, np.ndarray]:
    """This process's rows of the next global batch."""

  def get_state(self) -> dict:
    """JSON-serialisable position after the last batch returned."""

  def set_state(self, state: dict) -> None:
    """Continues from a `get_state()` result."""


class BuiltinTrainingData:
  """Batches of a built-in data set; the state is the step of the next batch."""

  kind = 'builtin'

  def __init__(self, source: builtin_source.BuiltinSource, process_index: int, process_count: int):
    self.source = source
    self.process_index, self.process_count = process_index, process_count
    self._step = 0

  def next_batch(self) -> dict[str, np.ndarray]:
    batch = self.source.batch(self._step)
    self._step += 1
    return distributed.process_rows(batch, self.process_index, self.process_count)

  def get_state(self) -> dict:
    return {'kind': self.kind, 'step': self._step}

  def set_state(self, state: dict) -> None:
    if state.get('kind') != self.kind or not isinstance(state.get('step'), int):
      raise ValueError(
        f'{state!r} is not a {self.kind} data state (want {{"kind": "{self.kind}", '
        '"step": int}); resume with the data config that wrote the checkpoint'
      )
    self._step = state['step']


def make_training_data(
  config, tok: text_tokenizer.TextTokenizer, process_index: int, process_count: int
) -> TrainingData:
  """The training data of `config.data` for process `process_index` of `process_count`."""
  if config.data.source == 'edit':
    from nextstep_jax.data import edit_data

    return edit_data.EditTrainingData(config, tok, process_index, process_count)
  if grain_pipeline.uses_grain(config):
    return grain_pipeline.make_grain_training_data(config, tok, process_index, process_count)
  if config.data.dataset in BUILTIN_DATASETS:
    return BuiltinTrainingData(
      builtin_source.BuiltinSource(config, tok), process_index, process_count
    )
  raise ValueError(
    f'data.dataset={config.data.dataset!r} has no training data; use one of {BUILTIN_DATASETS}'
  )


def heldout_batch(
  config, tok: text_tokenizer.TextTokenizer, num_sequences: int
) -> dict[str, np.ndarray]:
  """A fixed batch of `num_sequences` examples generated apart from the training set.

  Built-in data: the same generator with seed + HELDOUT_SEED_OFFSET, so the examples follow the
  training distribution (shapes: new scenes; digits: new augmentations of the digit images).
  """
  if config.data.dataset not in BUILTIN_DATASETS:
    raise ValueError(
      f'data.dataset={config.data.dataset!r} has no held-out batch; use one of {BUILTIN_DATASETS}'
    )
  heldout = config.copy_and_resolve_references()
  with heldout.unlocked():
    heldout.seed = config.seed + HELDOUT_SEED_OFFSET
    heldout.data.num_train = num_sequences
  return builtin_source.BuiltinSource(heldout, tok).batch(0, num_sequences)
