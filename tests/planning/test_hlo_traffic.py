"""HBM traffic counted from optimized HLO (planning/hlo_traffic.py)."""

import jax
import jax.numpy as jnp
import pytest

from nextstep_jax.planning import hlo_traffic

S = jax.ShapeDtypeStruct


def compiled_bytes(fn, *args) -> tuple[float, float]:
  compiled = jax.jit(fn).lower(*args).compile()
  analysis = compiled.cost_analysis()
  analysis = analysis[0] if isinstance(analysis, list) else analysis
  return analysis['bytes accessed'], hlo_traffic.hbm_bytes(compiled.as_text())


@pytest.mark.parametrize(
  'fn, args',
  [
    (lambda x, y: x + y, (S((256, 512), jnp.float32), S((256, 512), jnp.float32))),
    (lambda x: jnp.tanh(x) * 2 + 1, (S((256, 512), jnp.float32),)),
    (lambda x, w: x @ w, (S((8, 512), jnp.float32), S((512, 1024), jnp.float32))),
    (
      lambda x, w, i: x @ jax.lax.dynamic_index_in_dim(w, i, keepdims=False),
      (S((8, 512), jnp.float32), S((4, 512, 1024), jnp.float32), S((), jnp.int32)),
    ),
  ],
)
def test_equals_the_cost_analysis_where_every_buffer_is_in_memory(fn, args):
  # The CPU backend has no on-chip memory space, so the two counts must agree exactly.
  accessed, hbm = compiled_bytes(fn, *args)
  assert hbm == accessed


# Shaped like a TPU compile of x (2, 4096) bf16 @ w (4096, 8192) int8: the weight is prefetched
# into VMEM (S(1)) by copy-start and the matmul fusion reads it there.
PREFETCHED_MATMUL = """
HloModule m

%fused_computation (param_0: bf16[2,4096], param_1: s8[4096,8192]) -> bf16[2,8192] {
  %param_0 = bf16[2,4096]{1,0:T(2,128)(2,1)} parameter(0)
  %param_1 = s8[4096,8192]{1,0:T(32,128)(4,1)S(1)} parameter(1)
  ROOT %convolution.1 = bf16[2,8192]{1,0:T(2,128)(2,1)} convolution(%param_0, %param_1), dim_labels=bf_io->bf
}

ENTRY %main.1 (x.1: bf16[2,4096], w.1: s8[4096,8192]) -> bf16[2,8192] {
  %w.1 = s8[4096,8192]{1,0:T(32,128)(4,1)} parameter(1)
 %copy-start = (s8[4096,8192]{1,0:T(32,128)(4,1)S(1)}, s8[4096,8192]{1,0:T(32,128)(4,1)}, u32[]{:S(2)}) copy-start(%w.1)
  %x.1 = bf16[2,4096]{1,0:T(2,128)(2,1)} parameter(0)
  %copy-done = s8[4096,8192]{1,0:T(32,128)(4,1)S(1)} copy-done(%copy-start)
  ROOT %fusion = bf16[2,8192]{1,0:T(2,128)(2,1)} fusion(%x.1, %copy-done), kind=kOutput, calls=%fused_computation
}
"""

# A stacked cache (4 layers): layer 2's slice is read by a fusion and the new slot is written in
# place by a fusion whose root is a dynamic-update-slice; a stacked weight's layer is staged into
# VMEM by an async slice.
SLICES_AND_UPDATES = """
HloModule m

%read (p0: bf16[4,1024,128], p1: s32[]) -> f32[1024] {
  %p0 = bf16[4,1024,128]{2,1,0} parameter(0)
  %p1 = s32[] parameter(1)
  %c0 = s32[] constant(0)
  %ds = bf16[1,1024,128]{2,1,0} dynamic-slice(%p0, %p1, %c0, %c0), dynamic_slice_sizes={1,1024,128}
  %b = bf16[1024,128]{1,0} bitcast(%ds)
  %z = bf16[] constant(0)
  ROOT %r = f32[1024]{0} reduce(%b, %z), dimensions={1}, to_apply=%add
}

%write (q0: bf16[4,1024,128], q1: bf16[1,1,128], q2: s32[]) -> bf16[4,1024,128] {
  %q0 = bf16[4,1024,128]{2,1,0} parameter(0)
  %q1 = bf16[1,1,128]{2,1,0} parameter(1)
  %q2 = s32[] parameter(2)
  %c = s32[] constant(0)
  ROOT %u = bf16[4,1024,128]{2,1,0} dynamic-update-slice(%q0, %q1, %q2, %q2, %c)
}

ENTRY %main (cache: bf16[4,1024,128], new: bf16[1,1,128], i: s32[], w: s8[4,512,512]) -> f32[1024] {
  %cache = bf16[4,1024,128]{2,1,0} parameter(0)
  %new = bf16[1,1,128]{2,1,0} parameter(1)
  %i = s32[] parameter(2)
  %w = s8[4,512,512]{2,1,0} parameter(3)
  %slice-start = ((s8[4,512,512]{2,1,0}), s8[1,512,512]{2,1,0:S(1)}, s32[]{:S(2)}) slice-start(%w)
  %slice-done = s8[1,512,512]{2,1,0:S(1)} slice-done(%slice-start)
  %read_fusion = f32[1024]{0} fusion(%cache, %i), kind=kLoop, calls=%read
  %write_fusion = bf16[4,1024,128]{2,1,0} fusion(%cache, %new, %i), kind=kLoop, calls=%write
  ROOT %t = (f32[1024]{0}, bf16[4,1024,128]{2,1,0}) tuple(%read_fusion, %write_fusion)
}
"""


def test_buffers_staged_on_chip_are_not_counted():
  x, w, out = 2 * 4096 * 2, 4096 * 8192, 2 * 8192 * 2
  assert hlo_traffic.hbm_bytes(PREFETCHED_MATMUL) == x + w + out


def test_slices_read_and_in_place_updates_count_only_their_part():
  layer_read = 1024 * 128 * 2 + 1024 * 4  # One layer's slice in, the f32 reduction out.
  update = 2 * 128 * 2  # The new slot read and written in place.
  staged = 512 * 512  # One layer of w read from HBM into VMEM.
  index = 2 * 4  # The layer index, read by both fusions.
  assert hlo_traffic.hbm_bytes(SLICES_AND_UPDATES) == layer_read + update + staged + index


def test_bad_text_is_refused():
  with pytest.raises(ValueError, match='ENTRY'):
    hlo_traffic.hbm_bytes('HloModule m\n')


@pytest.mark.tpu_aot
def test_tpu_matmul_streams_its_weight_once():
  from nextstep_jax.planning import aot

  mesh = jax.sharding.Mesh(aot.topology_devices('v5e:1x1'), ('x',))
  one = jax.sharding.NamedSharding(mesh, jax.sharding.PartitionSpec())
  compiled = (
    jax.jit(lambda x, w: x @ w.astype(jnp.bfloat16), in_shardings=(one, one), out_shardings=one)
    .lower(S((2, 4096), jnp.bfloat16), S((4096, 8192), jnp.int8))
    .compile()
  )
  x, w, out = 2 * 4096 * 2, 4096 * 8192, 2 * 8192 * 2
  assert hlo_traffic.hbm_bytes(compiled.as_text()) == pytest.approx(x + w + out, rel=0.01)
