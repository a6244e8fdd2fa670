"""Checkpoints: exact encode/decode round trips, no unpickling, fallback to the previous valid
checkpoint, a missing pointer, retention that never deletes another run's files."""
import json
import logging
import os
import pickle
import random
from collections import OrderedDict

import numpy as np
import pytest
import torch
from mpi4py import MPI

from hpc_dgrab import checkpoint
from hpc_dgrab.checkpoint import Position
from hpc_dgrab.errors import UserError

COMM = MPI.COMM_WORLD


def assert_same(a, b, path="state"):
    """Equal values of exactly the same types (tuple stays tuple, int keys stay int, dtypes kept)."""
    assert type(a) is type(b), f"{path}: {type(a)} != {type(b)}"
    if isinstance(a, dict):
        assert list(a.keys()) == list(b.keys()), path
        assert all(type(k) is type(j) for k, j in zip(a, b)), path
        for k in a:
            assert_same(a[k], b[k], f"{path}[{k!r}]")
        assert getattr(a, "_metadata", None) == getattr(b, "_metadata", None), path
    elif isinstance(a, (list, tuple)):
        assert len(a) == len(b), path
        for i, (x, y) in enumerate(zip(a, b)):
            assert_same(x, y, f"{path}[{i}]")
    elif isinstance(a, torch.Tensor):
        assert a.dtype == b.dtype and a.shape == b.shape, path
        assert torch.equal(a, b) or (a.is_floating_point() and torch.equal(a.isnan(), b.isnan())
                                     and torch.equal(a.nan_to_num(), b.nan_to_num())), path
    elif isinstance(a, np.ndarray):
        assert a.dtype == b.dtype and a.shape == b.shape, path
        assert a.tobytes() == b.tobytes(), path
    elif isinstance(a, np.generic):
        assert a.dtype == b.dtype and a.tobytes() == b.tobytes(), path
    elif isinstance(a, float) and a != a:
        assert b != b, path
    else:
        assert a == b, path


def roundtrip(state):
    tensors, tree = checkpoint.encode(state)
    json.loads(tree, parse_constant=lambda c: pytest.fail(f"non-strict JSON constant {c}"))
    return checkpoint.decode(tensors, tree)


def sgd_momentum_state():
    torch.manual_seed(0)
    model = torch.nn.Sequential(torch.nn.Linear(3, 4), torch.nn.BatchNorm1d(4), torch.nn.Linear(4, 2))
    opt = torch.optim.SGD(model.parameters(), lr=0.1, momentum=0.9, weight_decay=1e-4)
    for _ in range(2):
        opt.zero_grad()
        model(torch.randn(5, 3)).pow(2).sum().backward()
        opt.step()
    return model, opt


def test_roundtrip_optimizer_and_model_state_dicts():
    model, opt = sgd_momentum_state()
    sd = opt.state_dict()
    assert isinstance(next(iter(sd["state"])), int)  # optimizer state is keyed by int parameter ids
    back = roundtrip({"model": model.state_dict(), "optimizer": sd})
    assert_same({"model": model.state_dict(), "optimizer": sd}, back)
    # and they load: a fresh optimizer continues exactly like the original
    model2, opt2 = sgd_momentum_state()
    model2.load_state_dict(back["model"])
    opt2.load_state_dict(back["optimizer"])
    x = torch.randn(5, 3)
    for m, o in ((model, opt), (model2, opt2)):
        o.zero_grad()
        m(x).pow(2).sum().backward()
        o.step()
    for p, q in zip(model.parameters(), model2.parameters()):
        assert torch.equal(p, q)


def test_roundtrip_rng_states_continue_identically():
    gen = np.random.default_rng(12345)
    gen.random(3)
    rnd = random.Random(7)
    rnd.random()
    state = {"numpy": gen.bit_generator.state, "python": rnd.getstate(), "legacy": np.random.get_state(),
             "torch": torch.get_rng_state()}
    assert state["numpy"]["state"]["state"] >= 2 ** 64  # 128-bit ints survive
    back = roundtrip(state)
    assert_same(state, back)
    gen2 = np.random.default_rng()
    gen2.bit_generator.state = back["numpy"]
    rnd2 = random.Random()
    rnd2.setstate(back["python"])
    assert np.array_equal(gen.random(5), gen2.random(5)) and rnd.random() == rnd2.random()
    torch.set_rng_state(back["torch"])
    a = torch.rand(3)
    torch.set_rng_state(state["torch"])
    assert torch.equal(a, torch.rand(3))


