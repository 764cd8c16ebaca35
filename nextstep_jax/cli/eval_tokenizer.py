"""nextstep-eval-tokenizer --workdir DIR [--workdir DIR2 ...] [--labels A B] [--num 256]
    [--sigmas 0 0.1 0.2 0.4 0.8] [--out results.json] [--plot robustness.png]

PSNR/SSIM of each tokenizer run on held-out images and its robustness curve (PSNR of
decode(z + sigma * eps)); writes DIR/eval.json, optionally a combined JSON and a PNG plot.
"""

import json
import pathlib
import sys

from nextstep_jax.cli import entry

DEFAULT_SIGMAS = (0.0, 0.1, 0.2, 0.3, 0.5, 0.8)


def main(argv=None) -> int:
  return entry.run(_main, argv)


def _main(argv) -> int:
  parser = entry.ArgumentParser(description=__doc__)
  parser.add_argument(
    '--workdir', action='append', required=True, help='tokenizer run (repeatable)'
  )
  parser.add_argument('--labels', nargs='*', default=None, help='one label per --workdir')
  parser.add_argument('--num', type=int, default=256, help='held-out images')
  parser.add_argument('--sigmas', type=float, nargs='*', default=DEFAULT_SIGMAS)
  parser.add_argument('--out', default=None, help='combined JSON {label: result}')
  parser.add_argument('--plot', default=None, help='robustness curves PNG')
  args = parser.parse_args(argv)
  if args.num < 1:
    parser.error(f'--num {args.num} must be >= 1')
  labels = args.labels or [pathlib.Path(w).name for w in args.workdir]
  if len(labels) != len(args.workdir):
    parser.error(f'{len(labels)} labels for {len(args.workdir)} workdirs; give one per --workdir')
  from nextstep_jax.evaluate import tokenizer_eval  # after flag errors

  results = {}
  for label, workdir in zip(labels, args.workdir):
    results[label] = tokenizer_eval.evaluate_run(workdir, args.num, args.sigmas)
    curve = ', '.join(f'{s}: {p:.2f}' for s, p in results[label]['robustness'].items())
    print(
      f'{label}: PSNR {results[label]["psnr"]:.2f} dB, SSIM {results[label]["ssim"]:.4f} '
      f'(n={results[label]["n"]}); robustness {{{curve}}}',
      flush=True,
    )
  if args.out:
    pathlib.Path(args.out).write_text(json.dumps(results, indent=2))
  if args.plot:
    tokenizer_eval.plot_robustness(results, args.plot)
  return 0


if __name__ == '__main__':
  sys.exit(main())
