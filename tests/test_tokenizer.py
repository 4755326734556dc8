"""Tests for qwen2_jax.tokenizer (both backends, ChatML, SFT mask) and `qwen2-jax tokenizer`."""

from __future__ import annotations

import json
import unicodedata

import pytest

from qwen2_jax import cli
from qwen2_jax import tokenizer as tk

MULTILINGUAL = [
    "Hello, world! It's a test.",
    "我们今天学习机器学习。",
    "日本語のテキストとカタカナ、ひらがな。",
    "مرحبا بالعالم",
    "Emoji: 😀🎉👍🏽 and a flag 🇯🇵",
    "def f(x):\n\tif x:\n        return  x * 2\n\n\n# trailing spaces   \n",
    "  leading spaces, \r\n windows line, numbers 3.14159 and 1,000,000",
    "",
]

CONVERSATION = [
    {"role": "user", "content": "What is 2+2?"},
    {"role": "assistant", "content": "2+2 = 4."},
    {"role": "user", "content": "And in Chinese?"},
    {"role": "assistant", "content": "二加二等于四。"},
]

EXPECTED_WITH_DEFAULT_SYSTEM = (
    "<|im_start|>system\nYou are a helpful assistant.<|im_end|>\n"
    "<|im_start|>user\nWhat is 2+2?<|im_end|>\n"
    "<|im_start|>assistant\n2+2 = 4.<|im_end|>\n"
    "<|im_start|>user\nAnd in Chinese?<|im_end|>\n"
    "<|im_start|>assistant\n二加二等于四。<|im_end|>\n")


@pytest.fixture(scope="module")
def hf_tok(hf_tokenizer_dir):
  """The Qwen2-style HF tokenizer, loaded through load_tokenizer."""
  return tk.load_tokenizer(hf_tokenizer_dir)


@pytest.fixture(scope="module")
def sp_tok(sp_model_path):
  """The SentencePiece tokenizer trained by train_sentencepiece, loaded through load_tokenizer."""
  return tk.load_tokenizer(sp_model_path)


@pytest.fixture(scope="module", params=["hf", "sp"])
def any_tok(request, hf_tok, sp_tok):
  """Each backend in turn."""
  return {"hf": hf_tok, "sp": sp_tok}[request.param]


def test_backends_chosen_from_path(hf_tokenizer_dir, sp_model_path, tmp_path):
  """Directories, tokenizer.json files and .model files (also as dir/tokenizer.model) load."""
  assert isinstance(tk.load_tokenizer(hf_tokenizer_dir), tk.HFTokenizer)
  assert isinstance(tk.load_tokenizer(hf_tokenizer_dir / "tokenizer.json"), tk.HFTokenizer)
  assert isinstance(tk.load_tokenizer(str(sp_model_path)), tk.SentencePieceTokenizer)
  (tmp_path / "tokenizer.model").write_bytes(sp_model_path.read_bytes())
  assert isinstance(tk.load_tokenizer(tmp_path), tk.SentencePieceTokenizer)


@pytest.mark.parametrize("text", MULTILINGUAL)
def test_round_trip_exact(any_tok, text):
  """decode(encode(text)) == text for multilingual text, emoji and whitespace-heavy code."""
  ids = any_tok.encode(text)
  assert all(0 <= i < any_tok.vocab_size for i in ids)
  assert any_tok.decode(ids) == text


def test_hf_nfc_normalisation(hf_tok):
  """The HF backend NFC-normalises (as Qwen2 does): decomposed input decodes composed."""
  decomposed = "Cafe\u0301 ñ"
  assert hf_tok.decode(hf_tok.encode(decomposed)) == unicodedata.normalize("NFC", decomposed)


def test_sp_space_marker_caveat(sp_tok):
  """The one SentencePiece round-trip exception: a literal U+2581 decodes as a space."""
  assert sp_tok.decode(sp_tok.encode("a\u2581b")) == "a b"


def test_encode_batch_matches_encode(any_tok):
  """encode_batch equals encoding each text on its own."""
  assert any_tok.encode_batch(MULTILINGUAL) == [any_tok.encode(t) for t in MULTILINGUAL]


