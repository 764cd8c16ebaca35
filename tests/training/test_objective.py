"""The training objective against a hand-computed numpy reference on a real tiny batch
(docs/model.md §4, §6)."""

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest
from flax import nnx

from model_testing import TINY_MODEL
from model_testing import tiny_model
from nextstep_jax.config_defaults import get_base_config
from nextstep_jax.data import sequences
from nextstep_jax.data.text_tokenizer import TextTokenizer
from nextstep_jax.data.text_tokenizer import train_sentencepiece
from nextstep_jax.model import nextstep as ns
from nextstep_jax.training import objective as O

LOSS_RTOL = 2e-5  # float32 losses (logsumexp over 512, masked means) vs float64 numpy.
INVARIANCE_RTOL = 1e-6  # The same float32 computation on unchanged inputs; only reduction order.
TOTAL_RTOL = 1e-6  # total vs w_lm lm + w_im im recombined in Python: one float32 rounding.

CAPTIONS = [
  'a red circle to the left of a blue square',
  'a handwritten digit seven',
  'a green triangle above a yellow square',
]
H, W = 2, 3
N = H * W
MAX_CAPTION_TOKENS = 12
TOKEN_DIM = 12  # 3 channels x 2 x 2 patch.


@pytest.fixture(scope='module')
def tok(tmp_path_factory):
  path = train_sentencepiece(CAPTIONS, str(tmp_path_factory.mktemp('spm') / 'tok'), 400)
  tok = TextTokenizer.load(path)
  assert tok.vocab_size <= TINY_MODEL['vocab_size']
  return tok


@pytest.fixture(scope='module')
def model():
  return tiny_model(seed=1)


@pytest.fixture(scope='module')
def batch(tok):
  b = sequences.build_training_batch(
    tok,
    ['a red circle', 'a blue square', 'a digit seven'],
    H,
    W,
    MAX_CAPTION_TOKENS,
    drop_text=np.array([False, True, False]),
  )
  rng = np.random.default_rng(2)
  b['image_tokens'] = rng.standard_normal((3, N, TOKEN_DIM)).astype(np.float32)
  b['image_valid'] = np.array([True, True, False])  # Row 2 is a padding row for the FM loss.
  return b


def loss_config(tok, **kw):
  return O.LossConfig(placeholder_id=tok.image_placeholder_id, **kw)


@pytest.fixture(scope='module')
def loss_fn():
  return nnx.jit(
    lambda model, batch, key, cfg: O.compute_loss(model, batch, key, cfg), static_argnums=3
  )


def to_jax(batch):
  return {k: jnp.asarray(v) for k, v in batch.items()}


def np_params(model):
  return {
    '.'.join(map(str, p)): np.asarray(v.get_value(), np.float64)
    for p, v in nnx.to_flat_state(nnx.state(model, nnx.Param))
  }


@nnx.jit
def _hidden(model, ids, tokens, mask, positions, attention_mask):
  return model(model.embed(ids, tokens, mask), positions, attention_mask)[0]


@nnx.jit
def _velocity(model, x_t, t, cond):
  return model.image_head(x_t, t, cond)


def reference_losses(model, batch, key, cfg, tok):
  """The loss pieces recomputed from the model's hidden states in numpy (float64)."""
  ids, labels = batch['input_ids'], batch['labels']
  ph = tok.image_placeholder_id
  mask = ids == ph
  hidden = np.asarray(
    _hidden(
      model,
      *map(
        jnp.asarray, (ids, batch['image_tokens'], mask, batch['positions'], batch['attention_mask'])
      ),
    ),
    np.float64,
  )
  p = np_params(model)
  b, length, _ = hidden.shape

  # LM: position i predicts labels[i + 1] unless input_ids[i + 1] is a placeholder; -100 ignored.
  nll, count = 0.0, 0
  for r in range(b):
    for i in range(length - 1):
      if labels[r, i + 1] == -100 or ids[r, i + 1] == ph:
        continue
      logits = hidden[r, i] @ p['lm_head.kernel']
      top = logits.max()
      logz = top + np.log(np.exp(logits - top).sum())
      nll += logz - logits[labels[r, i + 1]]
      count += 1
  lm = nll / count

  # FM: the position before placeholder k conditions token k.
  cond = []
  for r in range(b):
    for pos in np.nonzero(mask[r])[0]:
      cond.append(
        hidden[r, pos - 1] @ p['image_out_projector.kernel'] + p['image_out_projector.bias']
      )
  cond = np.stack(cond)  # (M, D), row-major (row, token).
  m = b * N
  x1 = batch['image_tokens'].reshape(m, -1).astype(np.float64)
  token_mask = np.repeat(batch['image_valid'], N).astype(np.float64)
  tile = np.arange(m * cfg.fm_head_batch_mul) % m  # Row r <- r mod M.
  x1, cond, token_mask = x1[tile], cond[tile], token_mask[tile]
  # Same draws as objective.head_draws: split(key) -> (t key, eps key).
  key_t, key_eps = jax.random.split(key)
  n = np.asarray(jax.random.normal(key_t, (len(tile),)), np.float64)
  t = 1 / (1 + np.exp(-(cfg.time_mean + cfg.time_std * n)))
  eps = np.asarray(jax.random.normal(key_eps, x1.shape, jnp.float32), np.float64)
  x_t = t[:, None] * x1 + (1 - t[:, None]) * eps
  target = x1 - eps
  v = np.asarray(
    _velocity(
      model,
      jnp.asarray(x_t, jnp.float32),
      jnp.asarray(t, jnp.float32),
      jnp.asarray(cond, jnp.float32),
    ),
    np.float64,
  )
  per_token = ((v - target) ** 2).mean(-1)
  im = (per_token * token_mask).sum() / (token_mask.sum() + 1e-8)
  return dict(
    lm_loss=lm, im_loss=im, loss=cfg.lm_loss_weight * lm + cfg.im_loss_weight * im, num_lm=count
  )


