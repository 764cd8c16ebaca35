"""Multi-process (multi-host) start-up: `jax.distributed.initialize` from flags or environment.

Explicit settings (flags, or NEXTSTEP_COORDINATOR / NEXTSTEP_NUM_PROCESSES / NEXTSTEP_PROCESS_ID)
win; with none, a TPU VM slice is auto-detected by JAX (`initialize()` with no arguments) and a
single machine runs as one process. CPU processes use gloo collectives.
"""

import os

import jax


def initialize(
  coordinator: str | None = None, num_processes: int | None = None, process_id: int | None = None
) -> None:
  """Joins the job's processes (no-op for a single process). Call before any other JAX use."""
  coordinator = coordinator or os.environ.get('NEXTSTEP_COORDINATOR')
  if num_processes is None and os.environ.get('NEXTSTEP_NUM_PROCESSES'):
    num_processes = int(os.environ['NEXTSTEP_NUM_PROCESSES'])
  if process_id is None and os.environ.get('NEXTSTEP_PROCESS_ID'):
    process_id = int(os.environ['NEXTSTEP_PROCESS_ID'])
  explicit = (coordinator, num_processes, process_id)
  if any(v is not None for v in explicit):
    if any(v is None for v in explicit):
      raise ValueError(
        f'multi-process start needs all of coordinator, num_processes and process_id; '
        f'got coordinator={coordinator!r}, num_processes={num_processes}, process_id={process_id}'
      )
    if num_processes == 1:
      return
    jax.config.update('jax_cpu_collectives_implementation', 'gloo')
    jax.distributed.initialize(coordinator, num_processes, process_id)
  elif os.environ.get('TPU_WORKER_HOSTNAMES', '').count(',') > 0:  # A multi-host TPU VM slice.
    jax.distributed.initialize()


def process_rows(
  batch: dict, process_index: int | None = None, process_count: int | None = None
) -> dict:
  """This process's contiguous share of a global host batch (leading dim B, B % processes == 0)."""
  index = jax.process_index() if process_index is None else process_index
  count = jax.process_count() if process_count is None else process_count
  if count == 1:
    return batch
  rows = next(iter(batch.values())).shape[0]
  if rows % count:
    raise ValueError(
      f'global batch {rows} is not divisible by {count} processes; change train.batch_size'
    )
  per = rows // count
  return {k: v[index * per : (index + 1) * per] for k, v in batch.items()}
