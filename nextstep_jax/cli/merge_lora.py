"""nextstep-merge-lora --workdir RUN [--step N] --out DIR

Folds the LoRA adapters of a training run (train.lora.rank > 0) into its base kernels,
W' = W + (alpha / r) a @ b (model/lora.py), and writes DIR as a plain run: config.json with LoRA
off, the run's tokenizer, and checkpoints/<step> holding the merged params (and a fresh optimizer
state, so DIR also continues as full fine-tuning). `nextstep-sample --workdir DIR` samples it with
the base model's graph; its images equal the adapter model's.
"""

import argparse
import shutil
import sys

import jax
from etils import epath

from nextstep_jax import checkpoints
from nextstep_jax import configlib
from nextstep_jax import errors
from nextstep_jax import runs
from nextstep_jax.cli import entry
from nextstep_jax.model import lora
from nextstep_jax.training import state as state_lib


class NotALoraRunError(errors.UsageError, ValueError):
  """The run has no adapters to merge."""


def merge_run(workdir: str, out: str, step: int | None = None) -> int:
  """Writes the merged run to `out`; returns the step merged."""
  source = epath.Path(workdir)
  runs.check_files(workdir)
  # Every param of the run (the LM head too), in its stored dtype: the merged run trains on.
  restored = runs.restore_run(workdir, step, params_only=True)
  cfg = lora.LoraConfig.from_config(restored.config)
  if cfg is None:
    raise NotALoraRunError(
      f'{workdir} is not a LoRA run (train.lora.rank is 0): nothing to merge; sample or '
      'export it as it is.'
    )
  config = configlib.with_base_defaults(restored.config).copy_and_resolve_references()
  with config.unlocked():
    config.train.lora.rank = 0
  merged = lora.merge_adapters(restored.state, cfg)
  tx = state_lib.make_optimizer(config.train)
  step = restored.step
  target = epath.Path(out)
  if (target / runs.CHECKPOINT_DIR).exists():
    raise errors.UsageError(f'{target / runs.CHECKPOINT_DIR} exists; choose an empty --out.')
  target.mkdir(parents=True, exist_ok=True)
  (target / runs.CONFIG_FILE).write_text(configlib.config_to_json(config))
  for name in (runs.TOKENIZER_FILE, runs.HF_TOKENIZER_FILE):
    if (source / name).exists():
      shutil.copyfile(str(source / name), str(target / name))
  state = {
    'params': merged,
    'opt_state': tx.init(merged),
    'step': jax.numpy.asarray(step, jax.numpy.int32),
  }
  ckpt = checkpoints.Checkpointer(target / runs.CHECKPOINT_DIR, keep=1, async_save=False)
  ckpt.save(step, state)
  ckpt.close()
  return step


def main(argv=None) -> int:
  return entry.run(_main, argv)


def _main(argv) -> int:
  parser = entry.ArgumentParser(
    description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
  )
  parser.add_argument('--workdir', required=True, help='a LoRA training run')
  parser.add_argument(
    '--step', type=int, default=None, help='checkpoint to merge (default: latest)'
  )
  parser.add_argument('--out', required=True, help='directory of the merged run')
  args = parser.parse_args(argv)
  step = merge_run(args.workdir, args.out, args.step)
  print(f'merged the adapters of {args.workdir} step {step} into {args.out}')
  return 0


if __name__ == '__main__':
  sys.exit(main())
