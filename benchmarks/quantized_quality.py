"""Quality cost of weight-only int8/int4 quantization (model/quant.py), measured.

  python benchmarks/quantized_quality.py --part runs [--shapes-run /work/runs/shapes_base]
      [--digits-run /work/runs/digits_base] [--prompts 100] [--modes int8,int4] [--group-size 128]
  python benchmarks/quantized_quality.py --part tiny_official
  python benchmarks/quantized_quality.py --part large_shape [--large-layers 2]
  python benchmarks/quantized_quality.py --part convert_rss

runs: evaluator accuracy of trained shapes and digits runs (latest checkpoint, or --step),
unquantized and quantized, with the same prompts and seeds (one sample per prompt, seeds 0..n-1,
run_eval's prompt sets), so each prompt is scored twice under identical noise and the drop is a
paired difference: drop = accuracy(unquantized) - accuracy(quantized) in percentage points, with
the paired standard error and the discordant counts. shapes: the three suites together (3 x
--prompts prompts) and each suite; digits: --prompts prompts.

tiny_official: a tiny random release in the official layout (PyTorch reference, as the conversion
tests build it) converted to float32, then quantized at load time: relative L2 error of the final
hidden states and the head velocities against the float model.

large_shape: the NextStep-1-Large widths (hidden 5120, 40/8 heads, MLP 13824, head 1536 x 12)
with --large-layers decoder layers instead of 48 and a 1024-row vocabulary (the 14B model does not
fit this host's 24 GiB at float32; the embedding rows are quantized per row, so the vocabulary size
changes nothing per row): every weight N(0, 0.02^2) (norm weights 1 + N(0, 0.02^2), the zero-
initialised adaLN and output layers too), float32 compute, relative error of the final hidden
state and the velocity.

convert_rss: peak resident memory of `nextstep-convert` (a fresh process each) on a medium
synthetic release (~200M params), bfloat16 vs --quantize int8 / int4, next to the bytes of the
params as stored and the RSS of a process that only imports the converter.

Each part updates its keys in benchmarks/results/quantized_sampling.json (read-modify-write: other
benchmarks own other keys there) with the command, date and machine.
"""

import argparse
import datetime
import json
import os
import pathlib
import platform
import resource
import subprocess
import sys
import tempfile
import time

ROOT = pathlib.Path(__file__).resolve().parent.parent
sys.path.insert(
  0, str(ROOT / 'tests')
)  # The official-layout PyTorch reference lives with the tests.

import jax  # noqa: E402
import jax.numpy as jnp  # noqa: E402
import numpy as np  # noqa: E402
from flax import nnx  # noqa: E402

from nextstep_jax import configlib  # noqa: E402
from nextstep_jax import runs  # noqa: E402
from nextstep_jax.evaluate import run_eval  # noqa: E402
from nextstep_jax.evaluate import shapes_eval  # noqa: E402
from nextstep_jax.model import nextstep  # noqa: E402
from nextstep_jax.model import quant  # noqa: E402
from nextstep_jax.sampling import pipeline  # noqa: E402

RESULTS = ROOT / 'benchmarks' / 'results' / 'quantized_sampling.json'


def quantized_config(config, mode: str, group_size: int, head: bool = True):
  """A copy of `config` with model.quant set (vocab tables not quantized)."""
  out = configlib.with_base_defaults(config)
  out.model.quant.mode, out.model.quant.group_size, out.model.quant.head = mode, group_size, head
  configlib.validate(out)
  return out


def quantized_sampler(
  sampler: pipeline.TextToImage, mode: str, group_size: int
) -> pipeline.TextToImage:
  """The same sampler with its params quantized (float params kept for the unquantized runs)."""
  config = quantized_config(sampler.config, mode, group_size)
  model = nextstep.abstract_model(config, lm_head=False)  # As the sampler holds it.
  params = quant.quantize_params(
    sampler.params, model, quant.QuantConfig.from_config(config.model), delete_float=False
  )
  graphdef = nnx.split(model, nnx.Param)[0]
  return pipeline.TextToImage(
    config, graphdef, params, sampler.tok, image_tokenizer=sampler.image_tokenizer
  )


def correct_per_prompt(dataset: str, sampler, prompts: int, size: int) -> dict[str, np.ndarray]:
  """{suite: bool (n,)} whole-prompt correctness, seeds 0..n-1 per suite (run_eval's prompts)."""
  if dataset == 'shapes':
    out = {}
    for suite, captions in run_eval.shapes_suites(prompts).items():
      images = sampler(captions, list(range(len(captions))))
      out[suite] = np.array(
        [shapes_eval.evaluate_image(im, c)['correct'] for im, c in zip(images, captions)]
      )
    return out
  from nextstep_jax.data.builtin import digits  # sklearn
  from nextstep_jax.evaluate import digits_eval

  captions = digits.eval_prompts(prompts, 1)
  images = sampler(captions, list(range(len(captions))))
  labels = np.array([digits.parse_caption(c) for c in captions])
  return {'digits': digits_eval.DigitsEvaluator.fit(size=size).predict(images) == labels}


