"""Allocation (OWL, DP): the DP is optimal against brute force, OWL's rule against a formula written here
from dense activations, budgets are met, a saved allocation reproduces the same model, and stages take
their layer's level (also inside the fused SparseGPT+GPTQ pass)."""

import itertools
import json
from pathlib import Path

import numpy as np
import pytest
import torch

from compresslab import compress
from compresslab.allocation.dp import DP, solve
from compresslab.allocation.owl import OWL
from compresslab.engine import SequentialEngine
from compresslab.errors import ConfigError
from compresslab.models.loaders import TinyModel
from compresslab.pruner.magnitude import Magnitude
from compresslab.pruner.sparsegpt import SparseGPT
from compresslab.pruner.wanda import Wanda
from compresslab.quantizer.gptq import GPTQ
from compresslab.stages import fuse_stages, layer_state
from conftest import needs_data
from test_sweeps import run  # run.py in a subprocess, quiet

ROOT = Path(__file__).resolve().parents[2]


def brute(errors, costs, budget):
    best = (np.inf, None)
    for ch in itertools.product(*[range(errors.shape[1])] * errors.shape[0]):
        idx = np.arange(len(ch)), np.array(ch)
        if costs[idx].sum() <= budget and errors[idx].sum() < best[0]:
            best = (errors[idx].sum(), ch)
    return best


@pytest.mark.parametrize("seed", range(6))
def test_dp_is_optimal_on_integer_costs(seed):
    rng = np.random.default_rng(seed)
    L, K = 6, 4
    errors = rng.random((L, K))
    costs = rng.integers(1, 20, (L, K)).astype(float)
    budget = float(rng.integers(costs.min(1).sum(), costs.max(1).sum() + 1))
    choice = solve(errors, costs, budget)
    opt, _ = brute(errors, costs, budget)
    idx = np.arange(L), choice
    assert costs[idx].sum() <= budget
    assert errors[idx].sum() == pytest.approx(opt, abs=1e-12)


@pytest.mark.parametrize("seed", range(4))
def test_dp_with_binned_costs_stays_in_budget_and_beats_the_shrunk_optimum(seed):
    """Real costs in bins of budget/R (rounded up): every choice that fits budget − L·bin is open to the DP,
    so its error is at most that smaller budget's optimum; and it never exceeds the budget."""
    rng = np.random.default_rng(seed)
    L, K, R = 5, 3, 64
    errors, costs = rng.random((L, K)), rng.random((L, K)) * 100 + 1
    budget = float(costs.min(1).sum() + 0.6 * (costs.max(1).sum() - costs.min(1).sum()))
    choice = solve(errors, costs, budget, resolution=R)
    idx = np.arange(L), choice
    assert costs[idx].sum() <= budget + 1e-9
    shrunk, _ = brute(errors, costs, budget - L * budget / R)
    assert errors[idx].sum() <= shrunk + 1e-12


def test_dp_refuses_a_budget_below_the_cheapest_choice():
    with pytest.raises(ConfigError, match="cheapest"):
        solve(np.ones((2, 2)), np.array([[3.0, 5.0], [3.0, 4.0]]), 5.0)


def _model(seed=0, layers=3):
    m, _ = TinyModel(hidden_size=64, intermediate_size=128, num_layers=layers, seed=seed, device="cpu").load()
    return m


def _ids(n=8, t=32, seed=0):
    return torch.randint(0, 257, (n, t), generator=torch.Generator().manual_seed(seed))


def engine():
    return SequentialEngine(device="cpu", progress=False)


