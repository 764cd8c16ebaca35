"""nextstep-sample --workdir RUN --prompts FILE --out DIR [--seed 0] [--cfg 3.0] [--num-steps 50] ...

Writes one PNG per prompt (in order: 0000.png, 0001.png, ...) and samples.jsonl with the prompt,
file, seed and sampler settings of each image. Prompt file: one prompt per line (blank lines
skipped). Image i uses seed `--seed + i` (default --seed: the run's sample.seed).
"""
import argparse
import json
import pathlib
import sys


def main(argv=None) -> int:
  parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
  parser.add_argument('--workdir', required=True, help='a training run directory (nextstep-train --workdir)')
  parser.add_argument('--prompts', required=True, help='text file, one prompt per line')
  parser.add_argument('--out', required=True, help='output directory for PNGs and samples.jsonl')
  parser.add_argument('--step', type=int, default=None, help='checkpoint step (default: latest)')
  parser.add_argument('--seed', type=int, default=None,
                      help='seed of the first image, image i uses seed + i (default: sample.seed of the run)')
  parser.add_argument('--cfg', type=float, default=None, help='guidance scale (default: the run config)')
  parser.add_argument('--num-steps', type=int, default=None, help='head integration steps')
  parser.add_argument('--solver', choices=('sde', 'euler', 'heun'), default=None)
  parser.add_argument('--temperature', type=float, default=None)
  parser.add_argument('--batch-size', type=int, default=None, help='images per jitted call')
  args = parser.parse_args(sys.argv[1:] if argv is None else argv)
  prompts_path = pathlib.Path(args.prompts)
  if not prompts_path.exists():
    parser.error(f'--prompts {prompts_path} does not exist')
  prompts = [line.strip() for line in prompts_path.read_text(encoding='utf-8').splitlines() if line.strip()]
  if not prompts:
    parser.error(f'--prompts {prompts_path} holds no prompts')
  overrides = {name: value for name, value in (
      ('cfg', args.cfg), ('num_steps', args.num_steps), ('solver', args.solver),
      ('temperature', args.temperature), ('batch_size', args.batch_size)) if value is not None}

  from nextstep_jax.sampling import pipeline  # pylint: disable=g-import-not-at-top (after flag errors)
  from nextstep_jax.utils import images as image_utils  # pylint: disable=g-import-not-at-top
  sampler = pipeline.TextToImage.from_workdir(args.workdir, args.step, **overrides)
  first_seed = sampler.settings['seed'] if args.seed is None else args.seed
  seeds = [first_seed + i for i in range(len(prompts))]
  images = sampler(prompts, seeds)
  out = pathlib.Path(args.out)
  out.mkdir(parents=True, exist_ok=True)
  with open(out / 'samples.jsonl', 'w', encoding='utf-8') as f:
    for i, (prompt, seed, image) in enumerate(zip(prompts, seeds, images)):
      name = f'{i:04d}.png'
      image_utils.save_png(out / name, image)
      f.write(json.dumps({'prompt': prompt, 'file': name, 'seed': seed, 'settings': sampler.settings}) + '\n')
  print(f'wrote {len(prompts)} images and samples.jsonl to {out}')
  return 0


if __name__ == '__main__':
  sys.exit(main())
