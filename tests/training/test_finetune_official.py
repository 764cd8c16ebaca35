"""Fine-tuning a tiny official-layout release: the training loss matches a PyTorch reference of
the official training forward, and convert -> fine-tune (its tokenizer.json, its VAE, the latent
cache over aspect buckets) -> export -> sample runs end to end with falling losses.

The release is built in PyTorch as tests/convert does (tests/torch_reference.py), with a random
f2 VAE in its vae/ folder and non-default training fields in its config.json (lm_loss_weight 0.05,
im_loss_weight 0.5, fm_head_batch_mul 2) that the fine-tune must read.
"""

import json
import shutil

import jax
import numpy as np
import pytest
import torch
from PIL import Image

import hf_testing
import torch_reference as tr
from nextstep_jax import configlib
from nextstep_jax.convert import export
from nextstep_jax.convert import official
from nextstep_jax.data import builder
from nextstep_jax.data import builtin_source
from nextstep_jax.data import latent_cache
from nextstep_jax.data import sequences
from nextstep_jax.parallel import mesh as mesh_lib
from nextstep_jax.parallel import rules as rules_lib
from nextstep_jax.sampling import pipeline
from nextstep_jax.training import init_from
from nextstep_jax.training import loop
from nextstep_jax.training import objective
from nextstep_jax.training import state as state_lib
from nextstep_jax.training import step as step_lib

# float32 on both sides: matmul/softmax summation order through 2 layers, the CE over 352 logits
# and the head; observed relative differences are ~1e-7.
LOSS_RTOL = 1e-5
RELEASE_TRAINING_FIELDS = dict(lm_loss_weight=0.05, im_loss_weight=0.5, fm_head_batch_mul=2)


@pytest.fixture(scope='module')
def release(tmp_path_factory):
  """(torch model, release dir, converted dir)."""
  root = tmp_path_factory.mktemp('ft_release')
  hf_testing.build_tokenizer(str(root / 'tokenizer_src.json'))
  torch_model = tr.NextStepTorch(tr.TINY_RELEASE).randomize(seed=0, std=0.05).eval()
  release_dir = tr.write_release(
    torch_model,
    dict(tr.TINY_RELEASE, **RELEASE_TRAINING_FIELDS),
    str(root / 'tokenizer_src.json'),
    root / 'hf',
  )
  hf_testing.write_vae_release(release_dir / 'vae')
  official.convert(release_dir, root / 'converted', compute_dtype='float32', image_size=16)
  return torch_model, release_dir, root / 'converted'


def finetune_config(converted, *overrides):
  return configlib.load_config(f'configs/nextstep1_finetune.py:tiny,{converted}', list(overrides))


@pytest.mark.slow
def test_release_fields_are_read_or_refused(release, tmp_path):
  _, release_dir, converted = release
  config = finetune_config(converted, 'data.latent_cache_paths=x')
  configlib.validate(config)
  assert (
    config.loss.lm_loss_weight,
    config.loss.im_loss_weight,
    config.loss.fm_head_batch_mul,
  ) == (0.05, 0.5, 2)
  assert config.image.vae.scaling_factor == 0.8 and config.image.vae.checkpoint == str(
    converted / 'vae'
  )
  assert builtin_source.hf_tokenizer_path(config) == str(converted / 'tokenizer.json')
  for field, value, message in (
    ('noise_strength', 0.1, 'noise_strength=0.1 is not supported'),
    ('use_token_length_weight', True, 'use_token_length_weight=true is not supported'),
  ):
    bad = tmp_path / field
    shutil.copytree(release_dir, bad)
    hf = json.loads((bad / 'config.json').read_text())
    (bad / 'config.json').write_text(json.dumps(dict(hf, **{field: value})))
    with pytest.raises(official.ConversionError, match=message):
      official.convert(bad, tmp_path / f'{field}_out', compute_dtype='float32')