def test_owl_matches_its_rule_computed_from_dense_activations():
    """Outlier ratios from a plain forward of the dense model (hooks record each Linear's input norms),
    then OWL's mapping, both written here; the allocator's levels must equal them."""
    m, ids = _model(), _ids()
    norms = {}
    hooks = [lin.register_forward_pre_hook(lambda mod, a, n=n: norms.__setitem__(n, a[0].reshape(-1, a[0].shape[-1])
                                                                                   .double().norm(dim=0)))
             for n, lin in m.named_modules() if isinstance(lin, torch.nn.Linear) and ".layers." in f".{n}"]
    with torch.no_grad():
        m(ids)
    for h in hooks:
        h.remove()
    M, lam, S = 3.0, 0.05, 0.6
    D = []
    for i in range(3):
        scores = torch.cat([(lin.weight.double().abs() * norms[n][None]).flatten()
                            for n, lin in m.named_modules() if n.startswith(f"model.layers.{i}.")
                            and isinstance(lin, torch.nn.Linear)])
        D.append(float((scores > M * scores.mean()).double().mean()))
    D = np.array(D)
    dens = (D - D.min()) / (D.max() - D.min()) * 2 * lam
    want = 1 - (dens - dens.mean() + 1 - S)
    owl = OWL(M=M, lam=lam, target=S)
    levels = owl.allocate(m, ids, [Wanda(sparsity=S)], engine())
    for i in range(3):
        got = {v["sparsity"] for k, v in levels.items() if k.startswith(f"model.layers.{i}.")}
        assert len(got) == 1 and got.pop() == pytest.approx(want[i], abs=1e-6)
    assert np.mean([owl_s for owl_s in want]) == pytest.approx(S)
    assert np.allclose(owl.ratios, D, atol=1e-12)
    # the measuring pass left the model dense and without records
    assert all(layer_state(lin) is None for n, lin in m.named_modules() if isinstance(lin, torch.nn.Linear))


def test_dp_sparsity_budget_is_met_and_every_layer_takes_its_level(tmp_path):
    m, ids = _model(), _ids()
    stages = [SparseGPT(sparsity=0.6)]
    dp = DP(budget="sparsity", target=0.6, levels=[0.4, 0.5, 0.6, 0.7, 0.8])
    eng = engine()
    eng.levels = dp.levels(m, ids, stages, eng, tmp_path)
    assert (tmp_path / "allocation.yaml").is_file()
    assert len({v["sparsity"] for v in eng.levels.values()}) > 1  # not uniform
    report = compress(m, pruner=stages[0], calibration=ids, engine=eng)
    pruned = total = 0
    step = 0
    for row in report.layers:
        lv = eng.levels[row["name"]]["sparsity"]
        assert row["sparsity"] == pytest.approx(lv, abs=1 / 64)  # per-row rounding of a 64-wide row
        numel = row["shape"][0] * row["shape"][1]
        pruned, total = pruned + row["sparsity"] * numel, total + numel
        step = max(step, 0.1 * numel)
    assert pruned / total >= 0.6 - 1e-9 and (pruned / total - 0.6) * total <= step
    assert dp.report["allocation/error_sum"] <= dp.report["allocation/error_sum_uniform"]


def test_dp_bits_inside_the_fused_sparsegpt_gptq_pass_and_the_packed_size_is_the_budget(tmp_path):
    m, ids = _model(), _ids()
    stages = fuse_stages([SparseGPT(sparsity=0.5), GPTQ(bits=3, group_size=32)])
    assert len(stages) == 1  # the joint pass: levels must reach its quantizer
    dp = DP(budget="avg_bits", levels=[2, 3, 4])
    eng = engine()
    eng.levels = dp.levels(m, ids, stages, eng)
    report = compress(m, pruner=SparseGPT(sparsity=0.5), quantizer=GPTQ(bits=3, group_size=32), calibration=ids,
                      engine=eng)
    bits = {r["name"]: r["bits"] for r in report.layers}
    assert bits == {n: v["bits"] for n, v in eng.levels.items()}
    assert len(set(bits.values())) > 1
    assert report.metrics["avg_bits"] <= dp.report["allocation/target"] + 1e-12
    assert report.metrics["avg_bits"] == pytest.approx(dp.report["allocation/met"], rel=1e-12)


