"""The two compression benchmarks as commands: small runs, their JSON, and one-line errors."""
import json
import os

from benchmarks import compress as compress_bench
from tests.helpers import assert_one_line_error, run_cmd


def test_regtopk_linreg_command_writes_json_and_png(tmp_path):
    out = str(tmp_path / "lr")
    proc = run_cmd(["-m", "benchmarks", "regtopk-linreg", "--workers", "4", "--dim", "10",
                    "--samples", "50", "--rounds", "60", "--lr", "0.08", "--out", out], timeout=120)
    assert proc.returncode == 0, proc.stderr
    with open(os.path.join(out, "regtopk-linreg.json")) as fh:
        res = json.load(fh)
    assert set(res["log10_err"]) == {"dense", "topk", "regtopk"}
    for method, curve in res["log10_err"].items():
        assert len(curve) == 60
        assert res["final_log10_err"][method] == curve[-1]
    assert res["config"]["ranks"] == 1 and res["config"]["dtype"] == "float64"
    # k = 6 of 10 entries, int32 index + float64 value, 4 workers, 60 rounds (one rank sends them all)
    assert res["methods"]["topk"]["bytes_sent_all_ranks"] == 60 * 4 * 6 * (4 + 8)
    assert res["methods"]["dense"]["bytes_sent_all_ranks"] == 60 * 10 * 8
    assert res["final_log10_err"]["dense"] < res["initial_log10_err"]
    assert os.path.getsize(os.path.join(out, "regtopk-linreg.png")) > 1000
    assert "regtopk" in proc.stdout


def test_regtopk_linreg_bad_input_is_one_line(tmp_path):
    proc = run_cmd(["-m", "benchmarks", "regtopk-linreg", "--methods", "dense,foo",
                    "--out", str(tmp_path)])
    assert_one_line_error(proc, "--methods", "foo")
    proc = run_cmd(["-m", "benchmarks", "regtopk-linreg", "--density", "1.5", "--out", str(tmp_path)])
    assert_one_line_error(proc, "--density")
    assert not os.listdir(tmp_path)


def test_compress_bench_small(tmp_path, capsys):
    assert compress_bench.main(["--sizes", "1000,5000", "--densities", "0.01,0.1", "--repeats", "1",
                                "--out", str(tmp_path)]) == 0
    with open(tmp_path / "compress.json") as fh:
        res = json.load(fh)
    assert len(res["selection"]) == 4 and len(res["wire"]) == 4
    for row in res["selection"]:
        assert row["topk_select_ratio"] > 0 and row["regtopk_select_ratio"] > 0
    wire = {(r["n"], r["density"]): r for r in res["wire"]}
    assert wire[(5000, 0.01)]["wire_bytes"] == 50 * 8 and wire[(5000, 0.01)]["dense_bytes"] == 5000 * 4
    assert abs(wire[(1000, 0.1)]["ratio"] - 0.2) < 1e-12
    assert "torch.topk" in capsys.readouterr().out