def test_hf_special_ids_and_config(hf_tok):
  """Control tokens sit at Qwen2's ids; eos/pad come from tokenizer_config.json, no bos."""
  expected = {"<|endoftext|>": 151643, "<|im_start|>": 151644, "<|im_end|>": 151645}
  assert hf_tok.special_tokens == expected
  for token, token_id in expected.items():
    assert hf_tok.token_to_id(token) == token_id
    assert hf_tok.id_to_token(token_id) == token
    assert hf_tok.encode(token) == [token_id]
  assert (hf_tok.eos_id, hf_tok.pad_id, hf_tok.bos_id) == (151643, 151643, None)
  assert hf_tok.vocab_size == 151646
  # Qwen2's tokenizer.json adds nothing around the text, so add_special_tokens is a no-op.
  assert hf_tok.encode("hi", add_special_tokens=True) == hf_tok.encode("hi")
  assert hf_tok.token_to_id("<|no such token|>") is None
  assert hf_tok.id_to_token(10**7) is None and hf_tok.id_to_token(-1) is None


def test_sp_special_ids(sp_tok):
  """Trained SentencePiece models: pad 0, unk 1, ChatML symbols 2-4, eos = <|endoftext|>."""
  assert sp_tok.special_tokens == {"<pad>": 0, "<unk>": 1, "<|endoftext|>": 2,
                                   "<|im_start|>": 3, "<|im_end|>": 4}
  assert (sp_tok.eos_id, sp_tok.pad_id, sp_tok.bos_id) == (2, 0, None)
  assert sp_tok.vocab_size == 400
  for token in tk.CHATML_TOKENS:
    assert sp_tok.encode(token) == [sp_tok.token_to_id(token)]
  assert sp_tok.token_to_id("<|no such token|>") is None
  assert sp_tok.id_to_token(400) is None


def test_special_strings_parsed_by_default(any_tok):
  """Special strings in text become one id by default and plain text with parse_special=False."""
  text = "a<|im_end|>b"
  im_end = any_tok.token_to_id("<|im_end|>")
  assert im_end in any_tok.encode(text)
  literal = any_tok.encode(text, parse_special=False)
  assert im_end not in literal and any_tok.decode(literal) == text
  assert any_tok.encode_batch([text], parse_special=False) == [literal]


def test_skip_special_tokens(any_tok):
  """decode(skip_special_tokens=True) drops control tokens and keeps the rest."""
  ids = any_tok.encode("<|im_start|>user\nhi<|im_end|>\n<|endoftext|>")
  assert any_tok.decode(ids, skip_special_tokens=True) == "user\nhi\n"


def test_hf_digits_split_one_per_token(hf_tok):
  """Numbers are split into single digits on the HF backend, like Qwen2."""
  ids = hf_tok.encode("1234567890 2024")
  pieces = [hf_tok.decode([i]) for i in ids]
  assert pieces == list("1234567890") + [" "] + list("2024")


def test_chatml_default_system():
  """Without a system message the default one is prepended; rendering is exact."""
  assert tk.apply_chat_template(CONVERSATION) == EXPECTED_WITH_DEFAULT_SYSTEM


def test_chatml_own_system_and_generation_prompt():
  """A given system message replaces the default; add_generation_prompt appends the header."""
  messages = [{"role": "system", "content": "Be brief."}, {"role": "user", "content": "Hi"}]
  assert tk.apply_chat_template(messages, add_generation_prompt=True) == (
      "<|im_start|>system\nBe brief.<|im_end|>\n"
      "<|im_start|>user\nHi<|im_end|>\n"
      "<|im_start|>assistant\n")


def test_chatml_without_default_system_and_tool_role():
  """default_system=None disables the default system message; the tool role renders."""
  messages = [{"role": "user", "content": "x"}, {"role": "tool", "content": "{\"a\": 1}"}]
  assert tk.apply_chat_template(messages, default_system=None) == (
      "<|im_start|>user\nx<|im_end|>\n<|im_start|>tool\n{\"a\": 1}<|im_end|>\n")
  assert tk.apply_chat_template([], add_generation_prompt=True) == "<|im_start|>assistant\n"


