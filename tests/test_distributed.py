"""Expert parallelism: the placement, the all-to-all plan against a loop, and the exchange on 1, 2 and 4
processes over MPI (mpi4py + the mpich wheel) and gloo (torch.distributed, where torch is installed).
Each multi-process run is tests/ep_worker.py under a timeout: a hang fails, never blocks."""

from __future__ import annotations

import os
import re
import shutil
import socket
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest

import moe_router as mr
from conftest import IN_CI
from moe_router import distributed

WORKER = Path(__file__).resolve().parent / "ep_worker.py"
TIMEOUT = 240


def test_placement_layouts_and_errors():
    p = mr.ExpertPlacement(8, 4)
    assert p.expert_ranks == [[0], [0], [1], [1], [2], [2], [3], [3]]
    assert p.local_experts(2).tolist() == [4, 5] and p.max_local_experts == 2
    q = mr.ExpertPlacement(4, 2, mapping=[1, 0, 1, 0], replicas={2: [0]})
    assert q.expert_ranks == [[1], [0], [1, 0], [0]] and q.replica_counts.tolist() == [1, 1, 2, 1]
    assert q.local_experts(0).tolist() == [1, 2, 3]
    assert mr.ExpertPlacement(4, 2, mapping=[1, 0, 1, 0], replicas=[[], [], [0], []]) == q
    phys = mr.ExpertPlacement.from_physical([0, 1, 2, 0, 3, 1], 3)
    assert phys.expert_ranks == [[0, 1], [0, 2], [1], [2]]
    import pickle

    assert pickle.loads(pickle.dumps(q)) == q
    for call, error, name in [
        (lambda: mr.ExpertPlacement(6, 4), mr.ConfigError, "num_ranks"),
        (lambda: mr.ExpertPlacement(4, 0), mr.ConfigError, "num_ranks"),
        (lambda: mr.ExpertPlacement(4, 2, mapping=[0, 1, 2, 0]), mr.ConfigError, "mapping"),
        (lambda: mr.ExpertPlacement(4, 2, mapping=[0, 1]), mr.InputError, "mapping"),
        (lambda: mr.ExpertPlacement(4, 2, mapping=[0, 1, 0, 1], replicas={0: [0]}), mr.ConfigError, "replicas"),
        (lambda: mr.ExpertPlacement(4, 2, mapping=[0, 1, 0, 1], replicas={7: [0]}), mr.ConfigError, "replicas"),
        (lambda: mr.ExpertPlacement(4, 2, mapping=[0.5, 1, 0, 1]), TypeError, "mapping"),
        (lambda: mr.ExpertPlacement.from_physical([0, 1, 0], 2), mr.InputError, "physical"),
        (lambda: mr.ExpertPlacement.from_physical([0, 0, 2, 2], 2, num_experts=3), mr.ConfigError, "physical"),
        (lambda: mr.ExpertPlacement(8, 4).local_experts(4), mr.ConfigError, "rank"),
    ]:
        with pytest.raises(error, match=name):
            call()


def reference_send(plan, placement):
    """Send order by its definition: (destination rank, local expert, slot), replicas by token % copies."""
    keys = []
    for e in range(plan.num_experts):
        for r in range(plan.expert_offsets[e], plan.expert_offsets[e + 1]):
            t = plan.token_ids[r]
            if t < 0:
                continue
            ranks = placement.expert_ranks[e]
            dest = ranks[t % len(ranks)]
            local = placement.local_experts(dest).tolist().index(e)
            keys.append((dest, local, r - plan.expert_offsets[e], r))
    keys.sort()
    return keys


@pytest.mark.parametrize("alignment", [1, 8])
def test_all_to_all_plan_matches_its_definition(rng, alignment):
    E, R = 8, 3
    x = rng.normal(size=(300, E)).astype(np.float32)
    dec = mr.route_logits(x, mr.RouterConfig(num_experts=E, top_k=2, capacity_factor=1.0))
    plan = dec.dispatch_plan(alignment=alignment)
    placement = mr.ExpertPlacement(E, R, mapping=[e % R for e in range(E)], replicas={1: [2], 4: [0, 2]})
    a2a = plan.all_to_all(placement)
    keys = reference_send(plan, placement)
    np.testing.assert_array_equal(a2a.send_rows, [k[3] for k in keys])
    np.testing.assert_array_equal(a2a.send_tokens, plan.token_ids[a2a.send_rows])
    assert a2a.send_counts.tolist() == [sum(1 for k in keys if k[0] == r) for r in range(R)]
    counts = np.zeros((R, placement.max_local_experts), np.int64)
    for dest, local, _, _ in keys:
        counts[dest, local] += 1
    np.testing.assert_array_equal(a2a.expert_counts, counts)
    pos = np.full(plan.num_rows, -1)
    pos[a2a.send_rows] = np.arange(len(a2a.send_rows))
    np.testing.assert_array_equal(a2a.send_position, pos)
    # one process playing every rank: the receive side regroups rows by local expert
    for r in range(R):
        received = np.stack([counts[r]] * R)  # as if every rank sent what this one sends
        recv = a2a.receive(received, r)
        assert recv.recv_counts.tolist() == [int(counts[r].sum())] * R
        assert recv.local_experts.tolist() == placement.local_experts(r).tolist()
        np.testing.assert_array_equal(recv.order[recv.inverse], np.arange(len(recv.order)))
    with pytest.raises(mr.InputError, match="received_counts"):
        a2a.receive(np.ones((R, placement.max_local_experts + 1), np.int64), 0)
    with pytest.raises(mr.ConfigError, match="placement"):
        plan.all_to_all(mr.ExpertPlacement(4, 2))


