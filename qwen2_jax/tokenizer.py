"""Tokenizers for Qwen2: one interface over HF `tokenizers` and SentencePiece, plus ChatML.

`HFTokenizer` reads Qwen2's real `tokenizer.json` (byte-level BPE; `<|endoftext|>` 151643,
`<|im_start|>` 151644, `<|im_end|>` 151645) and `tokenizer_config.json`. `SentencePieceTokenizer`
reads a `.model`, e.g. one from `train_sentencepiece` for pretraining from scratch; those carry
the three control strings as user-defined symbols (matched in raw text, like HF added tokens),
use `<|endoftext|>` as eos like Qwen2 base models, and have no BOS, like Qwen2.
`load_tokenizer(path)` picks the backend; `apply_chat_template`, `encode_chat` and
`encode_chat_with_mask` implement ChatML as Qwen2's chat template does.
"""

from __future__ import annotations

import abc
import json
import os
import pathlib
import re
import shutil
import sys
from collections.abc import Iterable, Mapping, Sequence
from typing import Any

from qwen2_jax.errors import UserError

ENDOFTEXT = "<|endoftext|>"
IM_START = "<|im_start|>"
IM_END = "<|im_end|>"
CHATML_TOKENS = (ENDOFTEXT, IM_START, IM_END)
CHAT_ROLES = ("system", "user", "assistant", "tool")
DEFAULT_SYSTEM = "You are a helpful assistant."

PathLike = str | os.PathLike


class TokenizerError(UserError, ValueError):
  """A tokenizer file is missing, unreadable or inconsistent; the message names the file."""


class Tokenizer(abc.ABC):
  """Backend-independent tokenizer interface.

  Subclasses set `_eos_id`, `_pad_id` and `_bos_id` in their constructor.
  """

  _eos_id: int | None = None
  _pad_id: int | None = None
  _bos_id: int | None = None

  @abc.abstractmethod
  def encode(self, text: str, *, add_special_tokens: bool = False,
             parse_special: bool = True) -> list[int]:
    """Encodes `text` to ids.

    Args:
      text: The text to encode.
      add_special_tokens: Add the backend's own decorations: the `tokenizer.json` post-processor
        for HF (none for Qwen2), a leading BOS for SentencePiece models that have one.
      parse_special: When True (default), special-token strings inside `text` (for example
        `<|im_end|>`) become their single special id, as HF `tokenizers` does. When False they
        are encoded as ordinary text, which is what untrusted user text usually wants.
    """

  def encode_batch(self, texts: Iterable[str], *, add_special_tokens: bool = False,
                   parse_special: bool = True) -> list[list[int]]:
    """Encodes each text; same semantics as `encode`."""
    return [self.encode(t, add_special_tokens=add_special_tokens, parse_special=parse_special)
            for t in texts]

  @abc.abstractmethod
  def decode(self, ids: Iterable[int], *, skip_special_tokens: bool = False) -> str:
    """Decodes ids to text, optionally dropping the ids in `special_tokens`.

    Ids >= vocab_size have no token and decode to nothing, as in HF `tokenizers`: a model's
    embedding may have more rows than its tokenizer has ids (Qwen2: 151,936 vs 151,646+), and
    such an id must not lose the text around it.

    Raises:
      ValueError: an id is negative.
    """

  def _checked_ids(self, ids: Iterable[int]) -> list[int]:
    """The ids that have a token (those below vocab_size); raises naming negative ids."""
    ids = [int(i) for i in ids]
    bad = [i for i in ids if i < 0]
    if bad:
      raise ValueError(f"token ids must be >= 0, got {bad[:10]}")
    return [i for i in ids if i < self.vocab_size]

  @property
  @abc.abstractmethod
  def vocab_size(self) -> int:
    """Number of ids the tokenizer can produce (max id + 1)."""

  @property
  def eos_id(self) -> int | None:
    """End-of-sequence id (None if the tokenizer has none)."""
    return self._eos_id

  @property
  def pad_id(self) -> int | None:
    """Padding id; falls back to `eos_id` when the tokenizer defines no pad token."""
    return self._pad_id

  @property
  def bos_id(self) -> int | None:
    """Beginning-of-sequence id; None for Qwen2 and for models trained here."""
    return self._bos_id

  @abc.abstractmethod
  def token_to_id(self, token: str) -> int | None:
    """Id of a vocabulary entry (in the backend's own spelling), or None."""

  @abc.abstractmethod
  def id_to_token(self, token_id: int) -> str | None:
    """Vocabulary entry of an id, or None when out of range."""

  @property
  @abc.abstractmethod
  def special_tokens(self) -> dict[str, int]:
    """Special tokens, keyed by their string (e.g. `{"<|im_end|>": 151645, ...}`)."""