def paired(reference: np.ndarray, candidate: np.ndarray) -> dict:
  """Paired accuracy difference (percentage points) of two bool arrays over the same prompts."""
  diff = reference.astype(float) - candidate.astype(float)
  return {
    'n': int(len(diff)),
    'accuracy_unquantized': float(reference.mean()),
    'accuracy_quantized': float(candidate.mean()),
    'drop_pp': float(100 * diff.mean()),
    'stderr_pp': float(100 * diff.std(ddof=1) / np.sqrt(len(diff))) if len(diff) > 1 else None,
    'lost': int(((reference) & ~candidate).sum()),
    'gained': int((~reference & candidate).sum()),
  }


def part_runs(args) -> dict:
  out = {}
  for dataset, run in (('shapes', args.shapes_run), ('digits', args.digits_run)):
    if not run:
      continue
    step = args.step or runs.checkpoint_steps(run)[-1]
    sampler = pipeline.TextToImage.from_workdir(run, step)
    size = sampler.config.image.size
    t0 = time.time()
    reference = correct_per_prompt(dataset, sampler, args.prompts, size)
    detail = {
      'run': run,
      'step': step,
      'prompts_per_suite': args.prompts,
      'group_size': args.group_size,
      'sample': sampler.config.sample.to_dict(),
      'unquantized_minutes': round((time.time() - t0) / 60, 2),
    }
    for mode in args.modes:
      quantized = quantized_sampler(sampler, mode, args.group_size)
      scores = correct_per_prompt(dataset, quantized, args.prompts, size)
      both = {suite: paired(reference[suite], scores[suite]) for suite in reference}
      total = paired(
        np.concatenate(list(reference.values())), np.concatenate(list(scores.values()))
      )
      detail[mode] = {'all': total, **({} if dataset == 'digits' else both)}
      out[f'{dataset}_drop_{mode}'] = round(total['drop_pp'], 2)
      print(json.dumps({dataset: mode, **total}), flush=True)
    out[f'{dataset}_quality_detail'] = detail
  return out


def relative_error(a, b) -> float:
  a, b = np.asarray(a, np.float64), np.asarray(b, np.float64)
  return float(np.linalg.norm(a - b) / np.linalg.norm(b))


def hidden_and_velocity(model, ids, x_t, t):
  """Final hidden states (B, L, D) of text `ids` and the head velocity at the last position."""
  b, l = ids.shape
  hidden, _ = model(
    model.embed(ids, None, None), jnp.broadcast_to(jnp.arange(l), (b, l)), jnp.ones((b, l), bool)
  )
  return hidden, model.image_head(x_t, t, model.head_condition(hidden[:, -1]))


def errors_by_mode(config, float_params, inputs, modes, group_size) -> dict:
  """{mode: {'hidden': rel. error, 'velocity': rel. error}} of `config`'s model with float params."""
  float_model = nextstep.abstract_model(config, quantized=False)
  run = lambda graphdef, params: jax.jit(
    lambda p: hidden_and_velocity(nnx.merge(graphdef, p), *inputs)
  )(params)
  reference = run(nnx.split(float_model, nnx.Param)[0], float_params)
  out = {}
  for mode in modes:
    for head in (True, False):
      name = mode if head else f'{mode}_float_head'
      qconfig = quantized_config(config, mode, group_size, head)
      model = nextstep.abstract_model(qconfig)
      params = quant.quantize_params(
        float_params, model, quant.QuantConfig.from_config(qconfig.model), delete_float=False
      )
      hidden, velocity = run(nnx.split(model, nnx.Param)[0], params)
      out[name] = {
        'hidden': relative_error(hidden, reference[0]),
        'velocity': relative_error(velocity, reference[1]),
        'params_bytes': quant.quantized_bytes(params),
      }
      if head:
        out[name]['weight_rel_rms'] = weight_error(float_params, params, model)
      del params
      print(json.dumps({name: out[name]}), flush=True)
  out['float_params_bytes'] = quant.quantized_bytes(float_params)
  return out