def test_roundtrip_sorter_like_state_and_scalars():
    state = {
        "perm": np.arange(10, dtype=np.int64)[::-1].copy(), "signs": np.array([True, False]),
        "acc": np.linspace(0, 1, 6, dtype=np.float32).reshape(2, 3), "fortran": np.asfortranarray(np.eye(3)[:, :2]),
        "big_endian": np.arange(3, dtype=">i4"), "empty": np.zeros((0, 4), dtype=np.float16),
        "pair": (np.int32(3), np.float64(0.5), np.bool_(True)), "nested": [(1, "a"), [None, {2: "b", "c": 3}]],
        "floats": [float("nan"), float("inf"), -float("inf"), -0.0, 1e-310, 0.1],
        "ints": [0, -1, 2 ** 53, -(2 ** 70), 2 ** 128 + 1], 7: "int key", -3: 4.0,
        "tensors": [torch.tensor(2.5, dtype=torch.float64), torch.zeros(0, 2), torch.tensor([True, False]),
                    torch.arange(4, dtype=torch.int64).reshape(2, 2).t(), torch.ones(2, dtype=torch.bfloat16)],
        "od": OrderedDict([("z", 1), ("a", 2)]), "unicode": "ü\u2603", "flag": False, "none": None,
    }
    back = roundtrip(state)
    assert_same(state, back)
    assert back["fortran"].flags.f_contiguous and type(back["ints"][4]) is int


@pytest.mark.parametrize("bad,where", [
    ({"a": [1, {"b": object()}]}, "state['a'][1]['b']"),
    ({"a": {(1, 2): 3}}, "state['a']"),
    ({"s": {1, 2}}, "state['s']"),
    ({"o": np.array([None])}, "state['o']"),
])
def test_unsupported_values_raise_type_error_naming_the_path(bad, where):
    with pytest.raises(TypeError) as info:
        checkpoint.encode(bad)
    assert str(info.value).startswith(where + ":"), info.value


def save(d, epoch, step, state, keep=2):
    checkpoint.save(str(d), Position(epoch, step), state, COMM, keep=keep, meta={"model": "mlp"})


def names(d):
    return sorted(n for n in os.listdir(d) if not n.startswith("."))


def test_save_load_latest_and_retention(tmp_path):
    for e in range(1, 5):
        save(tmp_path, e, 0, {"w": torch.full((3,), float(e)), "epoch": e})
    save(tmp_path, 4, 17, {"w": torch.zeros(3), "epoch": 4})  # mid-epoch
    assert names(tmp_path) == ["ckpt-e00004-s0000000-r00000.safetensors",
                               "ckpt-e00004-s0000017-r00000.safetensors", "latest.json"]
    pointer = json.load(open(tmp_path / "latest.json"))
    assert pointer["position"] == {"epoch": 4, "step": 17} and pointer["world_size"] == 1
    assert pointer["meta"] == {"model": "mlp"} and pointer["run_id"]
    got = checkpoint.load_latest(str(tmp_path), COMM)
    assert got.position == Position(4, 17) and got.meta == {"model": "mlp"}
    assert_same(got.state, {"w": torch.zeros(3), "epoch": 4})
    assert Position(4, 17) > Position(4, 0) > Position(3, 99)


def test_empty_or_absent_directory_gives_none(tmp_path):
    assert checkpoint.load_latest(str(tmp_path), COMM) is None
    assert checkpoint.load_latest(str(tmp_path / "absent"), COMM) is None


