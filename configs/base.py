"""The base config: every field at its default. The fields are documented once, in
nextstep_jax/config_defaults.py (the package's own defaults, which the converter and stored-run
loading also use). Experiment files build on this one by path:

  base = configlib.config_module('base.py', __file__)
"""

from nextstep_jax import config_defaults

get_base_config = config_defaults.get_base_config


def get_config(arg=None):
  del arg
  return get_base_config()
