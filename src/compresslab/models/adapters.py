"""Per-family adapters: where the blocks are, what runs before them, and the Linear groups.

This is the only place that knows model families. The engine asks `adapter_for(model)` and
never looks at class names. To support a new family, add an `Adapter` to `_ADAPTERS`.
"""

from __future__ import annotations

from dataclasses import dataclass

from torch import nn

from ..errors import ConfigError
from ..utils import get_module


@dataclass(frozen=True)
class Adapter:
    family: str
    blocks: str  # dotted path from the CausalLM to the ModuleList of blocks
    inputs: tuple[str, ...]  # modules that run before block 0 (embeddings, rotary); missing ones are skipped
    groups: tuple[tuple[str, ...], ...]  # Linear groups in a block, true-sequential order; a group shares one input

    def block_list(self, model: nn.Module) -> nn.ModuleList:
        blocks = get_module(model, self.blocks)
        if blocks is None:
            raise ConfigError(f"{self.family} adapter: no '{self.blocks}' in {type(model).__name__}")
        return blocks

    def input_modules(self, model: nn.Module) -> list[nn.Module]:
        return [m for m in (get_module(model, p) for p in self.inputs) if m is not None]

    def linear_groups(self, block: nn.Module) -> list[list[tuple[str, nn.Linear]]]:
        """[[(name, Linear), ...], ...] for one block, in true-sequential order."""
        out = []
        for group in self.groups:
            members = []
            for name in group:
                mod = get_module(block, name)
                if not isinstance(mod, nn.Linear):
                    raise ConfigError(f"{self.family} adapter: '{name}' is not an nn.Linear in {type(block).__name__}")
                members.append((name, mod))
            out.append(members)
        return out

    def named_linears(self, model: nn.Module):
        """(qualified name, Linear) for every target Linear of every block."""
        for i, block in enumerate(self.block_list(model)):
            for group in self.linear_groups(block):
                for name, lin in group:
                    yield f"{self.blocks}.{i}.{name}", lin


_LLAMA = Adapter(
    family="llama",
    blocks="model.layers",
    inputs=("model.embed_tokens", "model.rotary_emb"),
    groups=(
        ("self_attn.q_proj", "self_attn.k_proj", "self_attn.v_proj"),
        ("self_attn.o_proj",),
        ("mlp.gate_proj", "mlp.up_proj"),
        ("mlp.down_proj",),
    ),
)
_OPT = Adapter(
    family="opt",
    blocks="model.decoder.layers",
    inputs=("model.decoder.embed_tokens", "model.decoder.embed_positions", "model.decoder.project_in"),
    groups=(
        ("self_attn.q_proj", "self_attn.k_proj", "self_attn.v_proj"),
        ("self_attn.out_proj",),
        ("fc1",),
        ("fc2",),
    ),
)
_NEOX = Adapter(
    family="gpt_neox",
    blocks="gpt_neox.layers",
    inputs=("gpt_neox.embed_in", "gpt_neox.rotary_emb", "gpt_neox.emb_dropout"),
    groups=(
        ("attention.query_key_value",),
        ("attention.dense",),
        ("mlp.dense_h_to_4h",),
        ("mlp.dense_4h_to_h",),
    ),
)

# config.model_type -> adapter
_ADAPTERS = {
    "llama": _LLAMA,
    "mistral": _LLAMA,
    "qwen2": _LLAMA,
    "smollm3": _LLAMA,
    "opt": _OPT,
    "gpt_neox": _NEOX,
}


def adapter_for(model_or_config) -> Adapter:
    config = getattr(model_or_config, "config", model_or_config)
    model_type = getattr(config, "model_type", None)
    try:
        return _ADAPTERS[model_type]
    except KeyError:
        raise ConfigError(
            f"unsupported architecture '{model_type}': add an adapter for it in "
            f"src/compresslab/models/adapters.py (supported: {', '.join(sorted(_ADAPTERS))})"
        ) from None
