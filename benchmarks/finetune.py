"""Fine-tuning benchmark: teach a trained shapes model a new colour and a new shape, full and LoRA.

  python benchmarks/finetune.py --base /work/runs/shapes_base [--steps 200] [--lora-steps 200]
      [--num-train 400] [--new-fraction 0.5] [--prompts 100] [--workdir runs/finetune]

The base run (configs/shapes.py) never saw orange or diamonds. Both fine-tunes start from its
params (`train.init_from`) on `data.dataset=shapes_new`: `--num-train` images, a share
`--new-fraction` one-object scenes of the 10 new (colour, shape) pairs, the rest base scenes of one
or two objects (replay: a small replay set seen many times is memorised, and two-object scenes are
what the model forgets first, so more distinct replay scenes keep it). The base sentencepiece model
gets the two words as one piece each (`text.extra_words`), and their embedding and lm_head rows
start at the mean of the trained colour (shape) words (`train.init_word_rows`), so the new caption
'a orange diamond' has the structure of the trained ones. The LoRA run (`train.lora`, rank
`--rank`, flow head trained fully) is scored through its merged params (`lora.merge_adapters`
into the base graph), the path a user samples; the merged sampler's images equal the adapter
model's (checked on the first batch of prompts).

Scores (extended evaluator, one sample per prompt, seeds 0..n-1): `new_concept_*` on `--prompts`
one-object prompts with a new colour or shape (each of the 10 pairs equally often), `seen_*` on
`--prompts` seen one-object plus `--prompts` seen two-object prompts (mean of the two). `before`
is the model the fine-tunes start from (base params + the new word rows). Results:
benchmarks/results/finetune.json (every figure with its command) and finetune_*.png grids.
"""

import argparse
import datetime
import json
import os
import pathlib
import platform
import shlex
import sys
import time

import jax
import numpy as np
from flax import nnx

from nextstep_jax import configlib
from nextstep_jax import runs
from nextstep_jax.data import builtin_source
from nextstep_jax.data.builtin import shapes
from nextstep_jax.evaluate import run_eval
from nextstep_jax.evaluate import shapes_eval
from nextstep_jax.model import lora
from nextstep_jax.model import nextstep
from nextstep_jax.parallel import mesh as mesh_lib
from nextstep_jax.sampling import pipeline
from nextstep_jax.training import init_from
from nextstep_jax.training import loop
from nextstep_jax.training import new_words
from nextstep_jax.training import state as state_lib
from nextstep_jax.utils import images as image_utils

RESULTS = pathlib.Path(__file__).parent / 'results'
NEW_WORDS = ('orange', 'diamond')
WORD_ROWS = ('orange=' + '+'.join(shapes.COLORS), 'diamond=' + '+'.join(shapes.SHAPES))


def finetune_overrides(args, base_config) -> list[str]:
  """Overrides shared by both fine-tunes (on top of the base run's own config)."""
  return [
    'data.dataset=shapes_new',
    f'data.num_train={args.num_train}',
    f'data.new_concept_fraction={args.new_fraction}',
    f'text.spm_path={args.base}/tokenizer.model',
    f'text.extra_words={NEW_WORDS!r}',
    f'train.init_from={args.base}' + (f'@{args.base_step}' if args.base_step else ''),
    f'train.init_word_rows={WORD_ROWS!r}',
    f'train.batch_size={args.batch_size}',
    f'train.lr_schedule={args.schedule}',
    f'train.warmup_steps={args.warmup}',
    'train.log_every=25',
    'train.sample_every=0',
    'train.keep_checkpoints=1',
    f'sample.batch_size={args.sample_batch}',
    f'seed={base_config.seed + 1}',
  ]


def load_config(args, extra: list[str]):
  """The base run's own config (config.json) with the fine-tune overrides: (config, overrides)."""
  text = (pathlib.Path(args.base) / runs.CONFIG_FILE).read_text()
  config = configlib.with_base_defaults(configlib.config_from_json(text))
  overrides = finetune_overrides(args, config) + extra
  configlib.apply_overrides(config, overrides)
  configlib.validate(config)
  return config, overrides


def suites(num: int) -> dict[str, list[str]]:
  return {
    'new': shapes.eval_prompts(num, 1, 'new', 1),
    'seen_one': shapes.eval_prompts(num, 1, 'seen', 1),
    'seen_two': shapes.eval_prompts(num, 2, 'seen', 1),
  }


