"""Loading, overriding, validating and storing experiment configs.

A config is a locked `ml_collections.ConfigDict` built by `get_config(arg=None)` in a file under
`configs/`, loaded by path as data (fields documented once in `nextstep_jax/config_defaults.py`).
`load_config('configs/x.py:variant', ['train.steps=100'])` loads it and applies command-line
overrides; `validate` rejects inconsistent configs before any device work with a `ConfigError`
naming the field and the fix.
"""

import ast
import difflib
import importlib.util
import json
import pathlib
from collections.abc import Sequence
from typing import Any

import ml_collections

from nextstep_jax import config_defaults
from nextstep_jax import errors
from nextstep_jax import nn
from nextstep_jax.image import aspect
from nextstep_jax.parallel.mesh import MESH_AXES

REPO_ROOT = pathlib.Path(__file__).resolve().parents[1]  # Holds configs/ in a source checkout.
TOKENIZERS = ('pixels', 'vae')
TEXT_TOKENIZERS = ('spm', 'hf')
SPARE_EMBEDDING_ROWS = 16  # Embedding rows past text.vocab_size, for special tokens added later.
CFG_SCHEDULES = ('constant', 'linear')
LR_SCHEDULES = ('cosine', 'constant')
DATA_SOURCES = ('builtin', 'arrayrecord', 'tfds', 'edit')
OVERLONG_CAPTIONS = ('truncate', 'skip')
AUGMENT_OPS = ('hflip', 'random_crop')
HEAD_OBJECTIVES = ('flow', 'shortcut')


class ConfigError(errors.UsageError, ValueError):
  """A config field is unknown, mistyped or inconsistent; the message names the field and fix."""


def load_config(
  path_with_optional_variant: str, overrides: Sequence[str] = ()
) -> ml_collections.ConfigDict:
  """Loads `configs/x.py` or `configs/x.py:variant`, applies overrides and locks the result.

  Args:
    path_with_optional_variant: a config file path, optionally followed by `:variant`, which is
      passed to the file's `get_config(variant)`. The file is loaded by path (configs are data,
      not an installed package); a relative path that does not exist from the working directory is
      looked up from the repository root (`configs/x.py` works from any directory).
    overrides: `field.sub=value` strings (a leading `--config.` or `config.` is accepted). Values
      are parsed to the type of the field they replace.

  Returns:
    The locked config (no new fields can be added; existing ones stay assignable).
  """
  path, _, variant = path_with_optional_variant.partition(':')
  module = _load_module(_resolve_config_path(path))
  if not hasattr(module, 'get_config'):
    raise ConfigError(f'{path} defines no get_config(arg=None) function.')
  config = module.get_config(variant) if variant else module.get_config()
  if not isinstance(config, ml_collections.ConfigDict):
    raise ConfigError(f'{path}: get_config returned {type(config).__name__}, not a ConfigDict.')
  apply_overrides(config, overrides)
  config.lock()
  return config


def apply_overrides(config: ml_collections.ConfigDict, overrides: Sequence[str]) -> None:
  """Sets `field.sub=value` overrides in place; unknown fields and mistyped values are errors."""
  known = sorted(_flatten(config.to_dict()))
  for override in overrides:
    name, sep, text = override.removeprefix('--').removeprefix('config.').partition('=')
    if not sep:
      raise ConfigError(f'Override {override!r} is not of the form field.sub=value.')
    if name not in known:
      close = difflib.get_close_matches(name, known, n=3, cutoff=0.6)
      hint = f' Did you mean: {", ".join(close)}?' if close else ''
      raise ConfigError(f'Unknown config field {name!r} in override {override!r}.{hint}')
    *parents, leaf = name.split('.')
    node = config
    for parent in parents:
      node = node[parent]
    node[leaf] = _parse_value(name, text, node[leaf])


