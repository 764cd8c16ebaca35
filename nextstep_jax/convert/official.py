"""Official NextStep-1 release (HF safetensors) -> our orbax params checkpoint + config + tokenizer.

A release directory holds `config.json`, `model.safetensors.index.json` + shards (or one
`model.safetensors`) and `tokenizer.json` (docs/model.md §8). `convert(hf_dir, out_dir)` writes

  out_dir/config.json     our ml_collections config (model fields from the release's config.json)
  out_dir/tokenizer.json  the release's tokenizer, copied
  out_dir/params/0/       orbax checkpoint of the model params (nnx.State), restorable sharded
                          onto any mesh (`load_params`)
  out_dir/vae/            the image tokenizer (f8ch16 VAE: config.json + checkpoint.pt or
                          *.safetensors), copied from the release's `vae/` folder or `vae_dir`
                          after a full import check; config image.vae.checkpoint = 'vae' and the
                          VAE's architecture fields come from its config.json

Names and layouts follow one table (`_rules`): official name (with `{layer}` for stacked
modules) -> our param path -> transform ('copy', 'flat' = reshape a flat vector into the target's
(heads, head_dim), 'T' = torch Linear weight (out, in) transposed to a kernel (in, out...)).
Stacked layers (decoder `layers.N.*`, head `res_blocks.N.*`) land in slice N of one array with a
leading `layers` axis. Tensors are read one at a time from the memory-mapped shards, so host
memory holds the output params once (plus one tensor). Every missing, unexpected or mis-shaped
tensor, and every disagreement between config.json, the tensors and the tokenizer, is a
`ConversionError` listing all of them before anything is written.
"""

import functools
import json
import math
import pathlib
import re
import shutil
from typing import Any

import jax
import ml_collections
import numpy as np
from flax import nnx
from safetensors import SafetensorError
from safetensors import safe_open

from nextstep_jax import checkpoints
from nextstep_jax import config_defaults
from nextstep_jax import configlib
from nextstep_jax import errors
from nextstep_jax import nn
from nextstep_jax import runs
from nextstep_jax.data import hf_tokenizer
from nextstep_jax.image import vae_import
from nextstep_jax.model import nextstep
from nextstep_jax.model import quant
from nextstep_jax.utils import logging as logging_lib

CONFIG_FILE = runs.CONFIG_FILE  # In a model release and the converted directory.
TOKENIZER_FILE = runs.CONVERTED_TOKENIZER_FILE  # In a model release and the converted directory.
PARAMS_DIR = runs.CONVERTED_PARAMS_DIR
VAE_DIR = runs.CONVERTED_VAE_DIR  # In a model release and in the converted directory.
INDEX_FILE = 'model.safetensors.index.json'
SINGLE_FILE = 'model.safetensors'
# Tensors in releases that are not parameters: gen_pos_embed is a fixed buffer (checked against
# our table instead); rotary inv_freq is recomputed.
IGNORED = (re.compile(r'gen_pos_embed'), re.compile(r'(.+\.)?rotary_emb\.inv_freq'))
GEN_POS_EMBED_ATOL = 1e-4  # The buffer is float32 sin/cos; a bf16 release rounds to ~4e-3.
_MAX_LISTED = 30


class ConversionError(errors.UserError, ValueError):
  """The release does not match the expected layout; the message lists every problem."""


