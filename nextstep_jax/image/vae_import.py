"""Official tokenizer release (`config.json` + `checkpoint.pt` or `*.safetensors`) -> our VAE params.

`checkpoint.pt` is read WITHOUT PyTorch: it is a zip of `<root>/data.pkl` (a pickle of a plain
name -> tensor dict) plus raw little-endian storages `<root>/data/<key>`. `read_torch_checkpoint`
unpickles it with an allow-list of exactly the tensor-rebuild records
(`torch._utils._rebuild_tensor_v2`, torch storage classes, `collections.OrderedDict`); any other
global (e.g. `os.system` in a malicious file) raises `UnsafeCheckpointError` before it is called.
The record's numbers get the same care: every tensor record is checked before any view is made
(integer, non-negative offset, sizes and strides; its last element inside its storage; no more
elements than the storage holds; storage byte length matching its dtype and declared element
count), and a bad one is an `UnsafeCheckpointError` naming the tensor. A file from the internet
can therefore neither crash the process nor read memory outside its storages.
`*.safetensors` files are read and written through the `safetensors` library; a damaged one is a
`CheckpointFormatError` naming the file.

Name mapping (official Flux names, docs/model.md §8): `a.b.3.c.weight` -> path (a, b, 3, c,
kernel) for 4-D conv weights, transposed OIHW -> HWIO; GroupNorm `weight`/`bias` and conv `bias`
keep their names. The key set must match exactly: missing, unexpected and mis-shaped tensors are
listed in one `CheckpointLayoutError`.
"""

import collections
import dataclasses
import json
import pathlib
import pickle
import struct
import zipfile
from collections.abc import Mapping
from typing import Any

import jax.numpy as jnp
import ml_dtypes
import numpy as np
import safetensors
import safetensors.numpy
from flax import nnx

from nextstep_jax import errors
from nextstep_jax.image import vae

CONFIG_FILE = 'config.json'
TORCH_FILE = 'checkpoint.pt'
_MAX_LISTED = 20

_STORAGE_DTYPES = {
  'FloatStorage': np.float32,
  'DoubleStorage': np.float64,
  'HalfStorage': np.float16,
  'BFloat16Storage': ml_dtypes.bfloat16,
  'LongStorage': np.int64,
  'IntStorage': np.int32,
  'ShortStorage': np.int16,
  'CharStorage': np.int8,
  'ByteStorage': np.uint8,
  'BoolStorage': np.bool_,
}
# Official config.json fields -> AutoEncoderConfig fields (missing ones keep our defaults).
_CONFIG_FIELDS = (
  'in_channels',
  'out_ch',
  'ch',
  'ch_mult',
  'num_res_blocks',
  'z_channels',
  'scaling_factor',
  'shift_factor',
  'deterministic',
  'encoder_norm',
  'psz',
  'norm_groups',
)


class UnsafeCheckpointError(errors.UserError, pickle.UnpicklingError):
  """The pickle references something other than tensor-rebuild records, or a record's numbers
  point outside its storage."""


class CheckpointFormatError(errors.UserError, ValueError):
  """A weights file is truncated or not in its format."""


class CheckpointLayoutError(errors.UserError, ValueError):
  """Tensor names or shapes do not match the model built from the release's config."""


@dataclasses.dataclass(frozen=True)
class _Storage:
  """A persistent-id storage: raw bytes of `<root>/data/<key>`, its dtype and declared numel."""

  key: str
  data: bytes
  dtype: Any
  numel: Any  # None when the record does not declare it.


@dataclasses.dataclass(frozen=True)
class _TensorRecord:
  """torch._utils._rebuild_tensor_v2's arguments, kept unchecked until the tensor's name is known."""

  storage: Any
  offset: Any
  size: Any
  stride: Any


def _rebuild_tensor(storage: Any, offset: Any, size: Any, stride: Any, *unused) -> _TensorRecord:
  """torch._utils._rebuild_tensor_v2, deferred: `_materialize` checks and builds it by name."""
  del unused  # requires_grad, backward hooks, metadata.
  return _TensorRecord(storage, offset, size, stride)


def _is_index(value: Any) -> bool:
  return isinstance(value, int) and not isinstance(value, bool) and value >= 0


