"""tidal.policy: the eviction decision as a pure function of a frozen snapshot. Torch-free and fast: exact
victims, order and weights modes of LruPolicy, its errors, the snapshot transitions, and a seeded
cross-check against the loop `Runtime._make_room` ran before the policy was split out."""
import ast
import dataclasses
import pathlib
import random
import subprocess
import sys

import pytest

from tidal.errors import ConfigError, OutOfDeviceMemory, StateError
from tidal.modes import KV_MODES
from tidal.policy import (Load, LruPolicy, ModelState, ModelView, NoEviction, Policy, PoolView, Preempt, Request,
                          Resume, resolve)

A, H, D, U = ModelState.ACTIVE, ModelState.PREEMPTED_HOST, ModelState.PREEMPTED_DISK, ModelState.UNLOADED


def mv(name, device, host, last_used, state=A, copy=0, release=0, pinned=False, active=None):
    """A model holding `device`/`host` bytes now; `copy`: what a preemption to the host adds, `release`: what
    one to disk frees."""
    ad, ah = active or (device, host)
    return ModelView(name, state, device, host, ad, ah, host_copy_bytes=copy, host_release_bytes=release,
                     last_used=last_used, pinned=pinned)


def pool(models, request, device_budget=100, host_budget=None, loading=True):
    """A view whose request is `request` = (name, device, host); a new model (UNLOADED) unless it is in `models`."""
    name, dev, host = request
    models = list(models)
    if loading and all(m.name != name for m in models):
        models.append(mv(name, 0, 0, len(models), state=U, active=(dev, host)))
    return PoolView(device_budget, host_budget, tuple(models), Request(name, dev, host))


# -- torch-free ------------------------------------------------------------------------------------------------
def test_policy_imports_only_errors_and_modes():
    src = pathlib.Path(__file__).parents[1] / "runtime" / "policy.py"
    tidal_imports, others = [], []
    for node in ast.walk(ast.parse(src.read_text())):
        if isinstance(node, ast.ImportFrom):
            (tidal_imports if node.level else others).append(node.module)
        elif isinstance(node, ast.Import):
            others += [a.name for a in node.names]
    assert sorted(tidal_imports) == ["errors", "modes"]
    assert set(others) <= {"__future__", "dataclasses", "enum", "typing"}, others


def test_import_tidal_policy_does_not_import_torch():
    code = "import sys, tidal.policy; print(sorted(m for m in sys.modules if m.split('.')[0] == 'torch'))"
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True).stdout
    assert out.strip() == "[]"


# -- LruPolicy: exact plans ------------------------------------------------------------------------------------
def test_a_request_that_fits_preempts_nothing():
    view = pool([mv("a", 40, 0, 0)], ("new", 60, 0))
    assert LruPolicy().decide(view) == [Load("new")]
    assert NoEviction().decide(view) == [Load("new")]


def test_victims_least_recently_used_first_and_no_more_than_needed():
    models = [mv("a", 30, 0, 2), mv("b", 30, 0, 0), mv("c", 30, 0, 1)]  # b, then c, then a
    assert LruPolicy().decide(pool(models, ("new", 20, 0))) == [Preempt("b", "host", "swap"), Load("new")]
    assert LruPolicy().decide(pool(models, ("new", 50, 0))) == [Preempt("b"), Preempt("c"), Load("new")]
    assert LruPolicy().decide(pool(models, ("new", 100, 0))) == [Preempt("b"), Preempt("c"), Preempt("a"),
                                                                 Load("new")]


def test_ties_in_last_use_go_by_name():
    models = [mv("z", 50, 0, 0), mv("m", 50, 0, 0), mv("a", 50, 0, 1)]
    assert LruPolicy().decide(pool(models, ("new", 10, 0), device_budget=110)) == [Preempt("m"), Load("new")]


def test_preempted_pinned_and_the_requested_model_are_never_victims():
    models = [mv("gone", 0, 5, 0, state=H), mv("pin", 30, 0, 1, pinned=True), mv("me", 0, 0, 2, state=D,
              active=(30, 0)), mv("b", 30, 0, 3), mv("c", 30, 0, 4)]
    view = pool(models, ("me", 30, 0))
    assert LruPolicy().decide(view) == [Preempt("b"), Resume("me")]


def test_weights_go_to_the_host_while_the_host_budget_takes_the_copy_and_the_request():
    # unlimited host: always the host
    assert LruPolicy().decide(pool([mv("a", 60, 10, 0, copy=1000)], ("new", 60, 5))) == [Preempt("a", "host"),
                                                                                        Load("new")]
    # exactly at the budget: host; one byte over: disk
    fits = pool([mv("a", 60, 10, 0, copy=40, release=10)], ("new", 60, 50), host_budget=100)
    assert LruPolicy().decide(fits) == [Preempt("a", "host"), Load("new")]
    over = pool([mv("a", 60, 10, 0, copy=41, release=10)], ("new", 60, 50), host_budget=100)
    assert LruPolicy().decide(over) == [Preempt("a", "disk"), Load("new")]


