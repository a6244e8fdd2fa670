"""``python -m benchmarks data`` on a tiny budget: it runs, checks its readers agree, writes JSON."""
import json
import os

from benchmarks import data as bench_data


def test_bench_data_smoke(tmp_path, capsys):
    out = str(tmp_path / "out")
    assert bench_data.main(["--out", out, "--source", "digits", "--budget", "0.02", "--min-time", "0.01",
                            "--repeats", "1",
                            "--compression", "lzf"]) == 0
    result = json.load(open(os.path.join(out, "data.json")))
    assert os.path.getsize(os.path.join(out, "data.png")) > 0
    # 1797 digits - 179 held out = 1618 training examples over 4 shards: 405, 405, 404, 404
    assert result["source"] == "digits" and result["shard_examples"] == 405
    assert set(result["results"]) == {"memmap", "cached", "streaming", "streaming-1MiB"}
    for name, orders in result["results"].items():
        for order in ("random", "sequential"):
            assert orders[order]["examples_per_s"] > 0
    assert result["results"]["memmap"]["random"]["ratio_vs_memmap"] == 1.0
    assert "cached" in capsys.readouterr().out
    assert sorted(os.listdir(out)) == ["data.json", "data.png"]
