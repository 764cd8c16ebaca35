"""Config loading, overrides, validation and JSON round trip."""

import json
import sys
import textwrap

import pytest

from nextstep_jax import configlib
from nextstep_jax.config_defaults import get_base_config
from nextstep_jax.configlib import ConfigError

EXPERIMENT_FILE = textwrap.dedent("""
    from nextstep_jax.config_defaults import get_base_config

    def get_config(arg=None):
      config = get_base_config()
      config.name = 'tmp'
      if arg == 'small':
        config.model.num_layers = 2
      return config
""")


@pytest.fixture
def config_path(tmp_path):
  path = tmp_path / 'experiment.py'
  path.write_text(EXPERIMENT_FILE)
  return str(path)


def test_base_config_is_valid():
  configlib.validate(get_base_config())


def test_load_config_variant_and_overrides(config_path):
  config = configlib.load_config(
    f'{config_path}:small',
    [
      'train.steps=100',
      '--config.train.lr=3e-4',
      'model.attention_bias=false',
      'config.sample.solver=heun',
      "mesh.rules=(('batch', 'data'), ('length', None))",
    ],
  )
  assert (config.name, config.model.num_layers) == ('tmp', 2)
  assert config.train.steps == 100 and isinstance(config.train.steps, int)
  assert config.train.lr == pytest.approx(3e-4)
  assert config.model.attention_bias is False
  assert config.sample.solver == 'heun'
  assert config.mesh.rules == (('batch', 'data'), ('length', None))
  with pytest.raises(AttributeError):
    config.new_field = 1  # Locked.


def test_load_config_without_variant(config_path):
  assert configlib.load_config(config_path).model.num_layers == 4


def test_float_field_accepts_integer_text(config_path):
  assert configlib.load_config(config_path, ['train.lr=1']).train.lr == 1.0


def test_unknown_field_names_close_matches(config_path):
  with pytest.raises(ConfigError, match=r"'train\.stepz'.*train\.steps"):
    configlib.load_config(config_path, ['train.stepz=5'])


@pytest.mark.parametrize(
  'override', ['train.steps=ten', 'model.attention_bias=maybe', 'mesh.rules=3', 'train.steps']
)
def test_bad_override_values(config_path, override):
  with pytest.raises(ConfigError):
    configlib.load_config(config_path, [override])


def test_missing_file_and_missing_get_config(tmp_path):
  with pytest.raises(ConfigError, match='not found'):
    configlib.load_config(str(tmp_path / 'nope.py'))
  empty = tmp_path / 'empty.py'
  empty.write_text('X = 1\n')
  with pytest.raises(ConfigError, match='get_config'):
    configlib.load_config(str(empty))


@pytest.mark.parametrize(
  'field, value, message',
  [
    ('model.hidden_size', 0, 'model.hidden_size=0 must be > 0'),
    ('model.num_kv_heads', 3, 'multiple of model.num_kv_heads=3'),
    ('image.size', 30, 'image.size=30 must be divisible by'),
    ('sample.solver', 'rk4', 'sample.solver'),
    ('sample.time_grid', 'C', 'sample.time_grid'),
    ('sample.cfg_schedule', 'cosine', 'sample.cfg_schedule'),
    ('model.remat_policy', 'some', 'model.remat_policy'),
    ('train.lr_schedule', 'linear', 'train.lr_schedule'),
    ('model.dtype', 'float8', 'model.dtype'),
    ('model.param_dtype', 'f32', 'model.param_dtype'),
    ('data.drop_text_prob', 1.0, 'data.drop_text_prob'),
    ('data.drop_text_prob', -0.1, 'data.drop_text_prob'),
    ('loss.fm_head_batch_mul', 0, 'loss.fm_head_batch_mul'),
    ('mesh.fsdp', 0, 'mesh.fsdp=0'),
    ('mesh.tensor', -1, 'at most one of data/fsdp/tensor may be -1'),
    ('mesh.rules', (('batch', 'model'),), 'unknown mesh axes'),
    ('image.tokenizer', 'jpeg', 'image.tokenizer'),
    ('model.latent_channels', 16, 'must be 3 with image.tokenizer=pixels'),
    ('loss.head_objective', 'meanflow', 'loss.head_objective'),
    ('loss.head_objective', 'shortcut', 'set model.fm_head_step_cond=True'),
    (
      'sample.times',
      (0.0, 0.7),
      r'sample.times=\(0.0, 0.7\) must increase strictly from 0.0 to 1.0',
    ),
    ('sample.token_steps', (4, 0), 'sample.token_steps'),
    ('train.microbatches', 0, 'train.microbatches=0 must be an integer >= 1'),
    (
      'train.microbatches',
      3,
      r'train.microbatches=3 must divide train.batch_size=64: set train.batch_size '
      r'to a multiple of 3 \(e.g. 63\) or train.microbatches to a divisor of 64',
    ),
  ],
)
def test_validate_rejects(field, value, message):
  config = get_base_config()
  group, name = field.split('.')
  config[group][name] = value
  with pytest.raises(ConfigError, match=message):
    configlib.validate(config)