def _rules(o_attention_bias: bool, attention_bias: bool, tied: bool) -> list[tuple[str, str, str]]:
  """(official name template, our param path, transform) for every parameter of our model."""
  rules = [
    ('embed_tokens.weight', 'embed_tokens.embedding', 'copy'),
    ('norm.weight', 'decoder.norm.weight', 'copy'),
  ]
  if not tied:
    rules.append(('lm_head.weight', 'lm_head.kernel', 'T'))
  for norm in ('input_layernorm', 'post_attention_layernorm'):
    rules.append((f'layers.{{layer}}.{norm}.weight', f'decoder.layers.{norm}.weight', 'copy'))
  for proj in ('q_proj', 'k_proj', 'v_proj', 'o_proj'):
    rules.append(
      (f'layers.{{layer}}.self_attn.{proj}.weight', f'decoder.layers.self_attn.{proj}.kernel', 'T')
    )
    if (proj == 'o_proj' and o_attention_bias) or (proj != 'o_proj' and attention_bias):
      rules.append(
        (f'layers.{{layer}}.self_attn.{proj}.bias', f'decoder.layers.self_attn.{proj}.bias', 'flat')
      )
  for proj in ('gate_proj', 'up_proj', 'down_proj'):
    rules.append((f'layers.{{layer}}.mlp.{proj}.weight', f'decoder.layers.mlp.{proj}.kernel', 'T'))

  def linear(official, ours):
    rules.extend(
      [(f'{official}.weight', f'{ours}.kernel', 'T'), (f'{official}.bias', f'{ours}.bias', 'copy')]
    )

  linear('image_in_projector', 'image_in_projector')
  linear('image_out_projector', 'image_out_projector')
  head = 'image_head.net'
  linear(f'{head}.time_embed.mlp.0', 'image_head.time_embed.mlp_0')
  linear(f'{head}.time_embed.mlp.2', 'image_head.time_embed.mlp_2')
  linear(f'{head}.cond_embed', 'image_head.cond_embed')
  linear(f'{head}.input_proj', 'image_head.input_proj')
  rules.append(
    (f'{head}.res_blocks.{{layer}}.in_ln.weight', 'image_head.res_blocks.in_ln.weight', 'copy')
  )
  rules.append(
    (f'{head}.res_blocks.{{layer}}.in_ln.bias', 'image_head.res_blocks.in_ln.bias', 'copy')
  )
  linear(f'{head}.res_blocks.{{layer}}.mlp.0', 'image_head.res_blocks.mlp_0')
  linear(f'{head}.res_blocks.{{layer}}.mlp.2', 'image_head.res_blocks.mlp_2')
  linear(
    f'{head}.res_blocks.{{layer}}.adaLN_modulation.1', 'image_head.res_blocks.adaLN_modulation_1'
  )
  linear(f'{head}.final_layer.adaLN_modulation.1', 'image_head.final_layer.adaLN_modulation_1')
  linear(f'{head}.final_layer.linear', 'image_head.final_layer.linear')
  return rules


def _source_shape(transform: str, target: tuple[int, ...]) -> tuple[int, ...]:
  """The official tensor's shape for a target (per-layer) slice of shape `target`."""
  if transform == 'T':
    return (math.prod(target[1:]), target[0])
  if transform == 'flat':
    return (math.prod(target),)
  return tuple(target)


def _apply(transform: str, tensor: np.ndarray, target: tuple[int, ...]) -> np.ndarray:
  if transform == 'T':
    return tensor.T.reshape(target)
  return tensor.reshape(target)


# ----------------------------------------------------------------------------- release reading


def tensor_files(hf_dir: str | pathlib.Path) -> dict[str, pathlib.Path]:
  """{official tensor name: shard file} from the index json (or the single safetensors file)."""
  root = pathlib.Path(hf_dir)
  if (root / INDEX_FILE).exists():
    weight_map = read_json(root / INDEX_FILE).get('weight_map')
    if not isinstance(weight_map, dict):
      raise ConversionError(f'{root / INDEX_FILE} has no "weight_map" object; download it again')
    files = {name: root / shard for name, shard in weight_map.items()}
    absent = sorted({str(path) for path in files.values() if not path.exists()})
    if absent:
      raise ConversionError(f'{INDEX_FILE} names shards that are missing: {absent}')
    return files
  if (root / SINGLE_FILE).exists():
    with _open_safetensors(root / SINGLE_FILE) as f:
      return dict.fromkeys(f.keys(), root / SINGLE_FILE)
  raise ConversionError(
    f'{root} holds neither {INDEX_FILE} nor {SINGLE_FILE}; pass the directory of a '
    'NextStep-1 release (e.g. a download of stepfun-ai/NextStep-1-Large).'
  )


def _open_safetensors(path: pathlib.Path):
  """safe_open(path) with a damaged file reported as a ConversionError naming it."""
  try:
    return safe_open(path, 'numpy')
  except (SafetensorError, OSError, ValueError) as error:
    raise ConversionError(
      f'{path} is not a readable safetensors file ({error}); the download is '
      'probably incomplete: download it again'
    ) from error


def read_json(path: pathlib.Path) -> dict:
  """A JSON object file; ConversionError naming the file when it is not one."""
  try:
    value = json.loads(path.read_text(encoding='utf-8'))
  except (ValueError, UnicodeDecodeError) as error:
    raise ConversionError(f'{path} is not valid JSON ({error}); download it again') from error
  if not isinstance(value, dict):
    raise ConversionError(f'{path} holds {type(value).__name__}, expected a JSON object')
  return value