def test_a_disk_preemption_frees_host_for_the_next_victims_copy():
    models = [mv("a", 50, 30, 0, copy=40, release=20), mv("b", 50, 30, 1, copy=10, release=20)]
    view = pool(models, ("new", 100, 25), host_budget=100)
    # a: 60 + 40 + 25 > 100, to disk (host 60 -> 40); b: 40 + 10 + 25 <= 100, to the host (40 -> 50)
    assert LruPolicy().decide(view) == [Preempt("a", "disk"), Preempt("b", "host"), Load("new")]


def test_host_pressure_alone_evicts_to_disk():
    models = [mv("a", 10, 50, 0, copy=5, release=45), mv("b", 10, 40, 1, copy=5, release=30)]
    view = pool(models, ("new", 10, 30), host_budget=100)  # device fits; host 90 + 30 does not
    assert LruPolicy().decide(view) == [Preempt("a", "disk"), Load("new")]


def test_a_resume_with_staging_counts_the_requests_host_bytes():
    models = [mv("me", 0, 10, 0, state=D, active=(50, 10)), mv("a", 50, 10, 1, copy=30, release=5)]
    view = pool(models, ("me", 50, 60), device_budget=90, host_budget=100)  # 20 + copy 30 + staging 60 > 100
    assert LruPolicy().decide(view) == [Preempt("a", "disk"), Resume("me")]


# -- errors ----------------------------------------------------------------------------------------------------
def test_nothing_to_evict_keeps_the_runtimes_messages():
    view = pool([mv("a", 0, 7, 0, state=H)], ("new", 120, 3))
    msg = "model 'new' needs 120 device and 3 host bytes; in use: 0 of 100 device, 7 of unlimited host"
    with pytest.raises(OutOfDeviceMemory) as lru:
        LruPolicy().decide(view)
    assert str(lru.value) == msg + "; nothing left to evict"
    with pytest.raises(OutOfDeviceMemory) as none:
        NoEviction().decide(pool([mv("a", 90, 0, 0)], ("new", 20, 3), host_budget=50))
    assert str(none.value) == ("model 'new' needs 20 device and 3 host bytes; in use: 90 of 100 device, 0 of 50 "
                               "host; pass evict='lru'")


def test_when_evicting_everything_would_not_do_nothing_is_planned_and_the_numbers_are_todays():
    view = pool([mv("a", 30, 0, 0), mv("b", 30, 0, 1), mv("p", 30, 0, 2, pinned=True)], ("new", 80, 0))
    with pytest.raises(OutOfDeviceMemory) as exc:
        LruPolicy().decide(view)
    assert str(exc.value) == ("model 'new' needs 80 device and 0 host bytes; in use: 90 of 100 device, 0 of "
                              "unlimited host; preempting every active model (2) would not make room, so none was")


def test_decide_leaves_the_view_as_it_was():
    view = pool([mv("a", 60, 10, 0, copy=40)], ("new", 60, 50), host_budget=100)
    before = dataclasses.replace(view)
    LruPolicy().decide(view)
    assert view == before
    with pytest.raises(dataclasses.FrozenInstanceError):
        view.device_budget = 1


# -- the snapshot's transitions --------------------------------------------------------------------------------
def test_apply_moves_bytes_as_the_engines_do():
    view = pool([mv("a", 60, 10, 0, copy=40, release=8), mv("b", 20, 10, 1, copy=5, release=6)], ("new", 50, 1))
    after = view.apply(Preempt("a", "host")).apply(Preempt("b", "disk"))
    assert [(m.state, m.device_bytes, m.host_bytes) for m in after.models[:2]] == [(H, 0, 50), (D, 0, 4)]
    loaded = after.apply(Load("new"))
    assert loaded.model("new").state is A and loaded.request is None and loaded.device_used == 50
    back = loaded.apply(Resume("b"))
    assert (back.model("b").state, back.model("b").device_bytes, back.model("b").host_bytes) == (A, 20, 10)


@pytest.mark.parametrize("action, error, match", [
    (Preempt("gone"), StateError, "not active"),
    (Preempt("pin"), StateError, "pinned"),
    (Preempt("nope"), StateError, "no model named 'nope'"),
    (Preempt("big", "host"), OutOfDeviceMemory, "needs up to 90 host bytes"),
    (Load("a"), StateError, "is ACTIVE"),
    (Resume("a"), StateError, "is ACTIVE"),
    (Resume("new"), StateError, "is UNLOADED"),
    (Load("new"), OutOfDeviceMemory, "needs 50 device"),
])
def test_apply_refuses_what_the_state_does_not_allow(action, error, match):
    models = [mv("a", 10, 0, 0), mv("gone", 0, 0, 1, state=H), mv("pin", 10, 0, 2, pinned=True),
              mv("big", 60, 20, 3, copy=90)]
    view = pool(models, ("new", 50, 0), host_budget=100)
    with pytest.raises(error, match=match):
        view.apply(action)


