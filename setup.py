"""nextstep-jax: NextStep-1 in JAX/Flax NNX. `pip install -e '.[test]'` (see the Makefile)."""
import re

import setuptools

VERSION = re.search(r"__version__ = '([^']+)'",
                    open('nextstep_jax/__init__.py', encoding='utf-8').read()).group(1)

setuptools.setup(
    name='nextstep-jax',
    version=VERSION,
    description='NextStep-1 (autoregressive image generation with continuous tokens) in JAX/Flax',
    long_description=open('README.md', encoding='utf-8').read(),
    long_description_content_type='text/markdown',
    license='Apache-2.0',
    python_requires='>=3.10',
    # `configs` ships as a top-level package so `--config configs/x.py` and `from configs import
    # base` work outside the repository too.
    packages=setuptools.find_packages(include=('nextstep_jax', 'nextstep_jax.*', 'configs')),
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
    ],
    extras_require={
        'test': ['pytest', 'pytest-xdist',
                 'libtpu==0.0.42.*'],  # AOT planner tests (issue 4); the lead decides.
        'tpu-aot': ['libtpu==0.0.42.*'],  # nextstep-aot: TPU topologies and compiles without TPUs.
    },
    entry_points={
        'console_scripts': [
            'nextstep-train=nextstep_jax.cli.train:main',
            'nextstep-sample=nextstep_jax.cli.sample:main',
            'nextstep-aot=nextstep_jax.cli.aot:main',
        ],
    },
)
