"""Official tokenizer release (`config.json` + `checkpoint.pt` or `*.safetensors`) -> our VAE params.

`checkpoint.pt` is read WITHOUT PyTorch: it is a zip of `<root>/data.pkl` (a pickle of a plain
name -> tensor dict) plus raw little-endian storages `<root>/data/<key>`. `read_torch_checkpoint`
unpickles it with an allow-list of exactly the tensor-rebuild records
(`torch._utils._rebuild_tensor_v2`, torch storage classes, `collections.OrderedDict`); any other
global (e.g. `os.system` in a malicious file) raises `UnsafeCheckpointError` before it is called.

Name mapping (official Flux names, docs/model.md §8): `a.b.3.c.weight` -> path (a, b, 3, c,
kernel) for 4-D conv weights, transposed OIHW -> HWIO; GroupNorm `weight`/`bias` and conv `bias`
keep their names. The key set must match exactly: missing, unexpected and mis-shaped tensors are
listed in one `CheckpointLayoutError`.
"""
import collections
import json
import pathlib
import pickle
import struct
import zipfile
from typing import Any, Mapping

import jax.numpy as jnp
import ml_dtypes
import numpy as np
from flax import nnx

from nextstep_jax.image import vae

CONFIG_FILE = 'config.json'
TORCH_FILE = 'checkpoint.pt'
_MAX_LISTED = 20

_STORAGE_DTYPES = {
    'FloatStorage': np.float32, 'DoubleStorage': np.float64, 'HalfStorage': np.float16,
    'BFloat16Storage': ml_dtypes.bfloat16, 'LongStorage': np.int64, 'IntStorage': np.int32,
    'ShortStorage': np.int16, 'CharStorage': np.int8, 'ByteStorage': np.uint8, 'BoolStorage': np.bool_,
}
_SAFETENSORS_DTYPES = {
    'F32': np.float32, 'F64': np.float64, 'F16': np.float16, 'BF16': ml_dtypes.bfloat16,
    'I64': np.int64, 'I32': np.int32, 'I16': np.int16, 'I8': np.int8, 'U8': np.uint8, 'BOOL': np.bool_,
}
# Official config.json fields -> AutoEncoderConfig fields (missing ones keep our defaults).
_CONFIG_FIELDS = ('in_channels', 'out_ch', 'ch', 'ch_mult', 'num_res_blocks', 'z_channels',
                  'scaling_factor', 'shift_factor', 'deterministic', 'encoder_norm', 'psz',
                  'norm_groups')


class UnsafeCheckpointError(pickle.UnpicklingError):
  """The pickle references something other than tensor-rebuild records."""


class CheckpointLayoutError(ValueError):
  """Tensor names or shapes do not match the model built from the release's config."""


class _StorageRef:
  """A persistent-id storage reference: raw bytes of `<root>/data/<key>` read as `dtype`."""

  def __init__(self, dtype, key: str):
    self.dtype, self.key = dtype, key


def _rebuild_tensor(storage: Any, offset: int, size: tuple, stride: tuple, *unused) -> np.ndarray:
  """torch._utils._rebuild_tensor_v2: a strided view of `storage` (a flat numpy array), copied."""
  del unused  # requires_grad, backward hooks, metadata.
  itemsize = storage.dtype.itemsize
  view = np.lib.stride_tricks.as_strided(storage[offset:], shape=tuple(size),
                                         strides=tuple(s * itemsize for s in stride))
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
        'to safetensors if it is trusted.')

  def persistent_load(self, pid):
    if not (isinstance(pid, tuple) and len(pid) >= 3 and pid[0] == 'storage'):
      raise UnsafeCheckpointError(f'unexpected persistent id {pid!r} in checkpoint pickle.')
    dtype, key = pid[1], str(pid[2])
    if dtype not in _STORAGE_DTYPES.values():
      raise UnsafeCheckpointError(f'storage type {dtype!r} is not a torch storage class.')
    if key not in self._storages:
      raise UnsafeCheckpointError(f'storage {key!r} is missing from the archive.')
    return np.frombuffer(self._storages[key], dtype=dtype)


