"""One model compressed by several ranks (distributed.py) on the CPU with gloo: 2 ranks give the weights,
masks and records of 1 rank (to float-summation order), the same on every rank, bitwise the same run to run."""

import os
import socket
import sys
from pathlib import Path

import pytest
import torch
import torch.multiprocessing as mp

from compresslab.distributed import assign_by_cost, env_ranks, slurm_master

HERE = Path(__file__).parent


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def build(name):
    """(model, stages, calibration ids) of a named case, the same in every process."""
    from compresslab.engine import SequentialEngine  # noqa: F401 - import check in the workers
    from compresslab.lowrank.slim import SLiMLoRA as SLiM
    from compresslab.models.loaders import TinyModel
    from compresslab.pruner.magnitude import Magnitude
    from compresslab.pruner.sparsegpt import SparseGPT
    from compresslab.pruner.wanda import Wanda
    from compresslab.quantizer.gptq import GPTQ
    from compresslab.quantizer.slim_llm import SliMLLM

    family = "mixtral" if name.startswith("moe") else "llama"
    model, _ = TinyModel(family=family, num_layers=2, hidden_size=64, intermediate_size=128, device="cpu").load()
    stages = {
        "magnitude": lambda: [Magnitude(0.5, "2:4")],
        "wanda": lambda: [Wanda(0.5, "2:4")],
        "sparsegpt": lambda: [SparseGPT(0.5, "2:4")],
        "gptq": lambda: [GPTQ(bits=4, group_size=16)],
        "sparsegpt+gptq": lambda: [SparseGPT(0.5, "2:4"), GPTQ(bits=4, group_size=16)],
        "slim_llm": lambda: [SliMLLM(bits=2, group_size=16)],
        "gptq+slim": lambda: [GPTQ(bits=4, group_size=16), SLiM()],
        "moe": lambda: [SparseGPT(0.5, "2:4"), GPTQ(bits=4, group_size=16)],
        "moe_chunked": lambda: [SparseGPT(0.5, "2:4"), GPTQ(bits=4, group_size=16)],
    }[name]()
    ids = torch.randint(0, 256, (6, 32), generator=torch.Generator().manual_seed(1))
    return model, stages, ids


CASES = ["magnitude", "wanda", "sparsegpt", "gptq", "sparsegpt+gptq", "slim_llm", "gptq+slim", "moe", "moe_chunked"]


def compress_case(name):
    """Compress a case in this process (one rank or several, as the environment says); returns what
    every rank must agree on: the state dict, each Linear's mask and record, the engine's ranks."""
    from compresslab.engine import SequentialEngine
    from compresslab.stages import layer_state

    torch.manual_seed(0)
    model, stages, ids = build(name)
    engine = SequentialEngine("cpu", progress=False, max_memory=None,
                              chunk_size=2 if name.endswith("chunked") else None, dist_timeout_s=120)
    engine.run(model, ids, stages)
    records = {}
    for n, m in model.named_modules():
        st = layer_state(m)
        if st is not None:
            records[n] = {"mask": st.mask, "pattern": st.pattern, "tokens": st.tokens, "stats_from": st.stats_from,
                          "scales": None if st.quant is None else st.quant.scales, "bit_map": None if st.quant is None else st.quant.bit_map, "adapter": st.adapter is not None}
    state = {k: v.detach().clone() for k, v in model.state_dict().items()}
    return state, records, engine.ranks


def _worker(rank, world, port, out, cases):
    os.environ.update(RANK=str(rank), WORLD_SIZE=str(world), LOCAL_RANK=str(rank), MASTER_ADDR="127.0.0.1",
                      MASTER_PORT=str(port))
    torch.set_num_threads(1)
    sys.path.insert(0, str(HERE))
    import torch.distributed as dist

    results = {}
    for name in cases:
        state, records, ranks = compress_case(name)
        assert ranks.world == world and ranks.rank == rank
        results[name] = (state, records, ranks.comm_s)
    torch.save(results, Path(out) / f"rank{rank}.pt")
    dist.barrier()
    dist.destroy_process_group()


def run_ranks(world, cases, tmp_path):
    mp.spawn(_worker, args=(world, free_port(), str(tmp_path), cases), nprocs=world, join=True)
    return [torch.load(tmp_path / f"rank{r}.pt", weights_only=False) for r in range(world)]


@pytest.fixture(scope="module")
def two_ranks(tmp_path_factory):
    return run_ranks(2, CASES, tmp_path_factory.mktemp("ranks2"))


def test_env_ranks_from_torchrun_and_slurm():
    assert env_ranks({}) is None
    assert env_ranks({"RANK": "1", "WORLD_SIZE": "4", "LOCAL_RANK": "1"}) == (1, 4, 1)
    assert env_ranks({"RANK": "0", "WORLD_SIZE": "1"}) is None  # torchrun with one process: no group
    assert env_ranks({"SLURM_PROCID": "3", "SLURM_NTASKS": "4", "SLURM_LOCALID": "1"}) == (3, 4, 1)
    assert env_ranks({"SLURM_PROCID": "0", "SLURM_NTASKS": "1"}) is None  # an ordinary one-task job
    assert slurm_master({"SLURM_JOB_NODELIST": "gpu[07-09,12]", "SLURM_JOB_ID": "20123"}) == ("gpu07", 20123)
    assert slurm_master({"SLURM_JOB_NODELIST": "a1,b2", "SLURM_JOB_ID": "5"}) == ("a1", 20005)