@pytest.mark.parametrize("add_generation_prompt", [False, True])
@pytest.mark.parametrize("messages", [
    CONVERSATION,
    [{"role": "system", "content": "Be brief."}, *CONVERSATION],
    [{"role": "user", "content": "  spaced\n  content  "}],
])
def test_chatml_matches_transformers(hf_tokenizer_dir, hf_tok, messages, add_generation_prompt):
  """Our ChatML string and ids equal transformers' apply_chat_template with a Qwen2 template."""
  transformers = pytest.importorskip("transformers")
  config = json.loads((hf_tokenizer_dir / "tokenizer_config.json").read_text(encoding="utf-8"))
  ref = transformers.PreTrainedTokenizerFast(
      tokenizer_file=str(hf_tokenizer_dir / "tokenizer.json"),
      chat_template=config["chat_template"], eos_token=config["eos_token"])
  expected = ref.apply_chat_template(messages, tokenize=False,
                                     add_generation_prompt=add_generation_prompt)
  ours = tk.apply_chat_template(messages, add_generation_prompt=add_generation_prompt)
  assert ours == expected
  assert tk.encode_chat(hf_tok, messages, add_generation_prompt=add_generation_prompt) == (
      ref(expected, add_special_tokens=False)["input_ids"])


def test_chat_mask_exact(any_tok):
  """The SFT mask is 1 exactly on assistant content and its <|im_end|>, ids match encode_chat."""
  ids, mask = tk.encode_chat_with_mask(any_tok, CONVERSATION)
  assert len(ids) == len(mask)
  assert ids == tk.encode_chat(any_tok, CONVERSATION)
  im_end = any_tok.token_to_id("<|im_end|>")
  trained = [i for i, m in zip(ids, mask) if m]
  expected = []
  for answer in ("2+2 = 4.", "二加二等于四。"):
    expected += any_tok.encode(answer) + [im_end]
  assert trained == expected
  # Each masked run is one answer plus <|im_end|>, preceded by the unmasked header and followed
  # by the unmasked "\n".
  starts = [k for k in range(len(mask)) if mask[k] and not mask[k - 1]]
  ends = [k for k in range(len(mask)) if mask[k] and (k + 1 == len(mask) or not mask[k + 1])]
  assert [any_tok.decode(ids[a:b + 1]) for a, b in zip(starts, ends)] == [
      "2+2 = 4.<|im_end|>", "二加二等于四。<|im_end|>"]
  assert all(any_tok.decode(ids[:a]).endswith("<|im_start|>assistant\n") for a in starts)
  assert all(any_tok.decode(ids[b + 1:b + 2]) == "\n" for b in ends)


def test_chat_mask_piecewise_equals_whole_for_varied_content(any_tok):
  """Piecewise encoding equals encoding the whole rendered string for ordinary contents."""
  messages = []
  for question, answer in zip(MULTILINGUAL, reversed(MULTILINGUAL)):
    messages += [{"role": "user", "content": question}, {"role": "assistant", "content": answer}]
  ids, _ = tk.encode_chat_with_mask(any_tok, messages)
  assert ids == any_tok.encode(tk.apply_chat_template(messages))


def test_bad_role_and_content_name_the_index():
  """Validation errors name the offending message index."""
  with pytest.raises(ValueError, match=r"message 1: role 'bot'"):
    tk.apply_chat_template([{"role": "user", "content": "a"}, {"role": "bot", "content": "b"}])
  with pytest.raises(ValueError, match=r"message 0: content must be a string"):
    tk.apply_chat_template([{"role": "user", "content": ["a"]}])
  with pytest.raises(ValueError, match=r"message 2: expected a mapping"):
    tk.apply_chat_template([{"role": "user", "content": "a"}] * 2 + ["oops"])


def test_missing_paths_are_named(tmp_path):
  """Missing or unusable tokenizer paths raise errors that name the path."""
  missing = tmp_path / "nope"
  with pytest.raises(FileNotFoundError, match="nope"):
    tk.load_tokenizer(missing)
  with pytest.raises(FileNotFoundError, match=str(tmp_path)):
    tk.load_tokenizer(tmp_path)
  (tmp_path / "weird.txt").write_text("x")
  with pytest.raises(ValueError, match="weird.txt"):
    tk.load_tokenizer(tmp_path / "weird.txt")
  (tmp_path / "broken.model").write_bytes(b"not a model")
  with pytest.raises(ValueError, match="broken.model"):
    tk.load_tokenizer(tmp_path / "broken.model")
  with pytest.raises(FileNotFoundError, match="missing_corpus.txt"):
    tk.train_sentencepiece([tmp_path / "missing_corpus.txt"], tmp_path / "sp", vocab_size=300)