def test_batch_layout(tok, batch):
  """The batch is the real layout: every row has N placeholders, boi right before the first."""
  mask = batch['input_ids'] == tok.image_placeholder_id
  assert (mask.sum(1) == N).all()
  first = mask.argmax(1)
  assert (batch['input_ids'][np.arange(3), first - 1] == tok.boi_id).all()


@pytest.mark.slow
@pytest.mark.parametrize(
  'mul, time_mean, time_std, lm_w, im_w', [(4, 0.0, 1.0, 0.01, 1.0), (2, 0.3, 0.7, 0.5, 2.0)]
)
def test_loss_matches_numpy_reference(
  tok, model, batch, loss_fn, mul, time_mean, time_std, lm_w, im_w
):
  cfg = loss_config(
    tok,
    fm_head_batch_mul=mul,
    time_mean=time_mean,
    time_std=time_std,
    lm_loss_weight=lm_w,
    im_loss_weight=im_w,
  )
  key = jax.random.key(3)
  total, pieces = loss_fn(model, to_jax(batch), key, cfg)
  ref = reference_losses(model, batch, key, cfg, tok)
  assert ref['num_lm'] > 10
  for name in ('lm_loss', 'im_loss', 'loss'):
    assert float(pieces[name]) == pytest.approx(ref[name], rel=LOSS_RTOL), name
  assert float(total) == float(pieces['loss'])
  assert float(pieces['loss']) == pytest.approx(
    lm_w * float(pieces['lm_loss']) + im_w * float(pieces['im_loss']), rel=TOTAL_RTOL
  )


def test_default_loss_weights(tok):
  cfg = loss_config(tok)
  assert (cfg.lm_loss_weight, cfg.im_loss_weight, cfg.fm_head_batch_mul) == (0.01, 1.0, 4)
  from_config = O.LossConfig.from_config(get_base_config(), tok.image_placeholder_id)
  assert from_config == cfg


@pytest.mark.slow
def test_padding_rows_do_not_contribute_to_fm(tok, model, batch, loss_fn):
  cfg = loss_config(tok)
  key = jax.random.key(5)
  _, base = loss_fn(model, to_jax(batch), key, cfg)
  changed = dict(batch)
  changed['image_tokens'] = batch['image_tokens'].copy()
  changed['image_tokens'][2] = 100.0  # Padding row: huge tokens.
  _, pieces = loss_fn(model, to_jax(changed), key, cfg)
  assert float(pieces['im_loss']) == pytest.approx(float(base['im_loss']), rel=INVARIANCE_RTOL)
  # A valid row's tokens do matter.
  changed['image_tokens'][0] = 3.0
  _, pieces = loss_fn(model, to_jax(changed), key, cfg)
  assert abs(float(pieces['im_loss']) - float(base['im_loss'])) > 1e-3
  # All rows padding: the FM loss is 0 (not NaN) thanks to the +1e-8.
  none = dict(batch, image_valid=np.zeros(3, bool))
  _, pieces = loss_fn(model, to_jax(none), key, cfg)
  assert float(pieces['im_loss']) == 0.0 and np.isfinite(float(pieces['lm_loss']))


def test_placeholder_targets_never_enter_ce(tok, model, batch, loss_fn):
  """Even with labels at placeholders (not -100), positions followed by a placeholder are routed
  to the flow head, not to the CE."""
  cfg = loss_config(tok)
  key = jax.random.key(6)
  _, base = loss_fn(model, to_jax(batch), key, cfg)
  relabelled = dict(batch)
  labels = batch['labels'].copy()
  ph = batch['input_ids'] == tok.image_placeholder_id
  labels[ph] = batch['input_ids'][ph]
  relabelled['labels'] = labels
  _, pieces = loss_fn(model, to_jax(relabelled), key, cfg)
  assert float(pieces['lm_loss']) == pytest.approx(float(base['lm_loss']), rel=INVARIANCE_RTOL)
  # And ignored labels really are ignored: un-ignoring the boi target changes the CE.
  boi = batch['input_ids'] == tok.boi_id
  labels2 = batch['labels'].copy()
  labels2[boi] = tok.boi_id
  _, pieces = loss_fn(model, to_jax(dict(batch, labels=labels2)), key, cfg)
  assert abs(float(pieces['lm_loss']) - float(base['lm_loss'])) > 1e-4