def evaluate(sampler, num: int, tag: str, results: pathlib.Path) -> dict:
  """{suite: extended-evaluator scores} and grids of the first 64 images per suite."""
  out = {}
  for suite, prompts in suites(num).items():
    t0 = time.monotonic()
    images = sampler(prompts, list(range(len(prompts))))
    out[suite] = shapes_eval.score(images, prompts, 'extended')
    out[suite]['sample_seconds'] = round(time.monotonic() - t0, 1)
    image_utils.save_png(
      results / f'finetune_{tag}_{suite}.png', image_utils.make_grid(images[:64], 8)
    )
    print(tag, suite, json.dumps(run_eval.json_safe(out[suite])), flush=True)
  return out


def start_sampler(config, tok) -> pipeline.TextToImage:
  """The model the fine-tunes start from: base params restored as init_from does + new word rows."""
  base_cfg = config.copy_and_resolve_references()
  with base_cfg.unlocked():
    base_cfg.train.lora.rank = 0
  mesh = mesh_lib.make_mesh(base_cfg.mesh)
  tx = state_lib.make_optimizer(base_cfg.train)
  graphdef, abstract_state, shardings = state_lib.state_shardings(base_cfg, tx, mesh)
  state = init_from.initial_state(base_cfg, tx, abstract_state, shardings)
  params = new_words.init_word_rows(state['params'], tok, base_cfg.train.init_word_rows)
  return pipeline.TextToImage(base_cfg, graphdef, params, tok)


def merged_sampler(workdir: str) -> tuple[pipeline.TextToImage, pipeline.TextToImage]:
  """(sampler of the LoRA run's merged params in the base graph, sampler of the adapter model)."""
  adapter = pipeline.TextToImage.from_workdir(workdir)
  cfg = lora.LoraConfig.from_config(adapter.config)
  merged_config = adapter.config.copy_and_resolve_references()
  with merged_config.unlocked():
    merged_config.train.lora.rank = 0
  graphdef = nnx.graphdef(nextstep.abstract_model(merged_config, lm_head=False))
  merged = lora.merge_adapters(adapter.params, cfg)
  return pipeline.TextToImage(merged_config, graphdef, merged, adapter.tok), adapter


def seen(scores: dict) -> float:
  return (scores['seen_one']['accuracy'] + scores['seen_two']['accuracy']) / 2


