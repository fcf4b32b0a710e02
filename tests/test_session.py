"""SessionStore: exact round trips, LRU + disk, atomic writes, id validation, corrupt files, locks."""
import os
import subprocess
import sys
import textwrap
import threading
import time

import pytest
import torch
from safetensors.torch import save_file

from cortexlab.cortex.session import SessionCorruptError, SessionStore, validate_session_id


def make_state(seed=0):
    """A state with several dtypes, including values whose bits are easy to lose (-0.0, subnormals)."""
    gen = torch.Generator().manual_seed(seed)
    return {
        "layer12.S": torch.randn(2, 4, 16, 8, generator=gen),
        "layer12.conv": torch.randn(2, 3, 32, generator=gen).to(torch.bfloat16),
        "layer12.win_k": torch.randn(2, 5, 4, generator=gen).half(),
        "layer12.pos": torch.randint(-2**62, 2**62, (3,), generator=gen, dtype=torch.int64),
        "layer12.mask": torch.rand(7, generator=gen) > 0.5,
        "odd": torch.tensor([-0.0, 1e-40, 3.4e38], dtype=torch.float32),
        "scalar": torch.tensor(2.5, dtype=torch.float64),
        "empty": torch.zeros(0, 4),
    }


def assert_bit_identical(actual, expected):
    assert actual.keys() == expected.keys()
    for key in expected:
        a, e = actual[key], expected[key]
        assert a.dtype == e.dtype and a.shape == e.shape and a.device.type == "cpu", key
        assert torch.equal(a.reshape(-1).view(torch.uint8), e.contiguous().reshape(-1).view(torch.uint8)), key


# -- round trips --------------------------------------------------------------------------

@pytest.mark.parametrize("persist", [False, True])
def test_round_trip_exact(tmp_path, persist):
    store = SessionStore(directory=tmp_path if persist else None)
    state, meta = make_state(), {"tokens": "48", "config": "abc123"}
    store.put("s1", state, meta)
    got_state, got_meta = store.get("s1")
    assert_bit_identical(got_state, state)
    assert got_meta == meta
    if persist:
        fresh = SessionStore(directory=tmp_path).get("s1")  # new store: read from disk
        assert_bit_identical(fresh.state, state)
        assert fresh.metadata == meta
    else:
        assert list(tmp_path.iterdir()) == []


def test_get_shares_tensors_unless_copy(tmp_path):
    store = SessionStore(directory=tmp_path)
    x = torch.ones(3, requires_grad=True) * 2  # non-leaf with a graph
    store.put("a", {"x": x})
    shared = store.get("a").state["x"]
    assert not shared.requires_grad and shared.grad_fn is None
    assert shared.data_ptr() == x.data_ptr()  # no copy of a contiguous tensor
    copied = store.get("a", copy=True).state["x"]
    copied += 1
    assert torch.equal(store.get("a").state["x"], torch.full((3,), 2.0))
    meta = store.get("a").metadata
    meta["x"] = "y"
    assert store.get("a").metadata == {}


def test_noncontiguous_and_shared_memory_tensors(tmp_path):
    base = torch.arange(24.0).reshape(4, 6)
    state = {"t": base.t(), "whole": base, "view": base[1], "same": base}
    SessionStore(directory=tmp_path).put("a", state)
    got = SessionStore(directory=tmp_path).get("a").state
    assert_bit_identical(got, state)
    assert all(t.is_contiguous() for t in got.values())


def test_metadata_only_and_empty_state(tmp_path):
    SessionStore(directory=tmp_path).put("a", {}, {"k": "v"})
    assert SessionStore(directory=tmp_path).get("a") == ({}, {"k": "v"})


# -- LRU and disk -------------------------------------------------------------------------

def test_lru_eviction_in_memory_only():
    store = SessionStore(capacity=2)
    for sid in "abc":
        store.put(sid, {"x": torch.tensor([ord(sid)])})
    assert store.get("a") is None and store.list_sessions() == ["b", "c"]
    store.get("b")  # b becomes most recent, so c is evicted next
    store.put("d", {"x": torch.tensor([0])})
    assert store.list_sessions() == ["b", "d"] and len(store) == 2


