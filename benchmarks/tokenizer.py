"""Tokenizer benchmark: the small shapes VAE trained on this CPU without and with latent noise
regularisation; held-out PSNR/SSIM, robustness curves, and (optionally) the AR model's scores.

  python benchmarks/tokenizer.py [--variants plain noise] [--steps N] [--num 256] [--workdir runs]
      [--override data.num_train=5000 ...] [--ar-steps 0] [--ar-prompts 50] [--no-ar-baseline]
      [--ar-tag _3600_steps]

Per variant: `nextstep-train-tokenizer --config configs/tokenizer_shapes.py[:noise]` (skipped when
the run's release/ exists), then `nextstep-eval-tokenizer` scoring on `--num` held-out scenes (the
held-out colour-shape pairs). With `--ar-steps` > 0, configs/shapes_vae.py[:noise] trains the AR model
on each tokenizer for that many steps and the shapes evaluator scores it on `--ar-prompts`
prompts per suite, and so does the pixels model on the same budget (the baseline; skip it with
`--no-ar-baseline`); `--ar-tag` suffixes the AR score keys so longer runs sit beside shorter ones.
Writes benchmarks/results/tokenizer.json (merged into the file as it is when the run ends, so
variants can run as separate, even concurrent, commands), tokenizer_robustness.png and
tokenizer_recon_*.png.
"""

import argparse
import datetime
import json
import os
import pathlib
import platform
import shutil
import sys

import jax

from nextstep_jax import configlib
from nextstep_jax.evaluate import run_eval
from nextstep_jax.evaluate import tokenizer_eval
from nextstep_jax.sampling import pipeline
from nextstep_jax.training import loop
from nextstep_jax.training import tokenizer_train

RESULTS = pathlib.Path(__file__).parent / 'results'
SIGMAS = (0.0, 0.1, 0.2, 0.3, 0.5, 0.8)
VARIANTS = {'plain': '', 'noise': 'noise'}  # Label -> configs/tokenizer_shapes.py variant.


def last_record(workdir: pathlib.Path) -> dict:
  return json.loads((workdir / 'metrics.jsonl').read_text().splitlines()[-1])


