"""Benchmarks of issue-style goals: simulate (N virtual workers), memory (peak RSS), goals fields."""
import json
import math

import pytest

from tests.helpers import run_cmd


def test_simulate_quick_herding_linreg_training(tmp_path):
    from benchmarks import simulate
    from hpc_dgrab.data.sources import SourceError, load_source

    try:
        load_source("fashion-mnist")
    except SourceError:
        pytest.skip("fashion-mnist not installed")
    assert simulate.main(["--quick", "--out", str(tmp_path)]) == 0
    res = json.loads((tmp_path / "simulate.json").read_text())
    assert res["workers"] == [4, 8] and (tmp_path / "simulate.png").stat().st_size > 1000
    for n in ("4", "8"):
        h = res["herding"][n]
        assert h["dgrab-exact"] < h["rr"] and h["dgrab-parallel"] < h["rr"], h
        lin = res["linreg"][n]
        assert math.isclose(lin["gap_topk_minus_regtopk"], lin["topk"] - lin["regtopk"])
        tr = res["training"][n]
        assert len(tr["dgrab"]) == len(tr["rr"]) == 2
        assert tr["dgrab"][0] == tr["rr"][0]  # the same first order, data and model: the same first epoch
    assert set(res["growth"]["herding_bound_exponent"]) == set(simulate.HERDING)


def test_growth_exponent_and_goals_fields():
    from benchmarks import comm, order
    from benchmarks.simulate import _growth

    assert _growth([2, 4, 8], [3.0, 6.0, 12.0]) == pytest.approx(1.0)
    assert _growth([2, 4], [1.0, -1.0]) is None
    summary = {"methods": {"rr": {"epoch_time_ratio_vs_rr": 1.0},
                           "dgrab-parallel": {"epoch_time_ratio_vs_rr": 1.1, "step_time_ratio_vs_rr": 1.6,
                                              "order_bytes_ratio": 1.0}},
               "sign_agreement": {"mismatches": 0, "max_abs_cos_at_mismatch": 0.0}}
    g = order.goals(summary)
    assert g["dgrab_epoch_time_vs_rr"]["met"] and not g["dgrab_step_time_vs_rr"]["met"]
    assert g["dgrab_bytes_per_step_vs_rr"]["value"] == 2.0 and not g["dgrab_bytes_per_step_vs_rr"]["met"]
    assert g["same_signs_as_materialised_gradients"]["met"]
    result = {"allreduce": [{"allreduce_ratio": 0.97}, {"allreduce_ratio": 0.9}],
              "gossip_sizes": [{"numel": 10, "gossip_copy_ratio": 1.05, "gossip_ratio": 1.0},
                               {"numel": 100, "gossip_copy_ratio": 1.5, "gossip_ratio": 1.1}]}
    g = comm.goals(result)
    assert g["allreduce_throughput_vs_best_raw"] == {"value": 0.9, "rule": ">= 0.95 at every size",
                                                     "met": False}
    assert not g["gossip_step_copy_vs_raw_exchange"]["met"] and g["gossip_step_vs_raw_exchange"]["met"]


@pytest.mark.slow
@pytest.mark.timeout(400)
def test_memory_quick(tmp_path):
    proc = run_cmd(["-m", "benchmarks", "memory", "--quick", "--out", str(tmp_path)], timeout=360)
    assert proc.returncode == 0, proc.stderr
    res = json.loads((tmp_path / "memory.json").read_text())
    configs = [(r["sync"], r["compress"], r["order"]) for r in res["rows"]]
    assert configs == [("allreduce", "regtopk", "dgrab"), ("gossip", "none", "rr")]
    for r in res["rows"]:
        assert r["model_bytes"] == r["params"] * 4 and abs(r["params"] - 100_000) < 300
        assert r["peak_rss"] > r["baseline_rss"] > 0
        assert r["overhead_bytes"] == pytest.approx(r["overhead_x_model"] * r["model_bytes"])
        assert r["held_x_model"]["momentum"] == pytest.approx(1.0, abs=1e-3)   # SGD's momentum: one model
        key = f"{r['sync']}/{r['compress']}/{r['order']}@{r['params']}"
        assert res["goals"]["per_config"][key]["met"] == r["goal_met"]
    sync = res["rows"][0]["held_x_model"]
    # the gradient buckets (plus the payload region) and the error memory: at least one model each
    assert sync["gradients"] >= 1.0 and sync["compression"] >= 1.0
    assert res["goals"]["overhead_vs_model"]["met"] == all(r["goal_met"] for r in res["rows"])


def test_memory_bad_params():
    from benchmarks import memory
    from hpc_dgrab.errors import UserError

    with pytest.raises(UserError, match="--params"):
        memory.main(["--out", "x", "--params", "10"])