def _token_content(value: Any) -> str | None:
  """Token string from a tokenizer_config value: a string, an AddedToken dict, or null."""
  if isinstance(value, Mapping):
    return value.get("content")
  return value


class HFTokenizer(Tokenizer):
  """HF `tokenizers` backend (`tokenizer.json`, optionally with `tokenizer_config.json`).

  Without a config (or when it lacks the key) eos defaults to `<|endoftext|>` if the vocab has
  it, pad defaults to eos and bos to None, which is what Qwen2's own configs say.
  """

  def __init__(self, tokenizer_file: PathLike, config_file: PathLike | None = None):
    from tokenizers import Tokenizer as HFBackend  # pylint: disable=import-outside-toplevel

    self._path = pathlib.Path(tokenizer_file)
    try:
      self._tok = HFBackend.from_file(str(self._path))
    except Exception as e:  # The Rust side raises plain Exception on malformed files.
      raise TokenizerError(f"could not load HF tokenizer file {self._path}: {e}") from e
    config: dict[str, Any] = {}
    if config_file is not None:
      try:
        config = json.loads(pathlib.Path(config_file).read_text(encoding="utf-8"))
      except (OSError, json.JSONDecodeError) as e:
        raise TokenizerError(f"could not read tokenizer config {config_file}: {e}") from e
    self._add_config_tokens(config, config_file)
    self._literal = None  # Lazily built twin that encodes special strings as plain text.
    vocab = self._tok.get_vocab(with_added_tokens=True)
    self._vocab_size = max(vocab.values()) + 1 if vocab else 0
    self._special = {t.content: i for i, t in sorted(self._tok.get_added_tokens_decoder().items())
                     if t.special}
    default_eos = ENDOFTEXT if self._tok.token_to_id(ENDOFTEXT) is not None else None
    self._eos_id = self._config_id(config, "eos_token", default_eos, config_file)
    self._pad_id = self._config_id(config, "pad_token", None, config_file)
    if self._pad_id is None:
      self._pad_id = self._eos_id
    self._bos_id = self._config_id(config, "bos_token", None, config_file)

  def _add_config_tokens(self, config: Mapping[str, Any], config_file: PathLike | None) -> None:
    """Adds tokens that the config declares but tokenizer.json lacks, checking declared ids."""
    from tokenizers import AddedToken  # pylint: disable=import-outside-toplevel

    for id_str, spec in sorted(config.get("added_tokens_decoder", {}).items(),
                               key=lambda kv: int(kv[0])):
      content, special = spec["content"], bool(spec.get("special", False))
      if self._tok.token_to_id(content) is None:
        token = AddedToken(content, single_word=spec.get("single_word", False),
                           lstrip=spec.get("lstrip", False), rstrip=spec.get("rstrip", False),
                           normalized=spec.get("normalized", not special), special=special)
        (self._tok.add_special_tokens if special else self._tok.add_tokens)([token])
      # Ids are baked into checkpoints, so a silent renumbering would be a real bug.
      if self._tok.token_to_id(content) != int(id_str):
        raise TokenizerError(f"{config_file}: token {content!r} is declared with id {id_str} but "
                         f"{self._path} gives it id {self._tok.token_to_id(content)}")
    named = [config.get(k) for k in ("eos_token", "pad_token", "bos_token", "unk_token")]
    for value in [*config.get("additional_special_tokens", []), *named]:
      content = _token_content(value)
      if content is not None and self._tok.token_to_id(content) is None:
        self._tok.add_special_tokens([AddedToken(content, special=True, normalized=False)])

  def _config_id(self, config: Mapping[str, Any], key: str, default: str | None,
                 config_file: PathLike | None) -> int | None:
    content = _token_content(config[key]) if key in config else default
    if content is None:
      return None
    token_id = self._tok.token_to_id(content)
    if token_id is None:
      raise TokenizerError(f"{config_file or self._path}: {key} {content!r} is not in the vocabulary")
    return token_id

  def _literal_tokenizer(self):
    if self._literal is None:
      # A separate instance rather than toggling the flag on the shared one keeps encode()
      # thread-safe; the copy costs one vocab in memory and is only built if asked for.
      from tokenizers import Tokenizer as HFBackend  # pylint: disable=import-outside-toplevel
      self._literal = HFBackend.from_str(self._tok.to_str())
      self._literal.encode_special_tokens = True
    return self._literal

  def encode(self, text, *, add_special_tokens=False, parse_special=True):
    tok = self._tok if parse_special else self._literal_tokenizer()
    return tok.encode(text, add_special_tokens=add_special_tokens).ids

  def encode_batch(self, texts, *, add_special_tokens=False, parse_special=True):
    tok = self._tok if parse_special else self._literal_tokenizer()
    return [e.ids for e in tok.encode_batch(list(texts), add_special_tokens=add_special_tokens)]

  def decode(self, ids, *, skip_special_tokens=False):
    return self._tok.decode(self._checked_ids(ids), skip_special_tokens=skip_special_tokens)

  @property
  def vocab_size(self):
    return self._vocab_size

  def token_to_id(self, token):
    return self._tok.token_to_id(token)

  def id_to_token(self, token_id):
    token_id = int(token_id)
    return self._tok.id_to_token(token_id) if token_id >= 0 else None

  @property
  def special_tokens(self):
    return dict(self._special)