def test_preempt_of_the_requested_model_is_refused():
    view = pool([mv("me", 10, 0, 0)], ("me", 10, 0), loading=False)
    with pytest.raises(StateError, match="the room is for"):
        view.apply(Preempt("me"))


def test_actions_are_validated_when_made():
    assert Preempt("a").kv == KV_MODES[0] == "swap"
    assert Preempt("a", "disk", KV_MODES[1]).kv == "recompute"
    with pytest.raises(ConfigError, match='called "drop" before'):
        Preempt("a", kv="drop")
    with pytest.raises(ConfigError, match="not 'keep'"):
        Preempt("a", weights="keep")
    with pytest.raises(ConfigError, match="weights="):
        Preempt("a", weights="ssd")


def test_model_state_read_through_properties():
    assert A.active and not A.preempted and A.weights is None
    assert [s.weights for s in (H, D, ModelState.PREEMPTED_KEEP)] == ["host", "disk", "keep"]
    assert all(ModelState.preempted_to(s.weights) is s for s in (H, D, ModelState.PREEMPTED_KEEP))
    assert not U.active and not U.preempted


def test_resolve():
    assert isinstance(resolve(None), NoEviction) and isinstance(resolve("lru"), LruPolicy)

    class Mine:
        def decide(self, view):
            return []

    mine = Mine()
    assert resolve(mine) is mine and isinstance(mine, Policy)
    for bad in ("mru", "LRU", LruPolicy, 3, ["lru"]):
        with pytest.raises(ConfigError, match="must be None, 'lru' or a Policy"):
            resolve(bad)


# -- against the loop it replaced ------------------------------------------------------------------------------
def old_make_room(models, request, device_budget, host_budget, evict="lru"):
    """`Runtime._make_room` as it was, over mutable state: names in use order, each [active, device, host, copy,
    release]; it preempted as it went."""
    name, device, host = request
    state = {m.name: [m.state is A, m.device_bytes, m.host_bytes, m.host_copy_bytes, m.host_release_bytes]
             for m in sorted(models, key=lambda m: (m.last_used, m.name)) if m.state is not U}
    used = lambda i: sum(s[i] for s in state.values())
    fits = lambda: ((device_budget is None or used(1) + device <= device_budget)
                    and (host_budget is None or used(2) + host <= host_budget))
    out = []
    while not fits():
        victims = [n for n, s in state.items() if n != name and s[0]]
        if evict != "lru" or not victims:
            return out, "error"
        s = state[victims[0]]
        to_host = host_budget is None or used(2) + s[3] + host <= host_budget
        out.append((victims[0], "host" if to_host else "disk"))
        s[0], s[1], s[2] = False, 0, s[2] + s[3] if to_host else s[2] - s[4]
    return out, "ok"


@pytest.mark.parametrize("seed", range(4))
def test_lru_policy_matches_the_old_loop_on_random_pools(seed):
    rng = random.Random(seed)
    for _ in range(250):
        models = []
        for i in range(rng.randint(0, 6)):
            st = rng.choice([A, A, A, H, D])
            dev = rng.randint(1, 40) if st is A else 0
            host = rng.randint(0, 30)
            models.append(mv(f"m{i}", dev, host, rng.randint(0, 3), state=st, copy=rng.randint(0, 30),
                             release=rng.randint(0, host), active=(dev or rng.randint(1, 40), host)))
        preempted = [m for m in models if m.state is not A]
        if preempted and rng.random() < 0.5:
            me = rng.choice(preempted)
            request = (me.name, me.active_device_bytes, rng.randint(0, 40))
        else:
            request = ("new", rng.randint(1, 80), rng.randint(0, 40))
        device_budget = rng.choice([None, rng.randint(30, 120)])
        host_budget = rng.choice([None, rng.randint(60, 250)])
        view = pool(models, request, device_budget, host_budget)
        want, outcome = old_make_room(models, request, device_budget, host_budget)
        if outcome == "error":
            with pytest.raises(OutOfDeviceMemory, match=f"model '{request[0]}' needs"):
                LruPolicy().decide(view)
            continue
        plan = LruPolicy().decide(view)
        assert [(a.model, a.weights) for a in plan[:-1]] == want
        assert all(a.kv == "swap" for a in plan[:-1])
        assert plan[-1] == (Load if request[0] == "new" else Resume)(request[0])