def weight_error(float_params, params, model) -> float:
  """sqrt(sum |dequantized - float|^2 / sum |float|^2) over every quantized kernel."""
  flat_float, flat_q = dict(nnx.to_flat_state(float_params)), dict(nnx.to_flat_state(params))
  num = den = 0.0
  for path in quant.quantized_paths(model):
    w = np.asarray(flat_float[path].get_value(), np.float64)
    q = quant.qwix.QArray(
      flat_q[(*path, 'qvalue')].get_value(),
      flat_q[(*path, 'scale')].get_value(),
      None,
      flat_q[(*path, 'qvalue')].get_value().dtype,
    )
    num += float(np.sum((np.asarray(quant.qwix.dequantize(q), np.float64) - w) ** 2))
    den += float(np.sum(w**2))
  return float(np.sqrt(num / den))


def model_inputs(vocab: int, token_dim: int, seq: int = 32, seed: int = 0):
  rng = np.random.default_rng(seed)
  return (
    jnp.asarray(rng.integers(0, vocab, (2, seq)), jnp.int32),
    jnp.asarray(rng.standard_normal((2, token_dim)), jnp.float32),
    jnp.asarray([0.3, 0.8], jnp.float32),
  )


def part_tiny_official(args) -> dict:
  import hf_testing
  import torch_reference as tr
  from nextstep_jax.convert import official
  from nextstep_jax.parallel import mesh as mesh_lib

  work = pathlib.Path(tempfile.mkdtemp(prefix='quant_tiny_official_'))
  hf_testing.build_tokenizer(str(work / 'tokenizer.json'))
  torch_model = tr.NextStepTorch(tr.TINY_RELEASE).randomize(seed=0).eval()
  tr.write_release(torch_model, tr.TINY_RELEASE, str(work / 'tokenizer.json'), work / 'hf')
  config = official.convert(work / 'hf', work / 'converted', compute_dtype='float32')
  _, params = official.load_params(
    work / 'converted', mesh_lib.make_mesh(config.mesh, jax.devices()[:1])
  )
  inputs = model_inputs(config.model.vocab_size, configlib.token_dim(config))
  errors = errors_by_mode(config, params, inputs, args.modes, args.tiny_group_size)
  result = {
    'tiny_official_rel_error': {
      'release': tr.TINY_RELEASE,
      'weights': 'PyTorch reference randomize(seed=0): N(0, 0.15^2)',
      'group_size': args.tiny_group_size,
      'inputs': '2 x 32 random text ids; head at the last position',
      **errors,
    }
  }
  for mode in args.modes:
    result[f'tiny_official_hidden_rel_error_{mode}'] = round(
      errors[mode]['hidden'], 4
    )  # Head quantized too.
    result[f'tiny_official_velocity_rel_error_{mode}'] = round(errors[mode]['velocity'], 4)
  return result


def part_large_shape(args) -> dict:
  import model_testing

  config = configlib.load_config(
    'configs/nextstep1_large.py',
    [
      f'model.num_layers={args.large_layers}',
      'model.vocab_size=1024',
      'text.vocab_size=1000',
      'model.dtype=float32',
      'model.param_dtype=float32',
      'model.remat_policy=none',
    ],
  )
  model = nextstep.NextStep(nextstep.model_config(config), rngs=nnx.Rngs(0))
  model_testing.randomize(model, seed=0, std=0.02)
  params = nnx.state(model, nnx.Param)
  del model
  inputs = model_inputs(config.model.vocab_size, configlib.token_dim(config))
  errors = errors_by_mode(config, params, inputs, args.modes, args.group_size)
  result = {
    'large_shape_rel_error': {
      'shape': f'NextStep-1-Large widths, {args.large_layers} of 48 decoder layers, vocabulary 1024 rows',
      'weights': 'N(0, 0.02^2), norm weights 1 + N(0, 0.02^2)',
      'compute': 'float32',
      'group_size': args.group_size,
      **errors,
    }
  }
  for mode in args.modes:
    result[f'large_hidden_rel_error_{mode}'] = round(errors[mode]['hidden'], 4)
    result[f'large_velocity_rel_error_{mode}'] = round(errors[mode]['velocity'], 4)
  return result


CONVERT_CHILD = """
import sys, time
t0 = time.time()
from nextstep_jax.cli import convert
code = convert.main(sys.argv[1:]) if len(sys.argv) > 1 else 0
# VmHWM: this process image's peak RSS (ru_maxrss would carry the forking parent's over exec).
peak = next(int(line.split()[1]) for line in open('/proc/self/status') if line.startswith('VmHWM:'))
print('PEAK_RSS_KB', peak, 'SECONDS', time.time() - t0)
sys.exit(code)
"""