def test_evicted_sessions_reload_from_disk(tmp_path):
    store = SessionStore(capacity=2, directory=tmp_path)
    states = {sid: make_state(seed=i) for i, sid in enumerate("abcde")}
    for sid, state in states.items():
        store.put(sid, state, {"id": sid})
    assert store.list_sessions() == list("abcde") and len(store) == 5
    assert all(sid in store for sid in "abcde")
    for sid, state in states.items():  # a, b, c were evicted: reloaded from their files
        got = store.get(sid)
        assert_bit_identical(got.state, state)
        assert got.metadata == {"id": sid}


def test_persistence_across_processes(tmp_path):
    code = textwrap.dedent("""
        import sys, torch
        sys.path.insert(0, {tests!r})
        from test_session import make_state, assert_bit_identical
        from cortexlab.cortex.session import SessionStore
        store = SessionStore(directory={d!r})
        if sys.argv[1] == "write":
            store.put("chat-1", make_state(seed=7), {{"tokens": "96"}})
        else:
            state, meta = store.get("chat-1")
            assert_bit_identical(state, make_state(seed=7))
            assert meta == {{"tokens": "96"}}, meta
            print("ok", store.state_nbytes("chat-1"))
    """).format(tests=os.path.dirname(__file__), d=str(tmp_path))
    for step in ("write", "read"):
        proc = subprocess.run([sys.executable, "-c", code, step], capture_output=True, text=True, timeout=120)
        assert proc.returncode == 0, proc.stderr
    expected = make_state(seed=7)
    assert proc.stdout.split() == ["ok", str(sum(t.nbytes for t in expected.values()))]
    assert_bit_identical(SessionStore(directory=tmp_path).get("chat-1").state, expected)


def test_state_nbytes_is_constant_and_read_from_header(tmp_path):
    store = SessionStore(directory=tmp_path)
    nbytes = sum(t.nbytes for t in make_state().values())
    for seed in range(3):
        store.put("a", make_state(seed=seed))
        assert store.state_nbytes("a") == nbytes
    assert SessionStore(directory=tmp_path).state_nbytes("a") == nbytes  # disk only
    with pytest.raises(ValueError, match="session_id 'nope' is unknown"):
        store.state_nbytes("nope")


def test_delete_and_reset(tmp_path):
    store = SessionStore(capacity=1, directory=tmp_path)
    store.put("a", {"x": torch.ones(2)})
    store.put("b", {"x": torch.ones(2)})  # evicts a from memory; its file stays
    assert store.delete("a") is True and store.get("a") is None and "a" not in store
    assert not (tmp_path / "a.safetensors").exists()
    assert store.reset("b") is True and store.get("b") is None
    assert store.reset("b") is False and store.delete("never") is False
    assert store.list_sessions() == [] and list(tmp_path.iterdir()) == []


# -- atomic writes ------------------------------------------------------------------------

def test_crash_during_write_keeps_old_file_and_leaves_no_temp(tmp_path, monkeypatch):
    store = SessionStore(directory=tmp_path)
    old = {"x": torch.arange(4.0)}
    store.put("a", old, {"v": "1"})
    path = tmp_path / "a.safetensors"
    before = path.read_bytes()

    def crash(src, dst):
        raise OSError("simulated crash before rename")

    monkeypatch.setattr(os, "replace", crash)
    with pytest.raises(OSError, match="simulated crash"):
        store.put("a", {"x": torch.zeros(4)}, {"v": "2"})
    monkeypatch.undo()
    assert path.read_bytes() == before
    assert sorted(p.name for p in tmp_path.iterdir()) == ["a.safetensors"]  # no temp file left
    assert store.get("a").metadata == {"v": "1"}  # memory unchanged too
    assert_bit_identical(SessionStore(directory=tmp_path).get("a").state, old)


# -- validation ---------------------------------------------------------------------------

@pytest.mark.parametrize("bad", ["", "a" * 129, "../x", "a/b", "a\\b", ".hidden", "..", "a b", "é", "a\x00"])
def test_invalid_session_ids(tmp_path, bad):
    store = SessionStore(directory=tmp_path)
    with pytest.raises(ValueError, match="session_id must be 1 to 128 characters"):
        validate_session_id(bad)
    for call in (lambda: store.get(bad), lambda: store.put(bad, {}), lambda: store.delete(bad),
                 lambda: store.lock(bad).__enter__(), lambda: store.state_nbytes(bad)):
        with pytest.raises(ValueError, match="session_id"):
            call()
    assert bad not in store
    assert list(tmp_path.iterdir()) == []