def main(argv=None) -> int:
  parser = argparse.ArgumentParser(description=__doc__)
  parser.add_argument('--variants', nargs='*', default=list(VARIANTS), choices=list(VARIANTS))
  parser.add_argument('--steps', type=int, default=0, help='vae_train.steps override (0 = config)')
  parser.add_argument(
    '--override', nargs='*', default=[], help='more tokenizer config overrides, a.b=c'
  )
  parser.add_argument('--num', type=int, default=256, help='held-out images scored')
  parser.add_argument('--workdir', default='runs', help='parent of the run directories')
  parser.add_argument(
    '--ar-steps', type=int, default=0, help='AR training steps per tokenizer (0 = skip)'
  )
  parser.add_argument('--ar-prompts', type=int, default=50)
  parser.add_argument(
    '--ar-baseline',
    action=argparse.BooleanOptionalAction,
    default=True,
    help='also train and score the pixels model on the same AR budget',
  )
  parser.add_argument('--ar-tag', default='', help='suffix of the AR score keys, e.g. _3600_steps')
  args = parser.parse_args(sys.argv[1:] if argv is None else argv)
  command = 'python ' + ' '.join([sys.argv[0]] + (sys.argv[1:] if argv is None else list(argv)))
  out_path = RESULTS / 'tokenizer.json'
  results = {key: {} for key in ('psnr', 'ssim', 'robustness', 'runs', 'ar_scores')}
  for label in args.variants:
    variant = VARIANTS[label]
    workdir = pathlib.Path(args.workdir) / ('tokenizer_shapes' + (f'_{variant}' if variant else ''))
    config_path = 'configs/tokenizer_shapes.py' + (f':{variant}' if variant else '')
    overrides = ([f'vae_train.steps={args.steps}'] if args.steps else []) + list(args.override)
    if not (workdir / 'release').exists():
      tokenizer_train.train(configlib.load_config(config_path, overrides), str(workdir))
    scores = tokenizer_eval.evaluate_run(str(workdir), args.num, SIGMAS)
    record = last_record(workdir)
    stats = json.loads((workdir / tokenizer_train.STATS_FILE).read_text())
    results['psnr'][label] = scores['psnr']
    results['ssim'][label] = scores['ssim']
    results['robustness'][label] = scores['robustness']
    results['runs'][label] = {
      'command': f'nextstep-train-tokenizer --config {config_path} --workdir {workdir} '
      + ' '.join(f'--config.{o}' for o in overrides),
      'noise_max': scores['noise_max'],
      'steps': record['step'],
      'train_minutes': round(record['minutes'], 2),
      'train_batch_psnr': record['psnr'],
      'latent_shape': scores['latent_shape'],
      'n_heldout': scores['n'],
      'channel_mean': stats['channel_mean'],
      'channel_std': stats['channel_std'],
      'scaling_factor': stats['scaling_factor'],
      'shift_factor': stats['shift_factor'],
    }
    grids = sorted((workdir / 'grids').glob('step_*.png'))
    shutil.copyfile(grids[-1], RESULTS / f'tokenizer_recon_{label}.png')
    print(
      json.dumps(
        {
          label: results['runs'][label]
          | {'psnr': scores['psnr'], 'ssim': scores['ssim'], 'robustness': scores['robustness']}
        }
      ),
      flush=True,
    )
    if args.ar_steps:
      ar_config = configlib.load_config(
        'configs/shapes_vae.py' + (f':{variant}' if variant else ''),
        [f'train.steps={args.ar_steps}', f'image.vae.checkpoint={workdir}'],
      )
      ar_dir = pathlib.Path(args.workdir) / ar_config.name
      train_result = loop.train(ar_config, str(ar_dir))
      scores, _ = run_eval.evaluate_shapes(
        pipeline.TextToImage.from_workdir(str(ar_dir)), args.ar_prompts
      )
      results['ar_scores'][f'vae_{label}{args.ar_tag}'] = {
        **run_eval.headline('shapes', scores),
        'steps': args.ar_steps,
        'train_minutes': round(train_result.minutes, 2),
        'prompts_per_suite': args.ar_prompts,
        'command': command,
      }
  if args.ar_steps and args.ar_baseline:  # The pixels tokenizer on the same budget: like for like.
    ar_config = configlib.load_config('configs/shapes.py', [f'train.steps={args.ar_steps}'])
    ar_dir = pathlib.Path(args.workdir) / f'{ar_config.name}_{args.ar_steps}'
    train_result = loop.train(ar_config, str(ar_dir))
    scores, _ = run_eval.evaluate_shapes(
      pipeline.TextToImage.from_workdir(str(ar_dir)), args.ar_prompts
    )
    results['ar_scores'][f'pixels{args.ar_tag}'] = {
      **run_eval.headline('shapes', scores),
      'steps': args.ar_steps,
      'train_minutes': round(train_result.minutes, 2),
      'prompts_per_suite': args.ar_prompts,
      'command': command,
    }
  quality = json.loads((RESULTS / 'quality.json').read_text())
  quality_scores = {
    'pixels_3600_steps': {k: quality[k] for k in quality if k.startswith('shapes_')}
    | {'steps': quality['shapes']['train_steps'], 'source': 'benchmarks/results/quality.json'}
  }
  stored = (
    json.loads(out_path.read_text()) if out_path.exists() else {}
  )  # Another command's figures.
  for key, values in results.items():  # This run's figures win, then quality.json's.
    results[key] = stored.get(key, {}) | (quality_scores if key == 'ar_scores' else {}) | values
  tokenizer_eval.plot_robustness(
    {k: {'robustness': v} for k, v in results['robustness'].items()},
    str(RESULTS / 'tokenizer_robustness.png'),
  )
  results = stored | results
  results.update(
    sigmas=list(SIGMAS),
    date=datetime.datetime.now(datetime.timezone.utc).isoformat(timespec='seconds'),
    command=command,
    machine=f'{platform.machine()} {os.cpu_count()} CPUs, {jax.devices()[0].device_kind}',
  )
  out_path.write_text(json.dumps(run_eval.json_safe(results), indent=2) + '\n')
  print(f'wrote {out_path}')
  return 0


if __name__ == '__main__':
  sys.exit(main())