def test_a_pattern_level_moves_nm_and_sparsity_together_and_dense_leaves_the_layer_alone():
    from compresslab.stages import with_levels

    p = SparseGPT(pattern="2:4")
    q = with_levels(p, {"pattern": "1:4"})
    assert (q.nm, q.sparsity, q.pattern) == ((1, 4), 0.75, "1:4") and (p.nm, p.sparsity) == ((2, 4), 0.5)
    m, ids = _model(), _ids()
    lin = m.model.layers[0].mlp.up_proj
    before = lin.weight.detach().clone()
    H = torch.eye(64) + 0.1  # any positive definite Hessian: a dense level must not touch the weight
    with_levels(p, {"pattern": "dense"}).compress("up", lin, type("S", (), {"hessian": H, "has_hessian": True})())
    assert torch.equal(lin.weight, before) and layer_state(lin) is None


def test_nm_vs_dense_per_layer_meets_the_sparsity_budget_inside_the_fused_pass(tmp_path):
    """A sparsity budget over a 2:4 pruner: each Linear is 2:4 (a valid mask) or dense, and GPTQ
    quantizes every one of them; the mean sparsity reaches the target, past it by less than one Linear's step."""
    m, ids = _model(), _ids()
    make = lambda: fuse_stages([SparseGPT(pattern="2:4"), GPTQ(bits=4, group_size=32)])  # noqa: E731
    dp = DP(budget="sparsity", target=0.3, levels=["dense", "2:4"])
    dp.check(make())
    assert dp.key == "pattern"
    eng = engine()
    eng.levels = dp.levels(m, ids, make(), eng, tmp_path)
    assert {v["pattern"] for v in eng.levels.values()} == {"dense", "2:4"}
    report = compress(m, pruner=SparseGPT(pattern="2:4"), quantizer=GPTQ(bits=4, group_size=32), calibration=ids,
                      engine=eng)
    pruned = total = biggest = 0
    for row in report.layers:
        numel = row["shape"][0] * row["shape"][1]
        if eng.levels[row["name"]]["pattern"] == "dense":
            assert row["sparsity"] == 0 and row["pattern"] is None
        else:
            assert row["pattern"] == "2:4" and row["nm_valid"] and row["sparsity"] == 0.5
        assert row["bits"] == 4
        pruned, total, biggest = pruned + row["sparsity"] * numel, total + numel, max(biggest, numel)
    assert 0.3 * total - 1e-9 <= pruned <= 0.3 * total + 0.5 * biggest  # the budget (kept weights), over by < one step
    assert pruned / total == pytest.approx(dp.report["allocation/met"], abs=1e-12)
    assert "pattern: dense" in (tmp_path / "allocation.yaml").read_text()


def test_a_saved_allocation_reproduces_the_same_compressed_model(tmp_path):
    ids = _ids()
    weights = []
    for path in (None, str(tmp_path / "allocation.yaml")):
        m = _model()
        dp = DP(budget="sparsity", target=0.6, path=path) if path else DP(budget="sparsity", target=0.6)
        eng = engine()
        eng.levels = dp.levels(m, ids, [Wanda(sparsity=0.6)], eng, tmp_path if path is None else None)
        compress(m, pruner=Wanda(sparsity=0.6), calibration=ids, engine=eng)
        weights.append({n: p.detach().clone() for n, p in m.named_parameters()})
    assert all(torch.equal(weights[0][n], weights[1][n]) for n in weights[0])


def test_a_saved_allocation_for_another_model_is_refused(tmp_path):
    (tmp_path / "a.yaml").write_text("levels:\n  model.layers.9.mlp.up_proj: {sparsity: 0.5}\n")
    with pytest.raises(ConfigError, match="another model"):
        DP(path=str(tmp_path / "a.yaml")).levels(_model(), None, [Magnitude(0.5)], engine())
    with pytest.raises(ConfigError, match="not a file"):
        DP(path=str(tmp_path / "none.yaml"))


@pytest.mark.parametrize("kw,match", [({"budget": "flops"}, "budget"), ({"target": 1.5}, "target"),
                                      ({"levels": [0.5, 1.2]}, "levels"), ({"granularity": "row"}, "granularity"),
                                      ({"budget": "avg_bits", "levels": [3, 9]}, "levels"),
                                      ({"resolution": 4}, "resolution")])
