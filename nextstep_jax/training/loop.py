"""The training loop: data, sharded jitted steps, checkpoints, metrics, sample grids, preemption.

Workdir layout (a local path or a `gs://` URL; host files go through etils.epath, checkpoints
through orbax): config.json, tokenizer.model, checkpoints/ (orbax, keep N, atomic), tb/
(TensorBoard scalars and sample grids), samples/step_<step, 7 digits>.png, metrics.jsonl (one line
per logged step with the wall time, for accuracy-vs-minutes curves).

A fresh run starts from random init, or from the params of `train.init_from` (a converted
release or another run, `training/init_from.py`) with a fresh optimizer; a run with checkpoints
always resumes from its own. Resume is exact: each checkpoint holds the model, the optimizer and
every process's data-iterator
state (`nextstep_jax.data.training_data`), and the step's noise is a pure function of (seed, step),
so restarting from checkpoint s reproduces the run that never stopped. SIGTERM (a preemption
notice) or Ctrl-C makes every process stop at one agreed step boundary, checkpoint it and return
normally (`training/preemption.py`); a second Ctrl-C exits at once.

Hardening: everything checkable is checked before the workdir is created (config, batch versus
device divisibility); one trainer per workdir (`training/workdir_lock.py`); the newest checkpoint
that restores is resumed, damaged newer ones moved aside (`checkpoints.Checkpointer.restore_newest`);
`metrics.jsonl` rows past the restored step (written after it by a run that stopped uncleanly) are
dropped; a failed save stops the run at once with one `CheckpointSaveError`. Metrics are fetched
one step late so the host never waits for the
device; a NaN/Inf loss or gradient stops the run with `TrainingDivergedError` before any
checkpoint of the bad step is written.
"""

import dataclasses
import json
import math
import pathlib
import time

import jax
from etils import epath

from nextstep_jax import checkpoints
from nextstep_jax import configlib
from nextstep_jax import errors
from nextstep_jax import runs
from nextstep_jax.data import builtin_source
from nextstep_jax.data import training_data
from nextstep_jax.parallel import mesh as mesh_lib
from nextstep_jax.parallel import rules as rules_lib
from nextstep_jax.sampling import pipeline
from nextstep_jax.training import init_from
from nextstep_jax.training import new_words
from nextstep_jax.training import preemption
from nextstep_jax.training import state as state_lib
from nextstep_jax.training import step as step_lib
from nextstep_jax.training import workdir_lock
from nextstep_jax.utils import images as image_utils
from nextstep_jax.utils import logging as log_utils


class TrainingDivergedError(errors.UserError, RuntimeError):
  """The loss or gradient norm became NaN/Inf."""


@dataclasses.dataclass
class TrainResult:
  workdir: str
  step: int
  metrics: dict
  minutes: float
  preempted: bool = False  # Stopped early on a preemption notice (a checkpoint holds `step`).


def default_workdir(config) -> str:
  return config.workdir or str(pathlib.Path('runs') / config.name)


class MetricsLog:
  """metrics.jsonl: appended in place locally; object stores (gs://) cannot append, so there the
  file is rewritten from the records kept in memory (read back first when resuming)."""

  def __init__(
    self,
    path: epath.Path,
    enabled: bool,
    appendable: bool | None = None,
    resumed_step: int | None = None,
  ):
    """enabled: False on processes other than 0; appendable: None decides from the path (URL or
    not); resumed_step: rows of later steps (written after that checkpoint by a run that then
    stopped uncleanly; the resumed run writes them again) are dropped."""
    self.path, self.enabled = path, enabled
    self._appendable = '://' not in str(path) if appendable is None else appendable
    self._lines = []
    if enabled and path.exists():
      lines = path.read_text().splitlines(keepends=True)
      kept = [line for line in lines if resumed_step is None or _row_step(line) <= resumed_step]
      if len(kept) != len(lines):
        path.write_text(''.join(kept))
      if not self._appendable:
        self._lines = kept

  def write(self, record: dict) -> None:
    if not self.enabled:
      return
    line = json.dumps(record) + '\n'
    if self._appendable:
      with self.path.open('a') as f:
        f.write(line)
    else:
      self._lines.append(line)
      self.path.write_text(''.join(self._lines))


