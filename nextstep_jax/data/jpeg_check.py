"""Full structural check of baseline JPEG entropy data, which decoders accept when garbled.

libjpeg (under Pillow) decodes a JPEG whose middle bytes are garbled without an error in most
cases: it warns ("Corrupt JPEG data: bad Huffman code"), fills in what it can and returns a normal
looking image. `check_jpeg(data)` walks the entropy-coded data of a baseline or extended
sequential JPEG (SOF0/SOF1) with its Huffman tables: every code must exist, no block may run past
64 coefficients, each restart interval must hold exactly its MCUs and end with at most 7 padding
bits of ones. It returns None when the data is consistent and a reason otherwise. Progressive and
other JPEG kinds are not walked (None): their pixels are still decoded fully by the caller.
"""

import numpy as np


def _segments(data: bytes):
  """(marker, payload, end offset) of the header segments up to and including SOS."""
  pos = 2
  while pos + 4 <= len(data):
    if data[pos] != 0xFF:
      raise ValueError(f'expected a marker at byte {pos}')
    marker = data[pos + 1]
    if marker == 0xFF:
      pos += 1
      continue
    if marker in (0xD8, 0x01) or 0xD0 <= marker <= 0xD7:
      pos += 2
      continue
    length = int.from_bytes(data[pos + 2 : pos + 4], 'big')
    payload = data[pos + 4 : pos + 2 + length]
    if len(payload) != length - 2:
      raise ValueError('a header segment is cut short')
    yield marker, payload, pos + 2 + length
    if marker == 0xDA:
      return
    pos += 2 + length