def tensor_shapes(files: dict[str, pathlib.Path]) -> dict[str, tuple[int, ...]]:
  """Shapes from the safetensors headers (no tensor data read)."""
  shapes = {}
  for shard in sorted(set(files.values())):
    with _open_safetensors(shard) as f:
      for name in f.keys():
        if files.get(name) == shard:
          shapes[name] = tuple(f.get_slice(name).get_shape())
  missing = sorted(set(files) - set(shapes))
  if missing:
    raise ConversionError(
      f'tensors listed in {INDEX_FILE} but absent from their shards: {missing[:_MAX_LISTED]}'
    )
  return shapes


def _first(hf: dict, *names, default=None):
  for name in names:
    if name in hf:
      return hf[name]
  return default


def model_fields(hf: dict, names: set[str]) -> tuple[dict, list[str]]:
  """Our `config.model` fields from a release's config.json and its tensor names.

  Returns (fields, problems). Biases are decided by the tensors (docs/model.md §9: a config without
  `o_attention_bias` falls back to `attention_bias` upstream); an explicit config value that
  contradicts the tensors is a problem.
  """
  problems = []
  required = (
    'vocab_size',
    'hidden_size',
    'num_hidden_layers',
    'num_attention_heads',
    'intermediate_size',
  )
  absent = [key for key in required if key not in hf]
  if absent:
    return {}, [f'config.json lacks {absent}']
  rope_theta = _first(hf, 'rope_theta', default=None)
  if rope_theta is None:
    rope_theta = (hf.get('rope_parameters') or {}).get('rope_theta')
  if rope_theta is None:
    problems.append('config.json gives no rope_theta (nor rope_parameters.rope_theta)')
  scaling = hf.get('rope_scaling')
  if scaling and scaling.get('rope_type', scaling.get('type')) not in (None, 'default'):
    problems.append(f'rope_scaling={scaling} is not supported (NextStep-1 uses plain RoPE)')
  # Training fields of the official training release: supported values only, refused otherwise.
  if float(hf.get('noise_strength') or 0.0) != 0.0:
    problems.append(
      f'noise_strength={hf["noise_strength"]} is not supported: training here uses clean '
      'latents (the released value is 0)'
    )
  if hf.get('use_token_length_weight'):
    problems.append(
      'use_token_length_weight=true is not supported: the loss here is a plain mean over '
      'text targets and over image tokens'
    )
  if hf.get('mlp_bias'):
    problems.append('mlp_bias=true is not supported (NextStep-1 MLPs have no biases)')
  heads = hf['num_attention_heads']
  o_bias = 'layers.0.self_attn.o_proj.bias' in names
  qkv_bias = 'layers.0.self_attn.q_proj.bias' in names
  for key, found in (('o_attention_bias', o_bias), ('attention_bias', qkv_bias)):
    if key in hf and bool(hf[key]) != found:
      problems.append(
        f'config.json {key}={hf[key]} but the checkpoint {"has" if found else "has no"} '
        f'{"o_proj" if key == "o_attention_bias" else "q_proj"} bias'
      )
  head_layers = len(
    {m.group(1) for m in map(re.compile(r'image_head\.net\.res_blocks\.(\d+)\.').match, names) if m}
  )
  fields = dict(
    vocab_size=hf['vocab_size'],
    hidden_size=hf['hidden_size'],
    num_layers=hf['num_hidden_layers'],
    num_heads=heads,
    num_kv_heads=hf.get('num_key_value_heads', heads),
    head_dim=hf.get('head_dim') or hf['hidden_size'] // heads,
    intermediate_size=hf['intermediate_size'],
    rms_norm_eps=float(hf.get('rms_norm_eps', 1e-6)),
    rope_theta=float(rope_theta or 0.0),
    attention_bias=qkv_bias,
    o_attention_bias=o_bias,
    tie_word_embeddings=bool(hf.get('tie_word_embeddings', False)),
    latent_channels=_first(hf, 'latent_channels', 'num_channels', default=16),
    latent_patch_size=_first(hf, 'latent_patch_size', 'patch_size', default=2),
    fm_head_dim=_first(hf, 'fm_head_dim', 'genloss_width', default=1536),
    fm_head_layers=_first(hf, 'fm_head_layers', 'genloss_depth', default=head_layers or 12),
    use_gen_pos_embed=bool(hf.get('use_gen_pos_embed', False)),
    base_image_grid_size=hf.get('base_image_grid_size', 32),
    max_seq_len=hf.get('max_position_embeddings', 131072),
  )
  return fields, problems


