"""`qwen2-jax bench serve`: the workload generator, the summaries and the report (no vLLM; the
jax-new worker once on a tiny random model; the full run is the benchmark itself)."""

from __future__ import annotations

import json

import numpy as np
import pytest

from qwen2_jax import cli
from qwen2_jax.infer import bench_serve


def test_workload_is_deterministic_per_seed():
  """The same seed gives the same requests; another seed gives others."""
  a = bench_serve.make_workload(48, 151936, seed=0)
  assert a == bench_serve.make_workload(48, 151936, seed=0)
  assert a["requests"] != bench_serve.make_workload(48, 151936, seed=1)["requests"]


def test_workload_respects_bounds_and_vocab():
  """Lengths stay within their bounds, ids within the vocab, and lengths are mixed."""
  w = bench_serve.make_workload(200, 1000, seed=3, prompt_len=(16, 256), output_len=(16, 256))
  p = np.array([len(r["prompt_token_ids"]) for r in w["requests"]])
  o = np.array([r["max_tokens"] for r in w["requests"]])
  ids = np.concatenate([r["prompt_token_ids"] for r in w["requests"]])
  assert len(w["requests"]) == 200
  assert p.min() >= 16 and p.max() <= 256 and o.min() >= 16 and o.max() <= 256
  assert ids.min() >= 0 and ids.max() < 1000
  assert np.median(o) < o.mean() < 256  # a long tail: mean above median
  assert len(set(p.tolist())) > 50 and len(set(o.tolist())) > 30
  assert bench_serve.max_model_len(w) % 64 == 0
  assert bench_serve.max_model_len(w) >= (p + o).max()


def test_workload_rejects_bad_bounds():
  """Inverted bounds are an error, not an empty workload."""
  with pytest.raises(ValueError):
    bench_serve.make_workload(4, 100, prompt_len=(32, 16))


def test_summaries_report_and_ratios():
  """Medians over runs, TTFT n/a when a stack has none, ratios vs the new engine, agreement."""
  def runs(wall, ttft):
    return [{"wall_s": w, "output_tokens": 100, "ttft_s": ttft} for w in wall]
  new = {"runs": runs([1.0, 2.0, 4.0], [0.1, 0.2, 0.3, 0.4]), "startup_s": 3.0,
         "compile_s": 5.0, "outputs": [[1, 2], [3, 4]],
         "step_time_per_run": {"T=16": {"steps": 20.0, "seconds": 2.0},
                               "T=64": {"steps": 0.0, "seconds": 0.0}}}
  vllm = {"runs": runs([2.0, 2.0, 2.0], [0.2] * 4), "startup_s": 9.0, "compile_s": None,
          "outputs": [[1, 2], [3, 5]]}
  static = {"runs": runs([4.0, 4.0, 4.0], None), "startup_s": 1.0, "compile_s": 2.0,
            "outputs": [[9], [3, 4]]}
  stacks = {"jax-new": new, "vllm": vllm, "jax-static": static}
  for r in stacks.values():
    r["summary"] = bench_serve.summarize_runs(r["runs"])
  assert new["summary"]["output_tok_s"] == 50.0
  assert new["summary"]["ttft_median_s"] == pytest.approx(0.25)
  assert static["summary"]["ttft_median_s"] is None
  cmp = bench_serve._compare(stacks)  # pylint: disable=protected-access
  assert cmp["ratios"] == {"jax-new/vllm": 1.0, "jax-new/jax-static": 2.0}
  assert cmp["agreement"]["vllm"] == {"first_token": 1.0, "whole_output": 0.5}
  assert cmp["agreement"]["jax-static"] == {"first_token": 0.5, "whole_output": 0.5}
  result = {"preset": "qwen2-tiny", "dtype": "float32", "repeats": 3, "max_num_seqs": 4,
            "max_num_batched_tokens": 64,
            "machine": {"cpu_count": 2, "cpu_model": "x", "load_average_start": [1, 1, 1],
                        "load_average_end": [2, 2, 2]},
            "workload": {"num_requests": 2, "prompt_tokens": 10, "output_tokens": 100},
            "stacks": stacks, **cmp}
  table = bench_serve.format_report(result)
  assert "| jax-new | 50.0 | 250 | " in table
  assert "| jax-static | 25.0 | n/a | n/a |" in table
  assert "jax-new/jax-static 2.00x" in table
  assert ("jax-new steps per timed run, by padded token count: T=16: 20 steps, 2.00 s (100 ms "
          "each), T=64: 0 steps, 0.00 s") in table
  json.dumps(result)  # the report is JSON as written
  del stacks["jax-new"]
  assert "| vllm | 50.0 | 200 | 200 | 2.00 | 9.0 | n/a | n/a |" in (
      bench_serve.format_report(result))


