import json

import torch
from safetensors.torch import save_file

from compresslab.check_sparsity import main


def test_table_from_run_dir(tmp_path, capsys):
    layers = [{"name": "model.layers.0.mlp.down_proj", "shape": [4, 8], "sparsity": 0.5, "zero_fraction": 0.625,
               "nm_valid": True, "pattern": "2:4", "bits": 4, "group_size": 8, "avg_bits": 3.0, "rel_error": 0.1,
               "damp": 0.1, "fallback": False},
              {"name": "model.layers.0.mlp.up_proj", "shape": [4, 8], "sparsity": 0.0, "zero_fraction": 0.125,
               "nm_valid": None, "rel_error": 0.3, "damp": 10.0, "fallback": True}]
    (tmp_path / "metrics.json").write_text(json.dumps({"status": "ok", "layers": layers}))
    assert main([str(tmp_path)]) == 0
    out = capsys.readouterr().out
    assert "model.layers.0.mlp.down_proj" in out and "0.6250" in out
    assert "overall sparsity (pruned) 0.2500, zero fraction 0.3750" in out
    assert "fell back to the diagonal (no error propagation) in: model.layers.0.mlp.up_proj" in out


def test_table_from_safetensors_flags_violations(tmp_path, capsys):
    good = torch.tensor([[1.0, 0, 2, 0]] * 2)
    bad = torch.tensor([[1.0, 1, 2, 0]] * 2)
    save_file({"a.q_proj.weight": good, "a.k_proj.weight": bad}, str(tmp_path / "model.safetensors"))
    assert main([str(tmp_path)]) == 0
    out = capsys.readouterr().out
    assert "VIOLATED in: a.k_proj" in out
    assert main([str(tmp_path / "nothing")]) == 2
