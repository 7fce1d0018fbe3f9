"""Neuron alignments solved on the assignment threads are the alignments solved one by one: the same
permutations, and `compress` writes the same bytes with the threads as without them; the weight cost built with
the centroid's side once is torch.cdist's, bit for bit."""

import threading
import time

import numpy as np
import pytest
import torch

from ream_lite import lsap
from ream_lite.engine.streamer import StreamOptions
from ream_lite.methods import MethodOptions
from ream_lite.methods.align import WeightCost, hungarian, weight_features
from ream_lite.pipeline import CompressConfig, compress


def test_the_pool_solves_as_the_solver_does():
    rng = np.random.default_rng(0)
    costs = [rng.random((48, 48)) for _ in range(9)] + [np.zeros((16, 16))]  # ties too
    pool = lsap.AssignmentPool(workers=2)
    try:
        pooled = pool.solve_all(costs)
    finally:
        pool.close()
    for cost, perm in zip(costs, pooled):
        assert np.array_equal(perm, lsap.solve(cost))
        assert torch.equal(torch.from_numpy(perm), hungarian(torch.from_numpy(cost)))
        assert sorted(perm.tolist()) == list(range(len(perm)))  # a permutation


@pytest.mark.parametrize("rows", [(8, 8), (25, 25), (26, 26), (30, 12), (96, 96)])
def test_weight_cost_is_cdist_bit_for_bit(rows):
    """Both of cdist's ways (direct up to 25 rows, one padded matmul beyond), the centroid's side reused."""
    g = torch.Generator().manual_seed(sum(rows))
    hidden = 40

    def expert(n: int, gated: bool) -> tuple[torch.Tensor, ...]:  # (a non-gated expert's gate is [I, 0])
        return (torch.randn(n, hidden if gated else 0, generator=g).bfloat16(), torch.randn(n, hidden, generator=g),
                torch.randn(hidden, n, generator=g))

    for gated in (True, False):
        fc = weight_features(*expert(rows[0], gated))
        cost = WeightCost(fc)
        for _ in range(2):
            member = expert(rows[1], gated)
            fj = weight_features(*member)
            assert torch.equal(cost(fj), torch.cdist(fc, fj))
            assert torch.equal(cost.of_expert(*member), torch.cdist(fc, fj))  # (its operand built in place)


@pytest.mark.parametrize("expert_cache", ["auto", "off"])
def test_compress_writes_the_same_bytes_with_the_threads(model_dirs, tmp_path, monkeypatch, expert_cache):
    """Guarded REAM (many candidate plans: their pairs solved together up front where the layer's experts are
    cached, else handed to the threads member by member as the merges go) and plain REAM."""
    src = model_dirs["deepseek_v3"][1]
    real = lsap.solve
    for settings in ({"method": "ream"}, {"method": "ream", "guard": "off"}):
        outs = {}
        for workers in (1, 2):
            pool = lsap.AssignmentPool(workers)
            monkeypatch.setattr(lsap, "_shared", pool)
            threads: list[str] = []

            def counted(cost, threads=threads):
                threads.append(threading.current_thread().name)
                return real(cost)

            monkeypatch.setattr(lsap, "solve", counted)
            try:
                outs[workers] = compress(CompressConfig(
                    model=str(src), output=str(tmp_path / f"{settings.get('guard', 'group')}-{workers}"),
                    experts=12, num_sequences=8, seq_len=32, options=MethodOptions(group_size=2), **settings,
                    stream=StreamOptions(device="cpu", progress=False, expert_cache=expert_cache)))
            finally:
                pool.close()
            on_workers = [t for t in threads if t.startswith("ream-lsap")]
            assert threads and len(on_workers) == (len(threads) if workers == 2 else 0)
        a, b = outs[1], outs[2]
        assert (a / "model.safetensors").read_bytes() == (b / "model.safetensors").read_bytes()
        assert (a / "ream_plan.json").read_text() == (b / "ream_plan.json").read_text()


def test_a_forked_child_solves_on_its_own_threads():
    """A fork copies the pool, not its threads: the child starts its own (the fault tests run compress forked)."""
    import os

    pool = lsap.AssignmentPool(workers=2)
    cost = np.random.default_rng(1).random((32, 32))
    try:
        pool.solve_all([cost, cost])  # (threads started in the parent)
        pid = os.fork()
        if pid == 0:  # the child: exit 0 only if it solves (else the parent's wait times the test out)
            ok = np.array_equal(pool.solve_all([cost])[0], lsap.solve(cost))
            os._exit(0 if ok else 1)
        deadline = time.monotonic() + 60
        while time.monotonic() < deadline:
            done, status = os.waitpid(pid, os.WNOHANG)
            if done:
                assert os.waitstatus_to_exitcode(status) == 0
                return
            time.sleep(0.05)
        os.kill(pid, 9)
        os.waitpid(pid, 0)
        raise AssertionError("the forked child did not solve within 60 s")
    finally:
        pool.close()