def torch_training_loss(
  model: tr.NextStepTorch,
  batch: dict,
  eps: np.ndarray,
  t: np.ndarray,
  placeholder: int,
  lm_weight: float,
  im_weight: float,
  mul: int,
) -> float:
  """The official training forward (design doc §4-6), written from the documented layout: text
  embeddings with image_in_projector(tokens) at the placeholders, the Qwen2 stack (all-ones
  mask, positions 0..L-1), CE over next tokens that are not placeholders, and the flow head on
  image_out_projector(hidden) before each placeholder, tiled `mul` times (row r <- r mod M)."""
  ids = torch.from_numpy(batch['input_ids']).long()
  labels = torch.from_numpy(batch['labels']).long()
  tokens = torch.from_numpy(batch['image_tokens']).float()
  b, length = ids.shape
  with torch.no_grad():
    embeds = model.backbone.embed_tokens(ids)
    is_image = ids == placeholder
    embeds[is_image] = model.image_in_projector(tokens.reshape(-1, tokens.shape[-1]))
    hidden = model.backbone(
      inputs_embeds=embeds,
      attention_mask=torch.ones(b, length, dtype=torch.long),
      position_ids=torch.arange(length)[None].expand(b, -1),
    ).last_hidden_state
    logits = model.lm_head(hidden[:, :-1])
    targets = labels[:, 1:].masked_fill(is_image[:, 1:], -100)
    lm = torch.nn.functional.cross_entropy(
      logits.reshape(-1, logits.shape[-1]), targets.reshape(-1), ignore_index=-100
    )
    cond = model.image_out_projector(hidden[:, :-1][is_image[:, 1:]])
    x1 = tokens.reshape(-1, tokens.shape[-1]).repeat(mul, 1)
    cond = cond.repeat(mul, 1)
    eps_t, t_t = torch.from_numpy(eps), torch.from_numpy(t)
    x_t = t_t[:, None] * x1 + (1 - t_t[:, None]) * eps_t
    v = model.image_head.net(x_t, t_t, cond)
    im = ((v - (x1 - eps_t)) ** 2).mean(-1).mean()
  return float(lm_weight * lm + im_weight * im)


@pytest.mark.slow
def test_first_training_step_loss_matches_the_official_forward(release):
  torch_model, _, converted = release
  config = finetune_config(converted, 'data.latent_cache_paths=x', 'model.dtype=float32')
  tok = builtin_source.load_text_tokenizer(config)
  captions = [
    'a red circle to the left of a blue square',
    'make the sky green',
    'a photo of a cat on a sofa, 4k',
  ]
  rows = sequences.build_training_batch(
    tok, captions, 4, 4, config.text.max_caption_tokens, np.array([False, True, False])
  )
  rng = np.random.default_rng(3)
  batch = dict(
    rows,
    image_tokens=rng.standard_normal((3, 16, 64)).astype(np.float32),
    image_valid=np.ones(3, bool),
  )
  with config.unlocked():
    config.train.batch_size = 3
  mesh = mesh_lib.make_mesh(config.mesh, jax.devices()[:1])
  tx = state_lib.make_optimizer(config.train)
  graphdef, abstract_state, shardings = state_lib.state_shardings(config, tx, mesh)
  state = init_from.initial_state(config, tx, abstract_state, shardings)
  train_step = step_lib.build_train_step(
    config, graphdef, tx, shardings, mesh, tok.image_placeholder_id, batch
  )
  _, metrics = train_step(state, rules_lib.shard_batch(batch, mesh, config.mesh.rules))
  # The step's head draws: key fold_in(key(seed), step 0), as the train step makes them.
  loss_cfg = objective.LossConfig.from_config(config, tok.image_placeholder_id)
  draws = objective.head_draws(
    jax.random.fold_in(jax.random.key(config.seed), 0), 2 * 3 * 16, 64, loss_cfg
  )
  expected = torch_training_loss(
    torch_model,
    batch,
    np.array(draws['eps']),
    np.array(draws['t']),
    tok.image_placeholder_id,
    0.05,
    0.5,
    2,
  )
  np.testing.assert_allclose(float(metrics['loss']), expected, rtol=LOSS_RTOL)