def read_torch_checkpoint(path: str | pathlib.Path) -> dict[str, np.ndarray]:
  """A torch.save'd zip archive of {name: tensor} -> {name: numpy array}, without torch."""
  with zipfile.ZipFile(path) as archive:
    names = archive.namelist()
    pickles = [n for n in names if n.endswith('/data.pkl')]
    if len(pickles) != 1:
      raise ValueError(f'{path} is not a torch zip checkpoint (found {len(pickles)} data.pkl); '
                       'legacy (pre-1.6) torch.save files are not supported.')
    root = pickles[0][:-len('data.pkl')]
    byteorder = (archive.read(root + 'byteorder').decode() if root + 'byteorder' in names
                 else 'little')
    if byteorder != 'little':
      raise ValueError(f'{path}: big-endian storages are not supported.')
    storages = {n[len(root) + len('data/'):]: archive.read(n) for n in names
                if n.startswith(root + 'data/')}
    with archive.open(pickles[0]) as file:
      state = _RestrictedUnpickler(file, storages).load()
  if not isinstance(state, dict) or not all(isinstance(v, np.ndarray) for v in state.values()):
    raise ValueError(f'{path} does not hold a plain name -> tensor dict.')
  return dict(state)


def read_safetensors(path: str | pathlib.Path) -> dict[str, np.ndarray]:
  """A safetensors file -> {name: numpy array} (header: u64 length + JSON, then raw bytes)."""
  data = pathlib.Path(path).read_bytes()
  (length,) = struct.unpack('<Q', data[:8])
  header = json.loads(data[8:8 + length])
  body = memoryview(data)[8 + length:]
  out = {}
  for name, info in header.items():
    if name == '__metadata__':
      continue
    start, end = info['data_offsets']
    dtype = _SAFETENSORS_DTYPES[info['dtype']]
    out[name] = np.frombuffer(body[start:end], dtype=dtype).reshape(info['shape']).copy()
  return out


def config_from_release(official: Mapping[str, Any], **overrides) -> vae.AutoEncoderConfig:
  """AutoEncoderConfig from an official `config.json` dict (its fields win over our defaults)."""
  kwargs = {k: official[k] for k in _CONFIG_FIELDS if k in official}
  if 'ch_mult' in kwargs:
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
      wrong.append(f'{name}: checkpoint {tensors[name].shape}, expected (torch layout) '
                   f'{torch_shape(var.get_value().shape)}')
    converted[name] = tensor
  if missing or unexpected or wrong:
    lines = ['VAE checkpoint does not match the model built from its config:']
    for title, items in (('missing', missing), ('unexpected', unexpected), ('wrong shape', wrong)):
      if items:
        lines.append(f'  {title} ({len(items)}): ' + ', '.join(items[:_MAX_LISTED])
                     + (' ...' if len(items) > _MAX_LISTED else ''))
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
    raise FileNotFoundError(f'{root} holds neither {TORCH_FILE} nor exactly one *.safetensors '
                            f'file (found {[c.name for c in candidates]}).')
  return read_safetensors(candidates[0])


def load_release(directory: str | pathlib.Path, **overrides) -> vae.AutoEncoder:
  """The official tokenizer in `directory` (config.json + checkpoint.pt | *.safetensors).

  overrides: AutoEncoderConfig fields not stored in config.json (dtype, param_dtype) or to replace
    the release's (e.g. psz, whose release value is unverified).
  """
  root = pathlib.Path(directory)
  if not (root / CONFIG_FILE).exists():
    raise FileNotFoundError(f'{root / CONFIG_FILE} is missing; a release directory holds '
                            f'{CONFIG_FILE} and {TORCH_FILE} (or a .safetensors copy).')
  cfg = config_from_release(json.loads((root / CONFIG_FILE).read_text()), **overrides)
  model = nnx.eval_shape(lambda: vae.AutoEncoder(cfg, nnx.Rngs(0)))  # Every param is overwritten.
  load_params(model, read_release_tensors(root))
  return model


def write_safetensors(path: str | pathlib.Path, tensors: Mapping[str, np.ndarray]) -> None:
  """Writes {name: numpy array} as safetensors (e.g. a torch-free copy of checkpoint.pt)."""
  names = {v: k for k, v in _SAFETENSORS_DTYPES.items()}
  header, offset, blobs = {}, 0, []
  for name in sorted(tensors):
    array = np.ascontiguousarray(tensors[name])
    blob = array.tobytes()
    header[name] = {'dtype': names[array.dtype.type], 'shape': list(array.shape),
                    'data_offsets': [offset, offset + len(blob)]}
    offset += len(blob)
    blobs.append(blob)
  text = json.dumps(header).encode()
  text += b' ' * (-len(text) % 8)
  with open(path, 'wb') as file:
    file.write(struct.pack('<Q', len(text)) + text + b''.join(blobs))
