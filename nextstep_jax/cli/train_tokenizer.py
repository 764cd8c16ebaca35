"""nextstep-train-tokenizer --config configs/tokenizer_shapes.py[:variant] --workdir DIR [--config.x=y]

Trains (or resumes) the VAE image tokenizer; the finished run's DIR/release is what
image.vae.checkpoint=DIR points the AR model at.
"""

import sys

from nextstep_jax import errors
from nextstep_jax.cli import entry
from nextstep_jax.cli import train as train_cli


def main(argv=None) -> int:
  return entry.run(_main, argv)


def _main(argv) -> int:
  args, config = train_cli.parse_config(argv, __doc__)
  if args.step is not None:
    raise errors.UsageError(
      '--step is not supported by nextstep-train-tokenizer (it resumes from its newest checkpoint)'
    )
  from nextstep_jax.parallel import distributed  # after flag errors

  distributed.initialize(args.coordinator, args.num_processes, args.process_id)
  from nextstep_jax.training import tokenizer_train

  workdir = args.workdir or f'runs/{config.name}'
  result = tokenizer_train.train(config, workdir)
  print(
    f'finished step {result["step"]}: psnr {result.get("psnr", float("nan")):.2f} dB (train batch); '
    f'workdir: {workdir}'
  )
  return 0


if __name__ == '__main__':
  sys.exit(main())