def _row_step(line: str) -> int:
  """The step of a metrics.jsonl line (a torn last line counts as past any step)."""
  try:
    return int(json.loads(line)['step'])
  except (ValueError, KeyError, TypeError):
    return 1 << 62


class BatchNotDivisibleError(configlib.ConfigError):
  """train.batch_size does not split evenly over the devices or processes."""


def check_batch_divides(config, mesh) -> None:
  """train.batch_size must divide over the mesh axes of the batch and over the processes."""
  spec = rules_lib.activation_spec(mesh, config.mesh.rules, 'batch').spec
  axes = spec[0] if spec else None
  axes = () if axes is None else (axes,) if isinstance(axes, str) else tuple(axes)
  shards = math.prod(mesh.shape[axis] for axis in axes)
  batch = config.train.batch_size
  if batch % shards:
    raise BatchNotDivisibleError(
      f'train.batch_size={batch} does not divide over the {shards} devices of the batch mesh axes '
      f'{"x".join(axes)} (mesh {dict(mesh.shape)}); use a multiple of {shards}, e.g. '
      f'--config.train.batch_size={max(shards, batch - batch % shards)}, or change config.mesh'
    )
  if batch % jax.process_count():
    raise BatchNotDivisibleError(
      f'train.batch_size={batch} does not divide over {jax.process_count()} processes; use a '
      f'multiple of {jax.process_count()}'
    )


def has_grid(config) -> bool:
  """Whether the run writes sample grids: built-in data, or explicit train.grid_prompts."""
  return bool(config.train.get('grid_prompts')) or config.data.source == 'builtin'


