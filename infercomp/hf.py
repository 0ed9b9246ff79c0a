"""Hugging Face directories (``config.json`` + safetensors): build the module with transformers'
own classes (trusted, no ``trust_remote_code``) and tokenize text ``--data``.

transformers is optional: only these paths import it, and a missing install is a clear error.
"""

from __future__ import annotations

import json
import logging
from collections.abc import Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch
from torch import nn

import infercomp.formats as formats
from infercomp.checkpoint import Checkpoint
from infercomp.errors import DataError, ModelError, UsageError
from infercomp.formats.base import count_nonzero

HF_REF = "hf-auto"


# Loggers that transformers' import wakes (its torchao integration loads torchao when installed,
# which logs about CUDA-only extensions and deprecated pytree calls): noise for our users.
_NOISY = ("torchao", "torch.utils._pytree")


def _transformers() -> Any:
    loggers = [logging.getLogger(n) for n in _NOISY]
    levels = [lg.level for lg in loggers]
    for lg in loggers:
        lg.setLevel(logging.ERROR)
    try:
        import transformers
        import transformers.quantizers.auto  # noqa: F401  (imports torchao while the loggers are quiet)
    except ImportError as e:
        raise ModelError(
            "running a Hugging Face model needs transformers: pip install 'infercomp[hf]' (or pip install transformers)"
        ) from e
    finally:
        for lg, level in zip(loggers, levels):
            lg.setLevel(level)
    transformers.logging.set_verbosity_error()
    return transformers


def build(config: dict[str, Any]) -> nn.Module:
    """An untrained module of the architecture ``config.json`` names (its first ``architectures``
    entry when transformers has that class, else AutoModel for its ``model_type``)."""
    tf = _transformers()
    cfg = build_config(config)
    archs = config.get("architectures") or []
    cls = getattr(tf, archs[0], None) if archs else None
    if cls is None or not isinstance(cls, type) or not issubclass(cls, nn.Module):
        model = tf.AutoModel.from_config(cfg)
    else:
        model = cls(cfg)
    if hasattr(model.config, "use_cache"):
        model.config.use_cache = False  # infercomp runs whole sequences, never generates: no KV cache
    pad = getattr(cfg, "pad_token_id", None)
    if pad is not None:
        model.register_forward_pre_hook(_mask_padding(pad), with_kwargs=True)
    return model


def _mask_padding(pad: int) -> Any:
    """Text --data is padded to the longest example: when a caller passes token ids alone, mask
    the padding as a tokenizer's attention_mask would."""

    def hook(module: nn.Module, args: tuple[Any, ...], kwargs: dict[str, Any]) -> tuple[tuple[Any, ...], dict[str, Any]]:
        del module
        if args and "attention_mask" not in kwargs and torch.is_tensor(args[0]) and not args[0].is_floating_point():
            kwargs = {**kwargs, "attention_mask": (args[0] != pad).long()}
        return args, kwargs

    return hook


def tokenize(path: Path, tokenizer_dir: Path, *, max_length: int = 128) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor | None]:
    """``.txt`` (one example a line) or ``.jsonl`` (``{"text": ..., "label": ...}``) -> (token ids
    (N, T) int64 padded on the right to the longest example, attention mask (N, T) int64 with 0 at
    the padding, labels (N,) or None)."""
    tf = _transformers()
    texts: list[str] = []
    labels: list[int] = []
    if path.suffix == ".txt":
        texts = [line.rstrip("\n") for line in path.read_text().splitlines() if line.strip()]
    else:
        for i, line in enumerate(path.read_text().splitlines(), 1):
            if not line.strip():
                continue
            try:
                row = json.loads(line)
                texts.append(str(row["text"]))
                if "label" in row:
                    labels.append(int(row["label"]))
            except (ValueError, KeyError, TypeError) as e:
                raise DataError(f"{path}: line {i} is not a JSON object with a 'text' field and an integer 'label' (if any)") from e
    if not texts:
        raise DataError(f"{path}: holds no text examples")
    if labels and len(labels) != len(texts):
        raise DataError(f"{path}: 'label' is given for {len(labels)} of {len(texts)} examples; give it for all or none")
    try:
        tok = tf.AutoTokenizer.from_pretrained(str(tokenizer_dir), local_files_only=True)
    except (OSError, ValueError) as e:
        raise DataError(f"{tokenizer_dir}: no tokenizer found to tokenize {path} (pass --tokenizer DIR)") from e
    # Right padding: a causal LM's real tokens then never see the padding (it comes after them),
    # even when its config names no pad id for the masking hook. Many LLM tokenizers have no pad
    # token; the end-of-text one stands in (the mask, not the id, says what is padding).
    tok.padding_side = "right"
    if tok.pad_token is None and tok.eos_token is not None:
        tok.pad_token = tok.eos_token
    enc = tok(texts, padding="longest", truncation=True, max_length=max_length, return_tensors="pt")
    return enc["input_ids"].long(), enc["attention_mask"].long(), torch.tensor(labels) if labels else None