class SentencePieceTokenizer(Tokenizer):
  """SentencePiece backend (`.model` file).

  Special tokens are the control pieces, unk, and all user-defined symbols. eos is
  `<|endoftext|>` when the model has it as a user-defined symbol (models from
  `train_sentencepiece`), else the model's own eos; pad falls back to eos when the model has none.
  Round trips are exact for models from `train_sentencepiece` except for a literal U+2581 (`▁`,
  SentencePiece's own space marker), which decodes as a space.
  """

  def __init__(self, model_file: PathLike):
    import sentencepiece as spm  # pylint: disable=import-outside-toplevel

    self._path = pathlib.Path(model_file)
    try:
      self._sp = spm.SentencePieceProcessor(model_file=str(self._path))
    except (OSError, RuntimeError) as e:
      raise TokenizerError(f"could not load SentencePiece model {self._path}: {e}") from e
    sp = self._sp
    user = self._user_defined_ids()
    self._special = {sp.id_to_piece(i): i for i in range(sp.get_piece_size())
                     if sp.is_control(i) or sp.is_unknown(i) or i in user}
    self._special_ids = frozenset(self._special.values())
    # Longest first so the split regex prefers the longest symbol at a position.
    self._user_pieces = sorted((sp.id_to_piece(i) for i in user), key=len, reverse=True)
    self._user_re = (re.compile("|".join(re.escape(p) for p in self._user_pieces))
                     if self._user_pieces else None)
    if ENDOFTEXT in self._special and self._special[ENDOFTEXT] in user:
      self._eos_id = self._special[ENDOFTEXT]
    else:
      self._eos_id = sp.eos_id() if sp.eos_id() >= 0 else None
    self._bos_id = sp.bos_id() if sp.bos_id() >= 0 else None
    self._pad_id = sp.pad_id() if sp.pad_id() >= 0 else self._eos_id

  def _user_defined_ids(self) -> set[int]:
    try:
      from sentencepiece import sentencepiece_model_pb2  # pylint: disable=import-outside-toplevel
    except ImportError:
      # Without protobuf the piece type is not exposed; `<|...|>` pieces are the only
      # user-defined symbols this project creates.
      return {i for i in range(self._sp.get_piece_size())
              if re.fullmatch(r"<\|[^|]+\|>", self._sp.id_to_piece(i))
              and not self._sp.is_control(i)}
    proto = sentencepiece_model_pb2.ModelProto()
    proto.ParseFromString(self._sp.serialized_model_proto())
    return {i for i, p in enumerate(proto.pieces) if p.type == p.USER_DEFINED}

  def _encode_literal(self, text: str) -> list[int]:
    """Encodes with user-defined symbols treated as plain text.

    SentencePiece always matches user-defined symbols, so each occurrence is encoded in two
    parts (first character, rest); neither part can match a symbol, and decoding stays exact.
    """
    ids, pos = [], 0
    for m in self._user_re.finditer(text):
      for part in (text[pos:m.start()], m.group()[:1], m.group()[1:]):
        if part:
          ids.extend(self._sp.encode(part))
      pos = m.end()
    if pos < len(text):
      ids.extend(self._sp.encode(text[pos:]))
    return ids

  def encode(self, text, *, add_special_tokens=False, parse_special=True):
    if parse_special or self._user_re is None:
      ids = self._sp.encode(text)
    else:
      ids = self._encode_literal(text)
    if add_special_tokens and self._bos_id is not None:
      ids = [self._bos_id, *ids]
    return ids

  def decode(self, ids, *, skip_special_tokens=False):
    ids = self._checked_ids(ids)
    if skip_special_tokens:
      ids = [i for i in ids if i not in self._special_ids]
    return self._sp.decode(ids)

  @property
  def vocab_size(self):
    return self._sp.get_piece_size()

  def token_to_id(self, token):
    token_id = self._sp.piece_to_id(token)
    # piece_to_id maps unknown strings to unk; only the unk piece itself should map there.
    if token_id == self._sp.unk_id() and token != self._sp.id_to_piece(token_id):
      return None
    return token_id

  def id_to_token(self, token_id):
    token_id = int(token_id)
    return self._sp.id_to_piece(token_id) if 0 <= token_id < self.vocab_size else None

  @property
  def special_tokens(self):
    return dict(self._special)


