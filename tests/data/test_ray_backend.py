"""The `ray` backend with a real local Ray (one per test session): the same stream as the local
backend batch for batch; each document tokenized once for the whole job; a killed loader actor
loses and repeats nothing; a slow source gets replicas before its weight rises; the planner's
state restored in new loaders (and with another number of ranks) continues the stream."""

from __future__ import annotations

import threading
import time

import pytest

ray = pytest.importorskip("ray")

from slipstream.data import MixtureLoader, MixtureSpec, Planner  # noqa: E402
from tests.conftest import corpus_spec  # noqa: E402
from tests.data.contract import assert_same_batches, check_resume, run_steps  # noqa: E402


@pytest.fixture(scope="session", autouse=True)
def ray_session():
    ray.init(address="local", num_cpus=2, include_dashboard=False, log_to_driver=False)
    yield
    ray.shutdown()


def _specs(tmp_path, **kw) -> tuple[MixtureSpec, MixtureSpec]:
    raw = corpus_spec(tmp_path, "jsonl", **{"seq_len": 256, "micro_batch_size": 4, **kw})
    local = MixtureSpec.from_dict(raw, base_dir=str(tmp_path))
    raw["backend"] = {"kind": "ray", "prefetch_steps": 2, **kw.get("backend", {})}
    return local, MixtureSpec.from_dict(raw, base_dir=str(tmp_path))


@pytest.mark.parametrize("ranks", [2, 4])
def test_ray_gives_the_local_backends_batches(tmp_path, ranks):
    local, on_ray = _specs(tmp_path)
    ref, ref_state = run_steps(local, 6, world_size=ranks)
    got, state = run_steps(on_ray, 6, world_size=ranks)
    assert_same_batches(ref, got)
    assert state == ref_state


def test_four_ranks_tokenize_each_document_once_for_the_job(tmp_path):
    _, spec = _specs(tmp_path)
    # end_step: nothing is planned or loaded past step 5, so what the actors tokenized is
    # exactly the 5 steps' documents, however far the prefetchers got when the steps were
    # taken (a rank halted mid-read-ahead under load had left a planned step unloaded).
    loaders = [MixtureLoader(spec, r, 4, end_step=5) for r in range(4)]
    for ldr in loaders:
        for _ in range(5):
            next(ldr)
    for ldr in loaders:
        ldr._halt()
    planner = Planner(spec, loaders[0].planner.lengths, dp_world_size=4)
    docs = set()
    for _ in range(5):
        docs |= {(p.source, p.doc) for row in planner.plan_step().rows for p in row}
    stats = loaders[0].backend.actor_stats()
    tokenized = sum(s["tokenized"] for s in stats.values())
    asked = sum(sum(ldr.backend.num_loaded) for ldr in loaders)
    # Ranks sharing a long document ask for it more than once; one actor serves them all.
    assert tokenized == len(docs) < asked
    # Each rank sends one request per actor and step, whatever the sources it needs from it.
    serving = {n for lay in loaders[0].backend._layout.values() for n in lay["serving"]}
    calls = sum(s["calls"] for s in stats.values())
    planned = sum(ldr.planner.step for ldr in loaders)
    assert len(serving) < len(spec.sources) and 0 < calls <= planned * len(serving)
    # Actors tokenize on their own thread: each is budgeted one CPU.
    assert {s["tokenizer_parallelism"] for s in stats.values()} == {"false"}
    for ldr in loaders:
        ldr.close()