def _ceil_div(a: int, b: int) -> int:
  return -(-a // b)


def _huffman_table(payload: bytes, pos: int) -> tuple[dict, int, int, int]:
  """One DHT table at `pos`: ({(length, code): symbol}, class, id, next pos)."""
  kind, ident = payload[pos] >> 4, payload[pos] & 15
  counts = payload[pos + 1 : pos + 17]
  symbols = payload[pos + 17 : pos + 17 + sum(counts)]
  table, code, k = {}, 0, 0
  for length, count in enumerate(counts, 1):
    for _ in range(count):
      table[(length, code)] = symbols[k]
      code += 1
      k += 1
    code <<= 1
  return table, kind, ident, pos + 17 + sum(counts)


def check_jpeg(data: bytes) -> str | None:
  """None if `data` (a JPEG file) has consistent entropy-coded data (or is not walked), else why."""
  data = bytes(data)
  if data[:2] != b'\xff\xd8':
    return None
  tables, frame, restart, scan_end = {}, None, 0, None
  try:
    for marker, payload, end in _segments(data):
      if marker == 0xC4:
        pos = 0
        while pos < len(payload):
          table, kind, ident, pos = _huffman_table(payload, pos)
          tables[(kind, ident)] = table
      elif marker in (0xC0, 0xC1):
        height, width = int.from_bytes(payload[1:3], 'big'), int.from_bytes(payload[3:5], 'big')
        comps = {
          payload[6 + 3 * i]: (payload[7 + 3 * i] >> 4, payload[7 + 3 * i] & 15)
          for i in range(payload[5])
        }
        frame = (height, width, comps)
      elif marker in (0xC2, 0xC3, 0xC5, 0xC6, 0xC7, 0xC9, 0xCA, 0xCB, 0xCD, 0xCE, 0xCF):
        return None  # Progressive / lossless / arithmetic: not walked.
      elif marker == 0xDD:
        restart = int.from_bytes(payload[:2], 'big')
      elif marker == 0xDA:
        scan = [
          (payload[1 + 2 * i], payload[2 + 2 * i] >> 4, payload[2 + 2 * i] & 15)
          for i in range(payload[0])
        ]
        scan_end = end
  except (ValueError, IndexError) as error:
    return f'malformed JPEG header ({error})'
  if frame is None or scan_end is None:
    return None
  height, width, comps = frame
  if any(c not in comps for c, _, _ in scan):
    return 'scan names an unknown component'
  hmax = max(h for h, _ in comps.values())
  vmax = max(v for _, v in comps.values())
  if len(scan) == 1:  # Non-interleaved: one block per MCU over the component's own grid.
    h, v = comps[scan[0][0]]
    blocks_x = _ceil_div(_ceil_div(width * h, hmax), 8)
    blocks_y = _ceil_div(_ceil_div(height * v, vmax), 8)
    units, per_mcu = blocks_x * blocks_y, [(scan[0], 1)]
  else:
    units = -(-width // (8 * hmax)) * -(-height // (8 * vmax))
    per_mcu = [(s, comps[s[0]][0] * comps[s[0]][1]) for s in scan]
  for (_, dc, ac), _ in per_mcu:
    if (0, dc) not in tables or (1, ac) not in tables:
      return 'scan uses a Huffman table that is not defined'
  return _walk(data, scan_end, units, per_mcu, tables, restart)


def _intervals(data: bytes, start: int):
  """Entropy-coded byte runs between restart markers (stuffing removed), up to EOI or the end."""
  out, run, pos = [], bytearray(), start
  while pos < len(data):
    byte = data[pos]
    if byte != 0xFF:
      run.append(byte)
      pos += 1
      continue
    nxt = data[pos + 1] if pos + 1 < len(data) else None
    if nxt == 0x00:
      run.append(0xFF)
      pos += 2
    elif nxt is not None and 0xD0 <= nxt <= 0xD7:
      out.append(bytes(run))
      run = bytearray()
      pos += 2
    elif nxt == 0xFF:
      pos += 1
    else:
      out.append(bytes(run))
      return out, nxt
  out.append(bytes(run))
  return out, None


def _walk(data, start, units, per_mcu, tables, restart) -> str | None:
  intervals, end_marker = _intervals(data, start)
  if end_marker != 0xD9:
    return 'the image data does not end with an end-of-image marker'
  per_interval = restart or units
  expected = -(-units // per_interval)
  if len(intervals) != expected:
    return f'{len(intervals)} restart intervals, expected {expected}'
  for i, run in enumerate(intervals):
    bits = np.unpackbits(np.frombuffer(run, np.uint8)).tolist()
    count = min(per_interval, units - i * per_interval)
    reason = _walk_interval(bits, count, per_mcu, tables)
    if reason:
      return reason
  return None


def _walk_interval(bits: list, mcus: int, per_mcu, tables) -> str | None:
  pos, total = 0, len(bits)

  def symbol(table):
    nonlocal pos
    code = 0
    for length in range(1, 17):
      if pos >= total:
        raise EOFError
      code = (code << 1) | bits[pos]
      pos += 1
      value = table.get((length, code))
      if value is not None:
        return value
    raise KeyError

  try:
    for _ in range(mcus):
      for (_, dc, ac), blocks in per_mcu:
        dc_table, ac_table = tables[(0, dc)], tables[(1, ac)]
        for _ in range(blocks):
          size = symbol(dc_table)
          if size > 11:
            return 'a DC coefficient is out of range'
          pos += size
          k = 1
          while k < 64:
            rs = symbol(ac_table)
            run, size = rs >> 4, rs & 15
            if size == 0:
              if run == 15:
                k += 16
                continue
              break  # End of block.
            k += run
            if k > 63:
              return 'a block has more than 64 coefficients'
            pos += size
            k += 1
  except EOFError:
    return 'the entropy-coded data ends early'
  except KeyError:
    return 'an invalid Huffman code'
  if pos > total:
    return 'the entropy-coded data ends early'
  rest = bits[pos:]
  if len(rest) > 7 or any(b == 0 for b in rest):
    return f'{(total - pos) // 8} bytes of entropy-coded data are left over'
  return None