def _tokenizer_problems(hf: dict, tok: hf_tokenizer.HFTokenizer, vocab_size: int) -> list[str]:
  problems = []
  checks = (
    ('boi', tok.boi_id),
    ('eoi', tok.eoi_id),
    ('image_placeholder_id', tok.image_placeholder_id),
    ('pad_token_id', tok.pad_id),
    ('eos_token_id', tok.eos_id),
  )
  for key, token_id in checks:
    if key in hf and hf[key] is not None and hf[key] != token_id:
      problems.append(f'config.json {key}={hf[key]} but {TOKENIZER_FILE} gives id {token_id}')
  if tok.vocab_size > vocab_size:
    problems.append(
      f'{TOKENIZER_FILE} has {tok.vocab_size} ids but vocab_size={vocab_size} embedding rows'
    )
  return problems


def converted_config(
  fields: dict,
  hf: dict,
  tok_vocab_size: int,
  param_dtype: str,
  compute_dtype: str,
  image_tokenizer: str,
  image_size: int,
  max_caption_tokens: int,
) -> ml_collections.ConfigDict:
  """Our full config for a converted release (sampling defaults of the official T2I example)."""
  c = config_defaults.get_base_config()
  c.name = f'converted_{hf.get("model_type", "nextstep")}'
  c.model.update(fields)
  c.model.param_dtype, c.model.dtype, c.model.remat_policy = param_dtype, compute_dtype, 'none'
  c.image.tokenizer, c.image.size = image_tokenizer, image_size
  c.image.use_norm = image_tokenizer == 'vae'  # Official NextStep-1 `use_norm`, VAE latents only.
  c.text.vocab_size = tok_vocab_size
  c.text.max_caption_tokens = max_caption_tokens
  c.loss.lm_loss_weight = float(hf.get('lm_loss_weight', 0.01))
  c.loss.im_loss_weight = float(_first(hf, 'im_loss_weight', 'image_loss_weight', default=1.0))
  c.loss.fm_head_batch_mul = int(_first(hf, 'fm_head_batch_mul', 'genloss_batch_mul', default=4))
  c.sample.cfg, c.sample.num_steps, c.sample.batch_size = 7.5, 50, 1
  c.mesh.data, c.mesh.fsdp, c.mesh.tensor = 1, -1, 1
  return c


# ----------------------------------------------------------------------------- conversion


def plan(config: ml_collections.ConfigDict, shapes: dict[str, tuple[int, ...]]):
  """Matches release tensors to our params. Returns (abstract params, {official name: (our path,
  layer or None, transform)}); raises ConversionError listing missing/unexpected/mis-shaped."""
  abstract = nnx.state(nextstep.abstract_model(config, quantized=False), nnx.Param)
  targets = {
    '.'.join(str(k) for k in path): var.get_value() for path, var in nnx.to_flat_state(abstract)
  }
  m = config.model
  expected: dict[str, tuple[str, int | None, str]] = {}
  for template, path, transform in _rules(
    m.o_attention_bias, m.attention_bias, m.tie_word_embeddings
  ):
    if path not in targets:
      raise ConversionError(f'internal: rule target {path} is not a parameter of the model')
    if '{layer}' in template:
      for layer in range(targets[path].shape[0]):
        expected[template.format(layer=layer)] = (path, layer, transform)
    else:
      expected[template] = (path, None, transform)
  uncovered = sorted(set(targets) - {path for path, _, _ in expected.values()})
  if uncovered:
    raise ConversionError(f'internal: no conversion rule for our params {uncovered}')

  ignored = {name for name in shapes if any(p.fullmatch(name) for p in IGNORED)}
  missing = sorted(set(expected) - set(shapes))
  unexpected = sorted(set(shapes) - set(expected) - ignored)
  misshaped = []
  for name in sorted(set(expected) & set(shapes)):
    path, layer, transform = expected[name]
    full = targets[path].shape
    want = _source_shape(transform, full[1:] if layer is not None else full)
    if shapes[name] != want:
      misshaped.append(f'{name} {shapes[name]} (expected {want} for {path})')
  problems = []
  for title, items in (
    ('missing tensors', missing),
    ('unexpected tensors', unexpected),
    ('tensors with the wrong shape', misshaped),
  ):
    if items:
      shown = items[:_MAX_LISTED] + (
        [f'... and {len(items) - _MAX_LISTED} more'] if len(items) > _MAX_LISTED else []
      )
      problems.append(f'{len(items)} {title}:\n    ' + '\n    '.join(shown))
  if problems:
    raise ConversionError(
      'The release does not match the model its config.json describes '
      f'({m.num_layers} layers, hidden {m.hidden_size}, head {m.fm_head_layers} blocks):\n  '
      + '\n  '.join(problems)
    )
  return abstract, expected