@pytest.mark.parametrize("bad", [None, 1, b"abc", ["a"]])
def test_non_str_session_ids(bad):
    with pytest.raises(TypeError, match="session_id must be a str"):
        validate_session_id(bad)
    with pytest.raises(TypeError, match="session_id"):
        SessionStore().put(bad, {})


def test_valid_session_ids():
    for sid in ("a" * 128, "user-1.chat_2", "_", "-x", "A.B.C", "x.safetensors"):
        assert validate_session_id(sid) == sid


@pytest.mark.parametrize("state, error, match", [
    ({1: torch.ones(1)}, TypeError, "state keys must be str"),
    ({"": torch.ones(1)}, ValueError, "non-empty"),
    ({"ok": torch.ones(1), "w": [1.0]}, TypeError, r"state\['w'\] must be a torch.Tensor"),
    ({"ok": torch.ones(1), "w": torch.tensor([1.0, float("nan")])}, ValueError, r"state\['w'\] contains NaN"),
    ({"w": torch.tensor([float("inf")], dtype=torch.bfloat16)}, ValueError, r"state\['w'\] contains NaN"),
    ({"w": torch.ones(2, dtype=torch.complex64)}, TypeError, r"state\['w'\] must be a dense real tensor"),
    ([torch.ones(1)], TypeError, "state must be a dict"),
])
@pytest.mark.parametrize("persist", [False, True])
def test_bad_put_leaves_previous_state_intact(tmp_path, state, error, match, persist):
    store = SessionStore(directory=tmp_path if persist else None)
    store.put("a", {"w": torch.arange(3.0)}, {"v": "1"})
    files = {p.name: p.read_bytes() for p in tmp_path.iterdir()}
    with pytest.raises(error, match=match):
        store.put("a", state)
    with pytest.raises(TypeError, match="metadata must be a dict"):
        store.put("a", {"w": torch.zeros(3)}, {"v": 2})
    got = store.get("a")
    assert torch.equal(got.state["w"], torch.arange(3.0)) and got.metadata == {"v": "1"}
    assert {p.name: p.read_bytes() for p in tmp_path.iterdir()} == files


def test_bad_capacity():
    for bad, error in ((0, ValueError), (-1, ValueError), (True, TypeError), (1.5, TypeError)):
        with pytest.raises(error, match="capacity"):
            SessionStore(capacity=bad)


# -- corrupt files ------------------------------------------------------------------------

def _truncated(path):
    path.write_bytes(path.read_bytes()[:-10])


def _garbage(path):
    path.write_bytes(b"\x00garbage, not a safetensors file" * 3)


def _foreign(path):  # a valid safetensors file, but not one of ours
    save_file({"x": torch.ones(3)}, str(path))


def _short(path):
    path.write_bytes(b"abc")


def _nan_payload(path):  # header intact, data overwritten with NaNs
    data = bytearray(path.read_bytes())
    data[-4:] = torch.tensor([float("nan")]).numpy().tobytes()
    path.write_bytes(bytes(data))


@pytest.mark.parametrize("damage", [_truncated, _garbage, _foreign, _short, _nan_payload])
def test_corrupt_file(tmp_path, damage):
    SessionStore(directory=tmp_path).put("good", {"x": torch.arange(5.0)})
    SessionStore(directory=tmp_path).put("bad", {"x": torch.arange(5.0)})
    path = tmp_path / "bad.safetensors"
    damage(path)
    damaged = path.read_bytes()

    store = SessionStore(directory=tmp_path)
    with pytest.raises(SessionCorruptError, match="delete\\('bad'\\)") as info:
        store.get("bad")
    assert str(path) in str(info.value) and info.value.path == path
    assert isinstance(info.value, ValueError)
    assert torch.equal(store.get("good").state["x"], torch.arange(5.0))  # others stay readable
    assert "bad" in store and store.list_sessions() == ["bad", "good"]
    if damage is not _nan_payload:  # the header alone shows the damage
        with pytest.raises(SessionCorruptError):
            store.state_nbytes("bad")
    with pytest.raises(SessionCorruptError):  # put refuses to overwrite the corrupt file
        store.put("bad", {"x": torch.zeros(1)})
    assert path.read_bytes() == damaged  # neither replaced nor deleted
    assert sorted(p.name for p in tmp_path.iterdir()) == ["bad.safetensors", "good.safetensors"]

    assert store.delete("bad") is True
    store.put("bad", {"x": torch.zeros(1)})
    assert torch.equal(SessionStore(directory=tmp_path).get("bad").state["x"], torch.zeros(1))


