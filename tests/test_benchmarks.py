"""The benchmark scripts run end to end on tiny sizes (figures are not checked, only that each row is produced)."""

import importlib.util
import json
import sys
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parent.parent
MINI_TRACE = REPO / "tests" / "data" / "mini_trace.jsonl"


def load(name: str):
    bench_dir = str(REPO / "benchmarks")
    if bench_dir not in sys.path:  # bench_bookkeeping imports bench_tiers from beside it
        sys.path.insert(0, bench_dir)
    spec = importlib.util.spec_from_file_location(name, REPO / "benchmarks" / f"{name}.py")
    mod = importlib.util.module_from_spec(spec)
    sys.modules[name] = mod
    spec.loader.exec_module(mod)
    return mod


def test_bench_tiers_new_rows_exist_and_run(tmp_path, capsys):
    tiers = load("bench_tiers")
    for tag in ("2m", "512k", "128k", "64k"):
        assert {f"h2d_{tag}", f"d2h_{tag}", f"loop_lag_{tag}"} <= set(tiers.ROW_BY_NAME)
    out = tmp_path / "tiers.json"
    rc = tiers.main(["--device", "cpu", "--rows", "h2d_128k,d2h_128k,loop_lag_64k", "--size-mib", "2", "--reps", "1",
                     "--lag-seconds", "0.05", "--no-progress", "--no-gc-freeze", "--json", str(out)])
    assert rc == 0
    rows = {r["row"]: r for r in json.loads(out.read_text())["rows"]}
    assert rows["h2d_128k"]["status"] == rows["loop_lag_64k"]["status"] == "ok"
    assert rows["loop_lag_64k"]["medians"]["p99_lag_ms"] <= rows["loop_lag_64k"]["medians"]["max_lag_ms"]
    assert "p99 < 1.5 ms" in capsys.readouterr().out


def test_bench_bookkeeping_reports_every_operation_and_restores_the_copier(tmp_path, capsys):
    book = load("bench_bookkeeping")
    from kvstore.transfer import copier

    real = copier.Copier.copy
    out = tmp_path / "book.json"
    assert book.main(["--pages", "64", "--reps", "1", "--no-gc-freeze", "--json", str(out)]) == 0
    assert copier.Copier.copy is real
    rows = json.loads(out.read_text())["rows"]
    assert [r["operation"] for r in rows] == list(book.OPERATIONS)
    assert all(r["cpu_us_per_page"] is not None and r["max_sync_step_ms"] is not None for r in rows)
    assert "demoting resize" in capsys.readouterr().out


def test_bench_trace_runs_on_a_given_trace(tmp_path, capsys):
    trace = load("bench_trace")
    out = tmp_path / "trace.json"
    assert trace.main(["--trace", str(MINI_TRACE), "--capacity-pages", "24,24,48", "--runs", "2",
                       "--json", str(out)]) == 0
    doc = json.loads(out.read_text())
    assert doc["requests"] == 120 and len(doc["us_per_request_runs"]) == 2
    assert doc["gap_points"] == pytest.approx(100 * (doc["hit_rate"] - doc["exact_lru_hit_rate"]))
    assert "exact LRU" in capsys.readouterr().out


def test_bench_trace_missing_trace_says_how_to_get_it(tmp_path):
    trace = load("bench_trace")
    with pytest.raises(SystemExit, match="conversation_trace.jsonl"):
        trace.main(["--trace", str(tmp_path / "missing.jsonl")])


def test_bench_remote_runs_both_parts(capsys, redis_server):
    """(needs redis-server, like the remote-tier tests; the script starts its own)"""
    remote = load("bench_remote")
    rc = remote.main(["--part", "all", "--synthetic", str(MINI_TRACE), "--trace", str(MINI_TRACE), "--nodes", "1,2",
                      "--local-pages", "200", "--passes", "1", "--prompts", "1", "--page-kib", "64"])
    assert rc == 0
    out = capsys.readouterr().out
    assert "| put |" in out and "| get |" in out and "event-loop lag" in out
    assert "| synthetic (120 req) | 2 |" in out and "| conversation (120 req) | 1 |" in out


def test_bench_tiers_plot_defaults_into_the_results_dir_not_the_current_one():
    parser = load("bench_tiers").build_parser()
    assert parser.parse_args(["--plot", "--reps", "1"]).plot == str(REPO / "benchmarks" / "results" / "bench_tiers.png")
    assert parser.parse_args(["--plot", "x.png"]).plot == "x.png"
    assert parser.parse_args([]).plot is None


def test_bench_commit_measures_list_and_numpy_tokens(tmp_path, capsys):
    out = tmp_path / "commit.json"
    assert load("bench_commit").main(["--tokens", "256", "--reps", "3", "--json", str(out)]) == 0
    res = json.loads(out.read_text())
    assert res["list_us"] > 0 and res["numpy_us"] > 0
    assert "list" in capsys.readouterr().out


def test_bench_serving_runs_every_part_on_a_tiny_model(tmp_path, capsys):
    pytest.importorskip("transformers")
    serving = load("bench_serving")
    out = tmp_path / "serving.json"
    assert serving.main(["--device", "cpu", "--shapes", "tiny", "--lengths", "32,64", "--reps", "1", "--tail", "8",
                         "--tokens-per-page", "4", "--oversubscribe", "2", "--overlap-batch", "2",
                         "--overlap-context", "64", "--overlap-steps", "4", "--overlap-gbps", "0.05,0",
                         "--decode", "graphs,eager", "--watch-stalls-ms", "500", "--chat-config", "turns=2",
                         "--json", str(out), "--plot", str(tmp_path)]) == 0
    doc = json.loads(out.read_text())
    assert [r["length"] for r in doc["ttft"]] == [32, 64]
    for row in doc["ttft"]:
        assert row["recompute_s"] > 0 and all(row[v]["seconds"] > 0 for v in serving.VARIANTS)
        assert row["disk_warm"]["where"]["disk"] > 0 and row["host"]["where"]["host"] > 0
        assert row["device"]["where"]["device"] * 4 == row["device"]["reused_tokens"]
    assert {(r["decode"], r["offload"], r["oversubscribe"]) for r in doc["chat"]} == {
        (d, o, 2) for d in ("graphs", "eager") for o in (True, False)}
    assert all(isinstance(r["stalls"], list) for r in doc["chat"])
    assert all(r["recomputed_turns"] + r["loaded_turns"] == 2 * r["sessions"] for r in doc["chat"])  # turns=2
    runs = doc["overlap"][0]["runs"]
    assert [r["decode"] for r in runs] == ["graphs", "eager"]
    for run in runs:
        assert [w["paced_gbps"] for w in run["with"]] == [0.05, 0]
        assert all(w["gb_per_s_moved"] > 0 and w["slowdown"] > 0 for w in run["with"])
    assert (tmp_path / "bench_serving_ttft.png").stat().st_size > 0
    text = capsys.readouterr().out
    assert "worst policy ratio" in text and "drop+recompute" in text and "slower by" in text


def test_bench_serving_chat_config_overrides_take_numeric_chatconfig_fields_only(capsys):
    pytest.importorskip("transformers")
    serving = load("bench_serving")
    args = serving.parse_args(["--chat-config", "turns=6,user_tokens=2048,think_s=0.5"])
    assert args.chat_config == {"turns": 6, "user_tokens": 2048, "think_s": 0.5}
    for bad in ("sessions=3", "turns=x", "nosuch=1", "offload=1", "turns"):
        with pytest.raises(SystemExit):
            serving.parse_args(["--chat-config", bad])
    assert "--chat-config" in capsys.readouterr().err