def read_params(
  files: dict[str, pathlib.Path],
  abstract,
  mapping: dict,
  param_dtype,
  log_every: int = 50,
  quantized_model=None,
  qcfg: quant.QuantConfig | None = None,
):
  """Fills numpy arrays of the params' shapes (in `param_dtype`) tensor by tensor; returns the
  params as an nnx.State of numpy arrays.

  With `quantized_model` (abstract, `quant.quantize_model` of the model under `qcfg`) its kernels
  are filled instead: each release tensor (one layer's slice of a stacked kernel) is converted to
  `param_dtype` and quantized on its own, so host memory holds the quantized params plus one
  float tensor (numpy stores int4 in one byte). Per-layer scales make this equal to quantizing
  the whole float params (quant.quantize_params)."""
  flat = nnx.to_flat_state(
    abstract if quantized_model is None else nnx.state(quantized_model, nnx.Param)
  )
  buffers = {
    '.'.join(str(k) for k in path): np.empty(
      var.get_value().shape, var.get_value().dtype if quantized_model is not None else param_dtype
    )
    for path, var in flat
  }
  contract = {} if quantized_model is None else quant.quantized_paths(quantized_model)
  contract = {'.'.join(str(k) for k in path): axis for path, axis in contract.items()}
  quantizers = {}
  by_shard: dict[pathlib.Path, list[str]] = {}
  for name in mapping:
    by_shard.setdefault(files[name], []).append(name)
  progress = logging_lib.ProgressLogger(len(mapping), every=log_every, items_per_step=1)
  done = 0
  for shard in sorted(by_shard):
    with _open_safetensors(shard) as f:
      for name in sorted(by_shard[shard]):
        path, layer, transform = mapping[name]
        if path in contract:
          qvalue, scale = buffers[path + '.qvalue'], buffers[path + '.scale']
          slots = (qvalue, scale) if layer is None else (qvalue[layer], scale[layer])
          axis = contract[path] - (layer is not None)
          key = (slots[0].shape, axis, scale.dtype)
          if key not in quantizers:
            quantizers[key] = jax.jit(
              functools.partial(
                _quantized_slice, contract_axis=axis, qcfg=qcfg, scale_dtype=scale.dtype
              )
            )
          tensor = _apply(transform, f.get_tensor(name), slots[0].shape).astype(param_dtype)
          for slot, value in zip(slots, quantizers[key](tensor)):
            slot[...] = np.asarray(value)
        else:
          target = buffers[path]
          slot = target if layer is None else target[layer]
          slot[...] = _apply(transform, f.get_tensor(name), slot.shape).astype(param_dtype)
        done += 1
        progress.update(done)
  return nnx.from_flat_state(
    [(path, var.replace(buffers['.'.join(str(k) for k in path)])) for path, var in flat]
  )


def _quantized_slice(tensor, *, contract_axis, qcfg, scale_dtype):
  q = quant.quantize_tensor(tensor, contract_axis, qcfg, scale_dtype)
  return q.qvalue, q.scale


def _check_gen_pos_embed(files, shapes, config) -> list[str]:
  """A release's `gen_pos_embed` buffer must equal our 2-D sin-cos table when it is used."""
  if 'gen_pos_embed' not in shapes or not config.model.use_gen_pos_embed:
    return []
  m = config.model
  ours = nextstep.sincos_pos_embed_2d(m.hidden_size, m.base_image_grid_size)
  with _open_safetensors(files['gen_pos_embed']) as f:
    theirs = f.get_tensor('gen_pos_embed').astype(np.float32).reshape(-1, m.hidden_size)
  if theirs.shape != ours.shape or not np.allclose(theirs, ours, atol=GEN_POS_EMBED_ATOL):
    return [
      f'gen_pos_embed {shapes["gen_pos_embed"]} differs from the 2-D sin-cos table of grid '
      f'{m.base_image_grid_size} (hidden {m.hidden_size})'
    ]
  return []


