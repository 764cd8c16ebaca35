"""nextstep-convert --hf-dir RELEASE --out DIR [--dtype float32|bfloat16] [--vae TOKENIZER_DIR]
nextstep-convert --export-run WORKDIR[@STEP] --out DIR

Converts an official NextStep-1 release (a download of e.g. stepfun-ai/NextStep-1-Large:
config.json, model.safetensors.index.json + shards, tokenizer.json, vae/) into DIR: config.json
(ours), tokenizer.json, vae/ (the image tokenizer, from the release's vae/ or --vae, import-checked)
and params/ (orbax; `TextToImage.from_converted(DIR)` or `nextstep-sample --converted DIR` restore
it sharded onto any mesh). Host memory: the params once in --dtype (14B: 60 GB float32, 30 GB
bfloat16) plus one tensor. --quantize int8|int4 stores weight-only quantized linear layers
(config model.quant; each release tensor quantized as it is read), so host memory holds the
quantized params (int4 at one byte per weight on the host, half a byte on device) plus one
float tensor.

--export-run writes a fine-tuned run (trained with text.tokenizer='hf', e.g. from train.init_from
a converted release) back into the same layout: params only (no optimizer state), its
tokenizer.json, its VAE as vae/ and its config, so `nextstep-sample --converted DIR` samples it.
"""

import argparse
import sys

from nextstep_jax.cli import entry


def main(argv=None) -> int:
  return entry.run(_main, argv)


def _main(argv) -> int:
  parser = entry.ArgumentParser(
    description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
  )
  source = parser.add_mutually_exclusive_group(required=True)
  source.add_argument('--hf-dir', help='directory of the official release')
  source.add_argument('--export-run', help='a training workdir (WORKDIR or WORKDIR@STEP) to export')
  parser.add_argument('--out', required=True, help='output directory (must not hold params/ yet)')
  parser.add_argument(
    '--dtype',
    default='float32',
    choices=('float32', 'bfloat16'),
    help='stored parameter dtype (model.param_dtype)',
  )
  parser.add_argument(
    '--compute-dtype',
    default='bfloat16',
    choices=('float32', 'bfloat16'),
    help='activation dtype of the converted config (model.dtype)',
  )
  parser.add_argument(
    '--image-tokenizer',
    default='vae',
    choices=('vae', 'pixels'),
    help='image tokenizer of the converted config (official: vae)',
  )
  parser.add_argument(
    '--vae',
    default=None,
    help="image tokenizer folder (config.json + checkpoint.pt): default the release's vae/",
  )
  parser.add_argument(
    '--image-size', type=int, default=512, help='default square image side in pixels'
  )
  parser.add_argument(
    '--max-caption-tokens', type=int, default=256, help='prompt token budget per caption'
  )
  parser.add_argument(
    '--quantize',
    default=None,
    choices=('int8', 'int4'),
    help='weight-only quantization of the linear layers (model.quant.mode)',
  )
  parser.add_argument(
    '--quantize-embedding',
    action=argparse.BooleanOptionalAction,
    default=True,
    help='with --quantize, also quantize the vocab tables per row (model.quant.embedding; '
    'default on: the int8 14B model fits one 16 GiB v5e chip only with it)',
  )
  parser.add_argument(
    '--group-size',
    type=int,
    default=None,
    help='int4 group along the contracted axis (model.quant.group_size, default 128)',
  )
  args = parser.parse_args(argv)
  if args.image_size < 1 or args.max_caption_tokens < 1:
    parser.error('--image-size and --max-caption-tokens must be >= 1')
  if args.group_size is not None and args.group_size < 1:
    parser.error(f'--group-size {args.group_size} must be >= 1')

  from nextstep_jax.convert import official  # after flag errors

  if args.export_run:
    from nextstep_jax.convert import export

    try:
      config = export.export_run(args.export_run, args.out)
    except (export.ExportError, ValueError, FileNotFoundError, FileExistsError) as error:
      raise official.ConversionError(str(error)) from error
    print(
      f'exported {args.export_run} -> {args.out} (params {config.model.param_dtype}); sample it with '
      f'nextstep-sample --converted {args.out}'
    )
    return 0
  try:
    config = official.convert(
      args.hf_dir,
      args.out,
      param_dtype=args.dtype,
      compute_dtype=args.compute_dtype,
      image_tokenizer=args.image_tokenizer,
      image_size=args.image_size,
      max_caption_tokens=args.max_caption_tokens,
      vae_dir=args.vae,
      quantize=args.quantize,
      quantize_embedding=args.quantize_embedding,
      group_size=args.group_size,
    )
  except FileExistsError as error:
    raise official.ConversionError(str(error)) from error
  m = config.model
  print(
    f'converted {args.hf_dir} -> {args.out}: {m.num_layers} layers, hidden {m.hidden_size}, '
    f'head {m.fm_head_dim}x{m.fm_head_layers}, params {m.param_dtype}'
    + (f', {m.quant.mode} linear layers' if m.quant.mode != 'none' else '')
  )
  if config.image.tokenizer == 'vae':
    print(
      f'image tokenizer: {config.image.vae.checkpoint or "none found: add --vae DIR before sampling"}'
    )
  return 0


if __name__ == '__main__':
  sys.exit(main())
