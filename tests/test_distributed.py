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
from conftest import needs_data

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
        "sparsegpt+beam": lambda: [SparseGPT(0.5, "2:4")],
        "sparsegpt+beam2": lambda: [SparseGPT(0.5, "2:4")],
        "sparsegpt+finetune": lambda: [SparseGPT(0.5, "2:4")],
    }[name]()
    ids = torch.randint(0, 256, (6, 32), generator=torch.Generator().manual_seed(1))
    return model, stages, ids


CASES = ["magnitude", "wanda", "sparsegpt", "gptq", "sparsegpt+gptq", "slim_llm", "gptq+slim", "sparsegpt+beam",
         "sparsegpt+beam2", "sparsegpt+finetune", "moe", "moe_chunked"]


def recovery_of(name):
    """BEAM online on each block (its 6 windows: 5 train, 1 held out, on the second rank when there are
    two), and on groups of 2 blocks; at lr 1e-4 the training lowers the held-out loss, so the trained
    weights are kept (checked)."""
    from compresslab.recovery.beam import Beam

    if name == "sparsegpt+beam":
        return Beam(epochs=2, batch_size=2, lr=1e-4)
    if name == "sparsegpt+beam2":
        return Beam(epochs=2, batch_size=4, lr=1e-4, block_granularity=2)
    if name == "sparsegpt+finetune":  # end to end: batches of 3 samples, split 2 + 1 over two ranks
        from compresslab.recovery.finetune import Finetune

        return Finetune(steps=4, seqlen=32, batch_size=3, lr=1e-4)
    return None


