"""`qwen2-jax generate`: one prompt, interactive chat, or an offline JSONL batch.

  qwen2-jax generate MODEL --prompt "Once upon a time" --max-new-tokens 64
  qwen2-jax generate MODEL --chat                      # multi-turn ChatML, streamed
  qwen2-jax generate MODEL --chat --prompt "Hi!"       # one chat turn, streamed
  qwen2-jax generate MODEL --input in.jsonl --output out.jsonl [--on-error stop]

MODEL is an HF directory (config.json + safetensors) or an Orbax directory from
`qwen2-jax convert`; the tokenizer defaults to MODEL's own files (--tokenizer to override).
Exit codes: 0 ok, 2 bad input (a typed error naming the parameter), 1 other failures.
"""

from __future__ import annotations

import argparse
import json
import sys


def register(subparsers) -> None:
  """Adds the `generate` parser to `subparsers`."""
  p = subparsers.add_parser(
      "generate", help="generate text: one prompt, chat, or a JSONL batch",
      description="JIT-compiled batch generation with a KV cache. One of --prompt, "
                  "--prompt-ids, --chat, or --input/--output.")
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
                    help="batch: skip bad lines (reported) or stop before generating")
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
  e.add_argument("--batch-size", type=int, default=8, help="rows per compiled batch")
  e.add_argument("--max-context", type=int, default=None,
                 help="longest prompt + new tokens (default: max_position_embeddings)")
  e.add_argument("--dtype", default="float32", help="param dtype (float32, bfloat16)")
  e.add_argument("--compute-dtype", default=None, help="activation dtype (default: as saved)")
  e.add_argument("--no-progress", action="store_true", help="no progress bar (batch mode)")
  p.set_defaults(func=_run)


def _fail(error: Exception, code: int = 2) -> int:
  print(f"qwen2-jax generate: error: {error}", file=sys.stderr)
  return code


def _run(args: argparse.Namespace) -> int:
  # pylint: disable=import-outside-toplevel
  from qwen2_jax.infer import validation
  from qwen2_jax.infer.api import Generator
  from qwen2_jax.infer.sampling import SamplingParams

  modes = [m for m, on in (("prompt", args.prompt is not None and not args.chat),
                           ("prompt-ids", args.prompt_ids is not None), ("chat", args.chat),
                           ("batch", args.input is not None or args.output is not None)) if on]
  if len(modes) != 1:
    return _fail(ValueError(f"choose exactly one mode of --prompt, --prompt-ids, --chat, "
                            f"--input/--output (got {modes or 'none'})"))
  if modes == ["batch"] and not (args.input and args.output):
    return _fail(ValueError("batch mode needs both --input and --output"))
  try:
    sampling = SamplingParams(max_new_tokens=args.max_new_tokens, temperature=args.temperature,
                              top_k=args.top_k, top_p=args.top_p, seed=args.seed,
                              stop_token_ids=tuple(args.stop_id), ignore_eos=args.ignore_eos)
  except validation.GenerationInputError as e:
    return _fail(e)
  try:
    gen = Generator.from_pretrained(args.model, args.tokenizer, dtype=args.dtype,
                                    compute_dtype=args.compute_dtype,
                                    max_batch_size=args.batch_size, max_context=args.max_context)
  except (FileNotFoundError, ValueError) as e:
    return _fail(e, 1)
  try:
    if modes[0] in ("prompt", "prompt-ids"):
      prompt = args.prompt if args.prompt_ids is None else args.prompt_ids
      c, = gen.complete([prompt], sampling)
      print(c.text if c.text is not None else " ".join(map(str, c.output_ids)))
      print(f"[{len(c.output_ids)} tokens, finish_reason={c.finish_reason}]", file=sys.stderr)
    elif modes[0] == "chat":
      _chat(gen, args, sampling)
    else:
      summary = gen.run_jsonl(args.input, args.output, sampling, on_error=args.on_error,
                              progress=not args.no_progress)
      summary.update(gen.engine.stats)
      summary.pop("programs", None)
      print(json.dumps(summary), file=sys.stderr)
  except validation.GenerationInputError as e:
    return _fail(e)
  return 0


def _chat(gen, args, sampling) -> None:
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