def validate(config: ml_collections.ConfigDict) -> None:
  """Checks sizes, choices and cross-field consistency; raises ConfigError listing every problem."""
  problems = []

  def require(ok: bool, message: str) -> None:
    if not ok:
      problems.append(message)

  m, image, text, train, sample = (
    config.model,
    config.image,
    config.text,
    config.train,
    config.sample,
  )
  positive = {
    'model': (
      'vocab_size',
      'hidden_size',
      'num_layers',
      'num_heads',
      'num_kv_heads',
      'head_dim',
      'intermediate_size',
      'latent_channels',
      'latent_patch_size',
      'fm_head_dim',
      'fm_head_layers',
      'base_image_grid_size',
      'max_seq_len',
      'rms_norm_eps',
      'rope_theta',
    ),
    'image': ('size',),
    'text': ('vocab_size', 'max_caption_tokens'),
    'data': ('num_train',),
    'sample': ('num_steps', 'batch_size', 'timestep_shift', 'temperature'),
    'train': (
      'steps',
      'batch_size',
      'lr',
      'log_every',
      'checkpoint_every',
      'keep_checkpoints',
      'num_grid_samples',
    ),
  }
  for group, fields in positive.items():
    for field in fields:
      value = config[group][field]
      require(value > 0, f'{group}.{field}={value} must be > 0.')
  for field in ('warmup_steps', 'sample_every', 'weight_decay', 'grad_clip', 'max_minutes'):
    require(train[field] >= 0, f'train.{field}={train[field]} must be >= 0.')
  require(
    0 <= train.min_lr_ratio <= 1, f'train.min_lr_ratio={train.min_lr_ratio} must be in [0, 1].'
  )
  _validate_microbatches(require, train)
  lora = train.get('lora')
  if lora is not None and lora.rank:
    require(lora.rank > 0, f'train.lora.rank={lora.rank} must be >= 0 (0 = LoRA off).')
    require(lora.alpha > 0, f'train.lora.alpha={lora.alpha} must be > 0.')
    require(
      bool(lora.targets),
      "train.lora.targets is empty: give regexes over a decoder layer's "
      'Dense paths, e.g. ("self_attn/.*", "mlp/.*").',
    )
    quant_cfg = m.get('quant')
    require(
      not (
        lora.train_head and quant_cfg is not None and quant_cfg.mode != 'none' and quant_cfg.head
      ),
      'train.lora.train_head trains the flow head fully, which model.quant.head would quantize: '
      'set model.quant.head=False for QLoRA with a trained head.',
    )
  require(
    0 < sample.last_step_size < 1,
    f'sample.last_step_size={sample.last_step_size} must be in (0, 1).',
  )
  if m.num_heads > 0 and m.num_kv_heads > 0:
    require(
      m.num_heads % m.num_kv_heads == 0,
      f'model.num_heads={m.num_heads} must be a multiple of model.num_kv_heads='
      f'{m.num_kv_heads} (grouped-query attention); pick num_kv_heads dividing num_heads.',
    )

  choices = _implemented_choices()
  _require_choice(require, 'image.tokenizer', image.tokenizer, TOKENIZERS)
  _require_choice(require, 'data.dataset', config.data.dataset, choices['data.dataset'])
  _require_choice(require, 'sample.solver', sample.solver, choices['sample.solver'])
  _require_choice(require, 'sample.time_grid', sample.time_grid, choices['sample.time_grid'])
  _require_choice(require, 'sample.cfg_schedule', sample.cfg_schedule, CFG_SCHEDULES)
  _require_choice(require, 'model.remat_policy', m.remat_policy, tuple(nn.REMAT_POLICIES))
  _require_choice(require, 'loss.head_objective', config.loss.head_objective, HEAD_OBJECTIVES)
  if config.loss.head_objective == 'shortcut':
    require(
      m.fm_head_step_cond,
      "loss.head_objective='shortcut' needs the step-conditioned head: "
      'set model.fm_head_step_cond=True.',
    )
    k = config.loss.shortcut_max_steps
    require(k >= 2 and not k & (k - 1), f'loss.shortcut_max_steps={k} must be a power of two >= 2.')
    require(
      0 < config.loss.shortcut_fraction < 1,
      f'loss.shortcut_fraction={config.loss.shortcut_fraction} must be in (0, 1).',
    )
  require(
    all(n >= 1 for n in sample.token_steps),
    f'sample.token_steps={sample.token_steps} must all be >= 1.',
  )
  times = tuple(sample.times)
  require(
    not times
    or (
      len(times) >= 2
      and times[0] == 0.0
      and times[-1] == 1.0
      and all(b > a for a, b in zip(times, times[1:]))
    ),
    f'sample.times={times} must increase strictly from 0.0 to 1.0 (or be () for the grid).',
  )
  _require_choice(require, 'train.lr_schedule', train.lr_schedule, LR_SCHEDULES)
  _require_choice(require, 'model.dtype', m.dtype, tuple(nn.DTYPES))
  _require_choice(require, 'model.param_dtype', m.param_dtype, tuple(nn.DTYPES))
  _require_choice(require, 'model.attention', m.attention, choices['model.attention'])
  _validate_quant(require, m.quant)

  if image.tokenizer == 'pixels':
    require(
      m.latent_channels == 3,
      f'model.latent_channels={m.latent_channels} must be 3 with image.tokenizer=pixels '
      '(the latent is the RGB image).',
    )
    require(
      not image.use_norm,
      'image.use_norm=True LayerNorms every sampled token, which only matches training '
      'targets that are normalised per token (the VAE with encoder_norm); set '
      'image.use_norm=False with image.tokenizer=pixels.',
    )
  if image.tokenizer == 'vae':
    _validate_vae(require, config)
  buckets_ok = _validate_aspect_buckets(require, config)
  downsample = tokenizer_downsample(config) if image.tokenizer in TOKENIZERS else None
  if downsample and image.size > 0 and m.latent_patch_size > 0 and buckets_ok:
    unit = downsample * m.latent_patch_size
    require(
      image.size % unit == 0,
      f'image.size={image.size} must be divisible by {unit} (image.tokenizer='
      f'{image.tokenizer} downsamples by {downsample}, times model.latent_patch_size='
      f'{m.latent_patch_size}); e.g. image.size={max(unit, image.size // unit * unit)}.',
    )
    if image.size % unit == 0:
      needed = required_seq_len(config)
      require(
        m.max_seq_len >= needed,
        f'model.max_seq_len={m.max_seq_len} is too short: the longest training sequence '
        f'needs {needed} = {_seq_len_breakdown(config)}; set model.max_seq_len >= {needed} '
        'or lower text.max_caption_tokens / image.size.',
      )

  _require_choice(require, 'text.tokenizer', text.get('tokenizer', 'spm'), TEXT_TOKENIZERS)
  require(
    text.get('tokenizer', 'spm') != 'hf' or text.tokenizer_json or config.train.get('init_from'),
    "text.tokenizer='hf' needs text.tokenizer_json (a tokenizer.json) or train.init_from (a converted "
    'release or a run holding one).',
  )
  require(
    image.tokenizer != 'vae' or not config.train.get('init_from') or image.vae.checkpoint,
    'train.init_from fine-tunes trained weights but image.vae.checkpoint is empty (a random VAE): set '
    "it to the release's VAE (a converted release's DIR/vae) or to the run's tokenizer.",
  )
  require(
    text.get('tokenizer', 'spm') == 'hf' or m.vocab_size >= text.vocab_size + SPARE_EMBEDDING_ROWS,
    f'model.vocab_size={m.vocab_size} must be >= text.vocab_size + {SPARE_EMBEDDING_ROWS} = '
    f'{text.vocab_size + SPARE_EMBEDDING_ROWS}: every text id needs an embedding row (up to '
    f'{text.vocab_size} sentencepiece pieces, which include the 256 byte-fallback pieces and '
    f'the special tokens), plus {SPARE_EMBEDDING_ROWS} spare rows so special tokens can be '
    'added without resizing the embedding.',
  )
  require(
    0 <= config.data.drop_text_prob < 1,
    f'data.drop_text_prob={config.data.drop_text_prob} must be in [0, 1) (1 would never '
    'train the text-conditioned order).',
  )
  require(
    isinstance(config.loss.fm_head_batch_mul, int) and config.loss.fm_head_batch_mul >= 1,
    f'loss.fm_head_batch_mul={config.loss.fm_head_batch_mul} must be an integer >= 1.',
  )
  require(config.loss.time_std > 0, f'loss.time_std={config.loss.time_std} must be > 0.')

  _validate_data_pipeline(require, config.data)

  sizes = [config.mesh[axis] for axis in MESH_AXES]
  for axis, size in zip(MESH_AXES, sizes):
    require(
      size == -1 or size > 0,
      f'mesh.{axis}={size} must be a positive size or -1 (absorb the remaining devices).',
    )
  require(
    sizes.count(-1) <= 1,
    f'mesh: at most one of data/fsdp/tensor may be -1, got {dict(zip(MESH_AXES, sizes))}.',
  )
  _validate_rules(require, config.mesh.rules)

  if problems:
    raise ConfigError('Invalid config:\n  - ' + '\n  - '.join(problems))


