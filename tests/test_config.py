"""Qwen2Config: HF spellings in and out, strictness, validation errors naming the field, presets."""

from __future__ import annotations

import json

import jax
import pytest

import qwen2_jax as q
from qwen2_jax.config import ConfigError, Qwen2Config, num_params

PUBLISHED = {  # parameter counts of the released checkpoints
    "qwen2-0.5b": 494_032_768,
    "qwen2-1.5b": 1_543_714_304,
    "qwen2-7b": 7_615_616_512,
    "qwen2-72b": 72_706_203_648,
    "qwen2.5-0.5b": 494_032_768,
    "qwen2.5-1.5b": 1_543_714_304,
    "qwen2.5-3b": 3_085_938_688,
    "qwen2.5-7b": 7_615_616_512,
    "qwen2.5-14b": 14_770_033_664,
    "qwen2.5-32b": 32_763_876_352,
    "qwen2.5-72b": 72_706_203_648,
}

# The 7B config.json as published (rope_theta + rope_scaling spelling, transformers 4.x era).
PUBLISHED_7B_JSON = {
    "architectures": ["Qwen2ForCausalLM"], "attention_dropout": 0.0, "bos_token_id": 151643,
    "eos_token_id": 151643, "hidden_act": "silu", "hidden_size": 3584, "initializer_range": 0.02,
    "intermediate_size": 18944, "max_position_embeddings": 131072, "max_window_layers": 28,
    "model_type": "qwen2", "num_attention_heads": 28, "num_hidden_layers": 28,
    "num_key_value_heads": 4, "rms_norm_eps": 1e-06, "rope_theta": 1000000.0,
    "sliding_window": 131072, "tie_word_embeddings": False, "torch_dtype": "bfloat16",
    "transformers_version": "4.37.2", "use_cache": True, "use_sliding_window": False,
    "vocab_size": 152064,
}


@pytest.mark.parametrize("name", sorted(PUBLISHED))
def test_preset_param_count_matches_published(name):
  """jax.eval_shape of each preset's init gives the published parameter count (no memory used)."""
  config = q.get_preset(name)
  shapes = q.abstract_params(config)
  assert all(isinstance(x, jax.ShapeDtypeStruct) for x in jax.tree.leaves(shapes))
  assert q.count_params(shapes) == PUBLISHED[name]
  assert num_params(config) == PUBLISHED[name]


def test_published_config_json_reads_and_writes_back():
  """The published spelling reads; to_hf_dict writes the same model fields back."""
  config = Qwen2Config.from_hf(PUBLISHED_7B_JSON)
  assert config == q.get_preset("qwen2-7b").replace(
      max_position_embeddings=131072, extra=config.extra)
  out = config.to_hf_dict()
  for key, value in PUBLISHED_7B_JSON.items():
    if key != "transformers_version":
      assert out[key] == value, key


def test_transformers5_rope_parameters_spelling(tmp_path):
  """`rope_parameters` (transformers >= 5) gives the same config as rope_theta + rope_scaling."""
  yarn = {"type": "yarn", "factor": 4.0, "original_max_position_embeddings": 32768}
  old = dict(PUBLISHED_7B_JSON, rope_scaling=yarn)
  new = {k: v for k, v in PUBLISHED_7B_JSON.items() if k != "rope_theta"}
  new["rope_parameters"] = {"rope_theta": 1e6, "rope_type": "yarn", "factor": 4.0,
                            "original_max_position_embeddings": 32768}
  a, b = Qwen2Config.from_hf(old), Qwen2Config.from_hf(new)
  assert a.rope_theta == b.rope_theta == 1e6
  assert a.rope_type == b.rope_type == "yarn"
  assert a.rope_scaling["factor"] == b.rope_scaling["factor"] == 4.0
  (tmp_path / "config.json").write_text(json.dumps(new))
  assert Qwen2Config.from_hf(tmp_path).rope_scaling["original_max_position_embeddings"] == 32768