def test_cli_without_vllm_says_how_to_make_it(tmp_path, capsys):
  """A missing vLLM virtualenv is a skipped stack with the setup command, not a failure."""
  model = tmp_path / "model"
  model.mkdir()
  (model / "config.json").write_text(json.dumps({"vocab_size": 500}))
  rc = cli.main(["bench", "serve", "--stacks", "vllm", "--vllm-python", str(tmp_path / "none"),
                 "--model-dir", str(model), "--workdir", str(tmp_path / "w"),
                 "--num-requests", "4"])
  out = capsys.readouterr()
  assert rc == 0
  assert "setup_vllm_cpu.sh" in out.err
  assert "| vllm | skipped: no vLLM virtualenv" in out.out
  result = json.loads((tmp_path / "w" / "results.json").read_text())
  assert result["workload"]["num_requests"] == 4
  assert len(json.loads((tmp_path / "w" / "workload.json").read_text())["requests"]) == 4


def test_cli_help_lists_the_options(capsys):
  """`qwen2-jax bench serve --help` works without vLLM."""
  with pytest.raises(SystemExit) as e:
    cli.main(["bench", "serve", "--help"])
  assert e.value.code == 0
  assert "--max-num-batched-tokens" in capsys.readouterr().out


def test_worker_finds_both_engines():
  """The worker picks the continuous-batching Engine and the static baseline of this checkout."""
  from qwen2_jax.infer import Engine, StaticEngine  # pylint: disable=import-outside-toplevel
  from qwen2_jax.infer import bench_serve_worker  # pylint: disable=import-outside-toplevel
  assert bench_serve_worker.engine_classes() == (Engine, StaticEngine)


def test_worker_times_the_new_engine_steps(tmp_path):
  """The jax-new worker runs a small workload warm-up + repeats times on a tiny random model;
  its result carries each timed run's output count and the steps of one timed run by padded
  token count, which add up to the engine's steps over the timed runs."""
  from qwen2_jax.infer import bench_serve_worker  # pylint: disable=import-outside-toplevel
  model = str(tmp_path / "model")
  bench_serve_worker.prepare(model, "qwen2-tiny", "float32", 0)
  workload = bench_serve.make_workload(5, 512, prompt_len=(4, 40), output_len=(2, 12))
  (tmp_path / "workload.json").write_text(json.dumps(workload))
  spec = {"model_dir": model, "workload": str(tmp_path / "workload.json"), "dtype": "float32",
          "repeats": 2, "warmup": 1, "max_num_seqs": 4, "max_num_batched_tokens": 32,
          "kv_cache_gib": 0.01, "max_model_len": 64}
  out = bench_serve_worker.bench_stack("jax-new", spec)
  want = sum(r["max_tokens"] for r in workload["requests"])
  assert [r["output_tokens"] for r in out["runs"]] == [want, want]
  per_run = out["step_time_per_run"]
  assert per_run and all(v["seconds"] >= 0 for v in per_run.values())
  timed_steps = sum(v["steps"] for v in per_run.values()) * spec["repeats"]
  warm_steps = out["stats"]["steps"] - timed_steps
  assert timed_steps > 0 and warm_steps == pytest.approx(timed_steps / spec["repeats"])
