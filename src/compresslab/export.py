"""Export a compressed model in a standard format that plain `transformers` loads:

    python -m compresslab.export --format compressed-tensors --out export/w4 quantizer=gptq quantizer.group_size=64

writes a Hugging Face folder in compressed-tensors' `pack-quantized` format (int32 `weight_packed`,
`weight_scale`, `weight_zero_point` for asymmetric grids, `weight_shape`, and a `quantization_config`
in config.json). `AutoModelForCausalLM.from_pretrained(folder)` loads it with the `compressed-tensors`
package installed and serves it with vLLM and others.

What the format cannot hold is refused with the reason: low-rank adapters, SliM-LLM mixed bit maps,
AWQ's explicit input scales, activation quantization, and asymmetric grids (transformers 5.24 refuses
their packed zero points at load time, so quantize with quantizer.grid=sym or absmax to export). 2:4 sparse weights export with their zeros
kept (compressed-tensors has no 2:4 compressor), so only compresslab's own packed checkpoint
(`python -m compresslab.save`) stores 2:4 compactly.
"""

from __future__ import annotations

import argparse
import json
import logging
import sys
from pathlib import Path

import torch
from torch import nn

from .errors import ConfigError
from .models.adapters import adapter_for
from .quantizer.grid import symmetric_zero
from .stages import layer_state

log = logging.getLogger(__name__)
FORMATS = ("compressed-tensors",)


def _exportable_quant(name: str, lin: nn.Linear):
    state = layer_state(lin)
    qw = state.quant if state is not None else None
    if state is not None and (state.lut is not None or state.outliers is not None):
        raise ConfigError(f"{name} holds a per-row table or fp16 outliers (SqueezeLLM / SpQR), which compressed-tensors' "
                          "pack-quantized format cannot hold; save it with python -m compresslab.save instead")
    if qw is None:
        raise ConfigError(f"{name} is not quantized; compressed-tensors export needs every Linear quantized "
                          "(use a quantizer, or compresslab's own checkpoint: python -m compresslab.save)")
    problems = {"low-rank adapters": state.adapter is not None, "a SliM-LLM mixed bit map": qw.bit_map is not None,
                "an AWQ input scale": state.input_scale is not None, "activation quantization": state.act is not None,
                "an online Hadamard on its input (rotation.online_down)": state.online is not None}
    bad = [k for k, v in problems.items() if v]
    if bad:
        raise ConfigError(f"{name} has {', '.join(bad)}, which compressed-tensors' pack-quantized format cannot "
                          "hold; save it with python -m compresslab.save instead")
    return qw


