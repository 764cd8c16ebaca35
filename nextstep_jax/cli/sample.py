"""nextstep-sample (--workdir RUN | --converted DIR) (--prompts FILE | --prompt TEXT ...) --out DIR [options]

Writes one PNG per image (in order: 0000.png, 0001.png, ...) and samples.jsonl with the prompt,
file, seed and sampler settings of each image; --grid adds grid.png. Prompt file: one prompt per
line (blank lines skipped). With --num-images-per-caption K, prompt i gives images i*K .. i*K+K-1;
image n uses seed `--seed + n` (default --seed: the model's sample.seed).

Sizes: --height/--width in pixels, or --aspect-ratio W:H (the nearest official bucket at the
config's image size, e.g. 16:9 at 512 -> 384x672); default the config's square image size.
Editing: --edit-image IMG applies every prompt (an instruction, "<image>" prepended when absent)
to IMG, resized to cover the target size and centre-cropped, with 3-way guidance (--cfg text,
--cfg-img image; official edit example: cfg 7.5, cfg-img 2, timestep shift 3.2, negative prompt
"Copy original image.").
"""
import argparse
import json
import pathlib
import sys


def parse_args(argv):
  parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
  source = parser.add_mutually_exclusive_group(required=True)
  source.add_argument('--workdir', help='a training run directory (nextstep-train --workdir)')
  source.add_argument('--converted', help='a converted official checkpoint (nextstep-convert --out)')
  prompts = parser.add_mutually_exclusive_group(required=True)
  prompts.add_argument('--prompts', help='text file, one prompt per line')
  prompts.add_argument('--prompt', action='append', help='a prompt (repeatable)')
  parser.add_argument('--out', required=True, help='output directory for PNGs and samples.jsonl')
  parser.add_argument('--step', type=int, default=None, help='checkpoint step of --workdir (default: latest)')
  parser.add_argument('--seed', type=int, default=None,
                      help='seed of the first image, image n uses seed + n (default: sample.seed)')
  parser.add_argument('--num-images-per-caption', type=int, default=1)
  parser.add_argument('--cfg', type=float, default=None, help='text guidance scale (default: the config)')
  parser.add_argument('--cfg-img', type=float, default=2.0, help='image guidance scale of --edit-image')
  parser.add_argument('--cfg-schedule', choices=('constant', 'linear'), default=None)
  parser.add_argument('--num-steps', type=int, default=None, help='head integration steps')
  parser.add_argument('--timestep-shift', type=float, default=None, help="t' = t / (s - (s - 1) t)")
  parser.add_argument('--solver', choices=('sde', 'euler', 'heun'), default=None)
  parser.add_argument('--temperature', type=float, default=None)
  parser.add_argument('--positive-prompt', default=None, help='appended to every prompt after a space')
  parser.add_argument('--negative-prompt', default=None, help='text of the unconditional rows')
  parser.add_argument('--batch-size', type=int, default=None, help='images per jitted call')
  parser.add_argument('--height', type=int, default=None, help='image height in pixels')
  parser.add_argument('--width', type=int, default=None, help='image width in pixels')
  parser.add_argument('--aspect-ratio', default=None, help='W:H, the nearest official bucket')
  parser.add_argument('--edit-image', default=None, help='edit this image with each prompt')
  parser.add_argument('--grid', action='store_true', help='also write grid.png of all images')
  parser.add_argument('--progress', action='store_true', help='a progress bar over image tokens')
  args = parser.parse_args(argv)
  if args.num_images_per_caption < 1:
    parser.error('--num-images-per-caption must be >= 1')
  if args.aspect_ratio and (args.height or args.width):
    parser.error('give either --aspect-ratio or --height/--width')
  if args.edit_image and not pathlib.Path(args.edit_image).exists():
    parser.error(f'--edit-image {args.edit_image} does not exist')
  if args.prompts:
    path = pathlib.Path(args.prompts)
    if not path.exists():
      parser.error(f'--prompts {path} does not exist')
    args.prompt = [line.strip() for line in path.read_text(encoding='utf-8').splitlines() if line.strip()]
    if not args.prompt:
      parser.error(f'--prompts {path} holds no prompts')
  return args


def main(argv=None) -> int:
  args = parse_args(sys.argv[1:] if argv is None else argv)
  overrides = {name: value for name, value in (
      ('cfg', args.cfg), ('num_steps', args.num_steps), ('solver', args.solver),
      ('temperature', args.temperature), ('batch_size', args.batch_size),
      ('timestep_shift', args.timestep_shift), ('cfg_schedule', args.cfg_schedule),
      ('positive_prompt', args.positive_prompt), ('negative_prompt', args.negative_prompt)) if value is not None}

  # pylint: disable=import-outside-toplevel (after flag errors)
  import numpy as np
  from nextstep_jax.image import aspect
  from nextstep_jax.sampling import pipeline
  from nextstep_jax.utils import images as image_utils
  progress_every = 1 if args.progress else 0
  if args.converted:
    sampler = pipeline.TextToImage.from_converted(args.converted, progress_every=progress_every, **overrides)
  else:
    sampler = pipeline.TextToImage.from_workdir(args.workdir, args.step, progress_every=progress_every,
                                                **overrides)
  size = sampler.config.image.size
  if args.aspect_ratio:
    height, width = aspect.size_for_ratio(aspect.parse_ratio(args.aspect_ratio), size)
  else:
    height, width = args.height or size, args.width or size
  grid = sampler.grid_for_size(height, width)
  k = args.num_images_per_caption
  prompts = [prompt for prompt in args.prompt for _ in range(k)]
  first_seed = sampler.settings['seed'] if args.seed is None else args.seed
  seeds = [first_seed + n for n in range(len(prompts))]
  if args.edit_image:
    source = image_utils.load_resized(args.edit_image, height, width)
    images = sampler.edit(np.stack([source] * len(prompts)), prompts, seeds, cfg_img=args.cfg_img, grid=grid)
  else:
    images = sampler(prompts, seeds, grid=grid)
  out = pathlib.Path(args.out)
  out.mkdir(parents=True, exist_ok=True)
  settings = dict(sampler.settings, height=height, width=width,
                  **({'edit_image': args.edit_image, 'cfg_img': args.cfg_img} if args.edit_image else {}))
  with open(out / 'samples.jsonl', 'w', encoding='utf-8') as f:
    for n, (prompt, seed, image) in enumerate(zip(prompts, seeds, images)):
      name = f'{n:04d}.png'
      image_utils.save_png(out / name, image)
      f.write(json.dumps({'prompt': prompt, 'file': name, 'seed': seed, 'settings': settings}) + '\n')
  if args.grid:
    image_utils.save_png(out / 'grid.png', image_utils.make_grid(images, ncols=k if k > 1 else 8))
  print(f'wrote {len(prompts)} images and samples.jsonl to {out}')
  return 0


if __name__ == '__main__':
  sys.exit(main())
