"""`make demo`: train the default shapes config on the CPU, sample, evaluate, print the workdir.

  python -m nextstep_jax.cli.demo [--config configs/shapes.py:demo] [--workdir runs/demo]
                                  [--num-prompts 50] [--config.train.steps=...]

Writes <workdir>/demo/{seen,heldout}_grid.png with their prompts, and demo/scores.json.
"""
import json
import pathlib
import sys

from nextstep_jax.cli import train as train_cli

DEFAULT_CONFIG = 'configs/shapes.py:demo'
DEFAULT_PROMPTS = 50


def main(argv=None) -> int:
  argv = list(sys.argv[1:] if argv is None else argv)
  num_prompts = DEFAULT_PROMPTS
  if '--num-prompts' in argv:
    i = argv.index('--num-prompts')
    num_prompts = int(argv[i + 1])
    del argv[i:i + 2]
  if not any(a == '--config' or a.startswith('--config=') for a in argv):
    argv = ['--config', DEFAULT_CONFIG] + argv
  if not any(a == '--workdir' or a.startswith('--workdir=') for a in argv):
    argv += ['--workdir', 'runs/demo']
  args, config = train_cli.parse_config(argv, __doc__)

  from nextstep_jax.evaluate import run_eval  # pylint: disable=g-import-not-at-top
  from nextstep_jax.sampling import pipeline  # pylint: disable=g-import-not-at-top
  from nextstep_jax.training import loop  # pylint: disable=g-import-not-at-top
  from nextstep_jax.utils import images as image_utils  # pylint: disable=g-import-not-at-top

  result = loop.train(config, args.workdir)
  sampler = pipeline.TextToImage.from_workdir(result.workdir)
  out = pathlib.Path(result.workdir) / 'demo'
  out.mkdir(parents=True, exist_ok=True)
  if config.data.dataset == 'shapes':
    scores, images = run_eval.evaluate_shapes(sampler, num_prompts)
    suites = run_eval.shapes_suites(num_prompts)
    for name in ('seen_two', 'heldout'):
      image_utils.save_png(out / f'{name}_grid.png', image_utils.make_grid(images[name][:64], ncols=8))
      (out / f'{name}_prompts.txt').write_text('\n'.join(suites[name][:64]) + '\n')
  else:
    scores, images = run_eval.evaluate_digits(sampler, num_prompts, config.image.size)
    image_utils.save_png(out / 'digits_grid.png', image_utils.make_grid(images[:64], ncols=8))
  summary = {'config': config.name, 'train_steps': result.step, 'train_minutes': round(result.minutes, 2),
             'final_metrics': result.metrics, 'scores': scores,
             **run_eval.headline(config.data.dataset, scores)}
  summary = run_eval.json_safe(summary)
  (out / 'scores.json').write_text(json.dumps(summary, indent=2) + '\n')
  print(json.dumps(summary, indent=2))
  print(f'workdir: {result.workdir}  (try: nextstep-sample --workdir {result.workdir} '
        '--prompts PROMPTS.txt --out samples/)')
  return 0


if __name__ == '__main__':
  sys.exit(main())
