"""`qwen2_jax.infer`: JIT-compiled batch generation with a KV cache.

  Engine          continuous batching over a paged KV cache: token ids in, token ids + logprobs
                  + finish reasons out (engine.py; host-side pages and scheduler: paged.py)
  StaticEngine    the static-batching baseline (static_engine.py)
  SamplingParams  per-request greedy / temperature / top-k / top-p / seed / stops (sampling.py)
  Generator       Engine + tokenizer: text prompts, chat, JSONL batches (api.py)
  GenerationInputError and its subclasses: typed input errors naming the parameter (validation.py)
"""

from qwen2_jax.infer.api import Completion, Generator, load_model
from qwen2_jax.infer.engine import (Engine, GenerationResult, ReplicaProcessError, StaticEngine,
                                   decode_layout, init_cache)
from qwen2_jax.infer.paged import KVCacheTooSmallError
from qwen2_jax.infer.sampling import SamplingParams
from qwen2_jax.infer.validation import (ContextOverflowError, EmptyPromptError,
                                        GenerationInputError, InvalidParameterError,
                                        PromptTooLongError, RequestFormatError, TokenIdError)