def test_bad_dp_options_fail_at_once(kw, match):
    with pytest.raises(ConfigError, match=match):
        DP(**kw)


def test_owl_refuses_nm_patterns_and_a_missing_stage():
    with pytest.raises(ConfigError, match="unstructured"):
        OWL().check([Wanda(pattern="2:4")])
    with pytest.raises(ConfigError, match="quantizer"):
        DP(budget="avg_bits").check([Wanda()])
    with pytest.raises(ConfigError, match="lam"):
        OWL(lam=0.7)


TINY = ["model=tiny_llama", "data.nsamples=4", "data.seqlen=64", "eval.seqlen=64", "eval.max_windows=2",
        "engine.progress=false", "eval.progress=false", "logger=none"]


@needs_data
def test_readme_allocation_commands_run_as_printed(tmp_path):
    lines = [ln.strip() for ln in (ROOT / "README.md").read_text().splitlines()
             if ln.startswith(".venv/bin/python run.py") and "allocation=" in ln]
    assert len(lines) == 4, lines
    recs = []
    for k, line in enumerate(lines):
        out_dir = tmp_path / f"cmd{k}"
        args = line.split()[2:] + [*TINY, "model.hidden_size=128", "model.intermediate_size=256",
                                   f"hydra.{'sweep' if '-m' in line.split() else 'run'}.dir={out_dir}"]
        out = run(args)
        assert out.returncode == 0, out.stderr[-3000:]
        recs += [(p.parent, json.loads(p.read_text())) for p in out_dir.rglob("metrics.json")]
    assert len(recs) >= 4
    for d, r in recs:
        assert r["status"] == "ok", r.get("error")
        if r["choices"]["allocation"]:
            assert (d / "allocation.yaml").is_file() or r["config"]["allocation"]["path"]
            assert all(any(k.startswith("allocated_") for k in row) for row in r["layers"])


@needs_data
def test_bad_allocation_values_fail_before_loading(tmp_path):
    for k, args in enumerate([["allocation=dp", "allocation.budget=flops", "pruner=wanda"],
                              ["allocation=owl", "pruner=wanda", "pruner.pattern=2:4"],
                              ["allocation=dp", "allocation.budget=avg_bits", "pruner=wanda"]]):
        out = run([*TINY, *args, f"hydra.run.dir={tmp_path / str(k)}"])
        assert out.returncode != 0
        rec = json.loads((tmp_path / str(k) / "metrics.json").read_text())
        assert rec["status"] == "failed" and "allocation" in rec["error"] and "time/load_s" not in rec["metrics"]


def test_level_switch_keeps_the_budget_and_stays_in_its_classes():
    from compresslab.allocation.evopress import level_switch

    rng = np.random.default_rng(0)
    classes = [np.array([0, 1, 2]), np.array([3, 4]), np.array([5])]
    cost = np.array([[1, 2, 3]] * 3 + [[10, 20, 30]] * 2 + [[7, 8, 9]])  # same cost per level within a class
    start = np.array([1, 1, 1, 0, 2, 1])
    for _ in range(200):
        child = level_switch(start, classes, 3, int(rng.integers(1, 4)), rng)
        assert cost[np.arange(6), child].sum() == cost[np.arange(6), start].sum()
        assert child.min() >= 0 and child.max() <= 2 and child[5] == 1
        for c in classes:  # the levels move within a class, never between classes
            assert child[c].sum() == start[c].sum()