# ---------------------------------------------------------------------- structure after pruning

# config.json keys that hold the FFN width, by the names transformers' architectures use.
_FFN_KEYS = ("intermediate_size", "ffn_dim", "n_inner", "d_ff", "encoder_ffn_dim")


def describes_heads(config: dict[str, Any]) -> bool:
    """Whether this architecture's config can describe fewer attention heads of the same size: it
    needs an explicit ``head_dim`` (Llama-style); BERT-style models derive the head size from
    ``hidden_size / num_attention_heads``, and transformers 5 dropped ``pruned_heads``."""
    try:
        return "head_dim" in build_config(config).to_dict()
    except ModelError:
        return False


def build_config(config: dict[str, Any]) -> Any:
    """transformers' config object for a ``config.json`` dict."""
    tf = _transformers()
    cfg_dict = {k: v for k, v in config.items() if not k.startswith("_")}
    model_type = cfg_dict.pop("model_type", None)
    if model_type is None:
        raise ModelError("config.json has no 'model_type'; cannot pick a transformers class")
    try:
        return tf.AutoConfig.for_model(model_type, **cfg_dict)
    except (ValueError, KeyError) as e:  # its message lists every model type it knows (12 KB)
        raise ModelError(f"transformers {tf.__version__} does not know model_type {model_type!r} (a newer transformers may)") from e


def resized_config(config: dict[str, Any], plan: dict[str, Any], shapes: Mapping[str, tuple[int, ...]]) -> dict[str, Any]:
    """``config.json`` rewritten for the widths a channel-pruning ``plan`` left (``intermediate_size``;
    ``num_attention_heads`` / ``num_key_value_heads`` / ``head_dim`` where the architecture has
    ``head_dim``), when that describes every tensor's pruned ``shapes``. Layers of different widths
    (some layers pruned, or pruned by different amounts) cannot be described: the config stays as
    it was (the loader shrinks each layer to its stored shape), and ``mismatch`` reports it."""
    resized = _resized(config, plan)
    return resized if resized != config and mismatch(resized, shapes) is None else dict(config)


