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

Everything checkable is checked before the model loads: flag ranges, the prompt file (UTF-8),
and --out (created and write-tested first, so no sampled image is lost to an unwritable path).
User errors print one line (`--debug` or NEXTSTEP_DEBUG=1 for the traceback).
"""

import argparse
import json
import pathlib
import sys
import tempfile

from nextstep_jax import errors
from nextstep_jax.cli import entry


def parse_args(argv):
  parser = entry.ArgumentParser(
    description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
  )
  source = parser.add_mutually_exclusive_group(required=True)
  source.add_argument('--workdir', help='a training run directory (nextstep-train --workdir)')
  source.add_argument(
    '--converted', help='a converted official checkpoint (nextstep-convert --out)'
  )
  prompts = parser.add_mutually_exclusive_group(required=True)
  prompts.add_argument('--prompts', help='text file, one prompt per line')
  prompts.add_argument('--prompt', action='append', help='a prompt (repeatable)')
  parser.add_argument('--out', required=True, help='output directory for PNGs and samples.jsonl')
  parser.add_argument(
    '--step', type=int, default=None, help='checkpoint step of --workdir (default: latest)'
  )
  parser.add_argument(
    '--seed',
    type=int,
    default=None,
    help='seed of the first image, image n uses seed + n (default: sample.seed)',
  )
  parser.add_argument('--num-images-per-caption', type=int, default=1)
  parser.add_argument(
    '--cfg', type=float, default=None, help='text guidance scale (default: the config)'
  )
  parser.add_argument(
    '--cfg-img', type=float, default=2.0, help='image guidance scale of --edit-image'
  )
  parser.add_argument('--cfg-schedule', choices=('constant', 'linear'), default=None)
  parser.add_argument('--num-steps', type=int, default=None, help='head integration steps')
  parser.add_argument('--timestep-shift', type=float, default=None, help="t' = t / (s - (s - 1) t)")
  parser.add_argument('--solver', choices=('sde', 'euler', 'heun'), default=None)
  parser.add_argument('--temperature', type=float, default=None)
  parser.add_argument(
    '--positive-prompt', default=None, help='appended to every prompt after a space'
  )
  parser.add_argument('--negative-prompt', default=None, help='text of the unconditional rows')
  parser.add_argument('--batch-size', type=int, default=None, help='images per jitted call')
  parser.add_argument('--height', type=int, default=None, help='image height in pixels')
  parser.add_argument('--width', type=int, default=None, help='image width in pixels')
  parser.add_argument('--aspect-ratio', default=None, help='W:H, the nearest official bucket')
  parser.add_argument('--edit-image', default=None, help='edit this image with each prompt')
  parser.add_argument('--grid', action='store_true', help='also write grid.png of all images')
  parser.add_argument('--progress', action='store_true', help='a progress bar over image tokens')
  parser.add_argument(
    '--max-caption-tokens',
    type=int,
    default=None,
    help="prompt token budget (default: the model's text.max_caption_tokens)",
  )
  args = parser.parse_args(argv)
  for flag, value, low, strict in (
    ('--num-images-per-caption', args.num_images_per_caption, 1, False),
    ('--height', args.height, 0, True),
    ('--width', args.width, 0, True),
    ('--batch-size', args.batch_size, 1, False),
    ('--num-steps', args.num_steps, 1, False),
    ('--cfg', args.cfg, 0, False),
    ('--cfg-img', args.cfg_img, 0, False),
    ('--temperature', args.temperature, 0, True),
    ('--timestep-shift', args.timestep_shift, 0, True),
    ('--max-caption-tokens', args.max_caption_tokens, 1, False),
    ('--step', args.step, 0, False),
  ):
    if value is not None and (value <= low if strict else value < low):
      parser.error(f'{flag} {value} must be {">" if strict else ">="} {low}')
  if args.aspect_ratio and (args.height or args.width):
    parser.error('give either --aspect-ratio or --height/--width')
  if args.edit_image and not pathlib.Path(args.edit_image).exists():
    parser.error(f'--edit-image {args.edit_image} does not exist')
  if args.prompts:
    path = pathlib.Path(args.prompts)
    if not path.exists():
      parser.error(f'--prompts {path} does not exist')
    data = path.read_bytes()
    try:
      text = data.decode('utf-8')
    except UnicodeDecodeError as error:
      line = data[: error.start].count(b'\n') + 1
      parser.error(
        f'--prompts {path} is not UTF-8 text (byte {error.start}, line {line}); save it as UTF-8'
      )
    args.prompt = [line.strip() for line in text.splitlines() if line.strip()]
    if not args.prompt:
      parser.error(f'--prompts {path} holds no prompts')
  return args


def prepare_out(out: pathlib.Path) -> None:
  """Creates --out and checks a file can be written there, before any sampling."""
  try:
    out.mkdir(parents=True, exist_ok=True)
    with tempfile.NamedTemporaryFile(dir=out, prefix='.write-test-'):
      pass
  except OSError as error:
    raise errors.UsageError(
      f'--out {out} is not writable ({error.strerror or error}); choose a '
      'directory you can write to'
    ) from error


def main(argv=None) -> int:
  return entry.run(_main, argv)


def _main(argv) -> int:
  args = parse_args(argv)
  out = pathlib.Path(args.out)
  prepare_out(out)
  overrides = {
    name: value
    for name, value in (
      ('cfg', args.cfg),
      ('num_steps', args.num_steps),
      ('solver', args.solver),
      ('temperature', args.temperature),
      ('batch_size', args.batch_size),
      ('timestep_shift', args.timestep_shift),
      ('cfg_schedule', args.cfg_schedule),
      ('positive_prompt', args.positive_prompt),
      ('negative_prompt', args.negative_prompt),
    )
    if value is not None
  }

  # After flag errors.
  import numpy as np

  from nextstep_jax.data import sequences
  from nextstep_jax.image import aspect
  from nextstep_jax.sampling import pipeline
  from nextstep_jax.utils import images as image_utils

  progress_every = 1 if args.progress else 0
  if args.max_caption_tokens is not None:
    overrides['max_caption_tokens'] = args.max_caption_tokens
  if args.converted:
    if args.step is not None:
      raise errors.UsageError(
        '--step applies to --workdir runs; a --converted checkpoint has one step'
      )
    sampler = pipeline.TextToImage.from_converted(
      args.converted, progress_every=progress_every, **overrides
    )
  else:
    sampler = pipeline.TextToImage.from_workdir(
      args.workdir, args.step, progress_every=progress_every, **overrides
    )
  size = sampler.config.image.size
  if args.aspect_ratio:
    height, width = aspect.size_for_ratio(aspect.parse_ratio(args.aspect_ratio), size)
  else:
    height = size if args.height is None else args.height
    width = size if args.width is None else args.width
  try:
    grid = sampler.grid_for_size(height, width)
  except ValueError as error:
    raise errors.UsageError(f'--height/--width: {error}') from error
  try:
    for prompt in args.prompt:  # Every prompt fits before any image is sampled.
      sampler.prompts([prompt], grid)
  except sequences.PromptTooLongError as error:
    raise errors.UsageError(
      f'prompt {error.caption[:60]!r} has {error.num_tokens} tokens, more than the '
      f'{error.max_caption_tokens} allowed; pass --max-caption-tokens {error.num_tokens} (or more) '
      'or shorten the prompt'
    ) from error
  k = args.num_images_per_caption
  prompts = [prompt for prompt in args.prompt for _ in range(k)]
  first_seed = sampler.settings['seed'] if args.seed is None else args.seed
  seeds = [first_seed + n for n in range(len(prompts))]
  if args.edit_image:
    source = image_utils.load_resized(args.edit_image, height, width)
    images = sampler.edit(
      np.stack([source] * len(prompts)), prompts, seeds, cfg_img=args.cfg_img, grid=grid
    )
  else:
    images = sampler(prompts, seeds, grid=grid)
  settings = dict(
    sampler.settings,
    height=height,
    width=width,
    **({'edit_image': args.edit_image, 'cfg_img': args.cfg_img} if args.edit_image else {}),
  )
  with open(out / 'samples.jsonl', 'w', encoding='utf-8') as f:
    for n, (prompt, seed, image) in enumerate(zip(prompts, seeds, images)):
      name = f'{n:04d}.png'
      image_utils.save_png(out / name, image)
      f.write(
        json.dumps({'prompt': prompt, 'file': name, 'seed': seed, 'settings': settings}) + '\n'
      )
  if args.grid:
    image_utils.save_png(out / 'grid.png', image_utils.make_grid(images, ncols=k if k > 1 else 8))
  print(f'wrote {len(prompts)} images and samples.jsonl to {out}')
  return 0


if __name__ == '__main__':
  sys.exit(main())
