"""`qwen2-jax generate`: one prompt, interactive chat, or an offline JSONL batch.

  qwen2-jax generate MODEL --prompt "Once upon a time" --max-new-tokens 64
  qwen2-jax generate MODEL --chat                      # multi-turn ChatML, streamed
  qwen2-jax generate MODEL --chat --prompt "Hi!"       # one chat turn, streamed
  qwen2-jax generate MODEL --input in.jsonl --output out.jsonl [--on-error stop]

MODEL is an HF directory (config.json + safetensors) or an Orbax directory from
`qwen2-jax convert`; the tokenizer defaults to MODEL's own files (--tokenizer to override).
With a tokenizer, ids it does not have (Qwen2 pads its embedding past the tokenizer) are never
generated, unless --no-vocab-mask.

Batch output: lines are flushed as their batch finishes to OUT.<pid>.tmp beside OUT, which is
renamed to OUT, in input order, when every record is done. Ctrl-C (SIGINT) or SIGTERM stops
at the next decode step: the records finished so far are kept in OUT.partial (in the order they
finished, each with its input "index"), OUT is left as it was, and one line says how many of
how many were kept. A second signal quits at once (OUT.<pid>.tmp then holds what was flushed).

Exit codes: 0 ok; 2 bad input (one line naming the flag, or the file:line and field of a
record); 130 after SIGINT, 143 after SIGTERM; 1 other failures.
"""

from __future__ import annotations

import argparse
import contextlib
import json
import os
import signal
import sys

from qwen2_jax.errors import UserError

_DTYPES = ("float32", "bfloat16", "float16")

# The flag of each setting, for errors found by `qwen2_jax.infer.validation` (which names the
# field: the same checks run on JSONL records, whose errors name the record's field).
FLAGS = {"max_new_tokens": "--max-new-tokens", "temperature": "--temperature",
         "top_k": "--top-k", "top_p": "--top-p", "seed": "--seed", "stop_token_ids": "--stop-id",
         "ignore_eos": "--ignore-eos", "max_batch_size": "--batch-size",
         "max_context": "--max-context", "input_path": "--input", "output_path": "--output",
         "model_path": "MODEL", "max_num_seqs": "--batch-size",
         "max_num_batched_tokens": "--max-num-batched-tokens", "page_size": "--page-size",
         "num_pages": "--num-pages", "matmul_precision": "--matmul-precision"}