def write_image_folder(directory, count: int, seed: int = 0):
  """Coloured rectangles in three aspect ratios, captioned by colour."""
  rng = np.random.default_rng(seed)
  directory.mkdir(parents=True)
  colours = {'red': (220, 30, 30), 'green': (30, 200, 60), 'blue': (40, 60, 230)}
  lines = []
  for i in range(count):
    name = list(colours)[i % 3]
    height, width = [(16, 16), (12, 20), (20, 12)][i % 3]
    image = np.full((height, width, 3), 240, np.uint8)
    y, x = rng.integers(0, height // 2), rng.integers(0, width // 2)
    image[y : y + height // 2, x : x + width // 2] = colours[name]
    Image.fromarray(image).save(directory / f'{i:03d}.png')
    lines.append(json.dumps({'image': f'{i:03d}.png', 'caption': f'a {name} square'}))
  (directory / 'captions.jsonl').write_text('\n'.join(lines) + '\n')


@pytest.mark.slow
def test_convert_finetune_export_sample(release, tmp_path):
  """Images -> shards -> latent cache with the release's VAE over 3 aspect buckets -> fine-tune
  from the converted release with its tokenizer.json -> export -> nextstep-sample --converted."""
  _, _, converted = release
  write_image_folder(tmp_path / 'images', 48)
  items, _ = builder.folder_items(
    str(tmp_path / 'images'), str(tmp_path / 'images' / 'captions.jsonl')
  )
  builder.build(items, str(tmp_path / 'data' / 'mine'))
  cache_config = finetune_config(
    converted, f'data.paths={tmp_path / "data"}/mine-*.array_record', 'data.use_latent_cache=False'
  )
  latent_cache.build_latent_cache(cache_config, str(tmp_path / 'latents' / 'mine'))
  config = finetune_config(
    converted,
    f'data.latent_cache_paths={tmp_path / "latents"}/mine-*.array_record',
    'train.steps=30',
    'train.log_every=5',
    'train.checkpoint_every=30',
  )
  result = loop.train(config, str(tmp_path / 'run'))
  records = [
    json.loads(line) for line in (tmp_path / 'run' / 'metrics.jsonl').read_text().splitlines()
  ]
  first, last = records[0], records[-1]
  assert result.step == 30 and last['loss'] < 0.8 * first['loss'], records
  assert last['im_loss'] < first['im_loss'] and last['lm_loss'] < first['lm_loss'], records
  assert (tmp_path / 'run' / 'tokenizer.json').read_text() == (
    converted / 'tokenizer.json'
  ).read_text()

  export.export_run(str(tmp_path / 'run'), tmp_path / 'exported')
  sampler = pipeline.TextToImage.from_converted(
    str(tmp_path / 'exported'), mesh=mesh_lib.make_mesh(config.mesh, jax.devices()[:1])
  )
  run = pipeline.TextToImage.from_workdir(str(tmp_path / 'run'))
  for a, b in zip(jax.tree.leaves(sampler.params), jax.tree.leaves(run.params)):
    np.testing.assert_array_equal(np.asarray(a), np.asarray(b))
  images = sampler(['a red square', 'a blue square'], [0, 1])
  assert images.shape == (2, 16, 16, 3) and images.dtype == np.uint8 and images.std() > 0
  np.testing.assert_array_equal(images, run(['a red square', 'a blue square'], [0, 1]))


def test_export_cli_reports_bad_runs(tmp_path, capsys):
  from nextstep_jax.cli import convert as convert_cli

  assert (
    convert_cli.main(['--export-run', str(tmp_path / 'nowhere'), '--out', str(tmp_path / 'out')])
    == 1
  )
  assert 'is not a training run' in capsys.readouterr().err
  (tmp_path / 'run' / 'checkpoints').mkdir(parents=True)
  (tmp_path / 'run' / 'config.json').write_text(
    configlib.config_to_json(configlib.load_config('configs/tiny.py'))
  )
  assert (
    convert_cli.main(['--export-run', f'{tmp_path / "run"}@5', '--out', str(tmp_path / 'out')]) == 1
  )
  assert 'sentencepiece' in capsys.readouterr().err
  (tmp_path / 'run' / 'tokenizer.json').write_text('{}')
  assert (
    convert_cli.main(['--export-run', f'{tmp_path / "run"}@5', '--out', str(tmp_path / 'out')]) == 1
  )
  assert 'No checkpoint for step 5' in capsys.readouterr().err