def main() -> int:
  parser = argparse.ArgumentParser(
    description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
  )
  parser.add_argument(
    '--base', default='/work/runs/shapes_base', help='trained configs/shapes.py run'
  )
  parser.add_argument('--base-step', type=int, default=0, help='checkpoint of --base (0 = latest)')
  parser.add_argument('--workdir', default='runs/finetune')
  parser.add_argument('--num-train', type=int, default=400)
  parser.add_argument(
    '--new-fraction',
    type=float,
    default=0.5,
    help='share of new-concept scenes in the --num-train images (the rest: base-scene replay)',
  )
  parser.add_argument(
    '--schedule', default='constant', choices=('constant', 'cosine'), help='learning-rate schedule'
  )
  parser.add_argument('--steps', type=int, default=200, help='full fine-tune steps')
  parser.add_argument('--lora-steps', type=int, default=200)
  parser.add_argument('--batch-size', type=int, default=32)
  parser.add_argument('--warmup', type=int, default=20)
  parser.add_argument('--lr', type=float, default=3e-4, help='full fine-tune learning rate')
  parser.add_argument('--lora-lr', type=float, default=2e-3)
  parser.add_argument('--rank', type=int, default=8)
  parser.add_argument('--prompts', type=int, default=100)
  parser.add_argument('--sample-batch', type=int, default=50)
  parser.add_argument(
    '--results', default=str(RESULTS), help='where finetune.json and the grids go'
  )
  parser.add_argument(
    '--skip-before', action='store_true', help='reuse the before scores in finetune.json'
  )
  args = parser.parse_args()
  t_start = time.monotonic()
  results = pathlib.Path(args.results)
  results.mkdir(parents=True, exist_ok=True)
  command = ' '.join(['python'] + [shlex.quote(a) for a in sys.argv])
  out_path = results / 'finetune.json'
  previous = json.loads(out_path.read_text()) if out_path.exists() else {}
  root = pathlib.Path(args.workdir)

  full_config, full_overrides = load_config(
    args,
    [f'train.steps={args.steps}', f'train.lr={args.lr}', f'train.checkpoint_every={args.steps}'],
  )
  tok = builtin_source.load_text_tokenizer(full_config)
  if args.skip_before and 'scores' in previous:
    before = previous['scores']['before']
  else:
    before = evaluate(start_sampler(full_config, tok), args.prompts, 'before', results)

  full = loop.train(full_config, str(root / 'full'))
  after_full = evaluate(
    pipeline.TextToImage.from_workdir(str(root / 'full')), args.prompts, 'full', results
  )

  lora_extra = [
    f'train.steps={args.lora_steps}',
    f'train.lr={args.lora_lr}',
    f'train.checkpoint_every={args.lora_steps}',
    f'train.lora.rank={args.rank}',
    f'train.lora.alpha={2.0 * args.rank}',
    'train.lora.train_head=True',
  ]
  lora_config, lora_overrides = load_config(args, lora_extra)
  lora_run = loop.train(lora_config, str(root / 'lora'))
  merged, adapter = merged_sampler(str(root / 'lora'))
  check = suites(args.sample_batch)['new']
  merged_images, adapter_images = (
    merged(check, list(range(len(check)))),
    adapter(check, list(range(len(check)))),
  )
  merge_max_diff = int(np.abs(merged_images.astype(int) - adapter_images.astype(int)).max())
  after_lora = evaluate(merged, args.prompts, 'lora', results)
  trained, total = lora.count_trainable(adapter.params, lora.LoraConfig.from_config(adapter.config))
  adapters_only, _ = lora.count_trainable(
    adapter.params, lora.LoraConfig(rank=args.rank, alpha=2.0 * args.rank, train_head=False)
  )

  fig = lambda value: {'value': round(float(value), 4), 'command': command}
  summary = {
    'new_concept_before': fig(before['new']['accuracy']),
    'new_concept_after_full': fig(after_full['new']['accuracy']),
    'new_concept_after_lora': fig(after_lora['new']['accuracy']),
    'seen_before': fig(seen(before)),
    'seen_after_full': fig(seen(after_full)),
    'seen_after_lora': fig(seen(after_lora)),
    'forgetting_full_points': fig(100 * (seen(before) - seen(after_full))),
    'forgetting_lora_points': fig(100 * (seen(before) - seen(after_lora))),
    'lora_trainable_fraction': fig(trained / total),
    'lora_adapter_only_fraction': fig(adapters_only / total),
    'minutes': {
      'full_finetune': round(full.minutes, 2),
      'lora_finetune': round(lora_run.minutes, 2),
      'benchmark_total': round((time.monotonic() - t_start) / 60, 2),
      'command': command,
    },
    'lora_merge_max_pixel_diff': merge_max_diff,
    'scores': {'before': before, 'full': after_full, 'lora': after_lora},
    'setup': {
      'base': args.base,
      'base_step': args.base_step or 'latest',
      'num_train': args.num_train,
      'new_fraction': args.new_fraction,
      'schedule': args.schedule,
      'full_steps': full.step,
      'lora_steps': lora_run.step,
      'batch_size': args.batch_size,
      'full_lr': args.lr,
      'lora_lr': args.lora_lr,
      'lora_rank': args.rank,
      'lora_alpha': 2.0 * args.rank,
      'lora_train_head': True,
      'prompts_per_suite': args.prompts,
      'full_overrides': full_overrides,
      'lora_overrides': lora_overrides,
      'new_words': NEW_WORDS,
      'word_rows': WORD_ROWS,
      'sample': full_config.sample.to_dict(),
    },
    'command': command,
    'date': datetime.datetime.now(datetime.UTC).isoformat(timespec='seconds'),
    'machine': f'{platform.machine()} {os.cpu_count()} CPUs, {jax.devices()[0].device_kind}',
    'jax': jax.__version__,
  }
  out_path.write_text(json.dumps(run_eval.json_safe(summary), indent=2, default=str) + '\n')
  print(
    json.dumps(
      {k: v['value'] for k, v in summary.items() if isinstance(v, dict) and 'value' in v}, indent=2
    )
  )
  return 0


if __name__ == '__main__':
  sys.exit(main())