def test_transformers_written_config_round_trips(tmp_path):
  """A config written by transformers' save_pretrained reads back and reloads in transformers."""
  import transformers

  hf = transformers.Qwen2Config(vocab_size=99, hidden_size=32, intermediate_size=40,
                                num_hidden_layers=3, num_attention_heads=4, num_key_value_heads=2)
  hf.save_pretrained(tmp_path)
  config = Qwen2Config.from_hf(tmp_path)
  assert (config.vocab_size, config.num_hidden_layers, config.head_size) == (99, 3, 8)
  out = tmp_path / "out"
  out.mkdir()
  config.save_hf(out)
  again = transformers.AutoConfig.from_pretrained(out)
  assert again.num_key_value_heads == 2 and again.intermediate_size == 40
  assert Qwen2Config.from_hf(out) == config


@pytest.mark.parametrize("changes,field", [
    (dict(num_key_value_heads=3), "num_key_value_heads"),
    (dict(num_attention_heads=6), "num_attention_heads"),
    (dict(hidden_size=0), "hidden_size"),
    (dict(rms_norm_eps=0.0), "rms_norm_eps"),
    (dict(hidden_act="gelu"), "hidden_act"),
    (dict(use_sliding_window=True, sliding_window=None), "sliding_window"),
    (dict(attention_impl="cuda"), "attention_impl"),
    (dict(remat_policy="sometimes"), "remat_policy"),
    (dict(dtype="int8"), "dtype"),
    (dict(rope_scaling={"rope_type": "yarn"}), "rope_scaling"),
    (dict(rope_scaling={"rope_type": "magic", "factor": 2.0}), "rope_scaling"),
    (dict(num_experts=4, num_experts_per_tok=5, moe_intermediate_size=8), "num_experts_per_tok"),
    (dict(mlp_only_layers=(7,)), "mlp_only_layers"),
])
def test_inconsistent_values_raise_naming_the_field(changes, field):
  """Each inconsistent value raises ConfigError whose message names the offending field."""
  with pytest.raises(ConfigError, match=rf"Qwen2Config\.{field}:"):
    q.get_preset("qwen2-tiny").replace(**changes)


def test_project_config_rejects_unknown_keys_but_hf_keeps_them():
  """from_dict (our files) rejects unknown keys by name; from_hf keeps them in `extra`."""
  d = q.get_preset("qwen2-tiny").to_dict()
  assert Qwen2Config.from_dict(d) == q.get_preset("qwen2-tiny")
  with pytest.raises(ConfigError, match=r"hiden_size: unknown setting; did you mean hidden_size\?"):
    Qwen2Config.from_dict(dict(d, hiden_size=3))
  hf = dict(PUBLISHED_7B_JSON, some_future_field=[1, 2])
  config = Qwen2Config.from_hf(hf)
  assert dict(config.extra)["some_future_field"] == "[1, 2]"
  assert config.to_hf_dict()["some_future_field"] == [1, 2]
  with pytest.raises(ConfigError, match="model_type 'llama'"):
    Qwen2Config.from_hf(dict(PUBLISHED_7B_JSON, model_type="llama"))
  with pytest.raises(ConfigError, match="unknown preset 'qwen3-8b'"):
    q.get_preset("qwen3-8b")


def test_config_is_hashable_and_immutable():
  """Configs are hashable (jit static args) and their rope mapping cannot be mutated."""
  a = q.get_preset("qwen2-tiny", rope_scaling={"rope_type": "yarn", "factor": 2.0})
  b = q.get_preset("qwen2-tiny", rope_scaling={"rope_type": "yarn", "factor": 2.0})
  assert hash(a) == hash(b) and a == b
  assert hash(a) != hash(a.replace(dtype="bfloat16"))
  with pytest.raises(TypeError):
    a.rope_scaling["factor"] = 3.0
  with pytest.raises(Exception):
    a.hidden_size = 1