def _resized(config: dict[str, Any], plan: dict[str, Any]) -> dict[str, Any]:
    out = dict(config)
    widths = {len(g["kept"]) for g in plan.get("groups", []) if g["unit"] == 1}
    heads = {(len(g["kept"]) // g["unit"], g["unit"]) for g in plan.get("groups", []) if g["unit"] > 1}
    if len(widths) == 1:
        key = next((k for k in _FFN_KEYS if k in config), "intermediate_size")
        out[key] = widths.pop()
    if len(heads) == 1 and describes_heads(config):
        n, head_dim = heads.pop()
        out.update(num_attention_heads=n, num_key_value_heads=n, head_dim=head_dim)
    return out


def module_types(config: dict[str, Any]) -> dict[str, str]:
    """Module name -> class name of the model ``config`` builds (on the meta device: nothing is
    allocated): how ``HFOutput`` knows which weights are Linear layers."""
    return {name: type(m).__name__ for name, m in _on_meta(config).named_modules()}


def _on_meta(config: dict[str, Any]) -> nn.Module:
    """The model ``config`` builds, on the meta device (shapes and types only, nothing allocated)."""
    with torch.device("meta"):
        return build(config)


def non_linear_weights(config: dict[str, Any]) -> list[str]:
    """Modules of the model ``config`` builds (on the meta device) whose weight is a matrix or
    filter but that are not Linear layers (embedding tables, convolutions): compressed-tensors'
    loaders quantize Linear layers only, so a directory holds these in float."""
    return sorted(
        name
        for name, m in _on_meta(config).named_modules()
        if not isinstance(m, nn.Linear) and isinstance(getattr(m, "weight", None), torch.Tensor) and m.weight.dim() >= 2
    )


def mismatch(config: dict[str, Any], shapes: Mapping[str, tuple[int, ...]]) -> str | None:
    """The first tensor whose stored shape differs from what ``config`` builds (on the meta device,
    nothing allocated), or None when config.json describes the checkpoint."""
    built = _built_shapes(config)
    for name, shape in built.items():
        if name in shapes and tuple(shapes[name]) != shape:
            return f"{name} is {tuple(shapes[name])} in the checkpoint, config.json builds {shape}"
    return None


def _built_shapes(config: dict[str, Any]) -> dict[str, tuple[int, ...]]:
    return {name: tuple(t.shape) for name, t in _on_meta(config).state_dict().items()}


def padded(tensors: Mapping[str, torch.Tensor], config: dict[str, Any]) -> tuple[dict[str, torch.Tensor], list[str]]:
    """Channel-pruned ``tensors`` zero-padded (at the end of each pruned dim) to the shapes
    ``config`` builds, so that config.json describes them (``--export dense`` of layers of
    different widths). Exact: every removed channel's consumers get zero input weights, so what a
    padded channel computes is never used. (names of the padded tensors in the second item)"""
    built = _built_shapes(config)
    out, grown = dict(tensors), []
    for name, t in tensors.items():
        shape = built.get(name)
        if shape is None or tuple(t.shape) == shape:
            continue
        if len(shape) != t.dim() or any(s < d for s, d in zip(shape, t.shape)):
            raise ModelError(f"tensor {name!r} is {tuple(t.shape)}, config.json builds {shape}: not a pruned form of it; cannot pad it")
        full = torch.zeros(shape, dtype=t.dtype)
        full[tuple(slice(0, d) for d in t.shape)] = t
        out[name] = full
        grown.append(name)
    return out, grown


# ------------------------------------------------------------------------------ Hugging Face out

# Our codec -> the compressed-tensors format that transformers and vLLM read it as: int8 weights
# with int8 activations (W8A8) and fp8 weights as we store them; weight-only int8 / int4 converted
# to int32 words (``formats.quantized.PackQuantized``).
_CT_FORMATS = {"int8-dynamic": "int-quantized", "fp8": "float-quantized", "int8": "pack-quantized", "int4": "pack-quantized"}
_SPARSE = {"sparse-bitmask": "unstructured", "sparse-24-bitmask": "2:4"}


# config.json's model_type for a directory only infercomp can load (column scales): transformers'
# Auto classes and sentence-transformers refuse an unknown model type instead of loading wrong
# weights (a concrete class such as BertModel only warns).
OURS_MODEL_TYPE = "infercomp-column-scales"


@dataclass
class HFOutput:
    """What the tensors of a Hugging Face directory output add up to, one logical tensor at a time
    (``add``), and the config.json that describes them (``config``): ``output_checkpoint`` walks a
    checkpoint in memory, a streamed run (``infercomp.stream``) the tensors it spooled."""

    module_types: dict[str, str]
    kept: dict[str, dict[str, Any]] = field(default_factory=dict)  # compressed-tensors specs
    ours: dict[str, dict[str, Any]] = field(default_factory=dict)  # column scales: infercomp's
    sparse: dict[str, str] = field(default_factory=dict)  # name -> unstructured / 2:4
    sparse_zeros: int = 0
    sparse_total: int = 0
    others: list[str] = field(default_factory=list)  # encoded, written dense, not sparse Linear
    floats: set[str] = field(default_factory=set)  # dtypes of the float tensors written as they are

    def add(self, name: str, parts: Mapping[str, torch.Tensor], spec: dict[str, Any] | None, where: str) -> dict[str, torch.Tensor]:
        """The tensors to write for logical tensor ``name``, from its stored ``parts`` and ``spec``
        (None: a plain tensor)."""
        if spec is None:
            t = parts[name]
            if t.is_floating_point() and t.dim() >= 2:
                self.floats.add(str(t.dtype).removeprefix("torch."))
            return {name: t}
        codec = spec.get("codec")
        linear = self.module_types.get(name.removesuffix(".weight")) == "Linear"
        if spec.get("column_scale"):  # --column-scales forced: ours, which only infercomp reads
            self.ours[name] = spec
            return dict(parts)
        if codec in _CT_FORMATS and linear:
            stored = dict(parts)
            if _CT_FORMATS[codec] == "pack-quantized":
                stored, spec = formats.FORMATS["pack-quantized"].from_ours(stored, name, spec)
            self.kept[name] = spec
            return stored
        dense = formats.decode(parts, name, spec, where).contiguous()
        if codec in _SPARSE and linear:
            self.sparse[name] = _SPARSE[codec]
            self.sparse_zeros += dense.numel() - int(spec.get("nnz", count_nonzero(dense)))
            self.sparse_total += dense.numel()
        else:
            self.others.append(name)
        if dense.dim() >= 2:
            self.floats.add(str(dense.dtype).removeprefix("torch."))
        return {name: dense}

    def config(
        self, config: dict[str, Any], shapes: Mapping[str, tuple[int, ...]], where: str, *, sentence_transformers: bool = False
    ) -> tuple[dict[str, Any], list[str]]:
        """(config.json for what was added, notes for the user); ``shapes``: the logical shapes."""
        notes: list[str] = []
        if self.others:
            why = "layers compressed-tensors compresses only in Linear layers: embeddings, convolutions"
            notes.append(f"{len(self.others)} tensor(s) written dense for transformers ({why}), e.g. {sorted(self.others)[0]!r}")
        if self.ours:
            notes.append(
                f"{len(self.ours)} tensor(s) keep infercomp's column scales (--column-scales), which compressed-tensors cannot "
                f"describe: this directory loads with infercomp.load, not with transformers (config.json's model_type is "
                f"{OURS_MODEL_TYPE!r}, so that transformers refuses it instead of loading the integers as weights)"
            )
        problem = mismatch(config, shapes)
        if problem:
            raise UsageError(
                f"{where}: config.json cannot describe this model's shapes for transformers ({problem}): add --export dense "
                "(removed channels written as zeros at config.json's sizes: transformers loads it, no smaller), write one file "
                "with -o NAME.safetensors (infercomp loads it), or prune every layer alike"
            )
        out = {k: v for k, v in config.items() if k != "quantization_config"}  # ours describes what is written now
        qconfig: dict[str, Any] = {}
        if self.kept:
            qconfig = _quantization_config(self.kept, self.module_types)
            asymmetric = any(not spec.get("symmetric", True) for spec in self.kept.values())
            if sentence_transformers or asymmetric:
                qconfig["dequantize"] = True
            if asymmetric:
                notes.append(
                    "asymmetric weights: config.json says dequantize: true, so transformers dequantizes them at load (its "
                    "compressed route cannot read packed zero points, llm-compressor issue 1618); the files stay quantized"
                )
        if self.sparse:
            qconfig.setdefault("quant_method", "compressed-tensors")
            qconfig["sparsity_config"] = _sparsity_config(self)
        if qconfig:
            out["quantization_config"] = qconfig
        if len(self.floats) == 1:  # transformers 5 reads "dtype", earlier ones "torch_dtype": both say what the file holds
            name = next(iter(self.floats))
            if name != "float32" or any(out.get(k) not in (None, "float32") for k in ("dtype", "torch_dtype")):
                out["dtype"] = out["torch_dtype"] = name
        if self.ours:  # transformers would cast the stored integers to float and run them as weights
            out["infercomp"] = {"loads_with": "infercomp.load (--column-scales)", "model_type": config.get("model_type")}
            out["model_type"] = OURS_MODEL_TYPE
        return out, notes


def output_checkpoint(
    ckpt: Checkpoint, module_types: dict[str, str], config: dict[str, Any], *, sentence_transformers: bool = False
) -> tuple[Checkpoint, dict[str, Any], list[str]]:
    """``ckpt`` made loadable by transformers as a Hugging Face directory: (checkpoint to write,
    its config.json, notes for the user).

    Quantized Linear weights get a ``quantization_config`` in the compressed-tensors format
    (``int-quantized`` for int8-dynamic, ``float-quantized`` for fp8, ``pack-quantized`` for
    weight-only int8 / int4, converted to int32 words); sparse Linear weights are written dense
    with a ``sparsity_config`` that records their structure (unstructured or 2:4), as
    compressed-tensors' ``dense`` sparsity format does. Everything else (quantized embeddings or
    convolutions) is written dense. Column scales (``--column-scales``), which compressed-tensors has
    no field for, are kept in our format, and the notes say only infercomp loads the result.
    A config.json that cannot describe the tensors' shapes (pruned heads of a BERT-style model,
    layers of different widths) is refused.

    ``sentence_transformers``: the directory is a sentence-transformers model. Its loader calls the
    model's ``forward`` directly, which skips the hook through which compressed-tensors decompresses
    on the first call; ``dequantize: true`` makes transformers decompress at load instead (the same
    float weights the hook would give), so ``SentenceTransformer(OUT)`` runs.
    """
    built = HFOutput(module_types)
    owned = formats.stored_keys(ckpt.encodings, ckpt.name)
    tensors: dict[str, torch.Tensor] = {}
    for name in formats.logical_shapes(ckpt.tensors, ckpt.encodings, ckpt.name):
        parts = {k: ckpt.tensors[k] for k in owned.get(name, [name])}
        tensors.update(built.add(name, parts, ckpt.encodings.get(name), ckpt.name))
    shapes = formats.logical_shapes(ckpt.tensors, ckpt.encodings, ckpt.name)
    out, notes = built.config(config, shapes, ckpt.name, sentence_transformers=sentence_transformers)
    encodings = {**built.kept, **built.ours}
    return Checkpoint(tensors=tensors, model=ckpt.model, history=ckpt.history, encodings=encodings, plan=ckpt.plan), out, notes


def _quantization_config(kept: dict[str, dict[str, Any]], module_types: dict[str, str]) -> dict[str, Any]:
    spec = next(iter(kept.values()))
    codec = spec["codec"]
    ct_format = _CT_FORMATS.get(codec, codec)  # pack-quantized specs are already named so
    weights = {
        "num_bits": int(spec.get("bits", 8)),
        "type": "float" if codec == "fp8" else "int",
        "symmetric": bool(spec.get("symmetric", True)),
        "strategy": "group" if spec.get("granularity") == "group" else "channel",
        "group_size": spec.get("group_size"),
        "dynamic": False,
    }
    activations = None
    if codec == "int8-dynamic":
        activations = {"num_bits": 8, "type": "int", "symmetric": True, "strategy": "token", "dynamic": True}
    quantized = {n.removesuffix(".weight") for n in kept}
    ignore = sorted(name for name, kind in module_types.items() if kind == "Linear" and name not in quantized)
    return {
        "quant_method": "compressed-tensors",
        "format": ct_format,
        "quantization_status": "compressed",
        "config_groups": {"group_0": {"targets": ["Linear"], "weights": weights, "input_activations": activations}},
        "ignore": ignore,
    }


def _sparsity_config(built: HFOutput) -> dict[str, Any]:
    """compressed-tensors' ``dense`` sparsity format: the weights are stored whole, the config says
    which Linear layers are sparse and how (vLLM can pick 2:4 kernels from it)."""
    structures = set(built.sparse.values())
    modules = {n.removesuffix(".weight") for n in built.sparse}
    return {
        "format": "dense",
        "sparsity_structure": structures.pop() if len(structures) == 1 else "unstructured",
        "global_sparsity": built.sparse_zeros / built.sparse_total if built.sparse_total else 0.0,
        "targets": ["Linear"],
        "ignore": sorted(name for name, kind in built.module_types.items() if kind == "Linear" and name not in modules),
    }