def _validate_microbatches(require, train: ml_collections.ConfigDict) -> None:
  """train.microbatches: a positive int dividing the global batch (the mesh-dependent per-device
  check runs when the train step is built, training/step.py check_microbatches)."""
  k = train.microbatches
  if not isinstance(k, int) or k < 1:
    require(
      False, f'train.microbatches={k!r} must be an integer >= 1 (1 = no gradient accumulation).'
    )
    return
  require(
    train.batch_size % k == 0,
    f'train.microbatches={k} must divide train.batch_size={train.batch_size}: set '
    f'train.batch_size to a multiple of {k} (e.g. {max(k, train.batch_size // k * k)}) or '
    f'train.microbatches to a divisor of {train.batch_size}.',
  )


def _validate_data_pipeline(require, data: ml_collections.ConfigDict) -> None:
  """The Grain pipeline fields (data.source ... data.cache_variants)."""
  _require_choice(require, 'data.source', data.source, DATA_SOURCES)
  _require_choice(require, 'data.overlong_captions', data.overlong_captions, OVERLONG_CAPTIONS)
  if data.source == 'arrayrecord' and not data.use_latent_cache:
    require(
      bool(data.paths),
      'data.source=arrayrecord needs data.paths (shard files or globs '
      'written by `nextstep-data build`).',
    )
  if data.source == 'edit':
    require(
      bool(data.paths) and not data.use_latent_cache and not data.get('aspect_buckets'),
      'data.source=edit needs data.paths (shards of nextstep-data build --from edit-folder) and reads '
      'raw images at image.size: unset data.use_latent_cache and data.aspect_buckets.',
    )
  if data.source == 'tfds':
    require(bool(data.tfds_name), 'data.source=tfds needs data.tfds_name (a prepared data set).')
  if data.use_latent_cache:
    require(
      bool(data.latent_cache_paths),
      'data.use_latent_cache=True needs '
      'data.latent_cache_paths (shards written by `nextstep-data cache-latents`).',
    )
  for field in ('worker_count',):
    require(data[field] >= 0, f'data.{field}={data[field]} must be >= 0.')
  for field in ('read_threads', 'prefetch', 'cache_variants'):
    require(data[field] >= 1, f'data.{field}={data[field]} must be >= 1.')
  require(
    data.random_crop_scale >= 1,
    f'data.random_crop_scale={data.random_crop_scale} must be '
    '>= 1 (the crop window is image.size).',
  )
  ops = [op.strip() for op in data.augment.split(',') if op.strip()]
  for op in ops:
    require(op in AUGMENT_OPS, f'data.augment has {op!r}; use a comma list of {AUGMENT_OPS}.')
  require(
    data.cache_variants == 1 or ops,
    f'data.cache_variants={data.cache_variants} > 1 '
    'stores augmented variants: set data.augment (e.g. "hflip") or cache_variants=1.',
  )


