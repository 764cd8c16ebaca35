"""HBM traffic of a compiled program, counted from its optimized HLO text.

The compiler's cost analysis ('bytes accessed') adds up every operand and result of every
instruction wherever the buffer lives. On TPU the memory-space assignment stages buffers in on-chip
memory (layouts annotated `S(1)`, VMEM): a weight prefetched into VMEM is counted when it is copied
in, once more as the copy's result and again when the matmul reads it, so a decode step that
streams each weight from HBM once can show 2-3x its HBM traffic. `hbm_bytes` counts only buffers in
HBM (layouts without a memory-space annotation): per top-level instruction, the HBM operands it
reads (only the slices a fusion reads of them) and the HBM results it writes (only the update of
an in-place dynamic-update-slice). Only the entry computation's instructions are visited (a while
loop counts as its state read and written, its body not at all), so use it on loop-free compiles
(the AOT planner's calibration compiles).
"""

import re
from typing import NamedTuple

_BITS = {
  'pred': 8,
  's4': 4,
  'u4': 4,
  's8': 8,
  'u8': 8,
  'f8e4m3fn': 8,
  'f8e5m2': 8,
  's16': 16,
  'u16': 16,
  'f16': 16,
  'bf16': 16,
  's32': 32,
  'u32': 32,
  'f32': 32,
  's64': 64,
  'u64': 64,
  'f64': 64,
}
_ARRAY = re.compile(r'\b(' + '|'.join(_BITS) + r')\[([0-9,]*)\](\{[^}]*\})?')
_HEADER = re.compile(r'^(?:ENTRY )?%([\w.\-]+) .*\{$')
_NAME = re.compile(r'^\s*(ROOT )?%([\w.\-]+) = ')
_OPERAND = re.compile(r'%([\w.\-]+)')
_CALLS = re.compile(r'calls=%([\w.\-]+)')
# Instructions that move no data of their own (views, tuples, the end of an async copy).
_FREE = {
  'parameter',
  'constant',
  'tuple',
  'get-tuple-element',
  'bitcast',
  'copy-done',
  'after-all',
  'partition-id',
  'replica-id',
}
# Users of a value that read only part of it (their result's size).
_PARTIAL_READS = {'slice', 'dynamic-slice', 'gather'}
_VIEWS = {'bitcast', 'reshape', 'get-tuple-element'}


class Instruction(NamedTuple):
  name: str
  type: str  # The result type: one array or a tuple '(a, b, ...)'.
  opcode: str
  operands: tuple[str, ...]
  calls: str | None
  root: bool
  parameter_number: int | None  # For opcode 'parameter'.


def _array_bytes(type_str: str, hbm_only: bool) -> float:
  """Bytes of the arrays in `type_str` (only those without a memory-space annotation)."""
  total = 0.0
  for dtype, dims, layout in _ARRAY.findall(type_str):
    if hbm_only and re.search(r'S\([1-9]\d*\)', layout or ''):
      continue
    count = 1
    for d in filter(None, dims.split(',')):
      count *= int(d)
    total += count * _BITS[dtype] / 8
  return total


def _tuple_elements(type_str: str) -> list[str]:
  """Top-level elements of a tuple type '(a, (b, c), d)'; [type_str] for an array."""
  if not type_str.startswith('('):
    return [type_str]
  elements, depth, start = [], 0, 1
  for i, char in enumerate(type_str):
    depth += {'(': 1, ')': -1, '{': 1, '}': -1, '[': 1, ']': -1}.get(char, 0)
    if char == ',' and depth == 1:
      elements.append(type_str[start:i].strip())
      start = i + 1
  elements.append(type_str[start:-1].strip())
  return elements


def _balanced(text: str, start: int) -> int:
  """Index just past the bracket group opening at text[start]."""
  depth = 0
  for i in range(start, len(text)):
    depth += {'(': 1, ')': -1}.get(text[i], 0)
    if depth == 0:
      return i + 1
  raise ValueError(f'unbalanced brackets in HLO line: {text[:200]}')


def _parse_instruction(line: str) -> Instruction | None:
  head = _NAME.match(line)
  if not head:
    return None
  rest = line[head.end() :]
  type_end = _balanced(rest, 0) if rest.startswith('(') else rest.index(' ')
  type_str, rest = rest[:type_end], rest[type_end:].lstrip()
  paren = rest.find('(')
  opcode = rest[:paren]
  operands_end = _balanced(rest, paren)
  calls = _CALLS.search(rest[operands_end:])
  number = rest[paren + 1 : operands_end - 1] if opcode == 'parameter' else ''
  return Instruction(
    name=head.group(2),
    type=type_str,
    opcode=opcode,
    operands=tuple(_OPERAND.findall(rest[paren:operands_end])),
    calls=calls.group(1) if calls else None,
    root=bool(head.group(1)),
    parameter_number=int(number) if number.isdigit() else None,
  )


