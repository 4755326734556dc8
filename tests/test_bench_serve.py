"""`qwen2-jax bench serve`: the workload generator, the summaries and the report (no vLLM; the
jax-new worker once on a tiny random model; the full run is the benchmark itself)."""

from __future__ import annotations

import io
import json
import os
import sys
import time

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
  assert "paired" not in table
  paired = bench_serve._compare(stacks, paired=True)  # pylint: disable=protected-access
  # run i over run i: jax-new's 100, 50, 25 tok/s over vLLM's 50 each; static's 25 each
  assert paired["paired_ratios"]["jax-new/vllm"] == {"median": 1.0, "rounds": [2.0, 1.0, 0.5]}
  assert paired["paired_ratios"]["jax-new/jax-static"]["rounds"] == [4.0, 2.0, 1.0]
  result.update(paired, order="interleaved", schedule=[
      {"round": 0, "stack": "jax-new", "start_s": 0.0, "end_s": 1.0,
       "waiting_stacks_cpu_s": {"vllm": 0.25, "jax-static": 0.5}}])
  table = bench_serve.format_report(result)
  assert "median of 3 runs, interleaved rounds" in table
  assert ("paired ratios (the runs of each round): jax-new/vllm 1.00x median (2.00x, 1.00x, "
          "0.50x), jax-new/jax-static 2.00x median (4.00x, 2.00x, 1.00x)") in table
  assert "another stack's run: at most 0.50 CPU-s" in table
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
  assert result["order"] == "interleaved" and result["schedule"] == []
  assert result["workload"]["num_requests"] == 4
  assert len(json.loads((tmp_path / "w" / "workload.json").read_text())["requests"]) == 4


# A stand-in worker speaking the gated protocol: start-up, then before each timed run the file
# OUT.wait<i> and a line from stdin; logs when each run starts and ends; FAIL: -1 never, "start"
# exits before its first flag, "hang" never writes it, i exits with code 3 at timed run i.
_FAKE_WORKER = """
import json, os, sys, time
out, name, repeats, fail = sys.argv[1], sys.argv[2], int(sys.argv[3]), sys.argv[4]
assert sys.argv[5] == "--gated"
time.sleep(0.1)
if fail == "start":
  sys.exit(4)
if fail == "hang":
  time.sleep(600)
runs = []
for i in range(repeats):
  open(f"{out}.wait{i}", "w").close()
  if not sys.stdin.readline():
    sys.exit("eof")
  if i == int(fail):
    sys.exit(3)
  t0 = time.monotonic()
  time.sleep(0.15)
  runs.append({"wall_s": 0.15, "output_tokens": 10, "ttft_s": None, "t0": t0,
               "t1": time.monotonic()})
json.dump({"stack": name, "runs": runs}, open(out + ".tmp", "w"))
os.replace(out + ".tmp", out)
"""


def _fake_workers(tmp_path, fails: dict[str, str]):
  script = tmp_path / "worker.py"
  script.write_text(_FAKE_WORKER)
  return {name: ([sys.executable, str(script), str(tmp_path / f"{name}.json"), name, "3", fail],
                 tmp_path / f"{name}.json", None) for name, fail in fails.items()}


def test_interleaved_rounds_run_one_stack_at_a_time(tmp_path):
  """`run_interleaved`: every worker reaches its first timed run before any is timed; then
  rounds of one run per stack, never two at once, the order reversed every other round; a
  worker that fails mid-way is an error for its stack only, and the others finish."""
  log = []
  workers = _fake_workers(tmp_path, {"a": "-1", "b": "-1", "c": "-1"})
  results, schedule = bench_serve.run_interleaved(workers, 3, 60, log.append, pause=0.0)
  assert [(e["round"], e["stack"]) for e in schedule] == [
      (0, "a"), (0, "b"), (0, "c"), (1, "c"), (1, "b"), (1, "a"), (2, "a"), (2, "b"), (2, "c")]
  spans = sorted((r["t0"], r["t1"]) for res in results.values() for r in res["runs"])
  assert len(spans) == 9
  assert all(end <= start for (_, end), (start, _) in zip(spans, spans[1:]))
  assert all(e["end_s"] >= e["start_s"] for e in schedule)
  # the others wait (in the last round, those done have exited)
  assert all(set(e["waiting_stacks_cpu_s"]) == {"a", "b", "c"} - {e["stack"]}
             for e in schedule[:6])
  assert not list(tmp_path.glob("*.wait*"))
  workers = _fake_workers(tmp_path, {"a": "-1", "b": "1", "c": "-1"})
  results, schedule = bench_serve.run_interleaved(workers, 3, 60, log.append, pause=0.0)
  assert results["b"] == {"error": "exit code 3 (see its output above)"}
  assert len(results["a"]["runs"]) == len(results["c"]["runs"]) == 3
  assert [e["stack"] for e in schedule] == ["a", "b", "c", "c", "b", "a", "a", "c"]