@pytest.mark.parametrize("source", [0, 2])
def test_a_killed_loader_actor_loses_and_repeats_nothing(tmp_path, source):
    """Source 0 has an actor of its own; with 2 CPUs, sources 1 and 2 start on one shared
    actor: killing that one moves both sources to the standby."""
    local, spec = _specs(tmp_path)
    ref, _ = run_steps(local, 10, world_size=2)
    loaders = [MixtureLoader(spec, r, 2) for r in range(2)]
    got, waits = [], []
    for step in range(10):
        if step == 4:  # kill the actor serving the busiest source, mid-run
            backend = loaders[0].backend
            standbys = {n for lay in backend._layout.values() for n in lay["shadows"]}
            assert len(standbys) == spec.backend.shadow  # one standby covers every source
            victim = backend._layout[source]["serving"][0]
            served = [s for s, lay in backend._layout.items() if victim in lay["serving"]]
            assert len(served) == (1 if source == 0 else 2)
            ray.kill(backend._actor(victim))
        t0 = time.perf_counter()
        got.append([next(ldr) for ldr in loaders])
        waits.append(time.perf_counter() - t0)
    assert_same_batches(ref, got)  # nothing lost, nothing repeated, same order
    assert sum(ldr.backend.num_reissued for ldr in loaders) > 0  # the failover did run
    history = ray.get(loaders[0].backend.directory.history.remote())
    assert any(victim in h and "standby" in h for h in history)  # a standby took over
    assert max(waits[4:]) < 10.0  # bounded stall: a standby was already up (measured < 1 s)
    # A client that joins after the failure (it never held the dead actor's handle) is served
    # by the replacement, from the same place in the stream.
    late = MixtureLoader(spec, 0, 2)
    assert [next(late).stream for _ in range(3)] == [s[0].stream for s in ref[:3]]
    late.close()
    for ldr in loaders:
        ldr.close()


def test_slow_source_gets_replicas_before_its_weight_rises(tmp_path):
    raw = corpus_spec(tmp_path, "jsonl", seq_len=256, micro_batch_size=4)
    raw["sources"][0]["transform"] = "tests.data.slow:slow_identity"
    del raw["sources"][0]["weight"]
    raw["sources"][0]["schedule"] = [[0, 0.05], [29, 0.05], [30, 0.8]]
    raw["backend"] = {
        "kind": "ray",
        "prefetch_steps": 1,
        "autoscale_every": 5,
        "lookahead_steps": 20,
        "cpu_budget": 4,
    }
    spec = MixtureSpec.from_dict(raw, base_dir=str(tmp_path))
    loader = MixtureLoader(spec, 0, 1)
    replicas = [next(loader).stats.replicas[0] for _ in range(25)]
    assert replicas[2] == 1  # weight 0.05: one actor is enough
    # Sized for the weight ahead: more actors well before step 30 (the rise), with the
    # budget of 4 respected and every source keeping one.
    assert max(replicas[10:25]) >= 2
    assert sum(next(loader).stats.replicas) <= 4
    loader.close()


def test_fewer_cpus_than_sources_keeps_the_budget_and_isolates_the_slow_source(tmp_path):
    raw = corpus_spec(tmp_path, "jsonl", seq_len=256, micro_batch_size=16)
    raw["sources"][0]["transform"] = "tests.data.slow:slow_identity"
    # By weight alone (how actors start) the light, slow source shares an actor; by measured
    # cost x weight it is the heaviest, and alone it lowers the busiest actor's load ~17%.
    for src, w in zip(raw["sources"], (0.08, 0.46, 0.46), strict=True):
        src["weight"] = w
    raw["backend"] = {"kind": "ray", "prefetch_steps": 1, "autoscale_every": 3, "cpu_budget": 2}
    spec = MixtureSpec.from_dict(raw, base_dir=str(tmp_path))
    loader = MixtureLoader(spec, 0, 1)
    layout = loader.backend._layout
    assert layout[0]["serving"] in (layout[1]["serving"], layout[2]["serving"])
    served = []
    for _ in range(30):  # enough documents of every source to measure its cost
        next(loader)
        layout = loader.backend._layout
        assert all(layout[s]["serving"] for s in range(len(spec.sources)))
        served.append({n for lay in layout.values() for n in lay["serving"]})
    # 3 sources on a budget of 2: never more than 2 serving actors (the autoscaler used to
    # give every source its own), and once the costs are measured the slow source has an
    # actor to itself.
    assert max(len(names) for names in served) <= 2
    events = ray.get(loader.backend.directory.history.remote())
    assert len(events) == 1, events  # regrouped once, then stable (no churn on noise)
    slow = loader.backend._layout[0]["serving"]
    others = {n for s in range(1, len(spec.sources)) for n in loader.backend._layout[s]["serving"]}
    assert len(slow) == 1 and slow[0] not in others
    loader.close()


