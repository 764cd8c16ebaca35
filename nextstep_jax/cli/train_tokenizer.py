"""nextstep-train-tokenizer --config configs/tokenizer_shapes.py[:variant] --workdir DIR [--config.x=y]

Trains (or resumes) the VAE image tokenizer; the finished run's DIR/release is what
image.vae.checkpoint=DIR points the AR model at.
"""
import sys

from nextstep_jax.cli import train as train_cli


def main(argv=None) -> int:
  args, config = train_cli.parse_config(sys.argv[1:] if argv is None else argv, __doc__)
  from nextstep_jax.parallel import distributed  # pylint: disable=g-import-not-at-top (after flag errors)
  distributed.initialize(args.coordinator, args.num_processes, args.process_id)
  from nextstep_jax.training import tokenizer_train  # pylint: disable=g-import-not-at-top
  workdir = args.workdir or f'runs/{config.name}'
  result = tokenizer_train.train(config, workdir)
  print(f'finished step {result["step"]}: psnr {result.get("psnr", float("nan")):.2f} dB (train batch); '
        f'workdir: {workdir}')
  return 0


if __name__ == '__main__':
  sys.exit(main())