def test_evopress_improves_on_its_dp_start_within_the_same_budget():
    from compresslab.allocation.evopress import EvoPress

    m, ids = _model(layers=2), _ids(n=4, t=32)
    before = {n: p.detach().clone() for n, p in m.named_parameters()}
    ev = EvoPress(budget="sparsity", target=0.6, levels=[0.4, 0.5, 0.6, 0.7, 0.8], generations=12, offspring=4,
                  windows=2)
    levels = ev.allocate(m, ids, [Wanda(sparsity=0.6)], engine())
    assert all(torch.equal(p, before[n]) for n, p in m.named_parameters())  # dense again for the compression
    assert ev.curve[-1] < ev.curve[0]  # the search found a better allocation than the DP's on this seed
    # its fitness is the KL it reports: stitch the chosen levels by hand (compress each Linear at its level)
    m2 = _model(layers=2)
    eng = engine()
    eng.levels = levels
    compress(m2, pruner=Wanda(sparsity=0.6), calibration=ids, engine=eng)
    with torch.no_grad():
        ref = torch.log_softmax(_model(layers=2)(ids[:2]).logits.double(), -1)
        got = torch.log_softmax(m2(ids[:2]).logits.double(), -1)
    kl = float((ref.exp() * (ref - got)).sum(-1).mean())
    assert kl != pytest.approx(ev.curve[0], rel=1e-3)  # not the start's
    # (the compression pass sees compressed inputs, the search dense ones: close, not equal)
    assert kl == pytest.approx(ev.curve[-1], rel=0.3)
    assert ev.report["allocation/met"] >= 0.6 - 1e-12  # within the budget, as the DP's start
    numel = [lin.weight.numel() for n, lin in m.named_modules() if isinstance(lin, torch.nn.Linear) and ".layers." in n]
    assert ev.report["allocation/met"] - 0.6 <= 0.1 * max(numel) / sum(numel)  # within one layer's step
    assert len(levels) == 14


def test_evopress_levels_on_disk_give_the_same_search_as_in_memory_and_are_removed(tmp_path, monkeypatch):
    """The disk cache (one memory-mapped file per Linear and level) must stitch the very same candidates:
    same curve, same choice; its temporary directory is gone afterwards. The 2:4-vs-dense levels run here."""
    import shutil
    import tempfile

    from compresslab.allocation.evopress import EvoPress

    monkeypatch.setattr(tempfile, "tempdir", str(tmp_path))
    files, rmtree = [], shutil.rmtree
    monkeypatch.setattr(shutil, "rmtree", lambda d, **k: (files.append(len(list(Path(d).iterdir()))), rmtree(d, **k)))
    ids = _ids(n=4, t=32)
    got = []
    for cache in ("memory", "disk"):
        ev = EvoPress(target=0.25, levels=["dense", "2:4"], generations=4, offspring=3, windows=2, cache=cache)
        stages = [SparseGPT(pattern="2:4")]
        ev.check(stages)
        got.append((ev.allocate(_model(layers=2), ids, stages, engine()), ev.curve))
    assert got[0][0] == got[1][0] and got[0][1] == got[1][1]
    assert len(set(got[0][1])) > 1  # the search moved (else the caches were never read past the start)
    assert files == [2 * 14] and not list(tmp_path.glob("compresslab-evopress-*"))  # a file per Linear and level, then removed


@pytest.mark.parametrize("kw", [{"generations": -1}, {"offspring": 0}, {"windows": 0}, {"max_switches": 0},
                                {"seed": "x"}, {"cache": "ssd"}])
def test_bad_evopress_options_fail_at_once(kw):
    from compresslab.allocation.evopress import EvoPress

    with pytest.raises(ConfigError, match=list(kw)[0]):
        EvoPress(**kw)


@needs_data
def test_the_search_curve_goes_to_the_logger(tmp_path):
    from compresslab.allocation.evopress import EvoPress
    from compresslab.data.calibration import CalibrationData
    from compresslab.pipeline import Pipeline

    class Logger:
        def __init__(self):
            self.rows = []

        def start(self, *a, **k): ...
        def table(self, *a, **k): ...
        def summary(self, *a, **k): ...
        def finish(self, *a, **k): ...

        def log(self, metrics, step=None):
            self.rows.append(metrics)

    lg = Logger()
    ev = EvoPress(target=0.6, levels=[0.5, 0.6, 0.7], generations=3, offspring=2, windows=1)
    p = Pipeline(model=TinyModel(device="cpu"), data=CalibrationData(nsamples=2, seqlen=32), pruner=Wanda(0.6),
                 allocation=ev, logger=lg, engine=SequentialEngine(device="cpu", progress=False))
    rec = p.run(tmp_path)
    assert rec["status"] == "ok", rec["error"]
    curve = [r["allocation/curve"] for r in lg.rows if "allocation/curve" in r]
    assert curve == ev.curve and len(curve) >= 2
    assert (tmp_path / "allocation.yaml").is_file()