def test_planner_state_restored_in_new_loaders_continues_on_ray(tmp_path):
    _, spec = _specs(tmp_path)
    check_resume(spec, split=3, total=7)


def test_resume_on_ray_with_another_world_size(tmp_path):
    _, spec = _specs(tmp_path)
    check_resume(spec, split=3, total=7, after_world_size=4)


def test_ray_without_ray_installed_is_a_clear_error(tmp_path, monkeypatch):
    import builtins

    from slipstream.data.backends import build_backend

    _, spec = _specs(tmp_path)
    real = builtins.__import__

    def no_ray(name, *a, **k):
        if name == "ray" or name.startswith("ray."):
            raise ImportError("No module named 'ray'")
        return real(name, *a, **k)

    import sys

    for mod in [m for m in sys.modules if m.startswith("slipstream.data.backends.ray")]:
        monkeypatch.delitem(sys.modules, mod)
    monkeypatch.setattr(builtins, "__import__", no_ray)
    with pytest.raises(ValueError, match="needs Ray"):
        build_backend(spec)


def test_a_rank_receives_the_tokens_its_rows_hold_not_whole_documents(tmp_path):
    """Long documents are cut across several ranks' rows: each rank gets only its part (and
    the one token after a piece, its label), not the whole document."""
    _, spec = _specs(tmp_path)
    loaders = [MixtureLoader(spec, r, 4) for r in range(4)]
    for ldr in loaders:
        for _ in range(5):
            next(ldr)
        ldr._prefetch.stop()  # the read-ahead stops; then every load it sent is received
        inflight = ldr._fetch._inflight
        for task in {id(e.task): e.task for es in inflight.values() for e in es}.values():
            task.result()
    planner = Planner(spec, loaders[0].planner.lengths, dp_world_size=4)
    plans = [planner.plan_step() for _ in range(max(ldr.planner.step for ldr in loaders))]
    for r, ldr in enumerate(loaders):
        held: dict[tuple[int, int], set[int]] = {}  # this rank's tokens of each document
        pieces = whole = 0
        for plan in plans[: ldr.planner.step]:
            mine = [p for i in plan.rank_rows(r).tolist() for p in plan.row(i)]
            for p in mine:
                held.setdefault((p.source, p.doc), set()).update(range(p.start, p.start + p.length))
            pieces += sum(p.length + 1 for p in mine)  # each with the label after it
            whole += sum(int(planner.lengths[s][d]) for s, d in {(p.source, p.doc) for p in mine})
        got = ldr.backend.tokens_received
        # At least every token its rows hold; at most those of each step's pieces (no
        # document's tokens outside them); whole documents would be far more.
        assert sum(len(t) for t in held.values()) <= got <= pieces < 0.8 * whole
    for ldr in loaders:
        ldr.close()


def test_a_machines_ranks_fetch_each_step_once_together(tmp_path, monkeypatch):
    """4 ranks on one machine: the first to reach a step fetches it for all 4 (one call per
    actor and step, as for one rank) and the others read theirs from shared memory; the
    batches are the local backend's."""
    monkeypatch.setenv("SLIPSTREAM_SHARED_DOCS", str(tmp_path / "store"))
    local, _ = _specs(tmp_path)
    _, spec = _specs(tmp_path, backend={"machine_ranks": 4, "job": "group-stream"})
    ref, ref_state = run_steps(local, 6, world_size=4)
    got, state = run_steps(spec, 6, world_size=4)
    assert_same_batches(ref, got)
    assert state == ref_state
    _, spec = _specs(tmp_path, backend={"machine_ranks": 4, "job": "group-calls"})
    loaders = [MixtureLoader(spec, r, 4) for r in range(4)]
    for _ in range(5):
        for ldr in loaders:
            next(ldr)
    for ldr in loaders:
        ldr._halt()
    # Every step all ranks took was fetched once, by whichever rank got there first. (Steps
    # read ahead when a rank halted may be fetched twice: the halted maker's lock goes with
    # it, and a rank waiting on it fetches the step itself.)
    made = [s for ldr in loaders for s in ldr._group.recent_made if s < 5]
    assert sorted(made) == [0, 1, 2, 3, 4]
    assert sum(ldr._group.steps_made for ldr in loaders) >= max(ldr.planner.step for ldr in loaders)
    stats = loaders[0].backend.actor_stats()
    serving = {n for lay in loaders[0].backend._layout.values() for n in lay["serving"]}
    made = sum(ldr._group.steps_made for ldr in loaders)
    assert 0 < sum(s["calls"] for s in stats.values()) <= made * len(serving)
    tag = loaders[0]._group.tag
    for ldr in loaders:  # all halted: no rank publishes any more
        ldr.close()
    # Each file was read and removed, or, unread (read ahead), removed by its rank's close.
    assert not list((tmp_path / "store").glob(f"step-{tag}-*.bin"))