class _Module:
  def __init__(self, hlo_text: str):
    self.computations: dict[str, list[Instruction]] = {}
    self.entry = None
    self._reads = {}
    current = None
    for line in hlo_text.split('\n'):
      header = _HEADER.match(line)
      if header:
        current = header.group(1)
        self.computations[current] = []
        if line.startswith('ENTRY'):
          self.entry = current
        continue
      if line.startswith('}'):
        current = None
        continue
      if current is not None:
        instruction = _parse_instruction(line)
        if instruction:
          self.computations[current].append(instruction)
    if self.entry is None:
      raise ValueError('no ENTRY computation in the HLO text')

  def value_read(self, computation: str, name: str) -> float:
    """Bytes of `name`'s value that its users within `computation` read."""
    key = (computation, name)
    if key not in self._reads:
      self._reads[key] = self._value_read(computation, name)
    return self._reads[key]

  def _value_read(self, computation: str, name: str) -> float:
    instructions = self.computations[computation]
    full = _array_bytes(next(i for i in instructions if i.name == name).type, hbm_only=False)
    total = 0.0
    for user in (i for i in instructions if name in i.operands):
      if user.opcode in _PARTIAL_READS and user.operands[0] == name:
        total += _array_bytes(user.type, hbm_only=False)
      elif user.opcode in _VIEWS:
        total += self.value_read(computation, user.name)
      elif user.opcode == 'fusion' and user.calls:
        total += sum(
          self.parameter_read(user.calls, index)
          for index, operand in enumerate(user.operands)
          if operand == name
        )
      elif user.opcode == 'dynamic-update-slice' and user.operands[0] == name:
        continue  # Updated in place: not read.
      else:
        return full
    return min(total, full)

  def parameter_read(self, computation: str, index: int) -> float:
    """Bytes a fused computation reads of its parameter `index`."""
    for instruction in self.computations[computation]:
      if instruction.opcode == 'parameter' and instruction.parameter_number == index:
        return self.value_read(computation, instruction.name)
    return 0.0

  def fusion_written(self, computation: str, result_type: str) -> float:
    """HBM bytes a fusion writes: its HBM results (`result_type`, one array or a tuple), only
    the update of a result that is an in-place dynamic-update-slice."""
    instructions = {i.name: i for i in self.computations[computation]}
    root = next(i for i in instructions.values() if i.root)
    results = (
      [instructions.get(name) for name in root.operands] if root.opcode == 'tuple' else [root]
    )
    types = _tuple_elements(result_type)
    if len(types) != len(results):  # A tuple result whose root is not a tuple instruction.
      return _array_bytes(result_type, hbm_only=True)
    total = 0.0
    for result, type_str in zip(results, types):
      if not _array_bytes(type_str, hbm_only=True):
        continue  # Written on chip.
      if result is not None and result.opcode == 'dynamic-update-slice':
        update = instructions.get(result.operands[1])
        total += _array_bytes(update.type, hbm_only=False) if update else 0.0
      else:
        total += _array_bytes(type_str, hbm_only=True)
    return total


def hbm_bytes(hlo_text: str) -> float:
  """HBM bytes read and written by the entry computation of optimized HLO `hlo_text`
  (`compiled.as_text()`); see the module docstring for what is counted."""
  module = _Module(hlo_text)
  entry = module.computations[module.entry]
  types = {i.name: i.type for i in entry}
  total = 0.0
  for instruction in entry:
    if instruction.opcode in _FREE:
      continue
    if instruction.opcode.endswith('-done'):
      continue  # The end of an async op: its -start is counted.
    if instruction.opcode in ('copy-start', 'slice-start'):
      # Results (destination, source, context) and ((source), destination, context): each moves
      # the destination's bytes.
      source = _array_bytes(types.get(instruction.operands[0], ''), hbm_only=True)
      destination = _tuple_elements(instruction.type)[instruction.opcode == 'slice-start']
      moved = _array_bytes(destination, hbm_only=False)
      total += (moved if source else 0.0) + _array_bytes(destination, hbm_only=True)
    elif instruction.opcode.endswith('-start'):  # Async collectives: operands in, results out.
      operands = sum(_array_bytes(types.get(o, ''), hbm_only=True) for o in instruction.operands)
      results = _array_bytes(instruction.type, hbm_only=True) - operands
      total += operands + max(results, 0.0)
    elif instruction.opcode == 'fusion' and instruction.calls:
      for index, operand in enumerate(instruction.operands):
        if _array_bytes(types.get(operand, ''), hbm_only=True):
          total += module.parameter_read(instruction.calls, index)
      total += module.fusion_written(instruction.calls, instruction.type)
    elif instruction.opcode == 'dynamic-update-slice':
      total += _array_bytes(types.get(instruction.operands[1], ''), hbm_only=True) * 2
    else:
      total += sum(_array_bytes(types.get(o, ''), hbm_only=True) for o in instruction.operands)
      total += _array_bytes(instruction.type, hbm_only=True)
  return total