def test_interleaved_start_up_failures_and_hangs_end_only_their_stack(tmp_path):
  """A worker that dies before its first timed run, and one that never gets there (killed at
  the timeout, with its session), are errors; the remaining stack runs all its rounds."""
  workers = _fake_workers(tmp_path, {"dies": "start", "hangs": "hang", "ok": "-1"})
  t0 = time.monotonic()
  results, schedule = bench_serve.run_interleaved(workers, 3, 2, lambda _: None, pause=0.0)
  assert time.monotonic() - t0 < 30
  assert results["dies"] == {"error": "exit code 4 (see its output above)"}
  assert results["hangs"] == {"error": "timed out after 2 s"}
  assert len(results["ok"]["runs"]) == 3 and [e["stack"] for e in schedule] == ["ok"] * 3


def test_cpu_seconds_of_a_process_tree(tmp_path):
  """Utime, stime and the waited-for children's times of a process and its descendants, not
  of others; unreadable entries are skipped."""
  tick = os.sysconf("SC_CLK_TCK")
  def stat(pid, ppid, ticks):  # fields 14-17: utime stime cutime cstime
    (tmp_path / str(pid)).mkdir()
    (tmp_path / str(pid) / "stat").write_text(
        f"{pid} (a (b) c) S {ppid} 0 0 0 0 0 0 0 0 0 {' '.join(map(str, ticks))} 0 0\n")
  stat(10, 1, (tick, tick, 0, 0))
  stat(11, 10, (2 * tick, 0, tick, tick))
  stat(12, 11, (tick, 0, 0, 0))
  stat(20, 1, (100 * tick, 0, 0, 0))
  (tmp_path / "13").mkdir()  # no stat: gone since the listing
  (tmp_path / "14").mkdir()
  (tmp_path / "14" / "stat").write_text("garbage")
  assert bench_serve._tree_cpu_seconds(10, str(tmp_path)) == pytest.approx(7.0)  # pylint: disable=protected-access
  assert bench_serve._tree_cpu_seconds(12, str(tmp_path)) == pytest.approx(1.0)  # pylint: disable=protected-access
  assert bench_serve._tree_cpu_seconds(99, str(tmp_path)) == 0.0  # pylint: disable=protected-access


def test_gated_worker_waits_for_the_driver(tmp_path, monkeypatch):
  """The JAX worker's gate: the file that says it is idle, a line to go; EOF exits."""
  from qwen2_jax.infer import bench_serve_worker  # pylint: disable=import-outside-toplevel
  out = str(tmp_path / "r.json")
  monkeypatch.setattr(sys, "stdin", io.StringIO("go\n"))
  bench_serve_worker.wait_for_go(out, 0)
  assert (tmp_path / "r.json.wait0").exists()
  with pytest.raises(SystemExit, match="closed stdin"):
    bench_serve_worker.wait_for_go(out, 1)


@pytest.mark.parametrize("flag,value", [("--repeats", "0"), ("--warmup", "-1")])
def test_cli_refuses_run_counts_that_give_no_result(tmp_path, capsys, flag, value):
  """--repeats 0 (nothing to report) and a negative --warmup are one-line errors naming the
  option."""
  rc = cli.main(["bench", "serve", "--stacks", "vllm", "--vllm-python", str(tmp_path / "none"),
                 "--workdir", str(tmp_path / "w"), flag, value])
  err = capsys.readouterr().err
  assert rc != 0 and flag in err and value in err and "Traceback" not in err


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
  gated = []
  out = bench_serve_worker.bench_stack("jax-new", spec, gate=gated.append)
  assert gated == [0, 1]  # before each timed run, none before the warm-up
  want = sum(r["max_tokens"] for r in workload["requests"])
  assert [r["output_tokens"] for r in out["runs"]] == [want, want]
  per_run = out["step_time_per_run"]
  assert per_run and all(v["seconds"] >= 0 for v in per_run.values())
  timed_steps = sum(v["steps"] for v in per_run.values()) * spec["repeats"]
  warm_steps = out["stats"]["steps"] - timed_steps
  assert timed_steps > 0 and warm_steps == pytest.approx(timed_steps / spec["repeats"])
