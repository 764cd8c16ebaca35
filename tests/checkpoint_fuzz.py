"""Fuzzer of the torch-free `checkpoint.pt` reader (`vae_import.read_torch_checkpoint`).

Run as a script (in a subprocess, so a crash shows as an exit code):
  python tests/checkpoint_fuzz.py --cases 400 --seed 0 [--json out.json]
It writes a valid torch-format zip (float32, float16, int64 storages; a transposed view; two
tensors sharing a storage), then per case mutates its tensor records at random (offset, sizes,
strides, rank, element counts, storage dtype and key, number types) or flips bytes of the pickle,
and loads the file. Each case is `exact` (the loaded values equal what the mutated record
describes, computed here by plain index arithmetic on the raw storage; no byte outside it),
`refused` (an `UnsafeCheckpointError` / user error), `wrong` (loaded, but the values differ or
the record points outside its storage) or `unexpected` (another exception). It prints a JSON
summary; the process must exit 0.
"""

import argparse
import collections
import io
import json
import os
import pickle
import sys
import tempfile
import types
import zipfile

import numpy as np

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

from nextstep_jax import errors
from nextstep_jax.image import vae_import

STORAGES = {'FloatStorage': np.float32, 'HalfStorage': np.float16, 'LongStorage': np.int64}


def _fake_torch():
  """Importable stand-ins so pickle can name torch's globals without torch."""
  torch = types.ModuleType('torch')
  utils = types.ModuleType('torch._utils')

  def _rebuild_tensor_v2(*args):
    return args

  _rebuild_tensor_v2.__module__, _rebuild_tensor_v2.__qualname__ = (
    'torch._utils',
    '_rebuild_tensor_v2',
  )
  utils._rebuild_tensor_v2 = _rebuild_tensor_v2
  for name in STORAGES:
    cls = type(name, (), {'__module__': 'torch'})
    setattr(torch, name, cls)
  torch._utils = utils
  return torch, utils


TORCH, UTILS = _fake_torch()


class Record:
  """One tensor record: (storage class name, key, declared numel), offset, size, stride."""

  def __init__(self, storage, key, numel, offset, size, stride):
    self.storage, self.key, self.numel = storage, key, numel
    self.offset, self.size, self.stride = offset, size, stride

  def __reduce__(self):
    return (
      UTILS._rebuild_tensor_v2,
      (
        ('storage', self.storage, self.key, 'cpu', self.numel),
        self.offset,
        self.size,
        self.stride,
        False,
        collections.OrderedDict(),
      ),
    )


class _Pickler(pickle.Pickler):
  def persistent_id(self, obj):
    if isinstance(obj, tuple) and len(obj) == 5 and obj[0] == 'storage':
      storage = obj[1]
      return (
        'storage',
        getattr(TORCH, storage) if isinstance(storage, str) else storage,
        obj[2],
        obj[3],
        obj[4],
      )
    return None


def _pickle(records: dict) -> bytes:
  saved = {k: sys.modules.get(k) for k in ('torch', 'torch._utils')}
  sys.modules['torch'], sys.modules['torch._utils'] = TORCH, UTILS
  try:
    buffer = io.BytesIO()
    _Pickler(buffer, protocol=2).dump(collections.OrderedDict(records))
    return buffer.getvalue()
  finally:
    for k, v in saved.items():
      if v is None:
        sys.modules.pop(k, None)
      else:
        sys.modules[k] = v


def valid_file(rng):
  """(storages {key: (class, bytes)}, records {name: Record}) of a small plausible state_dict."""
  weight = rng.standard_normal(24).astype(np.float32)
  half = rng.standard_normal(6).astype(np.float16)
  ids = np.arange(5, dtype=np.int64)
  storages = {
    '0': ('FloatStorage', weight.tobytes()),
    '1': ('HalfStorage', half.tobytes()),
    '2': ('LongStorage', ids.tobytes()),
  }
  records = {
    'conv.weight': Record('FloatStorage', '0', 24, 0, (2, 3, 2, 2), (12, 4, 2, 1)),
    'conv.weight_t': Record('FloatStorage', '0', 24, 0, (3, 2), (1, 3)),  # Transposed view.
    'conv.bias': Record('FloatStorage', '0', 24, 20, (4,), (1,)),  # Shares storage 0.
    'norm.weight': Record('HalfStorage', '1', 6, 0, (6,), (1,)),
    'step': Record('LongStorage', '2', 5, 4, (), ()),
  }
  return storages, records