def test_dp_adapter_ranks_under_a_parameter_budget():
    """budget=params: SLiM-LoRA ranks per layer from [4, 8, 16, 32] (the stage set by rank_ratio is the
    uniform choice, level null); the stored parameters stay within the uniform setting's."""
    from compresslab.lowrank.slim import SLiMLoRA
    from compresslab.metrics import layer_params

    m, ids = _model(), _ids()
    stages = [Magnitude(0.5), SLiMLoRA(rank_ratio=0.25)]
    dp = DP(budget="params", levels=[4, 8, 16, 32])
    eng = engine()
    eng.levels = dp.levels(m, ids, stages, eng)
    ranks = {v["rank"] for v in eng.levels.values()}
    assert len(ranks) > 1 and ranks <= {4, 8, 16, 32, None}
    compress(m, pruner=stages[0], lowrank=stages[1], calibration=ids, engine=eng)
    lins = [(n, lin) for n, lin in m.named_modules() if isinstance(lin, torch.nn.Linear) and ".layers." in n]
    for n, lin in lins:
        want = eng.levels[n]["rank"] or max(1, round(0.25 * min(lin.weight.shape)))
        assert layer_state(lin).adapter.rank == want
    stored = sum(layer_params(lin) for _, lin in lins) / sum(lin.weight.numel() for _, lin in lins)
    assert stored <= dp.report["allocation/target"] + 1e-12
    assert stored == pytest.approx(dp.report["allocation/met"], rel=1e-12)
    with pytest.raises(ConfigError, match="allocation.levels"):
        DP(budget="params").levels(_model(), ids, stages, engine())


def test_the_measuring_pass_runs_stages_before_the_level_once_with_the_same_table():
    """Under a rank budget the pruner and quantizer do not depend on the level: the probe runs them once and
    the adapters per level on copies. Its table must be what compressing from scratch at every level (written
    here) gives."""
    from compresslab.allocation.dp import LevelProbe
    from compresslab.layer_error import hessian_rel_error
    from compresslab.lowrank.slim import SLiMLoRA
    from compresslab.metrics import layer_params
    from compresslab.stages import effective_weight, with_levels

    class FromScratch(LevelProbe):
        def compress(self, name, layer, stats):
            W, errs, costs = layer.weight.detach().float(), [], []
            for lv in self.levels:
                tmp = torch.nn.Linear(layer.in_features, layer.out_features, bias=False)
                tmp.weight.data.copy_(W)
                layer_state(tmp, create=True).original = W
                for s in self.stages:
                    with_levels(s, {self.key: lv}).compress(name, tmp, stats)
                errs.append(hessian_rel_error(W, effective_weight(tmp), stats.hessian) ** 2)
                costs.append(float(layer_params(tmp)))
            self.table[name] = (errs, costs)

    ids = _ids()
    stages = lambda: [SparseGPT(pattern="2:4"), GPTQ(bits=4, group_size=32), SLiMLoRA(rank_ratio=0.25)]  # noqa: E731
    tables = []
    for cls in (LevelProbe, FromScratch):
        probe = cls(stages(), "rank", [4, 8, None], "params")
        assert len(probe.stages) == 2  # SparseGPT+GPTQ fused, then the adapters
        engine().run(_model(), ids, [probe])
        tables.append(probe.table)
    assert tables[0].keys() == tables[1].keys() and len(tables[0]) == 21
    for n in tables[0]:
        assert tables[0][n][1] == tables[1][n][1]
        assert tables[0][n][0] == pytest.approx(tables[1][n][0], rel=1e-6, abs=1e-12)
    assert len({round(e, 9) for e in tables[0][n][0]}) == 3  # the levels differ (else nothing was compared)