def register(subparsers) -> None:
  """Adds the `generate` parser to `subparsers`."""
  p = subparsers.add_parser(
      "generate", help="generate text: one prompt, chat, or a JSONL batch",
      description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
  p.add_argument("model", metavar="MODEL", help="HF checkpoint directory or Orbax directory")
  p.add_argument("--tokenizer", metavar="PATH", help="tokenizer dir/file (default: MODEL's)")
  mode = p.add_argument_group("mode")
  mode.add_argument("--prompt", help="a text prompt (with --chat: the user's message)")
  mode.add_argument("--prompt-ids", nargs="+", type=int, metavar="ID", help="a prompt as ids")
  mode.add_argument("--chat", action="store_true",
                    help="ChatML chat: multi-turn from stdin, replies streamed")
  mode.add_argument("--system", help="chat system prompt (default: Qwen2's)")
  mode.add_argument("--input", metavar="IN.jsonl", help="offline batch input (JSONL)")
  mode.add_argument("--output", metavar="OUT.jsonl", help="offline batch output (JSONL)")
  mode.add_argument("--on-error", choices=("skip", "stop"), default="skip",
                    help="batch: a bad record (any bad field, invalid JSON or UTF-8) is reported "
                         "with its file:line and field; skip (default): write its error line "
                         "and generate the rest; stop: exit 2 before generating anything")
  s = p.add_argument_group("sampling (defaults: greedy)")
  s.add_argument("--max-new-tokens", type=int, default=128)
  s.add_argument("--temperature", type=float, default=0.0, help="0 = greedy")
  s.add_argument("--top-k", type=int, default=0, help="0 = off")
  s.add_argument("--top-p", type=float, default=1.0, help="1 = off")
  s.add_argument("--seed", type=int, default=0)
  s.add_argument("--stop-id", type=int, nargs="+", default=[], metavar="ID",
                 help="extra stop token ids (EOS is always one unless --ignore-eos)")
  s.add_argument("--ignore-eos", action="store_true")
  e = p.add_argument_group("engine")
  e.add_argument("--batch-size", type=int, default=8,
                 help="sequences generated at once (continuous batching; >= 1)")
  e.add_argument("--max-num-batched-tokens", type=int, default=None,
                 help="tokens per engine step: decode tokens, then prefill chunks (default "
                      "max(256, batch size))")
  e.add_argument("--page-size", type=int, default=16, help="tokens per KV-cache page")
  e.add_argument("--num-pages", type=int, default=None,
                 help="KV-cache pages (default: batch size x max context, at most 10%% of "
                      "the host memory on CPU)")
  e.add_argument("--no-prefix-caching", action="store_true",
                 help="do not reuse the KV cache of prompt prefixes seen before")
  e.add_argument("--max-context", type=int, default=None,
                 help="longest prompt + new tokens, in [1, the model's context: "
                      "max_position_embeddings, times a YaRN factor] (default: "
                      "max_position_embeddings)")
  e.add_argument("--no-vocab-mask", action="store_true",
                 help="let the model generate ids the tokenizer does not have (they decode to "
                      "nothing); by default their logits are masked")
  e.add_argument("--matmul-precision", choices=("highest", "high"), default=None,
                 help="the steps' fp32 matmuls (lax.Precision names; default: XLA's default, "
                      "fp32 on CPU); 'high' runs three bf16 passes, on AMX tiles on CPUs that "
                      "have them (faster, ~1e-5 relative error per product)")
  e.add_argument("--dtype", default="float32", choices=_DTYPES, help="param dtype")
  e.add_argument("--compute-dtype", default=None, choices=_DTYPES,
                 help="activation dtype (default: as saved)")
  e.add_argument("--allow-nonfinite", action="store_true",
                 help="load weights holding NaN or Inf (reported as warnings)")
  e.add_argument("--no-progress", action="store_true", help="no progress bar (batch mode)")
  p.set_defaults(func=_run)


class _StopOnSignal:
  """SIGINT and SIGTERM request a stop instead of raising KeyboardInterrupt wherever Python is.

  Python runs a signal handler between two bytecodes of the main thread, so the default SIGINT
  handler raises KeyboardInterrupt at an arbitrary point: inside jax's dispatch, or inside the
  garbage-collection callback jax registers (`_xla_gc_callback`, where the exception is
  swallowed: jax-ml/jax#18246, and has crashed: jax-ml/jax#15810); the interpreter then tears
  down with device buffers and XLA threads still live. Here the handler only records the signal;
  generation checks it between decode steps and records (`Generator.stop_requested`), after the
  device work has been read back, and returns through the normal path. Reading stdin (chat
  turns) involves no device work, so there a signal raises `GenerationInterrupted` at once. A
  second signal ends the process immediately with the signal's default action. A signal that
  was ignored when the command started (SIGINT of a shell's background job) stays ignored.
  """

  def __init__(self, interrupted: type[BaseException]):
    self.signum: int | None = None
    self._interrupted = interrupted
    self._raise_now = False
    self._previous = {}

  def __enter__(self) -> "_StopOnSignal":
    for signum in (signal.SIGINT, signal.SIGTERM):
      if signal.getsignal(signum) == signal.SIG_IGN:
        continue  # e.g. SIGINT of a shell's background job: it stays ignored
      self._previous[signum] = signal.signal(signum, self._handle)
    return self

  def __exit__(self, *exc) -> None:
    for signum, handler in self._previous.items():
      signal.signal(signum, handler)

  def _handle(self, signum, frame) -> None:
    del frame
    if self.signum is not None:  # the second signal: quit now
      signal.signal(signum, signal.SIG_DFL)
      os.kill(os.getpid(), signum)
      return
    self.signum = signum
    if self._raise_now:
      raise self._interrupted("interrupted")
    # os.write, not print: the main thread may be inside a write to sys.stderr (the progress
    # bar), and a buffered stream refuses a reentrant write.
    os.write(2, f"\nqwen2-jax generate: {signal.Signals(signum).name}: stopping after the "
                "current decode step (send it again to quit at once)\n".encode())

  def requested(self) -> bool:
    return self.signum is not None

  @property
  def exit_code(self) -> int:
    return 128 + (self.signum or signal.SIGINT)

  @contextlib.contextmanager
  def raising(self):
    """While blocked outside device work (reading stdin), a signal raises at once."""
    if self.signum is not None:
      raise self._interrupted("interrupted")
    self._raise_now = True
    try:
      yield
    finally:
      self._raise_now = False


@contextlib.contextmanager
def _flag_names():
  """Re-raises a validation error of a setting naming its command-line flag."""
  # pylint: disable-next=import-outside-toplevel  # jax-heavy: keeps `qwen2-jax --help` fast
  from qwen2_jax.infer.validation import GenerationInputError
  try:
    yield
  except GenerationInputError as e:
    raise e.renamed(FLAGS.get(e.param, e.param)) from None


def _run(args: argparse.Namespace) -> int:
  # pylint: disable=import-outside-toplevel  # jax-heavy: keeps `qwen2-jax --help` fast
  from qwen2_jax.infer import validation
  from qwen2_jax.infer.api import GenerationInterrupted, Generator
  from qwen2_jax.infer.sampling import SamplingParams

  modes = [m for m, on in (("prompt", args.prompt is not None and not args.chat),
                           ("prompt-ids", args.prompt_ids is not None), ("chat", args.chat),
                           ("batch", args.input is not None or args.output is not None)) if on]
  if len(modes) != 1:
    raise UserError(f"choose exactly one mode of --prompt, --prompt-ids, --chat, "
                    f"--input/--output (got {modes or 'none'})")
  if modes == ["batch"] and not (args.input and args.output):
    raise UserError("batch mode needs both --input and --output")
  with _flag_names():  # every setting is checked before the model is read
    sampling = SamplingParams(max_new_tokens=args.max_new_tokens, temperature=args.temperature,
                              top_k=args.top_k, top_p=args.top_p, seed=args.seed,
                              stop_token_ids=tuple(args.stop_id), ignore_eos=args.ignore_eos)
    validation.check_engine_settings(max_batch_size=args.batch_size,
                                     max_context=args.max_context,
                                     max_new_tokens=args.max_new_tokens)
    if modes == ["batch"]:
      validation.check_jsonl_paths(args.input, args.output)
  gen = None
  with _StopOnSignal(GenerationInterrupted) as stop:
    try:
      with _flag_names():
        gen = Generator.from_pretrained(args.model, args.tokenizer, dtype=args.dtype,
                                        compute_dtype=args.compute_dtype,
                                        allow_nonfinite=args.allow_nonfinite,
                                        mask_vocab=not args.no_vocab_mask,
                                        max_batch_size=args.batch_size,
                                        max_context=args.max_context,
                                        max_num_batched_tokens=args.max_num_batched_tokens,
                                        page_size=args.page_size, num_pages=args.num_pages,
                                        enable_prefix_caching=not args.no_prefix_caching,
                                        matmul_precision=args.matmul_precision)
        validation.check_engine_settings(max_batch_size=args.batch_size,
                                         max_context=gen.engine.max_context,
                                         max_new_tokens=args.max_new_tokens)
      gen.stop_requested = stop.requested
      if modes[0] in ("prompt", "prompt-ids"):
        prompt = args.prompt if args.prompt_ids is None else args.prompt_ids
        c, = gen.complete([prompt], sampling)
        print(c.text if c.text is not None else " ".join(map(str, c.output_ids)))
        print(f"[{len(c.output_ids)} tokens, finish_reason={c.finish_reason}]", file=sys.stderr)
      elif modes[0] == "chat":
        _chat(gen, args, sampling, stop)
      else:
        summary = gen.run_jsonl(args.input, args.output, sampling, on_error=args.on_error,
                                progress=not args.no_progress)
        summary.update(gen.engine.stats)
        summary.pop("programs", None)
        print(json.dumps(summary), file=sys.stderr)
    except GenerationInterrupted as e:
      if modes[0] == "chat":
        print(flush=True)  # end a half-streamed reply
      print(f"qwen2-jax generate: {e}", file=sys.stderr, flush=True)
      return stop.exit_code
    finally:
      if gen is not None:
        gen.stop_requested = None  # the handler goes with this block
  return 0


def _chat(gen, args, sampling, stop: _StopOnSignal) -> None:
  """Multi-turn chat; the whole conversation is re-encoded each turn (ChatML)."""
  messages = [] if args.system is None else [{"role": "system", "content": args.system}]
  one_turn = args.prompt is not None
  interactive = sys.stdin.isatty() and not one_turn
  if interactive:
    print("chat: empty line or Ctrl-D to quit", file=sys.stderr)
  while True:
    if one_turn:
      user = args.prompt
    else:
      if interactive:
        print("> ", end="", flush=True, file=sys.stderr)
      with stop.raising():
        user = sys.stdin.readline()
      if not user or not user.strip():
        return
      user = user.rstrip("\n")
    messages.append({"role": "user", "content": user})
    reply = gen.chat(messages, sampling, on_text=lambda t: print(t, end="", flush=True))
    print(flush=True)
    messages.append({"role": "assistant", "content": reply})
    if one_turn:
      return