def test_gather_rows(rng):
    src = rng.normal(size=(10, 3)).astype(np.float32)
    idx = np.array([3, -1, 9, 0, 3])
    want = np.where((idx >= 0)[:, None], src[np.maximum(idx, 0)], 0)
    np.testing.assert_array_equal(distributed.gather_rows(src, idx), want)
    with pytest.raises(mr.InputError, match="index"):
        distributed.gather_rows(src, np.array([10]))
    with pytest.raises(TypeError, match="src"):
        distributed.gather_rows(src.astype(np.int32), idx)


def test_single_rank_exchange_with_a_local_backend(rng):
    """A one-rank backend written here (no engine): the exchange equals the plan's own forward."""

    class Local:
        rank, size = 0, 1

        def allgather_object(self, obj):
            return [obj]

        def alltoall_counts(self, counts):
            return np.array(counts)

        def alltoallv(self, rows, send_counts, recv_counts):
            assert send_counts.tolist() == recv_counts.tolist()
            return np.array(rows)

    x = rng.normal(size=(120, 8)).astype(np.float32)
    h = rng.normal(size=(120, 6)).astype(np.float32)
    dec = mr.route_logits(x, mr.RouterConfig(num_experts=8, top_k=2, capacity_factor=1.0))
    plan = dec.dispatch_plan()
    rows = plan.permute(h)
    out = rows * 3.0
    y = distributed.expert_parallel_forward(h, dec, lambda e, r: r * np.float32(3.0), mr.ExpertPlacement(8, 1),
                                               Local())
    np.testing.assert_array_equal(y, plan.combine(out))
    with pytest.raises(mr.InputError, match="experts"):
        distributed.expert_parallel_forward(h, dec, lambda e, r: r[:, :2], mr.ExpertPlacement(8, 1), Local())
    with pytest.raises(mr.ConfigError, match="2 ranks"):
        distributed.expert_parallel_forward(h, dec, lambda e, r: r, mr.ExpertPlacement(8, 2), Local())
    ex = distributed.ExpertParallelExchange(dec, mr.ExpertPlacement(8, 1), Local(), 6)
    for value in (None, 1, "yes"):
        with pytest.raises(mr.InputTypeError, match=r"^invalid return_stats: got"):
            distributed.expert_parallel_forward(h, dec, lambda e, r: r, mr.ExpertPlacement(8, 1), Local(),
                                                return_stats=value)
        with pytest.raises(mr.InputTypeError, match=r"^invalid weighted: got"):
            ex.combine(ex.dispatch(h), weighted=value)
        with pytest.raises(mr.InputTypeError, match=r"^invalid weighted: got"):
            ex.combine_backward(h, weighted=value)


def mpiexec():
    found = shutil.which("mpiexec", path=str(Path(sys.executable).parent)) or shutil.which("mpiexec")
    try:
        import mpi4py  # noqa: F401
    except ImportError:
        found = None
    if found is None:
        reason = "mpi4py and an MPI (pip install mpi4py mpich) are not installed"
        if IN_CI:
            pytest.fail(reason + "; CI installs them", pytrace=False)
        pytest.skip(reason)
    return found


def run_ranks(commands, env=None):
    procs = [subprocess.Popen(c, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True, env=env)
             for c in commands]
    outputs = []
    try:
        for p in procs:
            out, _ = p.communicate(timeout=TIMEOUT)
            outputs.append((p.returncode, out))
    finally:
        for p in procs:
            if p.poll() is None:
                p.kill()
    return outputs


@pytest.mark.parametrize("ranks", [1, 2, 4])
def test_mpi_exchange_equals_the_single_process_forward(ranks):
    launcher = mpiexec()
    env = dict(os.environ, MOE_ROUTER_NUM_THREADS="1")
    (code, out), = run_ranks([[launcher, "-n", str(ranks), sys.executable, str(WORKER), "mpi"]], env)
    assert code == 0, out
    assert sorted(re.findall(r"rank (\d+)/\d+: OK", out)) == [str(r) for r in range(ranks)], out


def free_port():
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@pytest.mark.parametrize("ranks", [1, 2, 4])
def test_gloo_exchange_equals_the_single_process_forward(ranks):
    pytest.importorskip("torch.distributed")
    init = f"tcp://127.0.0.1:{free_port()}"
    env = dict(os.environ, MOE_ROUTER_NUM_THREADS="1", OMP_NUM_THREADS="1")
    results = run_ranks([[sys.executable, str(WORKER), "gloo", "--rank", str(r), "--world", str(ranks),
                          "--init", init] for r in range(ranks)], env)
    for r, (code, out) in enumerate(results):
        assert code == 0 and f"rank {r}/{ranks}: OK" in out, out