def _validate_aspect_buckets(require, config: ml_collections.ConfigDict) -> bool:
  """data.aspect_buckets ('h*w' token grids); False when an entry does not parse."""
  areas = tuple(config.data.get('aspect_buckets', ()))
  if not areas:
    return True
  try:
    grids = [aspect.parse_area(text) for text in areas]
  except ValueError as error:
    require(False, f'data.aspect_buckets={areas}: {error}.')
    return False
  require(len(set(grids)) == len(grids), f'data.aspect_buckets={areas} lists a grid twice.')
  require(
    config.data.source != 'builtin' or config.data.grain_builtin or config.data.use_latent_cache,
    'data.aspect_buckets needs the Grain pipeline: set data.source=arrayrecord/tfds or '
    'data.grain_builtin=True.',
  )
  if config.model.use_gen_pos_embed:
    table = config.model.base_image_grid_size**2
    require(
      all(h * w <= table for h, w in grids),
      f'data.aspect_buckets={areas} has grids of more than model.base_image_grid_size**2='
      f'{table} tokens (the gen_pos_embed table, indexed by flat token index); raise '
      'model.base_image_grid_size.',
    )
  return True


def tokenizer_downsample(config: ml_collections.ConfigDict) -> int:
  """Image side / latent side: 1 for pixels, 2**(len(image.vae.ch_mult) - 1) for the VAE."""
  if config.image.tokenizer == 'vae':
    return 2 ** (len(config.image.vae.ch_mult) - 1)
  return 1