def write(path, storages, records, pickle_bytes=None):
  with zipfile.ZipFile(path, 'w') as archive:
    archive.writestr(
      'archive/data.pkl', pickle_bytes if pickle_bytes is not None else _pickle(records)
    )
    archive.writestr('archive/byteorder', 'little')
    for key, (_, data) in storages.items():
      archive.writestr(f'archive/data/{key}', data)


def reference(storages, record):
  """What a correct reader returns for `record`, or None when it must be refused."""
  if not isinstance(record.storage, str) or record.storage not in STORAGES:
    return None
  if record.key not in storages or storages[record.key][0] != record.storage:
    return None
  dtype = STORAGES[record.storage]
  data = storages[record.key][1]
  if len(data) % np.dtype(dtype).itemsize or record.numel != len(data) // np.dtype(dtype).itemsize:
    return None
  flat = np.frombuffer(data, dtype)
  if not isinstance(record.size, (tuple, list)) or not isinstance(record.stride, (tuple, list)):
    return None
  values = (record.offset, *record.size, *record.stride)
  if not all(type(v) is int and v >= 0 for v in values) or len(record.size) != len(record.stride):
    return None
  numel = int(np.prod(record.size, dtype=object))
  if numel == 0:
    return np.zeros(record.size, dtype) if record.offset <= flat.size else None
  if numel > flat.size:
    return None
  index = np.full(record.size, record.offset, dtype=np.int64)
  for axis, (extent, step) in enumerate(zip(record.size, record.stride)):
    shape = [1] * len(record.size)
    shape[axis] = extent
    index = index + (np.arange(extent, dtype=np.int64) * step).reshape(shape)
  if index.max() >= flat.size:
    return None
  return flat[index]


class _RecordUnpickler(pickle.Unpickler):
  """Reads a (possibly mutated) pickle back into Records, without numpy views."""

  def find_class(self, module, name):
    if (module, name) == ('torch._utils', '_rebuild_tensor_v2'):
      return lambda pid, offset, size, stride, *_: Record(
        pid[1], pid[2], pid[4] if len(pid) > 4 else None, offset, size, stride
      )
    if module == 'torch' and name in STORAGES:
      return name
    if (module, name) == ('collections', 'OrderedDict'):
      return collections.OrderedDict
    raise pickle.UnpicklingError(f'{module}.{name}')

  def persistent_load(self, pid):
    return pid


def _records_of(data: bytes) -> dict:
  records = _RecordUnpickler(io.BytesIO(data)).load()
  if not isinstance(records, dict) or not all(
    isinstance(k, str) and isinstance(v, Record) for k, v in records.items()
  ):
    raise ValueError('not a name -> record dict')
  return records


BIG = [2**40, 2**62, 2**31, 10**6]