def load_tokenizer(path: PathLike) -> Tokenizer:
  """Loads a tokenizer, choosing the backend from `path`.

  Accepts a directory holding `tokenizer.json` (HF; preferred when both exist) or
  `tokenizer.model` (SentencePiece), a `.json` tokenizers file, or a `.model` SentencePiece file.
  A `tokenizer_config.json` next to a `tokenizer.json` is read too.

  Raises:
    FileNotFoundError: `path` does not exist, or a directory holds no tokenizer file.
    ValueError: the file is of an unknown kind or cannot be parsed.
  """
  files = tokenizer_files(path)
  if "tokenizer.json" in files:
    return HFTokenizer(files["tokenizer.json"], files.get("tokenizer_config.json"))
  return SentencePieceTokenizer(files["tokenizer.model"])


def tokenizer_files(path: PathLike) -> dict[str, pathlib.Path]:
  """The files `load_tokenizer(path)` reads, by the name they have in a model directory:
  {"tokenizer.json": ..., ["tokenizer_config.json": ...]} or {"tokenizer.model": ...}.

  Raises as `load_tokenizer` does for a missing path or an unknown kind of file.
  """
  p = pathlib.Path(path)
  if not p.exists():
    raise FileNotFoundError(f"no tokenizer at {p}: the path does not exist")
  if p.is_dir():
    if (p / "tokenizer.json").is_file():
      p = p / "tokenizer.json"
    elif (p / "tokenizer.model").is_file():
      p = p / "tokenizer.model"
    else:
      raise FileNotFoundError(f"no tokenizer in directory {p}: expected tokenizer.json "
                              "(HF tokenizers) or tokenizer.model (SentencePiece)")
  if p.suffix == ".json":
    config = p.parent / "tokenizer_config.json"
    use_config = p.name == "tokenizer.json" and config.is_file()
    return {"tokenizer.json": p, **({"tokenizer_config.json": config} if use_config else {})}
  if p.suffix == ".model":
    return {"tokenizer.model": p}
  raise TokenizerError(f"unrecognised tokenizer file {p}: expected a tokenizer.json or a "
                   "SentencePiece .model file")


def copy_tokenizer_files(path: PathLike, model_dir: PathLike) -> list[str]:
  """Copies the tokenizer at `path` into `model_dir` under the names `load_tokenizer(model_dir)`
  (and so `qwen2-jax generate MODEL`) looks for; returns the names written. Each file is
  copied beside its target and renamed over it when complete (mode: the umask's default)."""
  files = tokenizer_files(path)
  for name, src in files.items():
    dst = pathlib.Path(model_dir) / name
    if src.resolve() != dst.resolve():
      tmp = dst.with_name(f".{name}.tmp-{os.getpid()}")
      try:
        shutil.copyfile(src, tmp)
        os.replace(tmp, dst)
      finally:
        tmp.unlink(missing_ok=True)
  return sorted(files)