def vae_source(hf_dir: pathlib.Path, vae_dir: str | pathlib.Path | None) -> pathlib.Path | None:
  """The image tokenizer release to convert with: `vae_dir` if given (it must hold config.json),
  else the model release's `vae/` folder, else None."""
  if vae_dir is not None:
    root = pathlib.Path(vae_dir)
    if not (root / vae_import.CONFIG_FILE).exists():
      raise ConversionError(
        f'--vae {vae_dir}: {root / vae_import.CONFIG_FILE} is missing; pass the folder holding '
        f"the tokenizer's {vae_import.CONFIG_FILE} and {vae_import.TORCH_FILE} (or *.safetensors), "
        "e.g. a NextStep-1-f8ch16-Tokenizer download or a release's vae/."
      )
    return root
  root = hf_dir / VAE_DIR
  return root if (root / vae_import.CONFIG_FILE).exists() else None


def hf_use_norm(config: ml_collections.ConfigDict, cfg, source: pathlib.Path, stated) -> bool:
  """Whether sampled tokens are LayerNormed (official `use_norm`): what the release says
  (`stated`: `use_norm` of the model's config.json, None when absent), else whether its VAE
  normalises latents per token patch (encoder_norm with psz == latent_patch_size)."""
  matches = bool(cfg.encoder_norm) and cfg.psz == config.model.latent_patch_size
  if stated is None:
    return matches
  if stated and not matches:
    raise ConversionError(
      f'the release sets use_norm=true but its image tokenizer {source} has encoder_norm='
      f'{cfg.encoder_norm}, psz={cfg.psz} (latent_patch_size {config.model.latent_patch_size}); '
      'this combination is not supported'
    )
  return bool(stated)


def _attach_vae(
  config: ml_collections.ConfigDict, source: pathlib.Path, stated_use_norm=None
) -> None:
  """Imports the VAE release in `source` (every tensor name and shape checked) and sets the
  config's image.vae architecture from it; the checkpoint path is set when the files are copied."""
  try:
    model = vae_import.load_release(source)
  except (vae_import.CheckpointLayoutError, ValueError, FileNotFoundError) as error:
    raise ConversionError(f'image tokenizer {source}: {error}') from error
  cfg, v = model.cfg, config.image.vae
  v.in_channels, v.out_ch, v.ch, v.ch_mult = cfg.in_channels, cfg.out_ch, cfg.ch, tuple(cfg.ch_mult)
  v.num_res_blocks, v.z_channels, v.norm_groups = (
    cfg.num_res_blocks,
    cfg.z_channels,
    cfg.norm_groups,
  )
  v.scaling_factor, v.shift_factor, v.encoder_norm, v.psz = (
    cfg.scaling_factor,
    cfg.shift_factor,
    cfg.encoder_norm,
    cfg.psz,
  )
  config.image.use_norm = hf_use_norm(config, cfg, source, stated_use_norm)
  if cfg.z_channels != config.model.latent_channels:
    raise ConversionError(
      f'image tokenizer {source} has z_channels={cfg.z_channels} but the model reads '
      f'{config.model.latent_channels}-channel latents; pass the tokenizer of this model.'
    )