def test_stray_files_are_not_sessions(tmp_path):
    (tmp_path / ".a.safetensors.tmp").write_bytes(b"partial")
    (tmp_path / "notes.txt").write_text("hi")
    (tmp_path / ".hidden.safetensors").write_bytes(b"x")
    assert SessionStore(directory=tmp_path).list_sessions() == []


# -- locks and threads --------------------------------------------------------------------

def _run_threads(target, args_list, timeout=30):
    errors = []

    def wrapped(*args):
        try:
            target(*args)
        except BaseException as e:  # surfaced in the main thread below
            errors.append(e)

    threads = [threading.Thread(target=wrapped, args=args, daemon=True) for args in args_list]
    for t in threads:
        t.start()
    for t in threads:
        t.join(timeout)
    assert not any(t.is_alive() for t in threads), "threads deadlocked"
    if errors:
        raise errors[0]


def test_same_session_critical_sections_never_overlap():
    store = SessionStore()
    inside, overlaps, entries = [0], [], []

    def work(i):
        for _ in range(50):
            with store.lock("s"):
                inside[0] += 1
                entries.append(i)
                if inside[0] != 1:
                    overlaps.append(inside[0])
                time.sleep(1e-4)  # releases the GIL: without the lock, other threads would enter here
                inside[0] -= 1

    _run_threads(work, [(i,) for i in range(8)])
    assert overlaps == [] and len(entries) == 8 * 50


def test_same_session_waits_for_the_holder():
    store = SessionStore()
    held, release, second_entered = threading.Event(), threading.Event(), threading.Event()

    def holder():
        with store.lock("s"):
            held.set()
            assert release.wait(30)

    def second():
        assert held.wait(30)
        with store.lock("s"):
            second_entered.set()

    threads = [threading.Thread(target=f, daemon=True) for f in (holder, second)]
    for t in threads:
        t.start()
    assert held.wait(30)
    assert not second_entered.wait(0.3)  # blocked while the holder has the lock
    release.set()
    assert second_entered.wait(30)
    for t in threads:
        t.join(30)


def test_different_sessions_run_concurrently():
    store = SessionStore()
    barrier = threading.Barrier(4, timeout=30)  # breaks unless all four are inside their locks at once

    def work(sid):
        with store.lock(sid):
            barrier.wait()

    _run_threads(work, [(f"s{i}",) for i in range(4)])


def test_lock_is_reentrant_with_store_calls(tmp_path):
    store = SessionStore(directory=tmp_path)

    def work():
        with store.lock("a"), store.lock("a"):
            state = store.get("a")
            n = 0 if state is None else int(state.metadata["n"])
            store.put("a", {"x": torch.full((2,), float(n))}, {"n": str(n + 1)})

    _run_threads(lambda _: work(), [(i,) for i in range(8)])
    assert store.get("a").metadata == {"n": "8"}  # read-modify-write serialised: no lost update


def test_concurrent_puts_and_gets_keep_lru_consistent(tmp_path):
    store = SessionStore(capacity=3, directory=tmp_path)

    def work(i):
        sid = f"s{i}"
        for step in range(20):
            store.put(sid, {"x": torch.full((4,), float(step))}, {"step": str(step)})
            got = store.get(sid)
            assert got.metadata == {"step": str(step)} and torch.equal(got.state["x"], torch.full((4,), float(step)))
            store.list_sessions()

    _run_threads(work, [(i,) for i in range(6)])
    assert store.list_sessions() == [f"s{i}" for i in range(6)]
    assert len(store._cache) <= 3
    for i in range(6):
        assert store.get(f"s{i}").metadata == {"step": "19"}