def part_convert_rss(args) -> dict:
  import torch

  import hf_testing
  import torch_reference as tr

  work = pathlib.Path(tempfile.mkdtemp(prefix='quant_convert_rss_'))
  hf_testing.build_tokenizer(str(work / 'tokenizer.json'))
  release = dict(
    tr.TINY_RELEASE,
    hidden_size=1536,
    num_hidden_layers=8,
    num_attention_heads=12,
    num_key_value_heads=4,
    head_dim=128,
    intermediate_size=4096,
    fm_head_dim=512,
    fm_head_layers=4,
  )
  torch_model = tr.NextStepTorch(release).randomize(seed=0, std=0.02).eval()
  tr.write_release(
    torch_model, release, str(work / 'tokenizer.json'), work / 'hf', dtype=torch.bfloat16
  )
  num_params = sum(p.numel() for p in torch_model.parameters())
  del torch_model
  env = dict(os.environ, PYTHONPATH=str(ROOT), JAX_PLATFORMS='cpu')

  def child(*flags):
    proc = subprocess.run(
      [sys.executable, '-c', CONVERT_CHILD, *flags],
      env=env,
      capture_output=True,
      text=True,
      check=True,
      cwd=ROOT,
    )
    fields = proc.stdout.split('PEAK_RSS_KB')[-1].split()
    return int(fields[0]) / 2**20, float(fields[2])  # GiB, seconds.

  base_rss, _ = child()
  rows = {'import_only': {'peak_rss_gib': round(base_rss, 3)}}
  for name, flags in (
    ('bfloat16', ()),
    ('int8', ('--quantize', 'int8')),
    ('int4', ('--quantize', 'int4')),
  ):
    out = work / f'out_{name}'
    rss, seconds = child(
      '--hf-dir', str(work / 'hf'), '--out', str(out), '--dtype', 'bfloat16', *flags
    )
    config = json.loads((out / 'config.json').read_text())
    abstract = nnx.state(
      nextstep.abstract_model(
        configlib.with_base_defaults(configlib.config_from_json(json.dumps(config)))
      ),
      nnx.Param,
    )
    stored = quant.quantized_bytes(abstract)
    host = sum(np.prod(x.shape) * (jnp.dtype(x.dtype).itemsize) for x in jax.tree.leaves(abstract))
    rows[name] = {
      'peak_rss_gib': round(rss, 3),
      'above_import_gib': round(rss - base_rss, 3),
      'params_gib_on_device': round(stored / 2**30, 3),
      'params_gib_on_host': round(host / 2**30, 3),
      'seconds': round(seconds, 1),
    }
    print(json.dumps({name: rows[name]}), flush=True)
  return {
    'convert_peak_rss': {'release': {**release, 'params': num_params, 'dtype': 'bfloat16'}, **rows}
  }


def main() -> int:
  parser = argparse.ArgumentParser(
    description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
  )
  parser.add_argument(
    '--part', required=True, choices=('runs', 'tiny_official', 'large_shape', 'convert_rss')
  )
  parser.add_argument('--shapes-run', default='/work/runs/shapes_base')
  parser.add_argument('--digits-run', default='/work/runs/digits_base')
  parser.add_argument(
    '--step', type=int, default=None, help='checkpoint step (default: the latest)'
  )
  parser.add_argument(
    '--prompts', type=int, default=100, help='prompts per shapes suite / digits prompts'
  )
  parser.add_argument('--modes', default='int8,int4')
  parser.add_argument('--group-size', type=int, default=128)
  parser.add_argument(
    '--tiny-group-size', type=int, default=32, help='int4 group of the 64-wide tiny release'
  )
  parser.add_argument('--large-layers', type=int, default=2)
  parser.add_argument('--out', default=str(RESULTS))
  args = parser.parse_args()
  args.modes = [m for m in args.modes.split(',') if m]
  part = {
    'runs': part_runs,
    'tiny_official': part_tiny_official,
    'large_shape': part_large_shape,
    'convert_rss': part_convert_rss,
  }[args.part]
  result = part(args)
  result[f'quality_{args.part}_run'] = {
    'command': ' '.join([os.path.basename(sys.executable)] + sys.argv),
    'date': datetime.datetime.now(datetime.timezone.utc).isoformat(timespec='seconds'),
    'machine': f'{platform.machine()} {os.cpu_count()} CPUs, {jax.devices()[0].device_kind}',
    'peak_rss_gib': round(resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 2**20, 2),
  }
  out_path = pathlib.Path(args.out)
  summary = (
    json.loads(out_path.read_text()) if out_path.exists() else {}
  )  # Read as late as possible.
  summary.update(run_eval.json_safe(result))
  out_path.parent.mkdir(parents=True, exist_ok=True)
  out_path.write_text(json.dumps(summary, indent=2, default=str) + '\n')
  print(json.dumps({k: v for k, v in result.items() if not isinstance(v, dict)}, indent=2))
  return 0


if __name__ == '__main__':
  sys.exit(main())