def compress_case(name):
    """Compress a case in this process (one rank or several, as the environment says); returns what
    every rank must agree on: the state dict, each Linear's mask and record, the engine's ranks."""
    from compresslab.api import _finish_model
    from compresslab.engine import SequentialEngine
    from compresslab.stages import layer_state

    torch.manual_seed(0)
    model, stages, ids = build(name)
    engine = SequentialEngine("cpu", progress=False, max_memory=None,
                              chunk_size=2 if name.endswith("chunked") else None, dist_timeout_s=120)
    recovery = recovery_of(name)
    result = engine.run(model, ids, stages, recovery)
    _finish_model(recovery, model, ids, result, engine)  # an end-to-end recovery (finetune), as compress() does
    records = {"recovery": [{k: v for k, v in r.items() if k in ("loss_before", "loss_after", "curve", "kept")}
                            for r in result["recovery"]]}
    if recovery is not None and hasattr(recovery, "finish_model"):  # its curve: the global batch's loss per step
        records["recovery"] = [{"loss_before": r["curve"][0], "loss_after": r["curve"][-1], "curve": r["curve"],
                                "kept": "trained"} for r in result["recovery"]]
    for n, m in model.named_modules():
        st = layer_state(m)
        if st is not None:
            records[n] = {"mask": st.mask, "pattern": st.pattern, "tokens": st.tokens, "stats_from": st.stats_from,
                          "rel_error": st.rel_error, "factorizations": len(st.numerics),
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
    assert r0["recovery"] == r1["recovery"]
    for n in set(r0) - {"recovery"}:
        for field, v in r0[n].items():
            w = r1[n][field]
            assert (torch.equal(v, w) if isinstance(v, torch.Tensor) else v == w), (n, field)
    assert c0 > 0 and c1 > 0


def planner(world, rank=0):
    from compresslab.distributed import Distributed

    d = object.__new__(Distributed)  # the planning needs no process group
    d.rank, d.world = rank, world
    return d


def test_a_linear_that_outweighs_a_fair_share_is_cut_into_row_blocks():
    """A group of one Linear (o_proj) under GPTQ or N:M SparseGPT: one block of rows per rank, each a view
    of the Linear's rows; unstructured SparseGPT (a threshold across rows), SliM-LLM (a bit map from all
    rows) and a stage that says nothing keep it whole; q/k/v split as whole Linears (none outweighs half)."""
    from compresslab.pruner.sparsegpt import SparseGPT
    from compresslab.quantizer.gptq import GPTQ
    from compresslab.quantizer.slim_llm import SliMLLM

    o = [("o", torch.nn.Linear(64, 64))]
    for stages, cut in (([GPTQ(4, 16)], True), ([SparseGPT(0.5, "2:4")], True), ([SparseGPT(0.5)], False),
                        ([SparseGPT(0.5, "2:4"), SliMLLM(bits=2, group_size=16)], False), ([Seen()], False)):
        mine, plan = planner(2).work(o, stages)
        assert [rows for _, rows, _, _ in plan] == ([slice(0, 32), slice(32, 64)] if cut else [None]), stages
        assert [owner for _, _, owner, _ in plan] == ([0, 1] if cut else [0])
    mine, plan = planner(2, rank=1).work(o, [GPTQ(4, 16)])
    (name, view), = mine
    assert name == "o" and view.weight.shape == (32, 64)
    assert view.weight.data_ptr() == o[0][1].weight[32:].data_ptr()  # a view: what a stage writes lands in o
    qkv = [(n, torch.nn.Linear(64, d)) for n, d in (("q", 64), ("k", 32), ("v", 32))]
    _, plan = planner(2).work(qkv, [GPTQ(4, 16)])
    assert [(k, rows, owner) for k, rows, owner, _ in plan] == [(0, None, 0), (1, None, 1), (2, None, 1)]


def test_row_blocks_stack_back_to_the_whole_record():
    from compresslab.quantizer.rtn import rtn_quantize
    from compresslab.stages import LayerState

    W = torch.randn(12, 32)
    qw = rtn_quantize(W, 4, 8)
    parts = [qw.rows(0, 5), qw.rows(5, 12)]
    back = type(qw).stack_rows(parts)
    assert torch.equal(back.scales, qw.scales) and torch.equal(back.zeros, qw.zeros) and back.shape == qw.shape
    assert torch.equal(back.codes, qw.codes)
    keep = torch.rand(12, 32) > 0.5
    states = [LayerState(pattern="2:4", quant=p.without_codes(), numerics=[i]) for i, p in enumerate(parts)]
    states[0].mask, states[1].mask = keep[:5], keep[5:]
    whole = LayerState()
    whole.take_rows(states)
    assert torch.equal(whole.mask, keep) and whole.pattern == "2:4" and whole.numerics == [0, 1]
    assert torch.equal(whole.quant.scales, qw.scales) and whole.quant.codes is None


@pytest.mark.parametrize("name", DENSE)
def test_two_ranks_give_the_one_rank_result(two_ranks, name):
    """Two ranks equal one process up to the summation order of the statistics (each Hessian summed in two
    parts). Block 0 sees the same inputs either way: the same masks and records (to 1e-3), weights within
    1e-2 of each tensor's largest value (measured at most 1.3e-3: SLiM's adapters, GPTQ 2.6e-4). Later
    blocks see block 0's outputs, which differ in the last bits, and near-tied 2:4 and grid choices then
    flip and carry on through the sweep (on one CPU none, on another (AMD EPYC, AVX2) 5% of a block-1
    down_proj's 2:4 mask, its rel_error 0.1% apart): there the records agree to 1e-2, masks on 90% of
    their entries, weights to 25% of each tensor's norm."""
    one_state, one_rec, _ = compress_case(name)
    s0, r0, _ = two_ranks[0][name]
    assert s0.keys() == one_state.keys() and r0.keys() == one_rec.keys() and len(one_rec) > 1
    if name in ("gptq", "sparsegpt", "sparsegpt+gptq"):  # o_proj and down_proj (groups of one) went as row blocks
        cut = {n for n in one_rec if n.endswith(("o_proj", "down_proj"))}
        assert cut and all(r0[n]["factorizations"] == 2 * one_rec[n]["factorizations"] for n in cut)
        assert all(r0[n]["factorizations"] == one_rec[n]["factorizations"] for n in set(one_rec) - cut - {"recovery"})
    assert len(r0["recovery"]) == len(one_rec["recovery"])
    for mine, one in zip(r0["recovery"], one_rec["recovery"]):  # losses over the whole set, on every rank
        assert mine["kept"] == one["kept"] == "trained"
        for key in ("loss_before", "loss_after"):
            assert mine[key] == pytest.approx(one[key], rel=1e-3), key
        assert mine["curve"] == pytest.approx(one["curve"], rel=1e-3)
    first = "model.layers.0."
    assert any(n.startswith(first) for n in one_rec) and any(n.startswith("model.layers.1.") for n in one_rec)
    for n in set(one_rec) - {"recovery"}:
        for field in ("pattern", "adapter"):
            assert r0[n][field] == one_rec[n][field], (n, field)
        if one_rec[n]["rel_error"] is not None:
            rel = 1e-3 if n.startswith(first) else 1e-2
            assert r0[n]["rel_error"] == pytest.approx(one_rec[n]["rel_error"], rel=rel), n
        if one_rec[n]["mask"] is not None:
            same = float((r0[n]["mask"] == one_rec[n]["mask"]).float().mean())
            assert same == 1.0 if n.startswith(first) else same >= 0.9, (n, same)
    for k, v in one_state.items():
        if v.is_floating_point():
            if k.startswith(first) or not k.startswith("model.layers."):
                assert float((s0[k] - v).abs().max()) <= 1e-2 * float(v.abs().max()), k
            else:
                assert float((s0[k] - v).norm()) <= 0.25 * float(v.norm()), k


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


# -- run.py under torchrun and SLURM, as the README prints it ------------------------------------------
def _readme_lines(word):
    from test_sweeps import ROOT

    return [ln.strip() for ln in (ROOT / "README.md").read_text().splitlines()
            if ln.startswith(".venv/bin/") and word in ln]


TINY_RUN = ["data.nsamples=8", "data.seqlen=64", "eval.seqlen=64", "eval.max_windows=2", "logger=none",
            "engine.progress=false", "eval.progress=false", "recovery.epochs=1"]


def _env(tmp_path, **extra):
    from conftest import small_data_dir

    return {**os.environ, "COMPRESSLAB_DATA_DIR": str(small_data_dir(tmp_path / "data")), "TQDM_DISABLE": "1",
            "WANDB_SILENT": "true", **extra}


@needs_data
def test_readme_torchrun_command_runs_one_compression_on_two_ranks(tmp_path):
    """The README's torchrun line as printed (tiny data appended): one metrics.json, from rank 0, with
    world_size 2 and both ranks' times; nothing from rank 1 in the run folder; the same sparsity, bits,
    perplexity and BEAM losses as the same command in one process that sums its statistics in the same two
    parts (engine.chunk_size=4 of 8 samples). Against one pass the perplexity moves by 0.6% here (247.9 vs
    249.5 on this tiny random model and data): the float order of a Hessian sum flips a few GPTQ roundings,
    which one process in chunks does alike."""
    import json
    import subprocess

    from test_sweeps import ROOT

    (line,) = _readme_lines("torchrun")
    args = line.split()
    assert args[:3] == [".venv/bin/torchrun", "--nproc-per-node", "2"] and args[3] == "run.py"
    env = _env(tmp_path)
    recs = {}
    for name, cmd in (("two", [str(ROOT / args[0]), *args[1:3], "--master-port", str(free_port()), "run.py"]),
                      ("one", [sys.executable, "run.py", "engine.chunk_size=4"])):
        out = subprocess.run([*cmd, *args[4:], *TINY_RUN, f"hydra.run.dir={tmp_path / name}"], cwd=ROOT,
                             capture_output=True, text=True, env=env, timeout=600)
        assert out.returncode == 0, out.stderr[-3000:]
        assert sorted(p.name for p in (tmp_path / name).iterdir() if not p.name.startswith(".")) == [
            "metrics.json", "run.log"]
        recs[name] = json.loads((tmp_path / name / "metrics.json").read_text())
        if name == "two":
            assert out.stdout.count("metrics:") == 1  # rank 1 prints nothing
            assert "rank 1" not in (tmp_path / name / "run.log").read_text()
    two, one = recs["two"], recs["one"]
    assert two["status"] == one["status"] == "ok"
    m2, m1 = two["metrics"], one["metrics"]
    assert m2["dist/world_size"] == 2 and "dist/world_size" not in m1
    assert all(m2[f"dist/rank{r}/{k}"] > 0 for r in (0, 1) for k in ("compute_s", "comm_s", "comm_gb"))
    assert m2["sparsity"] == m1["sparsity"] and m2["avg_bits"] == m1["avg_bits"]
    # to 2e-3: the chunks' Grams go into the running sum inside the BLAS call, in its own order, while the ranks'
    # sums are added as two finished parts (one CPU: equal to 1e-6; an AMD EPYC (AVX2): 6e-4 apart)
    assert m2["ppl/wikitext2"] == pytest.approx(m1["ppl/wikitext2"], rel=2e-3)
    assert [r["loss_after"] for r in two["recovery"]] == pytest.approx([r["loss_after"] for r in one["recovery"]],
                                                                       rel=2e-3)


@needs_data
def test_a_rank_that_raises_ends_the_run_with_its_error(tmp_path):
    """Rank 1 fails in the middle of block 1 (a stage that raises there, given by `_target_`): both ranks
    end within seconds, not at the collective timeout (set to 300 s here), and rank 0's metrics.json says
    failed with rank 1's error."""
    import json
    import subprocess
    import time

    from test_sweeps import ROOT

    (tmp_path / "failing.py").write_text(
        "import os\nfrom compresslab.pruner.wanda import Wanda\n\n\n"
        "class FailOnRank1(Wanda):\n"
        "    def compress(self, name, layer, stats):\n"
        "        if os.environ.get('RANK') == '1' and '.1.' in name:\n"
        "            raise RuntimeError('injected failure on rank 1')\n"
        "        super().compress(name, layer, stats)\n")
    env = _env(tmp_path, PYTHONPATH=f"{tmp_path}{os.pathsep}{os.environ.get('PYTHONPATH', '')}")
    t0 = time.perf_counter()
    out = subprocess.run([str(ROOT / ".venv/bin/torchrun"), "--nproc-per-node", "2", "--master-port", str(free_port()),
                          "run.py", "model=tiny_llama", "pruner=wanda", "pruner._target_=failing.FailOnRank1",
                          *TINY_RUN[:-1], "engine.dist_timeout_s=300", f"hydra.run.dir={tmp_path / 'run'}"],
                         cwd=ROOT, capture_output=True, text=True, env=env, timeout=600)
    took = time.perf_counter() - t0
    assert out.returncode != 0
    rec = json.loads((tmp_path / "run" / "metrics.json").read_text())
    assert rec["status"] == "failed"
    assert rec["error"].startswith("rank 1: RuntimeError: injected failure on rank 1"), rec["error"]
    assert took < 120, took


@pytest.mark.slurm
@needs_data
def test_readme_slurm_command_runs_one_compression_on_two_tasks(tmp_path):
    """The README's SLURM line (2 tasks of one job on the local single-node SLURM): one job, whose two
    tasks are the two ranks of one compression; rank 0's metrics.json has world_size 2."""
    import json
    import subprocess

    from test_launchers import _slurm_reason
    from test_sweeps import ROOT

    reason = _slurm_reason()
    if reason:
        pytest.skip(reason)
    (line,) = _readme_lines("tasks_per_node")
    args = line.split()[2:]
    out = subprocess.run([sys.executable, "run.py", *args, *TINY_RUN[:-1], "hydra.launcher.timeout_min=10",
                          "hydra.launcher.signal_delay_s=30", f"hydra.sweep.dir={tmp_path / 's'}"],
                         cwd=ROOT, capture_output=True, text=True, env=_env(tmp_path), timeout=600)
    assert out.returncode == 0, out.stderr[-3000:]
    found = list((tmp_path / "s").rglob("metrics.json"))
    assert len(found) == 1, found
    rec = json.loads(found[0].read_text())
    assert rec["status"] == "ok", rec.get("error")
    assert rec["metrics"]["dist/world_size"] == 2


def test_bad_distributed_options_fail_before_anything_loads():
    from compresslab.engine import SequentialEngine
    from compresslab.errors import ConfigError

    with pytest.raises(ConfigError, match="engine.distributed='yes' must be auto .* or off"):
        SequentialEngine("cpu", distributed="yes")
    with pytest.raises(ConfigError, match="engine.dist_timeout_s=0 must be a number of seconds > 0"):
        SequentialEngine("cpu", dist_timeout_s=0)
    assert SequentialEngine("cpu", distributed="off").ranks.world == 1