def mutate(rng, storages, records):
  """Applies 1-3 random record mutations in place; returns their descriptions."""
  done = []
  for _ in range(rng.integers(1, 4)):
    name = list(records)[rng.integers(len(records))]
    r = records[name]
    kind = rng.choice(
      ['offset', 'size', 'stride', 'rank', 'numel', 'dtype', 'key', 'type', 'small']
    )
    if not (
      isinstance(r.size, tuple) and isinstance(r.stride, tuple) and isinstance(r.offset, int)
    ):
      kind = 'small'  # An earlier 'type' mutation: restore plausible numbers.
    pick = lambda options: options[rng.integers(len(options))]
    if kind == 'offset':
      r.offset = pick([-1, r.numel, r.numel - 1, int(rng.integers(0, 30)), *BIG])
    elif kind == 'size' and r.size:
      i = rng.integers(len(r.size))
      r.size = tuple(
        pick([-1, 0, int(rng.integers(1, 40)), *BIG]) if j == i else s for j, s in enumerate(r.size)
      )
    elif kind == 'stride' and r.stride:
      i = rng.integers(len(r.stride))
      r.stride = tuple(
        pick([-1, 0, int(rng.integers(1, 30)), *BIG]) if j == i else s
        for j, s in enumerate(r.stride)
      )
    elif kind == 'rank':
      r.size = r.size + (int(rng.integers(1, 5)),)
      if rng.random() < 0.5:
        r.stride = r.stride + (int(rng.integers(0, 5)),)
    elif kind == 'numel':
      r.numel = pick([0, r.numel + 1, r.numel * 4, -1, *BIG])
    elif kind == 'dtype':
      r.storage = pick([s for s in STORAGES if s != r.storage])
    elif kind == 'key':
      r.key = pick(['9', '../0', ''])
    elif kind == 'type':
      field = pick(['offset', 'size', 'stride'])
      setattr(r, field, pick([1.5, 'x', None, [2, 2], (1.0,)]))
    else:  # A plausible smaller in-bounds view.
      r.offset, r.size, r.stride = int(rng.integers(0, 3)), (int(rng.integers(0, 3)),), (1,)
    done.append(f'{name}.{kind}')
  return done


def run(cases: int, seed: int) -> dict:
  rng = np.random.default_rng(seed)
  counts = collections.Counter()
  examples = {}
  with tempfile.TemporaryDirectory() as tmp:
    path = os.path.join(tmp, 'checkpoint.pt')
    storages, records = valid_file(rng)
    write(path, storages, records)
    original = vae_import.read_torch_checkpoint(path)
    for name, record in records.items():
      assert np.array_equal(original[name], reference(storages, record)), name
    for case in range(cases):
      storages, records = valid_file(np.random.default_rng(seed))
      if case % 5 == 4:  # Byte flips of the pickle itself.
        data = bytearray(_pickle(records))
        for _ in range(rng.integers(1, 4)):
          data[rng.integers(len(data))] = rng.integers(256)
        write(path, storages, records, bytes(data))
        what, expected = ['pickle bytes'], None
      else:
        what = mutate(rng, storages, records)
        write(path, storages, records)
        expected = {name: reference(storages, r) for name, r in records.items()}
      try:
        loaded = vae_import.read_torch_checkpoint(path)
      except errors.UserError:
        outcome = 'refused'
      except Exception as error:  # counted, reported
        outcome = 'unexpected'
        examples.setdefault(outcome, f'{what}: {type(error).__name__}: {error}'[:300])
      else:
        if expected is None:  # Byte flips: compare with the records the flipped pickle holds.
          try:
            records = _records_of(bytes(data))
            expected = {name: reference(storages, r) for name, r in records.items()}
          except Exception:  # unparseable: nothing may load
            records, expected = {}, {}
        ok = all(
          expected[name] is not None
          and loaded[name].dtype == expected[name].dtype
          and np.array_equal(loaded[name], expected[name])
          for name in records
        )
        outcome = 'exact' if ok and set(loaded) == set(records) else 'wrong'
        if outcome != 'exact':
          examples.setdefault(outcome, str(what))
      counts[outcome] += 1
  return {
    'cases': cases,
    'seed': seed,
    **{k: counts.get(k, 0) for k in ('exact', 'refused', 'wrong', 'unexpected')},
    'examples': examples,
  }


def main() -> int:
  parser = argparse.ArgumentParser()
  parser.add_argument('--cases', type=int, default=400)
  parser.add_argument('--seed', type=int, default=0)
  parser.add_argument('--json', default=None)
  args = parser.parse_args()
  summary = run(args.cases, args.seed)
  text = json.dumps(summary, indent=1)
  print(text)
  if args.json:
    with open(args.json, 'w', encoding='utf-8') as f:
      f.write(text + '\n')
  return 0


if __name__ == '__main__':
  sys.exit(main())