def image_grid(config: ml_collections.ConfigDict) -> tuple[int, int]:
  """Image tokens per side (h, w): image.size / tokenizer downsample / latent_patch_size."""
  side = config.image.size // tokenizer_downsample(config) // config.model.latent_patch_size
  return side, side


def training_grids(config: ml_collections.ConfigDict) -> list[tuple[int, int]]:
  """Token grids (h, w) of training images: the data.aspect_buckets areas, else [image_grid]."""
  if config.data.get('aspect_buckets'):
    return [aspect.parse_area(text) for text in config.data.aspect_buckets]
  return [image_grid(config)]


def token_dim(config: ml_collections.ConfigDict) -> int:
  """Width of one continuous image token: latent_channels * latent_patch_size**2."""
  return config.model.latent_channels * config.model.latent_patch_size**2


def required_seq_len(config: ml_collections.ConfigDict) -> int:
  """Longest training sequence: caption, <image_area>, "h*w", boi, h*w tokens, eoi, eos (the
  longest over the aspect buckets)."""
  return max(sum(_seq_len_parts(config, grid).values()) for grid in training_grids(config))


def config_to_json(config: ml_collections.ConfigDict) -> str:
  """Serialises a config (a run's record in its workdir); inverse of `config_from_json`."""
  return json.dumps(config.to_dict(), indent=2)


def config_from_json(text: str) -> ml_collections.ConfigDict:
  """Rebuilds a locked config from `config_to_json` output (JSON lists become tuples)."""
  config = ml_collections.ConfigDict(_lists_to_tuples(json.loads(text)))
  config.lock()
  return config


def with_base_defaults(config: ml_collections.ConfigDict) -> ml_collections.ConfigDict:
  """A stored run config completed (locked) with the fields added to the defaults
  (`config_defaults`) since it was written; stored values win."""
  merged = config_defaults.get_base_config()
  merged.update(config.to_dict())
  merged.lock()
  return merged


def _seq_len_parts(config: ml_collections.ConfigDict, grid: tuple[int, int]) -> dict[str, int]:
  h, w = grid
  return {
    'caption': config.text.max_caption_tokens,
    '<image_area>': 1,
    'area string': len(str(h)) + 1 + len(str(w)),  # Digits are single tokens.
    'boi': 1,
    'image tokens': h * w,
    'eoi': 1,
    'eos': 1,
  }


def _seq_len_breakdown(config: ml_collections.ConfigDict) -> str:
  grid = max(training_grids(config), key=lambda g: sum(_seq_len_parts(config, g).values()))
  return ' + '.join(f'{n} ({part})' for part, n in _seq_len_parts(config, grid).items())