def _materialize(name: str, record: _TensorRecord) -> np.ndarray:
  """The tensor `name` of `record`, after checking every number against its storage.

  Raises:
    UnsafeCheckpointError: naming the tensor and the bad number.
  """

  def refuse(problem: str):
    raise UnsafeCheckpointError(
      f'tensor {name!r}: {problem}; refusing to load this checkpoint '
      '(the file is damaged or crafted).'
    )

  if not isinstance(record.storage, _Storage):
    refuse('its storage is not a storage record')
  key, data, dtype = record.storage.key, record.storage.data, np.dtype(record.storage.dtype)
  if len(data) % dtype.itemsize:
    refuse(
      f'storage {key!r} holds {len(data)} bytes, not a whole number of {dtype.name} elements '
      '(its dtype does not match)'
    )
  declared = record.storage.numel
  if declared is not None and not (_is_index(declared) and declared == len(data) // dtype.itemsize):
    refuse(
      f'storage {key!r} declares {declared!r:.40} elements but holds '
      f'{len(data) // dtype.itemsize} of {dtype.name}'
    )
  storage = np.frombuffer(data, dtype=dtype)
  size, stride, offset = record.size, record.stride, record.offset
  if not isinstance(size, (tuple, list)) or not isinstance(stride, (tuple, list)):
    refuse(f'size {size!r} and stride {stride!r} must be tuples')
  if len(size) != len(stride) or len(size) > 32:
    refuse(f'size {tuple(size)} and stride {tuple(stride)} differ in rank')
  if not all(_is_index(v) for v in (offset, *size, *stride)):
    refuse(
      f'offset {offset!r}, size {tuple(size)} and stride {tuple(stride)} must be non-negative '
      'integers'
    )
  numel = 1
  for extent in size:
    numel *= extent
  if numel:
    last = offset + sum((extent - 1) * step for extent, step in zip(size, stride))
    if last >= storage.size:
      refuse(
        f'its last element (offset {offset}, size {tuple(size)}, stride {tuple(stride)}) is '
        f'element {last}, outside its storage of {storage.size}'
      )
    if numel > storage.size:
      refuse(f'it has {numel} elements, more than its storage of {storage.size}')
  elif offset > storage.size:
    refuse(f'offset {offset} is outside its storage of {storage.size}')
  itemsize = storage.dtype.itemsize
  view = np.lib.stride_tricks.as_strided(
    storage[offset:], shape=tuple(size), strides=tuple(step * itemsize for step in stride)
  )
  return np.array(view)


class _RestrictedUnpickler(pickle.Unpickler):
  """Resolves only the globals a state_dict of plain tensors needs (see module docstring)."""

  def __init__(self, file, storages: Mapping[str, np.ndarray]):
    super().__init__(file)
    self._storages = storages

  def find_class(self, module: str, name: str):
    if module == 'torch._utils' and name == '_rebuild_tensor_v2':
      return _rebuild_tensor
    if module == 'torch' and name in _STORAGE_DTYPES:
      return _STORAGE_DTYPES[name]
    if module == 'collections' and name == 'OrderedDict':
      return collections.OrderedDict
    raise UnsafeCheckpointError(
      f'checkpoint pickle references {module}.{name}, which is not a tensor-rebuild record; '
      'refusing to load it (only plain state_dicts of tensors are accepted). Convert the file '
      'to safetensors if it is trusted.'
    )

  def persistent_load(self, pid):
    if not (isinstance(pid, tuple) and len(pid) >= 3 and pid[0] == 'storage'):
      raise UnsafeCheckpointError(f'unexpected persistent id {pid!r:.200} in checkpoint pickle.')
    dtype, key = pid[1], str(pid[2])
    if not isinstance(dtype, type) or dtype not in _STORAGE_DTYPES.values():
      raise UnsafeCheckpointError(f'storage type {dtype!r:.100} is not a torch storage class.')
    if key not in self._storages:
      raise UnsafeCheckpointError(f'storage {key!r:.100} is missing from the archive.')
    return _Storage(key, self._storages[key], dtype, pid[4] if len(pid) >= 5 else None)


def read_torch_checkpoint(path: str | pathlib.Path) -> dict[str, np.ndarray]:
  """A torch.save'd zip archive of {name: tensor} -> {name: numpy array}, without torch."""
  with zipfile.ZipFile(path) as archive:
    names = archive.namelist()
    pickles = [n for n in names if n.endswith('/data.pkl')]
    if len(pickles) != 1:
      raise ValueError(
        f'{path} is not a torch zip checkpoint (found {len(pickles)} data.pkl); '
        'legacy (pre-1.6) torch.save files are not supported.'
      )
    root = pickles[0][: -len('data.pkl')]
    byteorder = (
      archive.read(root + 'byteorder').decode() if root + 'byteorder' in names else 'little'
    )
    if byteorder != 'little':
      raise ValueError(f'{path}: big-endian storages are not supported.')
    storages = {
      n[len(root) + len('data/') :]: archive.read(n) for n in names if n.startswith(root + 'data/')
    }
    with archive.open(pickles[0]) as file:
      try:
        state = _RestrictedUnpickler(file, storages).load()
      except UnsafeCheckpointError:
        raise
      except (
        pickle.UnpicklingError,
        EOFError,
        ValueError,
        TypeError,
        IndexError,
        KeyError,
        AttributeError,
        RecursionError,
        MemoryError,
        UnicodeDecodeError,
        struct.error,
      ) as error:
        raise UnsafeCheckpointError(
          f'{path}: the pickle is malformed ({type(error).__name__}: '
          f'{str(error)[:200]}); refusing to load it.'
        ) from error
  if not isinstance(state, dict) or not all(
    isinstance(k, str) and isinstance(v, _TensorRecord) for k, v in state.items()
  ):
    raise UnsafeCheckpointError(f'{path} does not hold a plain name -> tensor dict.')
  return {name: _materialize(name, record) for name, record in state.items()}


def read_safetensors(path: str | pathlib.Path) -> dict[str, np.ndarray]:
  """A safetensors file -> {name: numpy array}, through the `safetensors` library.

  Raises:
    CheckpointFormatError: naming the file, when it is truncated or not safetensors.
  """
  try:
    return safetensors.numpy.load_file(str(path))
  except (safetensors.SafetensorError, ValueError, TypeError) as error:
    raise CheckpointFormatError(
      f'{path} is not a readable safetensors file ({error}); download it again'
    ) from error


def config_from_release(official: Mapping[str, Any], **overrides) -> vae.AutoEncoderConfig:
  """AutoEncoderConfig from an official `config.json` dict (its fields win over our defaults).

  `psz: null` is accepted only with `encoder_norm: false` (the patch size is then unused; an
  omitted encoder_norm means true, the official code's default). Fields of the wrong type raise
  CheckpointFormatError naming the field."""
  kwargs = {k: official[k] for k in _CONFIG_FIELDS if k in official}
  if kwargs.get('psz', 0) is None:
    if kwargs.get('encoder_norm', vae.AutoEncoderConfig.encoder_norm):
      raise CheckpointFormatError(
        'config.json has encoder_norm=true but psz=null: the patch size of '
        'the latent normalisation is unknown; set psz (NextStep-1: 1)'
      )
    del kwargs['psz']
  for key in ('in_channels', 'out_ch', 'ch', 'num_res_blocks', 'z_channels', 'psz', 'norm_groups'):
    if key in kwargs and not (
      isinstance(kwargs[key], int) and not isinstance(kwargs[key], bool) and kwargs[key] > 0
    ):
      raise CheckpointFormatError(f'config.json {key}={kwargs[key]!r} must be a positive integer')
  for key in ('scaling_factor', 'shift_factor'):
    if key in kwargs and not isinstance(kwargs[key], (int, float)):
      raise CheckpointFormatError(f'config.json {key}={kwargs[key]!r} must be a number')
  if 'ch_mult' in kwargs:
    if not isinstance(kwargs['ch_mult'], (list, tuple)) or not all(
      isinstance(x, int) and x > 0 for x in kwargs['ch_mult']
    ):
      raise CheckpointFormatError(
        f'config.json ch_mult={kwargs["ch_mult"]!r} must be a list of positive integers'
      )
    kwargs['ch_mult'] = tuple(kwargs['ch_mult'])
  kwargs.update(overrides)
  return vae.AutoEncoderConfig(**kwargs)


def official_name(path: tuple) -> str:
  """Our param path -> official tensor name (conv `kernel` -> `weight`)."""
  *parents, leaf = (str(p) for p in path)
  return '.'.join(parents + ['weight' if leaf == 'kernel' else leaf])


def load_params(model: vae.AutoEncoder, tensors: Mapping[str, np.ndarray]) -> None:
  """Writes official `tensors` into `model`'s params in place, cast to its param dtype.

  Raises:
    CheckpointLayoutError: listing missing, unexpected and mis-shaped tensors.
  """
  state = nnx.state(model, nnx.Param)
  flat = {official_name(path): (path, var) for path, var in nnx.to_flat_state(state)}
  missing = sorted(flat.keys() - tensors.keys())
  unexpected = sorted(tensors.keys() - flat.keys())
  converted, wrong = {}, []
  for name in sorted(flat.keys() & tensors.keys()):
    _, var = flat[name]
    tensor = np.asarray(tensors[name])
    if var.get_value().ndim == 4:
      tensor = tensor.transpose(2, 3, 1, 0)  # OIHW -> HWIO.
    if tensor.shape != var.get_value().shape:
      wrong.append(
        f'{name}: checkpoint {tensors[name].shape}, expected (torch layout) '
        f'{torch_shape(var.get_value().shape)}'
      )
    converted[name] = tensor
  if missing or unexpected or wrong:
    lines = ['VAE checkpoint does not match the model built from its config:']
    for title, items in (('missing', missing), ('unexpected', unexpected), ('wrong shape', wrong)):
      if items:
        lines.append(
          f'  {title} ({len(items)}): '
          + ', '.join(items[:_MAX_LISTED])
          + (' ...' if len(items) > _MAX_LISTED else '')
        )
    raise CheckpointLayoutError('\n'.join(lines))
  for name, (_, var) in flat.items():
    var.set_value(jnp.asarray(converted[name].astype(np.float32), var.get_value().dtype))
  nnx.update(model, state)


def torch_shape(shape: tuple) -> tuple:
  """Our parameter shape -> the checkpoint's (HWIO conv kernels -> OIHW)."""
  return (shape[3], shape[2], shape[0], shape[1]) if len(shape) == 4 else shape


def read_release_tensors(directory: str | pathlib.Path) -> dict[str, np.ndarray]:
  """checkpoint.pt, else the single *.safetensors file, of a release directory."""
  root = pathlib.Path(directory)
  if (root / TORCH_FILE).exists():
    return read_torch_checkpoint(root / TORCH_FILE)
  candidates = sorted(root.glob('*.safetensors'))
  if len(candidates) != 1:
    raise FileNotFoundError(
      f'{root} holds neither {TORCH_FILE} nor exactly one *.safetensors '
      f'file (found {[c.name for c in candidates]}).'
    )
  return read_safetensors(candidates[0])


def load_release(directory: str | pathlib.Path, **overrides) -> vae.AutoEncoder:
  """The official tokenizer in `directory` (config.json + checkpoint.pt | *.safetensors).

  overrides: AutoEncoderConfig fields not stored in config.json (dtype, param_dtype) or to replace
    the release's (e.g. psz, whose release value is unverified).
  """
  root = pathlib.Path(directory)
  if not (root / CONFIG_FILE).exists():
    raise FileNotFoundError(
      f'{root / CONFIG_FILE} is missing; a release directory holds '
      f'{CONFIG_FILE} and {TORCH_FILE} (or a .safetensors copy).'
    )
  try:
    release = json.loads((root / CONFIG_FILE).read_text(encoding='utf-8'))
  except (ValueError, UnicodeDecodeError) as error:
    raise CheckpointFormatError(f'{root / CONFIG_FILE} is not valid JSON ({error})') from error
  if not isinstance(release, dict):
    raise CheckpointFormatError(
      f'{root / CONFIG_FILE} holds {type(release).__name__}, expected an object'
    )
  try:
    cfg = config_from_release(release, **overrides)
  except CheckpointFormatError as error:
    raise CheckpointFormatError(f'{root / CONFIG_FILE}: {error}') from error
  model = nnx.eval_shape(lambda: vae.AutoEncoder(cfg, nnx.Rngs(0)))  # Every param is overwritten.
  load_params(model, read_release_tensors(root))
  return model


def write_safetensors(path: str | pathlib.Path, tensors: Mapping[str, np.ndarray]) -> None:
  """Writes {name: numpy array} as safetensors (e.g. a torch-free copy of checkpoint.pt)."""
  safetensors.numpy.save_file(
    {name: np.ascontiguousarray(tensors[name]) for name in sorted(tensors)}, str(path)
  )