def grid_prompts(config, num: int) -> list[str]:
  """Fixed prompts for the periodic sample grid: train.grid_prompts cycled to `num`, else the
  built-in data set's (seen and held-out for shapes)."""
  if config.train.get('grid_prompts'):
    prompts = list(config.train.grid_prompts)
    return [prompts[i % len(prompts)] for i in range(num)]
  if config.data.dataset in ('shapes', 'shapes_new'):
    from nextstep_jax.data.builtin import shapes

    half = num // 2
    return (
      shapes.eval_prompts(half // 2, 1, 'seen', 0)
      + shapes.eval_prompts(half - half // 2, 2, 'seen', 0)
      + shapes.eval_prompts(num - half, 2, 'heldout', 0)
    )
  from nextstep_jax.data.builtin import digits

  return digits.eval_prompts(num, 0)


def _check_finite(step: int, metrics: dict, workdir: str, last_saved: int | None) -> None:
  bad = {k: v for k, v in metrics.items() if not math.isfinite(v)}
  if bad:
    raise TrainingDivergedError(
      f'step {step}: non-finite {bad}. Training stopped; the last good checkpoint is step '
      f'{last_saved} in {workdir}/checkpoints. Lower train.lr, raise train.warmup_steps or '
      'tighten train.grad_clip, then resume.'
    )


def save_sample_grid(config, graphdef, params, tok, workdir: epath.Path, step: int, writer) -> str:
  """Samples the fixed grid prompts with the config's sampler and writes a PNG (+ TensorBoard)."""
  prompts = grid_prompts(config, config.train.num_grid_samples)
  sampler = pipeline.TextToImage(config, graphdef, params, tok)
  images = sampler(prompts, list(range(len(prompts))))
  grid = image_utils.make_grid(images, ncols=int(math.ceil(math.sqrt(len(images)))))
  path = workdir / 'samples' / f'step_{step:07d}.png'
  if jax.process_index() == 0:  # Every process samples (collectives); one writes.
    image_utils.save_png(path, grid)
    (workdir / 'samples' / f'step_{step:07d}.txt').write_text('\n'.join(prompts) + '\n')
  writer.image(step, 'samples', grid)
  return str(path)


def train(
  config, workdir: str | None = None, stop_at: int | None = None, from_step: int | None = None
) -> TrainResult:
  """Trains `config` in `workdir` (local path or gs:// URL), resuming from its newest checkpoint
  that restores.

  stop_at: end this invocation after that step (with a checkpoint), as a preempted job would;
  running again continues exactly where it stopped. A SIGTERM or Ctrl-C does the same at the next
  step boundary all processes agree on (see module docstring). from_step: resume from this saved
  step instead; newer checkpoints are moved aside to `checkpoints.superseded/` (kept).
  """
  configlib.validate(config)
  mesh = mesh_lib.make_mesh(config.mesh)
  check_batch_divides(config, mesh)
  workdir = epath.Path(workdir or default_workdir(config))
  is_writer = jax.process_index() == 0  # Host files (not checkpoints) are written by process 0.
  if is_writer:
    workdir.mkdir(parents=True, exist_ok=True)
  with workdir_lock.WorkdirLock(workdir, enabled=is_writer):
    tok = builtin_source.load_text_tokenizer(config)
    data = training_data.make_training_data(config, tok, jax.process_index(), jax.process_count())
    if is_writer:
      _write_run_files(config, workdir, tok)
    return _train_locked(config, workdir, stop_at, from_step, mesh, tok, data, is_writer)


def _train_locked(
  config, workdir: epath.Path, stop_at, from_step, mesh, tok, data, is_writer: bool
) -> TrainResult:
  tx = state_lib.make_optimizer(config.train)
  graphdef, abstract_state, shardings = state_lib.state_shardings(config, tx, mesh)
  ckpt = checkpoints.Checkpointer(workdir / runs.CHECKPOINT_DIR, keep=config.train.keep_checkpoints)
  if from_step is not None:
    if from_step not in ckpt.all_steps():
      raise checkpoints.CheckpointNotFoundError(
        f'--step {from_step}: no checkpoint for that step in {ckpt.directory}; saved steps: '
        f'{ckpt.all_steps()}'
      )
    for line in ckpt.set_aside_newer(from_step):
      print(line, flush=True)
  if not ckpt.all_steps() and config.train.init_from:
    state = init_from.initial_state(config, tx, abstract_state, shardings)
    if config.train.get('init_word_rows'):
      state['params'] = new_words.init_word_rows(state['params'], tok, config.train.init_word_rows)
    start = 0
    print(f'initialised from {config.train.init_from} (params only, fresh optimizer)', flush=True)
  elif not ckpt.all_steps():
    state = jax.jit(lambda: state_lib.init_state(config, tx), out_shardings=shardings)()
    start = 0
  else:  # The newest checkpoint that restores; damaged newer ones are moved aside.
    restored = runs.restore_run(
      workdir,
      None,
      params_only=False,
      mesh=mesh,
      config=config,
      abstract_state=abstract_state,
      checkpointer=ckpt,
    )
    start, state = restored.step, restored.state
    try:
      data_state = ckpt.restore_data_state(start)
    except Exception as error:  # orbax raises many kinds
      raise checkpoints.CheckpointDamagedError(
        f'checkpoint {start} in {workdir}: its data-iterator state cannot be read '
        f'({checkpoints.diagnose(epath.Path(ckpt.directory) / str(start), error)}); move the step directory '
        'away to resume from an older one',
        step=start,
        cause='data state',
      ) from error
    if data_state is None:
      raise checkpoints.CheckpointDamagedError(
        f'checkpoint {start} in {workdir} has no data-iterator state; it was written by an '
        'older version, start a new --workdir',
        step=start,
        cause='no data state',
      )
    data.set_state(data_state)
    print(f'resumed from step {start} in {workdir}', flush=True)

  total = config.train.steps
  writer = log_utils.MetricWriter(str(workdir / 'tb'))
  progress = log_utils.ProgressLogger(
    total, config.train.log_every, start_step=start, items_per_step=config.train.batch_size
  )
  metrics_log = MetricsLog(workdir / 'metrics.jsonl', enabled=is_writer, resumed_step=start)
  if jax.process_count() > 1:
    print(
      f'process {jax.process_index()}/{jax.process_count()}: {jax.local_device_count()} local devices '
      f'of {jax.device_count()}',
      flush=True,
    )
  t_start = time.monotonic()
  pending = None  # (step, device metrics) fetched one step late.
  last_saved = start if start else None
  metrics_host: dict = {}
  rate_clock = {'step': start, 'time': t_start}
  step = start
  preempted = False
  train_step = None

  def finish(step_done: int, device_metrics, last_of_invocation: bool = False) -> dict:
    host = {k: float(v) for k, v in jax.device_get(device_metrics).items()}
    _check_finite(step_done, host, str(workdir), last_saved)
    if step_done % config.train.log_every == 0 or step_done == total or last_of_invocation:
      now = time.monotonic()
      rate = (
        (step_done - rate_clock['step'])
        * config.train.batch_size
        / max(now - rate_clock['time'], 1e-9)
      )
      rate_clock.update(step=step_done, time=now)
      writer.scalars(step_done, {**host, 'sequences_per_s': rate})
      metrics_log.write({'step': step_done, 'minutes': (now - t_start) / 60, **host})
    progress.update(step_done, {k: host[k] for k in ('loss', 'lm_loss', 'im_loss', 'grad_norm')})
    return host

  with preemption.PreemptionWatch(ckpt) as watch:
    if jax.process_count() == 1 and watch.requested() and step < total:
      print(
        f'stop requested before step {step + 1} started: nothing new to save; rerun to continue',
        flush=True,
      )
      ckpt.close()
      writer.close()
      return TrainResult(str(workdir), step, {}, (time.monotonic() - t_start) / 60, preempted=True)
    while step < total:
      local_rows = data.next_batch()  # This process's share of the global batch.
      if train_step is None:
        train_step = step_lib.build_train_step(
          config, graphdef, tx, shardings, mesh, tok.image_placeholder_id, local_rows
        )
      batch = rules_lib.shard_batch(local_rows, mesh, config.mesh.rules)
      state, device_metrics = train_step(state, batch)
      step += 1
      ckpt.check_for_errors()  # A failed background save stops the run at once.
      if pending is not None:
        metrics_host = finish(*pending)
      pending = (step, device_metrics)
      out_of_time = bool(
        config.train.max_minutes and (time.monotonic() - t_start) / 60 >= config.train.max_minutes
      )
      preempted = watch.reached(step)
      stopping = out_of_time or preempted or step == stop_at
      periodic_save = step % config.train.checkpoint_every == 0
      periodic_grid = (
        config.train.sample_every and step % config.train.sample_every == 0 and not preempted
      )
      if periodic_save or periodic_grid or stopping or step == total:
        metrics_host = finish(*pending, last_of_invocation=stopping)  # Finite? Only then save it.
        pending = None
        if periodic_save or stopping or step == total:
          ckpt.save(step, state, extra={'step': step}, data_state=data.get_state(), force=True)
          last_saved = step
        if (periodic_grid or step == total) and has_grid(config):
          ckpt.wait()
          save_sample_grid(config, graphdef, state['params'], tok, workdir, step, writer)
        if stopping:
          reason = (
            'preemption notice'
            if preempted
            else f'train.max_minutes={config.train.max_minutes} reached'
            if out_of_time
            else 'stop_at'
          )
          print(
            f'{reason}: stopped at step {step}; checkpoint saved, rerun to continue', flush=True
          )
          break
  ckpt.close()  # Waits for the last save to be committed.
  writer.close()
  return TrainResult(str(workdir), step, metrics_host, (time.monotonic() - t_start) / 60, preempted)


def _write_run_files(config, workdir: epath.Path, tok) -> None:
  """config.json and the text tokenizer (tokenizer.model, or tokenizer.json with text.tokenizer='hf'):
  everything `nextstep-sample --workdir` needs besides weights."""
  config_path = workdir / runs.CONFIG_FILE
  text = configlib.config_to_json(config)
  if (
    config_path.exists()
    and configlib.with_base_defaults(configlib.config_from_json(config_path.read_text())).model
    != config.model
  ):
    raise configlib.ConfigError(
      f'{workdir} holds a run with a different model config; use a new '
      '--workdir or the same config to resume'
    )
  config_path.write_text(text)
  name = runs.HF_TOKENIZER_FILE if config.text.tokenizer == 'hf' else runs.TOKENIZER_FILE
  (workdir / name).write_bytes(epath.Path(tok.path).read_bytes())