def _validate_vae(require, config: ml_collections.ConfigDict) -> None:
  """image.vae and vae_train fields (image.tokenizer='vae')."""
  v, m = config.image.vae, config.model
  for field in (
    'ch',
    'num_res_blocks',
    'z_channels',
    'norm_groups',
    'psz',
    'batch_chunk',
    'scaling_factor',
    'in_channels',
    'out_ch',
  ):
    require(v[field] > 0, f'image.vae.{field}={v[field]} must be > 0.')
  require(
    len(v.ch_mult) >= 1 and all(k > 0 for k in v.ch_mult),
    f'image.vae.ch_mult={v.ch_mult} must be a non-empty tuple of positive ints.',
  )
  if v.norm_groups > 0 and v.ch > 0:
    widths = sorted({v.ch} | {v.ch * k for k in v.ch_mult})
    require(
      all(w % v.norm_groups == 0 for w in widths),
      f'image.vae widths {widths} (ch={v.ch} x ch_mult) must be divisible by '
      f'image.vae.norm_groups={v.norm_groups}; pick ch a multiple of norm_groups.',
    )
  require(v.tile_size >= 0, f'image.vae.tile_size={v.tile_size} must be >= 0 (0 = never tile).')
  if v.tile_size > 0:
    require(
      0 <= v.tile_overlap < v.tile_size,
      f'image.vae.tile_overlap={v.tile_overlap} must be in [0, image.vae.tile_size='
      f'{v.tile_size}); e.g. image.vae.tile_overlap={v.tile_size // 4}.',
    )
  require(
    m.latent_channels == v.z_channels,
    f'model.latent_channels={m.latent_channels} must equal image.vae.z_channels='
    f'{v.z_channels} with image.tokenizer=vae.',
  )
  latent_side = config.image.size // tokenizer_downsample(config)
  if v.encoder_norm and v.psz > 0:
    require(
      latent_side % v.psz == 0,
      f'image.vae.psz={v.psz} must divide the latent side {latent_side} (image.size / '
      f'{tokenizer_downsample(config)}).',
    )
  if config.image.use_norm:
    require(
      v.encoder_norm and v.psz == m.latent_patch_size,
      'image.use_norm=True LayerNorms every sampled token, which matches the training '
      'targets only when image.vae.encoder_norm=True and image.vae.psz == '
      f'model.latent_patch_size (got encoder_norm={v.encoder_norm}, psz={v.psz}, '
      f'latent_patch_size={m.latent_patch_size}).',
    )
  t = config.vae_train
  for field in (
    'steps',
    'batch_size',
    'lr',
    'log_every',
    'checkpoint_every',
    'keep_checkpoints',
    'num_eval',
    'disc_ch',
  ):
    require(t[field] > 0, f'vae_train.{field}={t[field]} must be > 0.')
  for field in (
    'warmup_steps',
    'l1_weight',
    'l2_weight',
    'kl_weight',
    'noise_max',
    'disc_weight',
    'disc_start',
    'grid_every',
  ):
    require(t[field] >= 0, f'vae_train.{field}={t[field]} must be >= 0.')


def _validate_quant(require, quant: ml_collections.ConfigDict) -> None:
  """model.quant: weight-only quantization settings (model/quant.py)."""
  _require_choice(require, 'model.quant.mode', quant.mode, ('none', *nn.QUANT_TYPES))
  require(
    isinstance(quant.group_size, int) and quant.group_size > 0,
    f'model.quant.group_size={quant.group_size!r} must be a positive integer (int4 group along '
    'the contracted axis, e.g. 128).',
  )
  for field in ('head', 'embedding'):
    require(
      isinstance(quant[field], bool), f'model.quant.{field}={quant[field]!r} must be True or False.'
    )


def _implemented_choices() -> dict[str, tuple[str, ...]]:
  """The choice lists owned by the modules above configlib in the import layers that implement
  them, imported here lazily, at validation time (the layer contract allows exactly these edges).
  Lists of modules below configlib (`nn.DTYPES`, `nn.REMAT_POLICIES`) are read directly."""
  from nextstep_jax.data import builtin
  from nextstep_jax.model import attention
  from nextstep_jax.sampling import integrators

  return {
    'data.dataset': builtin.DATASETS,
    'sample.solver': integrators.SOLVERS,
    'sample.time_grid': integrators.TIME_GRIDS,
    'model.attention': attention.IMPLEMENTATIONS,
  }


