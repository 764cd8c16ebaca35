"""Per-token distillation into a few-step head: teacher data, the student loss, frozen backbone."""

import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx

from model_testing import TINY_MODEL
from model_testing import tiny_model
from nextstep_jax.config_defaults import get_base_config
from nextstep_jax.sampling import guidance
from nextstep_jax.training import distill as D

COND_ATOL = 1e-5  # Same float32 forward at a different sequence length: reduction order only.
TRAJ_ATOL = 1e-5  # Scanned Euler vs a Python loop of the same float32 calls.
TOKEN_DIM, N, PROMPT_WIDTH = 12, 4, 5


@pytest.fixture(scope='module')
def teacher():
  return tiny_model(seed=1)


def prompt_rows(rows, seed=0):
  rng = np.random.default_rng(seed)
  ids = rng.integers(0, TINY_MODEL['vocab_size'], (rows, PROMPT_WIDTH)).astype(np.int32)
  mask = np.arange(PROMPT_WIDTH)[None] >= rng.integers(0, 3, rows)[:, None]
  positions = np.broadcast_to(np.arange(PROMPT_WIDTH, dtype=np.int32), ids.shape).copy()
  return {
    'input_ids': jnp.asarray(ids),
    'attention_mask': jnp.asarray(mask),
    'positions': jnp.asarray(positions),
  }


@pytest.mark.slow
def test_token_conditions_match_prefix_forwards(teacher):
  """Condition k from one teacher-forced pass == head_condition of the last hidden of a forward
  over prompt + tokens < k (what the sampler conditions token k on)."""
  prompt = prompt_rows(4)
  tokens = jnp.asarray(np.random.default_rng(1).standard_normal((2, N, TOKEN_DIM)), jnp.float32)
  cond = np.asarray(D.token_conditions(teacher, prompt, tokens, 2))
  fed = jnp.tile(tokens, (2, 1, 1))
  for k in range(N):
    x = jnp.concatenate(
      [teacher.embed(prompt['input_ids'], None, None), teacher.embed_image_tokens(fed[:, :k])], 1
    )
    positions = jnp.broadcast_to(jnp.arange(PROMPT_WIDTH + k), (4, PROMPT_WIDTH + k))
    valid = jnp.concatenate([prompt['attention_mask'], jnp.ones((4, k), bool)], 1)
    hidden, _ = teacher(x, positions, valid)
    want = np.asarray(teacher.head_condition(hidden[:, -1], jnp.full((4,), k)))
    np.testing.assert_allclose(cond[:, k], want, atol=COND_ATOL)


def test_teacher_trajectories_are_the_guided_euler_ode(teacher):
  cfg = D.DistillConfig(teacher_steps=4, teacher_solver='euler', max_student_steps=2)
  head = teacher.image_head
  rng = np.random.default_rng(2)
  cond_emb = head.condition(
    jnp.asarray(rng.standard_normal((6, TINY_MODEL['hidden_size'])), jnp.float32)
  )
  x = jnp.asarray(rng.standard_normal((3, TOKEN_DIM)), jnp.float32)
  states = np.asarray(D.teacher_trajectories(head, cond_emb, x, 2.0, cfg))
  assert states.shape == (3, 3, TOKEN_DIM)
  want = [np.asarray(x)]
  for i in range(4):
    v = head.velocity_from_condition(jnp.tile(x, (2, 1)), jnp.float32(i / 4), cond_emb)
    x = x + 0.25 * guidance.combine_two_way(v, jnp.float32(2.0))
    if i % 2:
      want.append(np.asarray(x))
  np.testing.assert_allclose(states, np.stack(want), atol=TRAJ_ATOL)


@pytest.mark.slow
@pytest.mark.parametrize('fold_guidance', [True, False])
def test_distillation_trains_the_head_only(teacher, fold_guidance):
  """The student starts at the teacher's velocity; training lowers the student loss, changes the
  head and leaves every backbone / projector / embedding parameter bit-identical."""
  config = get_base_config()
  config.model.update(TINY_MODEL)
  config.lock()
  teacher_params = nnx.state(teacher, nnx.Param)
  student_config, graphdef, params = D.student_model(config, teacher_params)
  assert student_config.model.fm_head_step_cond
  student = nnx.merge(graphdef, params)
  rng = np.random.default_rng(3)
  m = 96
  cond = rng.standard_normal((2, m, TINY_MODEL['hidden_size'])).astype(np.float32)  # [text; uncond]
  x, t = jnp.asarray(rng.standard_normal((m, TOKEN_DIM)), jnp.float32), jnp.full((m,), 0.5)
  np.testing.assert_array_equal(
    np.asarray(student.image_head(x, t, jnp.asarray(cond[0]), jnp.full((m,), 0.25))),
    np.asarray(teacher.image_head(x, t, jnp.asarray(cond[0]))),
  )
  # One level (d = 1) and whole-set batches: a deterministic regression whose loss must fall.
  cfg = D.DistillConfig(
    teacher_steps=2, teacher_solver='euler', max_student_steps=1, steps=40, batch_size=m, lr=3e-3
  )
  cond_emb = teacher.image_head.condition(jnp.asarray(cond.reshape(2 * m, -1)))
  states = np.asarray(D.teacher_trajectories(teacher.image_head, cond_emb, x, 1.5, cfg))
  if fold_guidance:
    trained, losses = D.train_student(graphdef, params, cond[0], states, cfg, log_every=10)
  else:
    trained, losses = D.train_student(graphdef, params, cond, states, cfg, log_every=10, scale=1.5)
  assert np.isfinite(losses).all() and losses[-1] < 0.7 * losses[0], losses
  before, after = dict(nnx.to_flat_state(params)), dict(nnx.to_flat_state(trained))
  assert before.keys() == after.keys()
  changed = {p for p in before if not np.array_equal(before[p].get_value(), after[p].get_value())}
  assert changed and all(p[0] == 'image_head' for p in changed)
  assert ('image_head', 'step_embed', 'mlp_2', 'kernel') in changed