def test_assign_by_cost_balances_the_load():
    """Longest first onto the least loaded rank: q (64x64) alone against k and v (16x64 each) when the
    factorization is cheap; every item owned once; one rank takes everything alone."""
    costs = [4.0, 1.0, 1.0]
    assert assign_by_cost(costs, 2) == [0, 1, 1]
    assert assign_by_cost([3.0, 3.0, 2.0, 2.0, 2.0], 2) == [0, 1, 0, 1, 0]  # 7 vs 5: greedy, not optimal
    assert assign_by_cost(costs, 1) == [0, 0, 0]
    assert assign_by_cost(costs, 5) == [0, 1, 2]


DENSE = [c for c in CASES if not c.startswith("moe")]


@pytest.mark.parametrize("name", CASES)
def test_every_rank_holds_the_same_compressed_model(two_ranks, name):
    """Each Linear is compressed by one rank and sent to the other: bitwise the same weights, masks and
    quantization records on both, and the comm time is counted."""
    (s0, r0, c0), (s1, r1, c1) = two_ranks[0][name], two_ranks[1][name]
    assert s0.keys() == s1.keys()
    for k in s0:
        assert torch.equal(s0[k], s1[k]), k
    assert r0.keys() == r1.keys() and r0
    for n in r0:
        for field, v in r0[n].items():
            w = r1[n][field]
            assert (torch.equal(v, w) if isinstance(v, torch.Tensor) else v == w), (n, field)
    assert c0 > 0 and c1 > 0


@pytest.mark.parametrize("name", DENSE)
def test_two_ranks_give_the_one_rank_result(two_ranks, name):
    """Two ranks equal one process up to the summation order of the statistics (each Hessian summed in two
    parts): the same masks (measured: identical in every case here) and records, weights within 1e-2 of
    each tensor's largest value (measured at most 1.3e-3: SLiM's adapters, GPTQ 2.6e-4)."""
    one_state, one_rec, _ = compress_case(name)
    s0, r0, _ = two_ranks[0][name]
    assert s0.keys() == one_state.keys() and r0.keys() == one_rec.keys() and one_rec
    for n in one_rec:
        for field in ("pattern", "adapter"):
            assert r0[n][field] == one_rec[n][field], (n, field)
        if one_rec[n]["mask"] is not None:
            assert torch.equal(r0[n]["mask"], one_rec[n]["mask"]), n
    for k, v in one_state.items():
        if v.is_floating_point():
            assert float((s0[k] - v).abs().max()) <= 1e-2 * float(v.abs().max()), k


class Seen:
    needs = frozenset({"hessian", "act_norm"})

    def __init__(self):
        self.h = {}

    def check(self, name, layer):
        pass

    def compress(self, name, layer, stats):
        self.h[name] = (stats.n, stats.hessian.clone(), stats.act_norm.clone())


def _stats_worker(rank, world, port, out):
    os.environ.update(RANK=str(rank), WORLD_SIZE=str(world), LOCAL_RANK=str(rank), MASTER_ADDR="127.0.0.1",
                      MASTER_PORT=str(port))
    torch.set_num_threads(1)
    sys.path.insert(0, str(HERE))
    import torch.distributed as dist

    torch.save({c: moe_stats(c) for c in (None, 2)}, Path(out) / f"stats{rank}.pt")
    dist.barrier()
    dist.destroy_process_group()


def moe_stats(chunk):
    """{Linear: (tokens, Hessian, channel norms)} the stages of a tiny Mixtral see (in one pass or in
    chunks of 2), with an identity stage so that the routing is the dense model's."""
    from compresslab.engine import SequentialEngine

    torch.manual_seed(0)
    model, _, ids = build("moe")
    seen = Seen()
    SequentialEngine("cpu", progress=False, max_memory=None, chunk_size=chunk, dist_timeout_s=120).run(model, ids, [seen])
    return seen.h


def test_two_ranks_see_the_one_rank_statistics_of_every_expert(tmp_path):
    """Mixtral (8 experts, top-2, 64-token starved rule): the statistics of every Linear, experts included,
    summed over 2 ranks equal one process's (in one pass and in chunks): each rank saw 3 of 6 samples,
    the experts' starved decisions took the summed counts. (Compressed MoE weights are not compared with
    one process: a Hessian of an expert with fewer tokens than inputs is singular, and GPTQ on it turns
    float-order differences into visible ones; one process in chunks differs from one pass alike.)"""
    mp.spawn(_stats_worker, args=(2, free_port(), str(tmp_path)), nprocs=2, join=True)
    parts = [torch.load(tmp_path / f"stats{r}.pt", weights_only=False) for r in range(2)]
    for chunk in (None, 2):
        one = moe_stats(chunk)
        two = {**parts[0][chunk], **parts[1][chunk]}  # each Linear's stage ran on its owner only
        assert two.keys() == one.keys() and any("experts" in n for n in one)
        assert parts[0][chunk] and parts[1][chunk]  # both ranks compressed some
        for n, (tokens, H, norm) in one.items():
            assert two[n][0] == tokens, n
            torch.testing.assert_close(two[n][1], H, rtol=1e-4, atol=1e-5 * float(H.abs().max()), msg=n)
            torch.testing.assert_close(two[n][2], norm, rtol=1e-4, atol=1e-6)


def test_the_same_rank_count_gives_bitwise_the_same_weights(two_ranks, tmp_path):
    again = run_ranks(2, ["sparsegpt+gptq"], tmp_path)
    for k, v in two_ranks[0]["sparsegpt+gptq"][0].items():
        assert torch.equal(again[0]["sparsegpt+gptq"][0][k], v), k