def _require_choice(require, name: str, value: Any, choices: Sequence[str]) -> None:
  require(value in choices, f'{name}={value!r} must be one of {", ".join(choices)}.')


def _validate_rules(require, rules: Any) -> None:
  """Each rule is (logical name, None | mesh axis | tuple of mesh axes)."""
  for rule in rules:
    ok = isinstance(rule, (tuple, list)) and len(rule) == 2 and isinstance(rule[0], str)
    require(ok, f'mesh.rules entry {rule!r} must be (logical_name, mesh_axes).')
    if not ok:
      continue
    targets = rule[1] if isinstance(rule[1], (tuple, list)) else (rule[1],)
    unknown = [axis for axis in targets if axis is not None and axis not in MESH_AXES]
    require(
      not unknown,
      f'mesh.rules entry {tuple(rule)!r} names unknown mesh axes {unknown}; '
      f'use {", ".join(MESH_AXES)} or None.',
    )


def config_module(path: str, relative_to: str | None = None):
  """The module of the config file at `path`, loaded by path (configs are data, not a package).

  A config builds on another by loading it relative to its own file:
  `shapes = configlib.config_module('shapes.py', __file__)`.

  Args:
    path: the config file.
    relative_to: a file whose directory a relative `path` starts from; None: see `load_config`.
  """
  if relative_to is not None and not pathlib.Path(path).is_absolute():
    path = str(pathlib.Path(relative_to).parent / path)
  return _load_module(_resolve_config_path(path))


def _resolve_config_path(path: str) -> pathlib.Path:
  """`path` as given (absolute or from the working directory), else from the repository root
  (where `configs/` lives next to the package in a source checkout or editable install)."""
  candidate = pathlib.Path(path)
  if candidate.is_file():
    return candidate
  from_repo = REPO_ROOT / candidate
  if not candidate.is_absolute() and from_repo.is_file():
    return from_repo
  raise ConfigError(
    f'Config file {path!r} not found (looked from the working directory and {REPO_ROOT}).'
  )


def _load_module(path: pathlib.Path):
  spec = importlib.util.spec_from_file_location(f'_nextstep_config_{path.stem}', path)
  module = importlib.util.module_from_spec(spec)
  spec.loader.exec_module(module)
  return module


def _flatten(tree: dict, prefix: str = '') -> dict[str, Any]:
  flat = {}
  for key, value in tree.items():
    if isinstance(value, dict):
      flat.update(_flatten(value, f'{prefix}{key}.'))
    else:
      flat[f'{prefix}{key}'] = value
  return flat


def _parse_value(name: str, text: str, current: Any) -> Any:
  """Parses `text` to the type of the field's current value."""
  try:
    if isinstance(current, bool):
      lowered = text.strip().lower()
      if lowered not in ('true', 'false', '1', '0'):
        raise ValueError(text)
      return lowered in ('true', '1')
    if isinstance(current, int):
      return int(text)
    if isinstance(current, float):
      return float(text)
    if isinstance(current, str):
      return text
    if current is None:
      return _literal_or_string(text)
    value = ast.literal_eval(text)
  except (ValueError, SyntaxError) as error:
    kind = type(current).__name__
    raise ConfigError(f'Config field {name!r} holds a {kind}; cannot parse {text!r}.') from error
  if current is not None and not isinstance(value, type(current)):
    if isinstance(current, tuple) and isinstance(value, list):
      return _lists_to_tuples(value)
    raise ConfigError(
      f'Config field {name!r} holds a {type(current).__name__}; '
      f'got {text!r} ({type(value).__name__}).'
    )
  return _lists_to_tuples(value)


def _literal_or_string(text: str) -> Any:
  """A Python literal when `text` is one (1, 0.5, None, (1, 2)), else the text itself."""
  try:
    return _lists_to_tuples(ast.literal_eval(text))
  except (ValueError, SyntaxError):
    return text


def _lists_to_tuples(value: Any) -> Any:
  if isinstance(value, dict):
    return {key: _lists_to_tuples(item) for key, item in value.items()}
  if isinstance(value, (list, tuple)):
    return tuple(_lists_to_tuples(item) for item in value)
  return value