def _validate_messages(messages: Iterable[Mapping[str, Any]]) -> list[tuple[str, str]]:
  if isinstance(messages, (str, bytes, Mapping)):
    raise ValueError("messages must be a sequence of {'role': ..., 'content': ...} mappings")
  out = []
  for i, m in enumerate(messages):
    if not isinstance(m, Mapping):
      raise ValueError(f"message {i}: expected a mapping with 'role' and 'content', "
                       f"got {type(m).__name__}")
    role, content = m.get("role"), m.get("content")
    if role not in CHAT_ROLES:
      raise ValueError(f"message {i}: role {role!r} is not one of {', '.join(CHAT_ROLES)}")
    if not isinstance(content, str):
      raise ValueError(f"message {i}: content must be a string, got {type(content).__name__}")
    out.append((role, content))
  return out


def _chat_pieces(messages, default_system: str | None) -> list[tuple[str, bool]]:
  """ChatML as (text, trained) pieces; `trained` marks assistant content and its <|im_end|>."""
  msgs = _validate_messages(messages)
  # Like the Qwen2 template: the default system prompt is added only before a first message
  # that is not a system message, so an empty conversation stays empty.
  if msgs and msgs[0][0] != "system" and default_system is not None:
    msgs.insert(0, ("system", default_system))
  pieces = []
  for role, content in msgs:
    trained = role == "assistant"
    pieces += [(IM_START, False), (f"{role}\n", False), (content, trained), (IM_END, trained),
               ("\n", False)]
  return pieces


def apply_chat_template(messages: Iterable[Mapping[str, Any]], *,
                        add_generation_prompt: bool = False,
                        default_system: str | None = DEFAULT_SYSTEM) -> str:
  """Renders messages as ChatML: `<|im_start|>{role}\\n{content}<|im_end|>\\n` each.

  Args:
    messages: Mappings with `role` (system/user/assistant/tool) and string `content`.
    add_generation_prompt: Append `<|im_start|>assistant\\n`.
    default_system: System prompt inserted when the first message is not a system message;
      None disables it.

  Raises:
    ValueError: a message has a bad role or non-string content (the message index is named).
  """
  text = "".join(t for t, _ in _chat_pieces(messages, default_system))
  return text + (f"{IM_START}assistant\n" if add_generation_prompt else "")


def encode_chat(tokenizer: Tokenizer, messages: Iterable[Mapping[str, Any]], *,
                add_generation_prompt: bool = False,
                default_system: str | None = DEFAULT_SYSTEM) -> list[int]:
  """Encodes the rendered ChatML string in one piece, as HF `apply_chat_template` does."""
  _require_chatml(tokenizer)
  return tokenizer.encode(apply_chat_template(
      messages, add_generation_prompt=add_generation_prompt, default_system=default_system))


def encode_chat_with_mask(tokenizer: Tokenizer, messages: Iterable[Mapping[str, Any]], *,
                          default_system: str | None = DEFAULT_SYSTEM
                          ) -> tuple[list[int], list[int]]:
  """Encodes a conversation with a loss mask for SFT.

  The mask is 1 exactly on each assistant message's content tokens and its `<|im_end|>`, 0
  elsewhere (headers, the `\\n` after `<|im_end|>`, other roles). Pieces are encoded separately
  and concatenated so the mask is exact. Special tokens always split pre-tokenization, so the
  only boundary where this can differ from `encode_chat` is header `\\n` | content, and only
  when the content starts with whitespace holding a line break (byte-level BPE may then group
  the two); the ids returned here are the piecewise ones.
  """
  specials = _require_chatml(tokenizer)
  ids, mask = [], []
  for text, trained in _chat_pieces(messages, default_system):
    piece = [specials[text]] if text in specials else tokenizer.encode(text) if text else []
    ids += piece
    mask += [int(trained)] * len(piece)
  return ids, mask


def _require_chatml(tokenizer: Tokenizer) -> dict[str, int]:
  ids = {t: tokenizer.token_to_id(t) for t in (IM_START, IM_END)}
  missing = [t for t, i in ids.items() if i is None]
  if missing:
    raise ValueError(f"tokenizer has no {' / '.join(missing)} token; ChatML needs "
                     f"{IM_START} and {IM_END}")
  return ids