def test_a_rank_whose_step_maker_left_no_file_fetches_the_step_itself(tmp_path, monkeypatch):
    """The rank holding a step's lock dies before publishing (its lock is released): the rank
    waiting on it fetches the step itself, and gets the same batch."""
    from slipstream.data.backends.machine_group import plan_fingerprint
    from slipstream.data.sources.shared import try_lock, unlock

    monkeypatch.setenv("SLIPSTREAM_SHARED_DOCS", str(tmp_path / "store"))
    local, _ = _specs(tmp_path)
    _, spec = _specs(tmp_path, backend={"machine_ranks": 2, "job": "group-orphan"})
    ref, _ = run_steps(local, 1, world_size=2)
    ldr = MixtureLoader(spec, 1, 2)
    plan = Planner(spec, ldr.planner.lengths, dp_world_size=2).plan_step()
    held = try_lock(ldr._group._lock_path(plan_fingerprint(plan)))  # "rank 0" makes step 0
    got = []

    def take() -> None:
        try:
            got.append(next(ldr))
        except Exception as e:  # noqa: BLE001 - reported below
            got.append(e)

    waiting = threading.Thread(target=take)
    waiting.start()
    time.sleep(0.5)
    assert waiting.is_alive() and not got  # it waits for the maker
    unlock(held)  # the maker is gone, without a file
    waiting.join(timeout=60)
    assert len(got) == 1 and not isinstance(got[0], Exception), got
    assert 0 in ldr._group.recent_made  # it fetched step 0 itself
    assert_same_batches([[ref[0][1]]], [[got[0]]])
    ldr.close()


def test_tensor_parallel_peers_both_take_their_data_ranks_batches(tmp_path, monkeypatch):
    """4 processes, tensor-parallel pairs (rank = dp_rank * 2 + tp_rank): both processes of a
    data-parallel rank read its fetched rows (a file per reader), and each step is fetched
    once for the machine."""
    from slipstream.topology import Topology

    monkeypatch.setenv("SLIPSTREAM_SHARED_DOCS", str(tmp_path / "store"))
    local, _ = _specs(tmp_path)
    _, spec = _specs(tmp_path, backend={"machine_ranks": 2, "job": "group-tp"})
    ref, _ = run_steps(local, 4, world_size=2)
    loaders = []
    for rank in range(4):
        where = Topology(rank=rank, world_size=4, local_world_size=4, tp_size=2)
        loaders.append(MixtureLoader(spec, topology=where))
    got = [[next(ldr) for ldr in loaders] for _ in range(4)]
    for step in range(4):
        for rank, batch in enumerate(got[step]):
            assert_same_batches([[ref[step][rank // 2]]], [[batch]])
    made = [s for ldr in loaders for s in ldr._group.recent_made if s < 4]
    assert sorted(made) == [0, 1, 2, 3]
    for ldr in loaders:
        ldr.close()


def test_a_client_finding_the_job_directory_gone_starts_a_new_one(tmp_path):
    """The last client left (the directory exits) just as another attaches: the newcomer
    starts a fresh directory, and loads."""
    from slipstream.data.backends.ray import RayBackend

    _, spec = _specs(tmp_path, backend={"job": "directory-race"})
    first = RayBackend(spec)
    first.directory.detach.remote()  # the last client leaves: the directory exits ...
    second = RayBackend(spec)  # ... while this one finds it by name and attaches
    assert len(second.submit(0, [0, 1]).result()) == 2
    second.close()