def convert(
  hf_dir: str | pathlib.Path,
  out_dir: str | pathlib.Path,
  param_dtype: str = 'float32',
  compute_dtype: str = 'bfloat16',
  image_tokenizer: str = 'vae',
  image_size: int = 512,
  max_caption_tokens: int = 256,
  vae_dir: str | pathlib.Path | None = None,
  quantize: str | None = None,
  group_size: int | None = None,
  quantize_embedding: bool = True,
) -> ml_collections.ConfigDict:
  """Converts the release in `hf_dir` into `out_dir` (see the module docstring); returns the config.

  quantize='int8' | 'int4' stores weight-only quantized kernels (model.quant, model/quant.py;
  `group_size` sets model.quant.group_size), quantized tensor by tensor as they are read;
  `quantize_embedding` quantizes the vocab tables too, one scale per row (model.quant.embedding).

  With image_tokenizer='vae' the VAE comes from `vae_dir` or the release's `vae/`; when neither
  exists the config's image.vae.checkpoint stays '' and `TextToImage.from_converted` asks for one."""
  hf_dir, out_dir = pathlib.Path(hf_dir), pathlib.Path(out_dir).absolute()
  if not (hf_dir / CONFIG_FILE).exists():
    raise ConversionError(
      f'{hf_dir / CONFIG_FILE} is missing; pass the directory of a NextStep-1 release.'
    )
  if (out_dir / PARAMS_DIR).exists():
    raise FileExistsError(f'{out_dir / PARAMS_DIR} exists; choose an empty --out directory.')
  hf = read_json(hf_dir / CONFIG_FILE)
  if not (hf_dir / TOKENIZER_FILE).exists():
    raise ConversionError(
      f'{hf_dir / TOKENIZER_FILE} is missing; the release download is incomplete '
      '(it holds the text tokenizer): download it again'
    )
  tok = hf_tokenizer.HFTokenizer.load(str(hf_dir / TOKENIZER_FILE))
  files = tensor_files(hf_dir)
  shapes = tensor_shapes(files)
  fields, problems = model_fields(hf, set(shapes))
  problems += _tokenizer_problems(hf, tok, fields.get('vocab_size', 0)) if fields else []
  if problems:
    raise ConversionError('Cannot convert ' + str(hf_dir) + ':\n  - ' + '\n  - '.join(problems))
  config = converted_config(
    fields,
    hf,
    tok.vocab_size,
    param_dtype,
    compute_dtype,
    image_tokenizer,
    image_size,
    max_caption_tokens,
  )
  vae_release = vae_source(hf_dir, vae_dir) if image_tokenizer == 'vae' else None
  if vae_release is not None:
    _attach_vae(config, vae_release, hf.get('use_norm'))
  if quantize is not None:
    config.model.quant.mode = quantize
    config.model.quant.embedding = quantize_embedding
  if group_size is not None:
    config.model.quant.group_size = group_size
  configlib.validate(config)
  abstract, mapping = plan(config, shapes)
  problems = _check_gen_pos_embed(files, shapes, config)
  if problems:
    raise ConversionError('\n'.join(problems))
  qcfg = quant.QuantConfig.from_config(config.model)
  params = read_params(
    files,
    abstract,
    mapping,
    nn.DTYPES[param_dtype],
    quantized_model=nextstep.abstract_model(config) if qcfg.enabled else None,
    qcfg=qcfg,
  )
  out_dir.mkdir(parents=True, exist_ok=True)
  ckpt = checkpoints.Checkpointer(out_dir / PARAMS_DIR, keep=1, async_save=False)
  try:
    ckpt.save(0, params, extra={'source': str(hf_dir.absolute()), 'release_config': hf})
    ckpt.wait()
  finally:
    ckpt.close()
  shutil.copyfile(hf_dir / TOKENIZER_FILE, out_dir / TOKENIZER_FILE)
  if vae_release is not None:
    (out_dir / VAE_DIR).mkdir(exist_ok=True)
    for path in vae_release.iterdir():
      if (
        path.name == vae_import.CONFIG_FILE
        or path.name == vae_import.TORCH_FILE
        or path.suffix == '.safetensors'
      ):
        shutil.copyfile(path, out_dir / VAE_DIR / path.name)
    config.image.vae.checkpoint = (
      VAE_DIR  # Relative: runs.load_config resolves it against the directory.
    )
  (out_dir / CONFIG_FILE).write_text(configlib.config_to_json(config))
  return config


def load_params(
  converted_dir: str | pathlib.Path, mesh, config=None, without_lm_head: bool = False
) -> tuple[Any, Any]:
  """(graphdef, params) of a converted checkpoint, params restored straight onto their
  shardings under `mesh` and `config.mesh.rules` (only the params: no optimizer memory); a
  `config` asking for `model.quant` quantizes a float conversion as it loads (runs.restore_run).
  without_lm_head: the LM head is not read (image sampling)."""
  root = pathlib.Path(converted_dir).absolute()
  restored = runs.restore_run(
    str(root), params_only=True, mesh=mesh, config=config, without_lm_head=without_lm_head
  )
  return restored.graphdef, restored.state