def test_fresh_noise_per_copy_and_key(tok, model, batch, loss_fn):
  cfg = loss_config(tok)
  _, a = loss_fn(model, to_jax(batch), jax.random.key(7), cfg)
  _, b = loss_fn(model, to_jax(batch), jax.random.key(8), cfg)
  assert float(a['im_loss']) != float(b['im_loss'])
  assert float(a['lm_loss']) == float(b['lm_loss'])


@pytest.mark.slow
def test_gradients_finite(tok, model, batch):
  cfg = loss_config(tok)

  @nnx.jit
  def grads(model, batch, key):
    return nnx.grad(lambda m: O.compute_loss(m, batch, key, cfg)[0])(model)

  g = grads(model, to_jax(batch), jax.random.key(9))
  flat = {'.'.join(map(str, p)): np.asarray(v.get_value()) for p, v in nnx.to_flat_state(g)}
  for name, arr in flat.items():
    assert np.isfinite(arr).all(), name
  for name in (
    'lm_head.kernel',
    'embed_tokens.embedding',
    'image_in_projector.kernel',
    'image_out_projector.kernel',
    'decoder.layers.self_attn.q_proj.kernel',
    'image_head.res_blocks.mlp_0.kernel',
    'image_head.final_layer.linear.kernel',
  ):
    assert np.abs(flat[name]).max() > 0, name


# ----- few-step head: the shortcut self-consistency objective -----


@pytest.mark.slow
def test_shortcut_rows_follow_the_documented_targets():
  """A spy field u = t + 3 d records every call: self-consistency rows query (t, d') then
  (t + d, d') and are trained at 2d with t on the d grid and t + 2d <= 1 (d' = 0 at the finest
  level); flow rows at d = 0; the loss equals the one recomputed from the recorded calls."""
  cfg = O.LossConfig(
    placeholder_id=0,
    fm_head_batch_mul=8,
    head_objective='shortcut',
    shortcut_fraction=0.5,
    shortcut_max_steps=8,
  )
  calls = []

  def spy(x, t, c, d):
    calls.append((np.asarray(t), np.asarray(d)))
    return jnp.zeros_like(x) + (t + 3 * d)[:, None]

  rng = np.random.default_rng(0)
  x1, cond = jnp.asarray(rng.standard_normal((16, 4)), jnp.float32), jnp.ones((16, 3))
  draws = O.head_draws(jax.random.key(1), 128, 4, cfg)
  loss = float(O.shortcut_loss_sum(spy, x1, cond, jnp.ones((16,), bool), draws, cfg)) / 128
  (t, dq), (t2, dq2), (tf, df) = calls
  sc = np.arange(128) < 64
  d = (t2 - t)[sc]
  np.testing.assert_allclose(df[sc], 2 * d, rtol=1e-6)
  assert set(np.round(1 / d).astype(int)) <= {2, 4, 8} and len(set(np.round(1 / d))) > 1
  np.testing.assert_allclose(np.round(t[sc] / d), t[sc] / d, atol=1e-5)
  assert (t[sc] + 2 * d <= 1 + 1e-6).all()
  np.testing.assert_allclose(dq[sc], np.where(np.isclose(d, 1 / 8), 0.0, d), rtol=1e-6)
  np.testing.assert_array_equal(dq2, dq)
  assert (df[~sc] == 0).all() and (tf[~sc] > 0).all() and (tf[~sc] < 1).all()
  u1, u2 = t[sc] + 3 * dq[sc], t2[sc] + 3 * dq[sc]
  sc_err = (tf[sc] + 3 * df[sc] - 0.5 * (u1 + u2)) ** 2  # Same for every token dim.
  assert 0 < loss and np.isfinite(loss)
  assert sc_err.sum() / 128 <= loss  # Flow rows add the rest of the mean.


@pytest.mark.slow
def test_shortcut_loss_finite_and_decreasing_on_a_tiny_run(tok, batch):
  m = get_base_config().model
  m.update(TINY_MODEL, fm_head_step_cond=True)
  model = ns.NextStep(ns.ModelConfig.from_config(m), rngs=nnx.Rngs(0))
  cfg = loss_config(tok, fm_head_batch_mul=8, head_objective='shortcut', shortcut_max_steps=16)
  optimizer = nnx.Optimizer(model, optax.adam(3e-3), wrt=nnx.Param)

  @nnx.jit
  def train_step(model, optimizer, batch, key):
    loss, grads = nnx.value_and_grad(lambda m: O.compute_loss(m, batch, key, cfg)[1]['im_loss'])(
      model
    )
    optimizer.update(model, grads)
    return loss

  data = to_jax(batch)
  losses = [float(train_step(model, optimizer, data, jax.random.key(s))) for s in range(40)]
  assert np.isfinite(losses).all()
  assert np.mean(losses[-8:]) < 0.8 * np.mean(losses[:8]), losses
