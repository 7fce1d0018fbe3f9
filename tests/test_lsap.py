"""Neuron alignments solved in parallel worker processes are the alignments solved one by one: the same
permutations, and `compress` writes the same bytes with the pool as without it."""

import numpy as np
import torch

from ream_lite import lsap
from ream_lite.engine.streamer import StreamOptions
from ream_lite.methods import MethodOptions
from ream_lite.methods.align import hungarian
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


def test_compress_writes_the_same_bytes_with_the_pool(model_dirs, tmp_path, monkeypatch):
    """Guarded REAM (many candidate plans, their pairs solved together up front) and plain REAM with merges."""
    src = model_dirs["deepseek_v3"][1]
    real = lsap.AssignmentPool.solve_all
    for settings in ({"method": "ream"}, {"method": "ream", "guard": "off"}):
        outs = {}
        for workers in (1, 2):
            pool = lsap.AssignmentPool(workers)
            monkeypatch.setattr(lsap, "_shared", pool)
            solved = []

            def counted(self, costs, solved=solved):
                solved.append(len(costs))
                return real(self, costs)

            monkeypatch.setattr(lsap.AssignmentPool, "solve_all", counted)
            try:
                outs[workers] = compress(CompressConfig(
                    model=str(src), output=str(tmp_path / f"{settings.get('guard', 'group')}-{workers}"),
                    experts=12, num_sequences=8, seq_len=32, options=MethodOptions(group_size=2), **settings,
                    stream=StreamOptions(device="cpu", progress=False)))
            finally:
                pool.close()
            assert (sum(solved) > 0) == (workers == 2)  # one worker: the merges solve each pair as before
        a, b = outs[1], outs[2]
        assert (a / "model.safetensors").read_bytes() == (b / "model.safetensors").read_bytes()
        assert (a / "ream_plan.json").read_text() == (b / "ream_plan.json").read_text()