@torch.no_grad()
def export_compressed_tensors(model: nn.Module, out: str | Path, tokenizer=None) -> Path:
    """Write `model` (quantized in place by compresslab) as a compressed-tensors pack-quantized folder."""
    from compressed_tensors.compressors.pack_quantized.helpers import pack_to_int32
    from compressed_tensors.quantization import QuantizationArgs, QuantizationConfig, QuantizationScheme
    from safetensors.torch import save_file

    from .models.conv1d import has_conv1d

    with torch.device("meta"):
        plain = type(model)(model.config)  # the family as transformers builds it
    if has_conv1d(plain):
        raise ConfigError(f"{type(model).__name__} is built from GPT-2 style Conv1D layers, which compressed-tensors "
                          "does not quantize; save it with python -m compresslab.save instead")
    from .models.moe import has_fused_experts

    if has_fused_experts(plain):
        raise ConfigError(f"{type(model).__name__} keeps its experts as fused 3-D tensors in transformers, which a "
                          "compressed-tensors folder cannot hold quantized per expert; save it with python -m "
                          "compresslab.save instead (the packed checkpoint stores each expert's layers)")
    out = Path(out)
    out.mkdir(parents=True, exist_ok=True)
    linears = dict(adapter_for(model).named_linears(model))
    grids = {name: _exportable_quant(name, lin) for name, lin in linears.items()}
    kinds = {(q.bits, q.group_size if q.group_size < q.shape[1] else -1, q.grid) for q in grids.values()}
    if len(kinds) != 1:
        raise ConfigError(f"compressed-tensors export needs one grid for all Linears, found {sorted(kinds)}")
    ((bits, group, grid),) = kinds
    symmetric = grid != "asym"
    if not symmetric:
        # compressed-tensors writes asymmetric zero points packed (ceil(out·b/32), groups), but
        # transformers 5.24 sizes the placeholder unpacked (out, groups) and refuses the load.
        raise ConfigError("compressed-tensors export needs a symmetric grid (quantizer.grid=sym or absmax): plain "
                          "transformers cannot load packed asymmetric zero points; compresslab's own checkpoint "
                          "(python -m compresslab.save) stores either")
    dtype = next(model.parameters()).dtype
    state = {}
    for key, v in model.state_dict().items():
        state[key] = v
    for name, lin in linears.items():
        qw = grids[name]
        # compressed-tensors stores signed codes q − z (w = s·code): z = 2^(b−1) on GPTQ's grid (codes
        # −2^(b−1)…2^(b−1)−1), 2^(b−1)−1 on AbsMax's (codes ±(2^(b−1)−1), inside the same range)
        offset = symmetric_zero(bits, grid) if symmetric else 1 << (bits - 1)
        codes = qw.encode(lin.weight.float()).codes.to(torch.int16) - offset
        del state[f"{name}.weight"]
        state[f"{name}.weight_packed"] = pack_to_int32(codes.to(torch.int8), bits)
        state[f"{name}.weight_scale"] = qw.scales.to(dtype)
        state[f"{name}.weight_shape"] = torch.tensor(list(lin.weight.shape))
        if not symmetric:
            zp = (qw.zeros.round().to(torch.int16) - offset).to(torch.int8)
            state[f"{name}.weight_zero_point"] = pack_to_int32(zp, bits, packed_dim=0)
    if getattr(model.config, "tie_word_embeddings", False):
        for key in [k for k in state if k.endswith("lm_head.weight")]:
            del state[key]
    save_file({k: v.detach().cpu().contiguous() for k, v in state.items()}, str(out / "model.safetensors"),
              metadata={"format": "pt"})
    strategy = "group" if group > 0 else "channel"
    scheme = QuantizationScheme(targets=["Linear"], weights=QuantizationArgs(
        num_bits=bits, type="int", symmetric=symmetric, strategy=strategy, group_size=group if group > 0 else None))
    ignore = [n for n, m in model.named_modules() if isinstance(m, nn.Linear) and n not in linears]
    qconfig = QuantizationConfig(config_groups={"group_0": scheme}, format="pack-quantized",
                                 quantization_status="compressed", ignore=ignore)
    model.config.save_pretrained(str(out))
    cfg = json.loads((out / "config.json").read_text())
    cfg["quantization_config"] = qconfig.model_dump(mode="json", exclude_none=True)
    (out / "config.json").write_text(json.dumps(cfg, indent=2))
    if tokenizer is not None:
        tokenizer.save_pretrained(str(out))
    log.info("exported %d Linears (W%d, %s %s) to %s", len(linears), bits, strategy,
             grid, out)
    return out


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(prog="python -m compresslab.export", description=__doc__.split("\n")[0])
    ap.add_argument("--format", choices=FORMATS, default="compressed-tensors")
    ap.add_argument("--out", required=True)
    ap.add_argument("overrides", nargs="*", help="run.py overrides, e.g. quantizer=gptq quantizer.group_size=64")
    args = ap.parse_args(argv)
    from hydra import compose, initialize_config_dir
    from hydra.utils import instantiate

    from .api import compress

    logging.basicConfig(level=logging.INFO, format="[%(asctime)s][%(name)s][%(levelname)s] - %(message)s")
    root = Path(__file__).resolve().parents[2]
    with initialize_config_dir(config_dir=str(root / "conf"), version_base="1.3"):
        cfg = compose("config", overrides=[*args.overrides, "eval=null", "logger=none"])
    from .cli import build_pipeline

    try:
        p = build_pipeline(cfg)
        p.validate()
        model, tok = p.model_loader.load()
        calib = p.data(tok) if p.uses_calibration else None
        compress(model, tok, pruner=p.pruner, quantizer=p.quantizer, lowrank=p.lowrank, recovery=p.recovery,
                 calibration=calib, engine=p.engine)
        export_compressed_tensors(model, args.out, tok)
    except ConfigError as e:
        log.error("%s", e)
        return 1
    return 0


if __name__ == "__main__":
    sys.exit(main())
