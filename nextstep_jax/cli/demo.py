"""`make demo`: train the default shapes config on the CPU, sample, evaluate, print the workdir.

  python -m nextstep_jax.cli.demo [--tokenizer pixels|vae] [--config FILE[:variant]]
                                  [--workdir DIR] [--num-prompts 50] [--config.train.steps=...]

--tokenizer picks the default config and workdir: pixels -> configs/shapes.py:demo in runs/demo;
vae -> configs/demo_vae.py in runs/demo_vae. A VAE config without image.vae.checkpoint first trains
its tokenizer (vae_train.*) in <workdir>/tokenizer (reused once finished), then the AR model on its
latents. Rerunning the command resumes an interrupted run.

Writes <workdir>/demo/{seen_two,heldout}_grid.png with their prompts, and demo/scores.json.
"""

import json
import pathlib
import sys
import time

from nextstep_jax import errors
from nextstep_jax.cli import entry
from nextstep_jax.cli import train as train_cli

DEFAULTS = {
  'pixels': ('configs/shapes.py:demo', 'runs/demo'),
  'vae': ('configs/demo_vae.py', 'runs/demo_vae'),
}
DEFAULT_PROMPTS = 50
TOKENIZER_DIR = 'tokenizer'
TOKENIZER_EVAL_IMAGES = 256


def _pop_flag(argv: list, name: str, default: str) -> str:
  if name not in argv:
    return default
  i = argv.index(name)
  if i + 1 >= len(argv):
    raise errors.UsageError(f'{name} needs a value')
  value = argv[i + 1]
  del argv[i : i + 2]
  return value


def train_tokenizer(config, workdir: str) -> dict:
  """Trains (or reuses) the VAE of `config` in <workdir>/tokenizer, points image.vae.checkpoint at
  it and returns its held-out PSNR/SSIM and training minutes."""
  from nextstep_jax.evaluate import tokenizer_eval
  from nextstep_jax.image import vae_tokenizer
  from nextstep_jax.training import tokenizer_train

  root = pathlib.Path(workdir).resolve() / TOKENIZER_DIR
  if not (root / vae_tokenizer.RELEASE_DIR).exists():
    tokenizer_train.train(config, str(root))
  config.image.vae.checkpoint = str(root)
  scores = tokenizer_eval.evaluate_run(str(root), TOKENIZER_EVAL_IMAGES, sigmas=(0.0,))
  last = json.loads((root / 'metrics.jsonl').read_text().splitlines()[-1])
  return {
    'workdir': str(root),
    'steps': last['step'],
    'train_minutes': round(last['minutes'], 2),
    'heldout_psnr': scores['psnr'],
    'heldout_ssim': scores['ssim'],
  }


def main(argv=None) -> int:
  return entry.run(_main, argv, stop_signals='train')


def _main(argv) -> int:
  argv = list(argv)
  num_prompts_text = _pop_flag(argv, '--num-prompts', str(DEFAULT_PROMPTS))
  if not num_prompts_text.isdigit() or int(num_prompts_text) < 1:
    raise errors.UsageError(f'--num-prompts {num_prompts_text!r} must be a positive integer')
  num_prompts = int(num_prompts_text)
  tokenizer = _pop_flag(argv, '--tokenizer', 'pixels')
  if tokenizer not in DEFAULTS:
    raise errors.UsageError(f'--tokenizer {tokenizer!r}: use one of {", ".join(DEFAULTS)}')
  default_config, default_workdir = DEFAULTS[tokenizer]
  if not any(a == '--config' or a.startswith('--config=') for a in argv):
    argv = ['--config', default_config] + argv
  if not any(a == '--workdir' or a.startswith('--workdir=') for a in argv):
    argv += ['--workdir', default_workdir]
  args, config = train_cli.parse_config(argv, __doc__)

  from nextstep_jax.evaluate import run_eval
  from nextstep_jax.sampling import pipeline
  from nextstep_jax.training import loop
  from nextstep_jax.utils import images as image_utils

  start = time.monotonic()
  tokenizer_summary = {}
  if config.image.tokenizer == 'vae' and not config.image.vae.checkpoint:
    tokenizer_summary = {'tokenizer': train_tokenizer(config, args.workdir)}
  result = loop.train(config, args.workdir)
  if result.preempted:
    print(f'preempted at step {result.step}; rerun the same command to resume.')
    return 0
  sampler = pipeline.TextToImage.from_workdir(result.workdir)
  out = pathlib.Path(result.workdir) / 'demo'
  out.mkdir(parents=True, exist_ok=True)
  if config.data.dataset == 'shapes':
    scores, images = run_eval.evaluate_shapes(sampler, num_prompts)
    suites = run_eval.shapes_suites(num_prompts)
    for name in ('seen_two', 'heldout'):
      image_utils.save_png(
        out / f'{name}_grid.png', image_utils.make_grid(images[name][:64], ncols=8)
      )
      (out / f'{name}_prompts.txt').write_text('\n'.join(suites[name][:64]) + '\n')
  else:
    scores, images = run_eval.evaluate_digits(sampler, num_prompts, config.image.size)
    image_utils.save_png(out / 'digits_grid.png', image_utils.make_grid(images[:64], ncols=8))
  summary = {
    'config': config.name,
    'train_steps': result.step,
    'train_minutes': round(result.minutes, 2),
    **tokenizer_summary,
    'wall_minutes_this_invocation': round((time.monotonic() - start) / 60, 2),
    'final_metrics': result.metrics,
    'scores': scores,
    **run_eval.headline(config.data.dataset, scores),
  }
  summary = run_eval.json_safe(summary)
  (out / 'scores.json').write_text(json.dumps(summary, indent=2) + '\n')
  print(json.dumps(summary, indent=2))
  print(
    f'workdir: {result.workdir}  (try: nextstep-sample --workdir {result.workdir} '
    '--prompts PROMPTS.txt --out samples/)'
  )
  return 0


if __name__ == '__main__':
  sys.exit(main())
