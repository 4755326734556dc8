"""Shared pytest fixtures.

Tokenizer fixtures (`hf_tokenizer_dir`, `sp_model_path`) build small tokenizers locally, with no
network: a Qwen2-style byte-level BPE `tokenizer.json` and a SentencePiece model trained by
`qwen2_jax.tokenizer.train_sentencepiece`, both on an in-test multilingual corpus.
"""

from __future__ import annotations

import json
import os

import pytest

# Sharding tests (tests/test_sharding.py) compare 8-device meshes with one device in the same
# process, so the CPU backend gets 8 fake devices; this must happen before any test initialises
# JAX. Unsharded arrays still live on device 0. JAX_PLATFORMS=cpu (unless set) keeps an
# installed libtpu from probing for a TPU on every test run.
os.environ.setdefault("JAX_PLATFORMS", "cpu")
import jax  # noqa: E402  pylint: disable=wrong-import-position

jax.config.update("jax_num_cpu_devices", 8)

# Qwen2's pre-tokenizer split: contractions, letter runs with one leading non-letter, single
# digits (this is what splits numbers one digit per token), punctuation runs, newline runs,
# whitespace.
QWEN2_SPLIT_REGEX = (r"(?i:'s|'t|'re|'ve|'m|'ll|'d)|[^\r\n\p{L}\p{N}]?\p{L}+|\p{N}"
                     r"| ?[^\s\p{L}\p{N}]+[\r\n]*|\s*[\r\n]+|\s+(?!\S)|\s+")

# Qwen2's real control-token ids; the fixture pads its vocabulary so they land there.
QWEN2_SPECIAL_IDS = {"<|endoftext|>": 151643, "<|im_start|>": 151644, "<|im_end|>": 151645}

# A Qwen2-style chat template, written from the ChatML rules in the reference notes.
QWEN2_CHAT_TEMPLATE = (
    "{% for message in messages %}"
    "{% if loop.first and message['role'] != 'system' %}"
    "{{ '<|im_start|>system\\nYou are a helpful assistant.<|im_end|>\\n' }}"
    "{% endif %}"
    "{{ '<|im_start|>' + message['role'] + '\\n' + message['content'] + '<|im_end|>\\n' }}"
    "{% endfor %}"
    "{% if add_generation_prompt %}{{ '<|im_start|>assistant\\n' }}{% endif %}")

_SENTENCES = [
    "The quick brown fox jumps over the lazy dog.",
    "Tokenizers split text into pieces that a language model can read.",
    "It's 2024 and we're training a small model; they'll see 12345 tokens.",
    "今天天气很好，我们去公园散步吧。",
    "机器学习是人工智能的一个分支。",
    "東京は日本の首都です。ひらがなとカタカナを使います。",
    "私は猫が好きです。",
    "مرحبا بالعالم، هذه جملة باللغة العربية.",
    "Ich möchte ein Glas Wasser, bitte. Ça va très bien, merci!",
    "Emoji time 😀🎉 and 👍 are fun.",
    "def add(a, b):\n    return a + b",
    "for i in range(10):\n\tprint(i * 2)",
    "if (x == 42) { return y; }  // comment",
]


def tokenizer_corpus(repeats: int = 20) -> list[str]:
  """A small multilingual corpus: the sentences above with numbered variations."""
  lines = []
  for r in range(repeats):
    for i, s in enumerate(_SENTENCES):
      lines.append(f"{s} {r * 7 + i}")
  return lines


def build_hf_tokenizer_dir(out_dir, *, vocab_size: int = 600) -> None:
  """Writes a Qwen2-style `tokenizer.json` and `tokenizer_config.json` into `out_dir`.

  Byte-level BPE with NFC, Qwen2's split regex, and the 3 control tokens as added special tokens
  at Qwen2's ids. To reach those ids the BPE vocab is padded with filler entries that no merge
  can produce, so they never appear in encodings.
  """
  from tokenizers import (AddedToken, Regex, Tokenizer, decoders, models,  # pylint: disable=import-outside-toplevel
                          normalizers, pre_tokenizers, trainers)

  tok = Tokenizer(models.BPE())
  tok.normalizer = normalizers.NFC()
  tok.pre_tokenizer = pre_tokenizers.Sequence([
      pre_tokenizers.Split(Regex(QWEN2_SPLIT_REGEX), behavior="isolated"),
      pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=False)])
  tok.decoder = decoders.ByteLevel()
  trainer = trainers.BpeTrainer(vocab_size=vocab_size, show_progress=False,
                                initial_alphabet=pre_tokenizers.ByteLevel.alphabet())
  tok.train_from_iterator(tokenizer_corpus(), trainer=trainer)
  spec = json.loads(tok.to_str())
  vocab = spec["model"]["vocab"]
  first_special = min(QWEN2_SPECIAL_IDS.values())
  for i in range(len(vocab), first_special):
    vocab[f"<|filler_{i}|>"] = i
  tok = Tokenizer.from_str(json.dumps(spec))
  tok.add_special_tokens([AddedToken(t, special=True, normalized=False)
                          for t in sorted(QWEN2_SPECIAL_IDS, key=QWEN2_SPECIAL_IDS.get)])
  tok.save(str(out_dir / "tokenizer.json"))
  config = {
      "tokenizer_class": "Qwen2Tokenizer",
      "added_tokens_decoder": {
          str(i): {"content": t, "special": True, "lstrip": False, "rstrip": False,
                   "normalized": False, "single_word": False}
          for t, i in QWEN2_SPECIAL_IDS.items()},
      "additional_special_tokens": ["<|im_start|>", "<|im_end|>"],
      "bos_token": None,
      "eos_token": "<|endoftext|>",
      "pad_token": "<|endoftext|>",
      "unk_token": None,
      "model_max_length": 32768,
      "chat_template": QWEN2_CHAT_TEMPLATE,
  }
  (out_dir / "tokenizer_config.json").write_text(json.dumps(config, indent=2), encoding="utf-8")


@pytest.fixture(scope="session")
def hf_tokenizer_dir(tmp_path_factory):
  """Directory with a Qwen2-style HF `tokenizer.json` + `tokenizer_config.json`."""
  out = tmp_path_factory.mktemp("hf_tokenizer")
  build_hf_tokenizer_dir(out)
  return out


@pytest.fixture(scope="session")
def sp_model_path(tmp_path_factory):
  """Path of a small SentencePiece BPE `.model` trained with `train_sentencepiece`."""
  from qwen2_jax.tokenizer import train_sentencepiece  # pylint: disable=import-outside-toplevel

  out = tmp_path_factory.mktemp("sp_tokenizer")
  corpus = out / "corpus.txt"
  corpus.write_text("\n".join(tokenizer_corpus()) + "\n", encoding="utf-8")
  return train_sentencepiece([corpus], out / "sp", vocab_size=400, verbose=False)
