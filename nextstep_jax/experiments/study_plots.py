"""PNGs of a scaling study (`study.run_study`): isoFLOP curves, fitted laws with bootstrap bands and
the predicted-versus-measured point, and the head-allocation table."""

import math

import matplotlib
import numpy as np
from etils import epath

matplotlib.use('Agg')
from matplotlib import pyplot as plt
from matplotlib import ticker

from nextstep_jax.experiments import scaling


def _save(fig, path: epath.Path) -> None:
  fig.tight_layout()
  with path.open('wb') as f:
    fig.savefig(f, format='png', dpi=130)
  plt.close(fig)


def isoflop_curves(path: epath.Path, summary: dict) -> None:
  """Eval loss against N per budget, the fitted parabolas in log N and their vertices."""
  fig, ax = plt.subplots(figsize=(6.4, 4.4))
  by_name = {r['name']: r for r in summary['runs']}
  for index, budget in enumerate(summary['isoflop_budgets']):
    color = f'C{index}'
    rows = [by_name[name] for name in budget['runs']]
    n = np.array([r['non_embedding_params'] for r in rows])
    loss = np.array([r['eval_loss'] for r in rows])
    ax.scatter(n, loss, color=color, zorder=3, label=f'C = {budget["budget"]:.2g} FLOPs')
    log_n = np.log(n)
    coeffs = np.polyfit(log_n - log_n.mean(), loss, 2)
    grid = np.linspace(log_n.min() - 0.2, log_n.max() + 0.2, 100)
    ax.plot(np.exp(grid), np.polyval(coeffs, grid - log_n.mean()), color=color, alpha=0.7)
    ax.scatter(
      [budget['n_opt']],
      [budget['loss_opt']],
      color=color,
      marker='*',
      s=120,
      edgecolor='k',
      zorder=4,
    )
  ax.set_xscale('log')
  ax.set_xlabel('non-embedding parameters N')
  ax.set_ylabel('held-out eval loss')
  ax.set_title('isoFLOP curves (parabola in log N; star: loss-optimal N*)', fontsize=8)
  ax.legend(fontsize=7)
  _save(fig, path)


def _band(
  draws: list[dict], grid: np.ndarray, falling: bool, level: float
) -> tuple[np.ndarray, np.ndarray]:
  values = np.array([[scaling.law_value(law, c, falling) for c in grid] for law in draws])
  lo, hi = 100 * (1 - level) / 2, 100 * (1 + level) / 2
  return np.percentile(values, lo, axis=0), np.percentile(values, hi, axis=0)


def fitted_laws(path: epath.Path, summary: dict, boot: dict) -> None:
  """N*(C) and L*(C): per-budget optima, the fitted laws, their bootstrap bands and the prediction."""
  optima = summary['isoflop_budgets']
  prediction = summary['prediction']
  c = np.array([o['budget'] for o in optima])
  grid = np.geomspace(c.min() / 1.5, prediction['budget'] * 1.5, 60)
  fig, axes = plt.subplots(1, 2, figsize=(10, 4.2))
  for ax, key, law_key, falling, label in (
    (axes[0], 'n_opt', 'n_opt_law', False, 'optimal N*'),
    (axes[1], 'loss_opt', 'loss_law', True, 'eval loss L*'),
  ):
    law = summary[law_key]
    lo, hi = _band(boot['draws'][law_key], grid, falling, boot['level'])
    ax.fill_between(
      grid, lo, hi, alpha=0.25, color='C0', label=f'{100 * boot["level"]:.0f}% bootstrap band'
    )
    sign = '-' if falling else ''
    ax.plot(
      grid,
      [scaling.law_value(law, g, falling) for g in grid],
      color='C0',
      label=f'{law["coefficient"]:.3g} C^{sign}{law["exponent"]:.3f}',
    )
    ax.scatter(c, [o[key] for o in optima], color='C0', zorder=3, label='isoFLOP optima (fitted)')
    interval = prediction[f'predicted_{"n_opt" if key == "n_opt" else "eval_loss"}_interval']
    predicted = prediction['predicted_n_opt' if key == 'n_opt' else 'predicted_eval_loss']
    ax.errorbar(
      [prediction['budget']],
      [predicted],
      yerr=[[predicted - interval[0]], [interval[1] - predicted]],
      fmt='s',
      color='C1',
      capsize=4,
      label='predicted',
    )
    measured = (
      prediction.get('measured_eval_loss')
      if key == 'loss_opt'
      else prediction['run_non_embedding_params']
    )
    if measured is not None:
      ax.scatter(
        [prediction['budget']],
        [measured],
        marker='x',
        s=80,
        color='C3',
        zorder=4,
        label='measured' if key == 'loss_opt' else 'size run (nearest family shape)',
      )
    ax.set_xscale('log')
    ax.set_yscale('log')
    ax.xaxis.set_minor_formatter(ticker.NullFormatter())  # Minor labels of a narrow range overlap.
    ax.set_xlabel('training FLOPs C')
    ax.set_ylabel(label)
    ax.legend(fontsize=7)
  rel = prediction.get('relative_error')
  fig.suptitle(
    'fitted laws'
    + (
      f'; prediction at {prediction["budget"]:.2g} FLOPs: relative error {100 * rel:.1f}%'
      if rel is not None
      else ''
    ),
    fontsize=9,
  )
  _save(fig, path)


def head_allocation(path: epath.Path, summary: dict) -> None:
  """Eval loss and evaluator accuracy against the head's share of the non-embedding parameters."""
  rows = summary['head_allocation']
  if not rows:
    return
  share = [r['head_share'] for r in rows]
  fig, ax = plt.subplots(figsize=(6.4, 4.2))
  ax.plot(share, [r['eval_loss'] for r in rows], 'o-', color='C0')
  for r in rows:
    ax.annotate(
      f'h{r["fm_head_dim"]}x{r["fm_head_layers"]} w{r["width"]}',
      (r['head_share'], r['eval_loss']),
      fontsize=6,
      xytext=(3, 3),
      textcoords='offset points',
    )
  ax.set_xlabel('flow head share of non-embedding parameters')
  ax.set_ylabel('held-out eval loss', color='C0')
  twin = ax.twinx()
  suites = (
    ('shapes_seen_accuracy_one', 'seen one-object', 's--'),
    ('shapes_seen_accuracy_two', 'seen two-object', '^:'),
    ('shapes_heldout_accuracy', 'held-out', 'v-.'),
  )
  for (key, label, style), color in zip(suites, ('C1', 'C2', 'C3'), strict=True):
    accuracy = [r.get(key) for r in rows]
    twin.plot(
      share, [math.nan if a is None else a for a in accuracy], style, color=color, label=label
    )
  twin.set_ylabel('evaluator prompt accuracy')
  twin.legend(fontsize=7, loc='upper right')
  ax.set_title(f'head vs backbone at C = {rows[0]["budget"]:.2g} FLOPs', fontsize=8)
  _save(fig, path)


def write_all(out: epath.Path, stem: str, summary: dict, boot: dict) -> None:
  isoflop_curves(out / f'{stem}_isoflop.png', summary)
  fitted_laws(out / f'{stem}_laws.png', summary, boot)
  head_allocation(out / f'{stem}_head_allocation.png', summary)