def train_sentencepiece(input_files: PathLike | Sequence[PathLike], output_prefix: PathLike, *,
                        vocab_size: int, model_type: str = "bpe", byte_fallback: bool = True,
                        character_coverage: float = 0.9995, max_sentence_length: int = 16384,
                        input_sentence_size: int = 10_000_000, num_threads: int | None = None,
                        verbose: bool = True) -> pathlib.Path:
  """Trains a SentencePiece model on local text files (one sentence or document per line).

  The model is lossless (bar a literal U+2581 `▁`, which decodes as a space): identity
  normalisation instead of NFKC, no dummy prefix, whitespace kept, byte fallback for unseen
  characters. Digits are split one per piece, like Qwen2. Ids: `<pad>` 0,
  `<unk>` 1, then `<|endoftext|>` 2, `<|im_start|>` 3, `<|im_end|>` 4 as user-defined symbols;
  no BOS, and eos is `<|endoftext|>` (SentencePiece's own eos piece is disabled because control
  pieces are never matched in text, which ChatML needs).

  Args:
    input_files: Text file(s); each line is one training sentence.
    output_prefix: Writes `{output_prefix}.model` and `{output_prefix}.vocab`.
    vocab_size: Number of pieces including the 5 special ones and 256 byte pieces.
    model_type: "bpe" or "unigram".
    byte_fallback: Encode unseen characters as UTF-8 byte pieces instead of `<unk>`.
    character_coverage: Fraction of characters covered by character pieces.
    max_sentence_length: Longer lines (in bytes) are skipped by the trainer.
    input_sentence_size: Lines sampled (shuffled) for training; 0 uses all.
    num_threads: Trainer threads; default min(16, cpu count).
    verbose: Print what is done and let SentencePiece log its progress to stderr.

  Returns:
    Path of the `.model` file.

  Raises:
    FileNotFoundError: an input file is missing (it is named).
    ValueError: bad `model_type`, or `vocab_size` too small for the reserved pieces.
    RuntimeError: SentencePiece failed (e.g. `vocab_size` too large for the corpus).
  """
  import sentencepiece as spm  # pylint: disable=import-outside-toplevel

  if isinstance(input_files, (str, os.PathLike)):
    input_files = [input_files]
  files = [pathlib.Path(f) for f in input_files]
  if not files:
    raise ValueError("no input files given for tokenizer training")
  for f in files:
    if not f.is_file():
      raise FileNotFoundError(f"tokenizer training input not found: {f}")
  if model_type not in ("bpe", "unigram"):
    raise ValueError(f"model_type must be 'bpe' or 'unigram', got {model_type!r}")
  reserved = 2 + len(CHATML_TOKENS) + (256 if byte_fallback else 0)
  if vocab_size <= reserved:
    raise ValueError(f"vocab_size {vocab_size} must exceed the {reserved} reserved pieces")
  prefix = pathlib.Path(output_prefix)
  prefix.parent.mkdir(parents=True, exist_ok=True)
  num_threads = num_threads or min(16, os.cpu_count() or 1)
  if verbose:
    megabytes = sum(f.stat().st_size for f in files) / 1e6
    print(f"training SentencePiece {model_type} tokenizer (vocab {vocab_size}) on {len(files)} "
          f"file(s), {megabytes:.1f} MB, {num_threads} threads -> {prefix}.model",
          file=sys.stderr, flush=True)
  try:
    spm.SentencePieceTrainer.train(
        input=[str(f) for f in files], model_prefix=str(prefix), vocab_size=vocab_size,
        model_type=model_type, character_coverage=character_coverage,
        byte_fallback="true" if byte_fallback else "false", normalization_rule_name="identity",
        remove_extra_whitespaces="false", add_dummy_prefix="false", split_digits="true",
        allow_whitespace_only_pieces="true", user_defined_symbols=list(CHATML_TOKENS),
        pad_id=0, unk_id=1, bos_id=-1, eos_id=-1, pad_piece="<pad>", unk_piece="<unk>",
        max_sentence_length=max_sentence_length, input_sentence_size=input_sentence_size,
        shuffle_input_sentence="true", num_threads=num_threads, minloglevel=0 if verbose else 2)
  except RuntimeError as e:  # E.g. a vocab_size larger than the corpus supports.
    raise RuntimeError(f"SentencePiece training of {prefix}.model failed: {e}") from e
  model = pathlib.Path(f"{prefix}.model")
  if verbose:
    print(f"wrote {model} and {prefix}.vocab", file=sys.stderr, flush=True)
  return model