def test_block_trained_quantizers_are_refused():
    from compresslab.quantizer.slim_llm_plus import SliMLLMPlus

    with pytest.raises(ConfigError, match="one-shot"):
        DP(budget="avg_bits").check([SliMLLMPlus(bits=3, group_size=32)])


def test_default_sparsity_budget_admits_the_uniform_setting():
    """With target null the budget is what the uniform setting keeps (its per-row rounding included): one
    level equal to the pruner's gives exactly the uniform allocation."""
    m, ids = _model(), _ids()
    dp = DP(budget="sparsity", levels=[0.6])
    levels = dp.allocate(m, ids, [Magnitude(1 / 3)], engine())  # 1/3 of 64 is not a whole number of weights
    assert all(v["sparsity"] == pytest.approx(1 / 3) for v in levels.values())
    assert dp.report["allocation/error_sum"] == dp.report["allocation/error_sum_uniform"]


def test_block_granularity_gives_one_level_per_block():
    m, ids = _model(), _ids()
    levels = DP(budget="sparsity", target=0.6, levels=[0.4, 0.6, 0.8], granularity="block").allocate(
        m, ids, [Wanda(0.6)], engine())
    per_block = {}
    for name, v in levels.items():
        per_block.setdefault(name.split(".")[2], set()).add(v["sparsity"])
    assert all(len(v) == 1 for v in per_block.values()) and len(per_block) == 3


def test_levels_a_stage_cannot_take_fail_before_loading(tmp_path):
    from compresslab.lowrank.slim import SLiMLoRA
    from compresslab.pruner.mask import MaskFile
    from compresslab.quantizer.slim_llm import SliMLLM

    with pytest.raises(ConfigError, match="bits"):  # SliM-LLM takes 2..7 (b+1 <= 8)
        DP(budget="avg_bits", levels=[3, 8]).check([SliMLLM(bits=3, group_size=32)])
    with pytest.raises(ConfigError, match="param_ratio"):
        DP(budget="params", levels=[8]).check([SLiMLoRA(param_ratio=0.5)])
    mask = tmp_path / "m.safetensors"
    from safetensors.torch import save_file

    save_file({"x": torch.ones(1)}, str(mask))
    with pytest.raises(ConfigError, match="mask"):
        DP(budget="sparsity", levels=[0.5]).check([MaskFile(path=str(mask), pattern="unstructured")])
    with pytest.raises(ConfigError, match="largest level"):
        DP(budget="sparsity", target=0.9, levels=[0.5, 0.7]).check([Wanda(0.5)])
    with pytest.raises(ConfigError, match="lam"):
        OWL(lam=0.2, target=0.7).check([Wanda(0.7)])


def test_a_saved_allocation_of_another_budget_is_refused(tmp_path):
    (tmp_path / "a.yaml").write_text("levels:\n  model.layers.0.mlp.up_proj: {bits: 3}\n")
    with pytest.raises(ConfigError, match="budget"):
        DP(path=str(tmp_path / "a.yaml")).levels(_model(), None, [Magnitude(0.5)], engine())


def test_with_levels_leaves_the_stage_itself_alone():
    from compresslab.stages import with_levels

    joint = fuse_stages([SparseGPT(sparsity=0.5), GPTQ(bits=4, group_size=32)])[0]
    lv = with_levels(joint, {"bits": 2, "sparsity": 0.7})
    assert (lv.quantizer.bits, lv.pruner.sparsity) == (2, 0.7)
    assert (joint.quantizer.bits, joint.pruner.sparsity) == (4, 0.5)
    assert with_levels(joint, None) is joint


def test_the_measuring_pass_keeps_a_rotations_online_hadamard():
    from compresslab.rotation.quarot import QuaRot

    m, ids = _model(), _ids()
    QuaRot().apply(m)
    DP(budget="sparsity", target=0.6, levels=[0.5, 0.7]).allocate(m, ids, [Wanda(0.6)], engine())
    for i in range(3):
        down = m.model.layers[i].mlp.down_proj
        assert layer_state(down).online is not None and layer_state(down).mask is None
        assert layer_state(m.model.layers[i].mlp.up_proj) is None