def test_validate_lists_every_problem():
  config = get_base_config()
  config.model.hidden_size = 0
  config.sample.solver = 'rk4'
  with pytest.raises(ConfigError) as error:
    configlib.validate(config)
  assert 'model.hidden_size' in str(error.value) and 'sample.solver' in str(error.value)


def test_vocab_needs_spare_rows():
  config = get_base_config()
  config.text.vocab_size = 256
  config.model.vocab_size = 272
  configlib.validate(config)
  config.model.vocab_size = 271
  with pytest.raises(ConfigError, match=r'model.vocab_size=271 .* text.vocab_size \+ 16 = 272'):
    configlib.validate(config)


def test_max_seq_len_boundary():
  config = get_base_config()
  config.image.size, config.model.latent_patch_size, config.text.max_caption_tokens = 32, 4, 24
  # 32 px / 4 patch = 8x8: caption 24 + <image_area> 1 + "8*8" 3 + boi 1 + 64 + eoi 1 + eos 1.
  assert configlib.required_seq_len(config) == 95
  config.model.max_seq_len = 95
  configlib.validate(config)
  config.model.max_seq_len = 94
  with pytest.raises(ConfigError, match=r'max_seq_len=94 .* needs 95'):
    configlib.validate(config)


def test_vae_tokenizer_grid():
  config = get_base_config()
  config.text.max_caption_tokens = 24
  config.image.tokenizer = 'vae'
  config.image.size = 256
  config.model.latent_channels = 16
  config.model.latent_patch_size = 2
  config.model.max_seq_len = 1100
  configlib.validate(config)
  assert configlib.image_grid(config) == (16, 16)
  assert configlib.token_dim(config) == 64
  # caption 24 + 1 + "16*16" 5 + boi 1 + 256 + eoi 1 + eos 1.
  assert configlib.required_seq_len(config) == 289


def test_image_grid_and_token_dim():
  config = get_base_config()
  config.image.size, config.model.latent_patch_size = 32, 4
  assert configlib.image_grid(config) == (8, 8)
  assert configlib.token_dim(config) == 48


def test_json_round_trip(config_path):
  config = configlib.load_config(config_path, ['train.steps=7'])
  restored = configlib.config_from_json(configlib.config_to_json(config))
  assert restored.to_dict() == config.to_dict()
  assert isinstance(restored.mesh.rules[0], tuple)
  configlib.validate(restored)
  with pytest.raises(AttributeError):
    restored.new_field = 1


@pytest.mark.parametrize(
  'name', sorted(path.name for path in (configlib.REPO_ROOT / 'configs').glob('*.py'))
)
def test_experiment_configs_are_valid(name):
  configlib.validate(configlib.load_config(f'configs/{name}', USER_FIELDS.get(name, ())))


# Fields a config leaves to its user (paths of their data and weights).
USER_FIELDS = {
  'nextstep1_finetune.py': (
    'text.tokenizer_json=release/tokenizer.json',
    'data.latent_cache_paths=latents-*.array_record',
  )
}


def test_configs_path_resolves_from_any_directory(tmp_path, monkeypatch):
  monkeypatch.chdir(tmp_path)
  assert configlib.load_config('configs/tiny.py').name
  assert (
    configlib.load_config('configs/digits.py').data.dataset == 'digits'
  )  # digits -> shapes -> base


def test_a_config_builds_on_another_by_path_relative_to_its_file(tmp_path, monkeypatch):
  """Configs are data loaded by path: no `configs` package is imported (none is installed)."""
  (tmp_path / 'parent.py').write_text(
    textwrap.dedent("""
      from nextstep_jax import config_defaults

      def get_config(arg=None):
        c = config_defaults.get_base_config()
        c.name = 'parent'
        return c
  """)
  )
  (tmp_path / 'sub').mkdir()
  (tmp_path / 'sub' / 'child.py').write_text(
    textwrap.dedent("""
      from nextstep_jax import configlib

      parent = configlib.config_module('../parent.py', __file__)

      def get_config(arg=None):
        c = parent.get_config()
        c.name = 'child-' + (arg or 'plain')
        return c
  """)
  )
  monkeypatch.chdir(tmp_path / 'sub')
  assert configlib.load_config(str(tmp_path / 'sub' / 'child.py') + ':x').name == 'child-x'
  assert 'configs' not in sys.modules
  with pytest.raises(ConfigError, match='not found'):
    configlib.config_module('missing.py', __file__)


def test_use_norm_is_refused_with_the_pixels_tokenizer():
  config = get_base_config()
  config.image.use_norm = True
  with pytest.raises(configlib.ConfigError, match='image.use_norm'):
    configlib.validate(config)


def test_with_base_defaults_completes_old_run_configs():
  """A run config stored before a field existed gets the field's default; stored values win."""
  stored = get_base_config().to_dict()
  del stored['sample']['token_steps']
  del stored['model']['fm_head_step_cond']
  stored['model']['num_layers'] = 7
  old = configlib.config_from_json(json.dumps(stored))
  merged = configlib.with_base_defaults(old)
  assert merged.sample.token_steps == () and merged.model.fm_head_step_cond is False
  assert merged.model.num_layers == 7
