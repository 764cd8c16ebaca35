"""nextstep-jax: NextStep-1 in JAX/Flax NNX.

`pip install -e .` is the runtime (what `make demo` installs: no torch, transformers,
tensorflow-datasets or libtpu); `pip install -e '.[test,parity,tfds,tpu-aot]'` is what `make test`
installs. See the Makefile and CONTRIBUTING.md.
"""

import re

import setuptools

VERSION = re.search(
  r"__version__ = '([^']+)'", open('nextstep_jax/__init__.py', encoding='utf-8').read()
).group(1)

setuptools.setup(
  name='nextstep-jax',
  version=VERSION,
  description='NextStep-1 (autoregressive image generation with continuous tokens) in JAX/Flax',
  long_description=open('README.md', encoding='utf-8').read(),
  long_description_content_type='text/markdown',
  license='Apache-2.0',
  python_requires='>=3.10',
  # Config files are data loaded by path (nextstep_jax.configlib), not an installed package.
  packages=setuptools.find_packages(include=('nextstep_jax', 'nextstep_jax.*')),
  install_requires=[
    'jax~=0.10.2',
    'flax~=0.12.8',
    'optax~=0.2.8',
    'orbax-checkpoint~=0.12.8',
    'grain~=0.2.18',
    'ml-collections~=1.1',
    'sentencepiece~=0.2.3',
    'numpy',
    'Pillow',
    'scikit-learn',  # Ships the built-in digits data set; the digit evaluator's classifier.
    'scipy',  # Connected components and matrix square roots in the evaluators.
    'tensorboardX~=2.6',  # TensorBoard event files without TensorFlow.
    # Official checkpoints (nextstep-convert): safetensors reads the released shards tensor by
    # tensor (memory-mapped, bf16 via ml_dtypes, no torch); tokenizers loads tokenizer.json.
    'safetensors>=0.4',
    'tokenizers>=0.20',
    'array-record~=0.8.6',  # Data shards (nextstep-data, the Grain pipeline).
    'etils[epath]',  # Workdir files on local disks and gs:// alike.
    'absl-py>=1.4',  # absl.flags: Grain's worker flags.
    'ml_dtypes>=0.5',  # bfloat16 numpy arrays (checkpoint import).
    'threadpoolctl>=3',  # Pins BLAS threads in the digit evaluator.
    'qwix~=0.1.8',  # Quantization and LoRA.
  ],
  extras_require={
    # Development: the test runner, plots the tests draw, the lint and import-layer checks.
    'test': [
      'pytest',
      'pytest-xdist',
      'matplotlib',
      'import-linter~=2.1',
      'ruff==0.17.6',
      'pre-commit',
    ],
    # PyTorch references of the parity tests and benchmarks (tests marked `torch`).
    'parity': ['torch==2.13.0', 'transformers~=5.24'],
    'tfds': ['tensorflow-datasets~=4.9'],  # data.source=tfds, build --from tfds.
    # nextstep-aot: TPU topologies and compiles without TPUs (tests marked `tpu_aot`).
    'tpu-aot': ['libtpu==0.0.42.*'],
    # Pod runs: TPU wheels of the pinned jax; gs:// workdirs (etils.epath, TensorBoard events).
    'tpu': ['jax[tpu]~=0.10.2'],
    'gcs': ['gcsfs', 'google-cloud-storage'],
    'sweep': ['matplotlib'],  # nextstep-sweep plots.
  },
  entry_points={
    'console_scripts': [
      'nextstep-train=nextstep_jax.cli.train:main',
      'nextstep-sample=nextstep_jax.cli.sample:main',
      'nextstep-convert=nextstep_jax.cli.convert:main',
      'nextstep-data=nextstep_jax.cli.data:main',
      'nextstep-sweep=nextstep_jax.cli.sweep:main',
      'nextstep-train-tokenizer=nextstep_jax.cli.train_tokenizer:main',
      'nextstep-eval-tokenizer=nextstep_jax.cli.eval_tokenizer:main',
      'nextstep-aot=nextstep_jax.cli.aot:main',
      'nextstep-merge-lora=nextstep_jax.cli.merge_lora:main',
    ],
  },
)