def test_truncated_newest_falls_back_with_a_warning(tmp_path, caplog):
    save(tmp_path, 1, 0, {"e": 1})
    save(tmp_path, 2, 0, {"e": 2, "w": torch.ones(1000)})
    newest = tmp_path / "ckpt-e00002-s0000000-r00000.safetensors"
    data = newest.read_bytes()
    newest.write_bytes(data[:len(data) // 2])
    with caplog.at_level(logging.WARNING, logger="hpc_dgrab.checkpoint"):
        got = checkpoint.load_latest(str(tmp_path), COMM)
    assert got.position == Position(1, 0) and got.state == {"e": 1}
    assert any("ckpt-e00002-s0000000-r00000.safetensors" in r.getMessage() for r in caplog.records)


def test_flipped_byte_is_detected_by_the_checksum(tmp_path, caplog):
    save(tmp_path, 1, 0, {"e": 1})
    save(tmp_path, 2, 0, {"e": 2, "w": torch.ones(1000)})
    newest = tmp_path / "ckpt-e00002-s0000000-r00000.safetensors"
    data = bytearray(newest.read_bytes())
    data[-10] ^= 0xFF
    newest.write_bytes(bytes(data))
    with caplog.at_level(logging.WARNING, logger="hpc_dgrab.checkpoint"):
        assert checkpoint.load_latest(str(tmp_path), COMM).position == Position(1, 0)
    assert any("checksum" in r.getMessage() for r in caplog.records)


def test_missing_pointer_uses_newest_valid(tmp_path, caplog):
    save(tmp_path, 1, 0, {"e": 1})
    save(tmp_path, 2, 5, {"e": 2})
    os.unlink(tmp_path / "latest.json")
    with caplog.at_level(logging.WARNING, logger="hpc_dgrab.checkpoint"):
        got = checkpoint.load_latest(str(tmp_path), COMM)
    assert got.position == Position(2, 5) and got.state == {"e": 2} and got.meta == {"model": "mlp"}
    assert any("latest.json is missing" in r.getMessage() for r in caplog.records)
    (tmp_path / "latest.json").write_text("{not json")
    assert checkpoint.load_latest(str(tmp_path), COMM).position == Position(2, 5)


def test_no_valid_checkpoint_and_world_size_mismatch_are_one_line_errors(tmp_path):
    save(tmp_path, 1, 0, {"e": 1})
    f = tmp_path / "ckpt-e00001-s0000000-r00000.safetensors"
    f.write_bytes(b"garbage")
    with pytest.raises(UserError, match="no valid checkpoint") as info:
        checkpoint.load_latest(str(tmp_path), COMM)
    assert "\n" not in str(info.value)
    save(tmp_path, 2, 0, {"e": 2})
    pointer = json.load(open(tmp_path / "latest.json"))
    pointer["world_size"] = 4
    (tmp_path / "latest.json").write_text(json.dumps(pointer))
    with pytest.raises(UserError, match="written by 4 ranks, this job has 1"):
        checkpoint.load_latest(str(tmp_path), COMM)


def test_retention_never_deletes_foreign_files(tmp_path):
    # another run left these: a checkpoint at epochs 1 and 2 (written in another process, simulated
    # by writing the files directly) and an unrelated file
    for e in (1, 2):
        checkpoint.write_file(str(tmp_path / checkpoint.file_name(Position(e, 0), 0)), Position(e, 0),
                              {"e": e}, 0, 1, run_id="other")
    (tmp_path / "notes.txt").write_text("keep")
    for e in (3, 4, 5, 6):
        save(tmp_path, e, 0, {"e": e}, keep=2)
    assert names(tmp_path) == ["ckpt-e00001-s0000000-r00000.safetensors",
                               "ckpt-e00002-s0000000-r00000.safetensors",
                               "ckpt-e00005-s0000000-r00000.safetensors",
                               "ckpt-e00006-s0000000-r00000.safetensors", "latest.json", "notes.txt"]


class _Evil:
    def __init__(self, target):
        self.target = target

    def __reduce__(self):
        return (open, (self.target, "w"))


def test_crafted_pickle_is_never_run(tmp_path):
    target = tmp_path / "pwned"
    payload = pickle.dumps({"model": _Evil(str(target))})
    pickle.loads(payload).get("model").close()  # the payload is real: unpickling it creates the file
    assert target.exists()
    target.unlink()
    (tmp_path / "ckpt-e00003-r00000.pt").write_bytes(payload)
    (tmp_path / "latest.json").write_text(json.dumps({"epoch": 3, "world_size": 1}))
    # only the pickle is there: refused with one line, never unpickled
    with pytest.raises(UserError, match="never loaded because unpickling can run code"):
        checkpoint.load_latest(str(tmp_path), COMM)
    assert not target.exists()
    # the same payload named like a new checkpoint is just an unreadable file
    (tmp_path / "ckpt-e00003-s0000000-r00000.safetensors").write_bytes(payload)
    os.unlink(tmp_path / "latest.json")
    with pytest.raises(UserError, match="no valid checkpoint"):
        checkpoint.load_latest(str(tmp_path), COMM)
    assert not target.exists()
    # beside a valid checkpoint the pickle is ignored
    save(tmp_path, 1, 0, {"e": 1})
    assert checkpoint.load_latest(str(tmp_path), COMM).state == {"e": 1}
    assert not target.exists()


def test_save_failure_is_one_collective_error_and_keeps_the_pointer(tmp_path):
    save(tmp_path, 1, 0, {"e": 1})
    with pytest.raises(UserError, match=r"checkpoint: cannot save .*TypeError: state\['bad'\]: value of type") as info:
        save(tmp_path, 2, 0, {"bad": object()})
    assert info.value.collective
    assert json.load(open(tmp_path / "latest.json"))["position"] == {"epoch": 1, "step": 0}
    assert names(tmp_path) == ["ckpt-e00001-s0000000-r00000.safetensors", "latest.json"]