def test_ids_without_a_token_decode_to_nothing(any_tok):
  """Ids >= vocab_size (a model's padded embedding rows) decode to nothing and keep the text
  around them; negative ids still raise ValueError naming them."""
  ids = any_tok.encode("the cat sat")
  padded = [any_tok.vocab_size, *ids[:1], any_tok.vocab_size + 289, *ids[1:], 10**9]
  assert any_tok.decode(padded) == "the cat sat"
  assert any_tok.decode(padded, skip_special_tokens=True) == "the cat sat"
  assert any_tok.decode([any_tok.vocab_size]) == ""
  with pytest.raises(ValueError, match="-1"):
    any_tok.decode([5, -1])


def test_hf_config_added_tokens(tmp_path):
  """Tokens declared only in tokenizer_config.json are added at their ids; a wrong id raises."""
  from tokenizers import Tokenizer, models  # pylint: disable=import-outside-toplevel

  Tokenizer(models.BPE(vocab={"a": 0, "b": 1}, merges=[])).save(str(tmp_path / "tokenizer.json"))
  def write_config(im_end_id):
    config = {"added_tokens_decoder": {
        "2": {"content": "<|endoftext|>", "special": True},
        str(im_end_id): {"content": "<|im_end|>", "special": True}},
              "eos_token": {"content": "<|im_end|>"}}
    (tmp_path / "tokenizer_config.json").write_text(json.dumps(config), encoding="utf-8")
  write_config(3)
  tok = tk.load_tokenizer(tmp_path)
  assert tok.special_tokens == {"<|endoftext|>": 2, "<|im_end|>": 3}
  assert (tok.eos_id, tok.pad_id, tok.bos_id, tok.vocab_size) == (3, 3, None, 4)
  assert tok.encode("ab<|im_end|>") == [0, 1, 3]
  write_config(7)
  with pytest.raises(ValueError, match="tokenizer_config.json.*'<\\|im_end\\|>'"):
    tk.load_tokenizer(tmp_path)


def test_chatml_needs_chatml_tokens(tmp_path):
  """encode_chat on a tokenizer without <|im_start|> fails with a clear error."""
  from tokenizers import Tokenizer, models  # pylint: disable=import-outside-toplevel

  Tokenizer(models.BPE(vocab={"a": 0}, merges=[])).save(str(tmp_path / "tokenizer.json"))
  with pytest.raises(ValueError, match="<|im_start|>"):
    tk.encode_chat(tk.load_tokenizer(tmp_path), CONVERSATION)


def test_cli_train_encode_decode(tmp_path, capsys):
  """`qwen2-jax tokenizer train/encode/decode` work end to end on a generated corpus."""
  corpus = tmp_path / "data" / "part0.txt"
  corpus.parent.mkdir()
  corpus.write_text("\n".join(f"line {i}: the cat sat on the mat. 猫が座った。" for i in range(200)),
                    encoding="utf-8")
  prefix = tmp_path / "out" / "tok"
  assert cli.main(["tokenizer", "train", "--input", str(tmp_path / "data" / "*.txt"),
                   "--output-prefix", str(prefix), "--vocab-size", "300", "--quiet"]) == 0
  model = f"{prefix}.model"
  assert capsys.readouterr().out.strip() == model
  text = "the cat 猫 <|im_end|> 42"
  assert cli.main(["tokenizer", "encode", "--tokenizer", model, "--text", text]) == 0
  ids = capsys.readouterr().out.split()
  assert [int(i) for i in ids] == tk.load_tokenizer(model).encode(text)
  assert cli.main(["tokenizer", "decode", "--tokenizer", model, "--ids", *ids]) == 0
  assert capsys.readouterr().out == text + "\n"
  assert cli.main(["tokenizer", "decode", "--tokenizer", model, "--ids", "999999"]) == 0
  assert capsys.readouterr().out == "\n"  # an id without a token decodes to nothing
  assert cli.main(["tokenizer", "decode", "--tokenizer", model, "--ids", "-5"]) == 2
  assert cli.main(["tokenizer", "encode", "--tokenizer", str(tmp_path / "nope"),
                   "--text", "x"]) == 2
  assert "nope" in capsys.readouterr().err


@pytest.mark.parametrize("argv", [["tokenizer"], ["tokenizer", "train"], ["tokenizer", "encode"],
                                  ["tokenizer", "decode"]])
def test_cli_help(argv, capsys):
  """`--help` of the tokenizer command and each subcommand exits 0."""
  with pytest.raises(SystemExit) as exc:
    cli.main([*argv, "--help"])
  assert exc.value.code == 0
  assert "usage:" in capsys.readouterr().out
