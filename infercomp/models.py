"""Model references, trust, and building a runnable module for a checkpoint.

A reference is a built-in name (``digits-cnn``), an installed entry point (group
``infercomp.models``), ``package.module:callable`` or ``path/to/file.py:callable``, plus a JSON
config of keyword arguments. A reference read from a checkpoint is imported only when trusted:
built-in, registered by an installed package, the one the user passed with ``--model``, or any with
``--trust-model-code``.
"""

from __future__ import annotations

import importlib
import importlib.util
import json
import math
import sys
from collections.abc import Callable, Mapping
from dataclasses import dataclass
from importlib.metadata import entry_points
from pathlib import Path
from typing import Any

import torch
from torch import nn

import infercomp.allocator as allocator
import infercomp.formats as formats
import infercomp.hf as hf
import infercomp.zoo as zoo
from infercomp.checkpoint import Checkpoint
from infercomp.compute import ComputeInfo, allowed_modes, prepare
from infercomp.data import Dataset
from infercomp.errors import ModelError, UsageError
from infercomp.kernels import Int8Weight
from infercomp.metrics import POOLING_MODES, pool

ENTRY_POINT_GROUP = "infercomp.models"


def parse_config(text: str | None) -> dict[str, Any] | None:
    """``--model-config``: a JSON object, or a path to a file holding one."""
    if text is None:
        return None
    src = "--model-config"
    p = Path(text)
    if not text.lstrip().startswith("{") and p.exists():
        try:
            src, text = str(p), p.read_text()
        except (OSError, UnicodeDecodeError) as e:
            why = e.strerror if isinstance(e, OSError) else "not UTF-8 text"
            raise UsageError(f"{p}: --model-config is not a readable JSON file ({why})") from e
    try:
        cfg = json.loads(text)
    except ValueError as e:
        raise UsageError(f"{src}: not valid JSON ({e.msg} at char {e.pos})") from e
    if not isinstance(cfg, dict):
        raise UsageError(f"{src}: must be a JSON object of keyword arguments, got {type(cfg).__name__}")
    return cfg


def _entry_point(name: str) -> Callable[..., nn.Module] | None:
    for ep in entry_points(group=ENTRY_POINT_GROUP):
        if ep.name == name:
            return ep.load()
    return None


def is_trusted_builtin(ref: str) -> bool:
    """Built-in names, transformers' own classes and names registered by installed packages need no extra trust."""
    return ref in zoo.MODELS or ref == hf.HF_REF or any(ep.name == ref for ep in entry_points(group=ENTRY_POINT_GROUP))


def resolve(ref: str) -> Callable[..., nn.Module]:
    """Import the callable a reference names (no trust check here: callers decide)."""
    if ref in zoo.MODELS:
        return zoo.MODELS[ref].factory
    ep = _entry_point(ref)
    if ep is not None:
        return ep
    if ":" not in ref:
        known = ", ".join(sorted(zoo.MODELS))
        raise ModelError(
            f"unknown model reference {ref!r}: use a built-in name ({known}), package.module:callable or path/file.py:callable"
        )
    target, _, attr = ref.rpartition(":")
    if target.endswith(".py"):
        path = Path(target)
        if not path.exists():
            raise ModelError(f"model reference {ref!r}: file {path} does not exist")
        mod_name = f"_infercomp_user_{abs(hash(str(path.resolve())))}"
        spec = importlib.util.spec_from_file_location(mod_name, path)
        if spec is None or spec.loader is None:
            raise ModelError(f"model reference {ref!r}: cannot import {path}")
        module = importlib.util.module_from_spec(spec)
        sys.modules[mod_name] = module
        try:
            spec.loader.exec_module(module)
        except Exception as e:  # user code: report it as a model error, not a crash
            raise ModelError(f"model reference {ref!r}: importing {path} failed: {type(e).__name__}: {e}") from e
    else:
        try:
            module = importlib.import_module(target)
        except ImportError as e:
            raise ModelError(f"model reference {ref!r}: cannot import module {target!r} ({e})") from e
    fn = getattr(module, attr, None)
    if not callable(fn):
        raise ModelError(f"model reference {ref!r}: {target} has no callable {attr!r}")
    return fn


@dataclass(frozen=True)
class ModelLoader:
    """Turns checkpoints into runnable modules, enforcing the trust rules.

    Attributes:
        ref: the reference the user passed with ``--model`` (trusted), or None.
        config: the user's ``--model-config``, or None to use the checkpoint's.
        trust_model_code: ``--trust-model-code``: follow any reference stored in a checkpoint.
        trusted: further references the user named on the command line (e.g. distill's
            ``--student-model``): trusted, and a checkpoint storing one is built with its own
            reference even when ``--model`` names another (the teacher's).
    """

    ref: str | None = None
    config: dict[str, Any] | None = None
    trust_model_code: bool = False
    trusted: frozenset[str] = frozenset()

    def spec_for(self, ckpt: Checkpoint) -> dict[str, Any] | None:
        """The model reference to use for (and record in the output of) this checkpoint."""
        stored = ckpt.model
        if stored is not None and stored.get("ref") in self.trusted:
            return {"ref": stored["ref"], "config": dict(stored.get("config") or {})}
        if self.ref is not None:
            cfg = self.config
            if cfg is None:
                cfg = dict(stored.get("config") or {}) if stored and stored.get("ref") == self.ref else {}
            return {"ref": self.ref, "config": cfg}
        if stored is None:
            return None
        cfg = self.config if self.config is not None else dict(stored.get("config") or {})
        return {"ref": stored["ref"], "config": cfg}

    def can_build(self, ckpt: Checkpoint) -> bool:
        return self.spec_for(ckpt) is not None

    def build(self, ckpt: Checkpoint, *, runtime: bool = False) -> nn.Module:
        """A module in eval mode holding the checkpoint's weights, decoded to dense floats (for
        training, analysis, and the CPU compute modes: see ``build_for_inference``).

        Args:
            ckpt: the checkpoint.
            runtime: swap in the modules that run encoded weights in their stored form (what a
                CUDA GPU runs: fp8 matmuls, 2:4 sparse kernels, compact quantized weights).
        """
        spec = self.spec_for(ckpt)
        if spec is None:
            raise ModelError(f"{ckpt.name}: no model reference stored in the checkpoint; pass --model REF (and --model-config)")
        ref = spec["ref"]
        stored = sum(math.prod(shape) for shape in formats.logical_shapes(ckpt.tensors, ckpt.encodings, ckpt.name).values())
        if ref == hf.HF_REF:  # transformers' own classes, chosen from config.json: trusted
            module = _bounded(lambda: hf.build(spec["config"]), stored, ckpt.name, spec)
            load_weights(module, ckpt, runtime=runtime)
            return module.eval()
        if self.ref is None and not self.trust_model_code and ref not in self.trusted and not is_trusted_builtin(ref):
            raise ModelError(
                f"{ckpt.name}: model reference {ref!r} stored in the checkpoint is not trusted; "
                f"pass --model {ref} to use it, or --trust-model-code"
            )
        module = _bounded(lambda: _instantiate(ref, spec["config"], ckpt.name), stored, ckpt.name, spec)
        load_weights(module, ckpt, runtime=runtime)
        return module.eval()

    def build_for_inference(
        self, ckpt: Checkpoint, *, compute: str = "auto", device: torch.device | None = None, example: Any = None, compile: bool = False
    ) -> tuple[nn.Module, ComputeInfo]:
        """A module that runs the checkpoint as ``compute`` says (see ``infercomp.compute``), and
        what runs. On the CPU the weights are decoded once and the compute mode applied, timing
        the candidates on ``example`` where it has to choose (a tensor, or a function of the
        float32 module that returns one), then with ``compile`` wrapped in ``torch.compile``; the
        C allocator is set for running models first (``allocator.for_models``); on
        CUDA each stored format runs its own modules (fp8 matmuls, 2:4 sparse kernels) and
        ``compute`` does not apply."""
        device = device or torch.device("cpu")
        if device.type != "cpu":
            note = "--compute applies to the CPU; on CUDA each stored format runs its own kernels"
            return self.build(ckpt, runtime=True).to(device), ComputeInfo(requested=compute, mode="stored formats", note=note)
        allocator.for_models()  # activations stay in the heap between calls (see infercomp.allocator)
        module = self.build(ckpt, runtime=False)
        if callable(example):
            example = example(module)
        module, info = prepare(
            module,
            compute,
            example=example,
            allowed=allowed_modes(storage_precisions(ckpt)),
            int8_weights=stored_int8(ckpt),
        )
        if compile:  # compiled on the first call: the caller's warm-up runs absorb it
            module, info.compiled = torch.compile(module), True
        return module, info

    def build_fresh(self) -> nn.Module:
        """A freshly initialised module from the user's ``--model`` reference (no weights)."""
        if self.ref is None:
            raise ModelError("no model reference given; pass --model REF")
        return _instantiate(self.ref, self.config or {}, "--model")


# A model config may build at most this many times the elements the checkpoint stores (and at
# least this many elements more) before we refuse to allocate it: structured pruning legitimately
# stores far fewer elements than the config builds, a hostile or mistaken config far more.
BUILD_RATIO, BUILD_SLACK = 1000, 100_000_000


def _bounded(build: Callable[[], nn.Module], stored: int, where: str, spec: dict[str, Any]) -> nn.Module:
    """``build()``, after building it once on the meta device (no memory) and refusing when it
    would allocate far more elements than the checkpoint stores."""
    try:
        with torch.device("meta"):
            probe = build()
        planned = sum(t.numel() for t in probe.state_dict().values())
    except ModelError:
        raise
    except Exception:  # model code that cannot run on the meta device: build it as it is
        planned = 0
    if planned > max(BUILD_RATIO * stored, stored + BUILD_SLACK):
        raise ModelError(
            f"{where}: the model config {json.dumps(spec.get('config'))[:200]} builds {planned:,} elements but the checkpoint "
            f"stores {stored:,}; refusing to allocate it (wrong --model-config, or a hostile checkpoint?)"
        )
    return build()


def _instantiate(ref: str, config: dict[str, Any], where: str) -> nn.Module:
    factory = resolve(ref)
    try:
        module = factory(**config)
    except TypeError as e:
        raise ModelError(f"{where}: building {ref!r} with config {json.dumps(config)} failed: {e}") from e
    if not isinstance(module, nn.Module):
        raise ModelError(f"model reference {ref!r} returned {type(module).__name__}, not a torch.nn.Module")
    return module


def load_weights(module: nn.Module, ckpt: Checkpoint, *, runtime: bool = True) -> None:
    """Load a checkpoint into ``module``: adapt standard layers to smaller stored shapes
    (structured pruning), swap in runtime modules for encoded weights, load the rest strictly."""
    shapes = formats.logical_shapes(ckpt.tensors, ckpt.encodings, ckpt.name)
    adapt_shapes(module, shapes, where=ckpt.name)
    swapped = _attach_runtime(module, ckpt) if runtime else set()

    def outside(key: str) -> bool:  # not owned by a runtime module (which loaded its own tensors)
        return not any(key.startswith(m + ".") for m in swapped)

    kept = {k: v for k, v in ckpt.encodings.items() if outside(k)}
    owned = formats.stored_keys(kept, ckpt.name)
    plain = {k: v for k, v in ckpt.tensors.items() if outside(k) or any(k in ks for ks in owned.values())}
    dense = formats.logical_tensors(plain, kept, ckpt.name)
    # A tied weight (a language model's output layer sharing its input embedding) is one tensor
    # under two names; checkpoints store it once (transformers' save_pretrained does).
    expected = {k for k in module.state_dict() if outside(k)} - _tied_aliases(module, set(dense))
    # Buffers the module does not persist (e.g. transformers' position_ids) may still be stored.
    transient = {k for k, _ in module.named_buffers()} - set(module.state_dict())
    dense = {k: v for k, v in dense.items() if k not in transient}
    missing = sorted(expected - set(dense))
    unexpected = sorted(set(dense) - expected)
    if missing or unexpected:
        parts = []
        if missing:
            parts.append(f"model expects {len(missing)} tensor(s) the checkpoint lacks, e.g. {missing[0]!r}")
        if unexpected:
            parts.append(f"checkpoint has {len(unexpected)} tensor(s) the model lacks, e.g. {unexpected[0]!r}")
        raise ModelError(f"{ckpt.name}: tensors do not match the model: {'; '.join(parts)} (wrong --model or --model-config?)")
    with torch.no_grad():
        own = module.state_dict(keep_vars=True)
        for name, value in dense.items():
            target = own[name]
            if tuple(target.shape) != tuple(value.shape):
                raise ModelError(f"{ckpt.name}: tensor {name!r} has shape {tuple(value.shape)}, the model has {tuple(target.shape)}")
            target.copy_(value.to(target.dtype))


def _tied_aliases(module: nn.Module, stored: set[str]) -> set[str]:
    """Names of the module's tensors that are another stored name's tensor (tied weights)."""
    names: dict[int, list[str]] = {}
    for k, t in module.state_dict(keep_vars=True).items():
        names.setdefault(id(t), []).append(k)
    return {k for group in names.values() if len(group) > 1 and stored.intersection(group) for k in group if k not in stored}


def _attach_runtime(module: nn.Module, ckpt: Checkpoint) -> set[str]:
    """Replace each module whose ``weight`` is encoded by the module its format runs it with,
    where the format has one for that layer (int8 kernels, ...). Returns the replaced names."""
    swapped: set[str] = set()
    for name, spec in ckpt.encodings.items():
        fmt = formats.format_for(name, spec, ckpt.name)
        mod_name, _, attr = name.rpartition(".")
        if attr != "weight" or not mod_name:
            continue
        parent_name, _, child = mod_name.rpartition(".")
        try:
            parent = module.get_submodule(parent_name) if parent_name else module
            old = module.get_submodule(mod_name)
        except AttributeError as e:
            raise ModelError(f"{ckpt.name}: encoded tensor {name!r} names no module of the model") from e
        new = fmt.runtime(old, ckpt.tensors, name, spec)
        if new is not None:
            setattr(parent, child, new)
            swapped.add(mod_name)
    return swapped


# Attribute fix-ups for standard layers whose tensors were replaced by smaller ones.
def _fix_linear(m: nn.Linear) -> None:
    m.out_features, m.in_features = m.weight.shape


def _fix_conv(m: nn.modules.conv._ConvNd) -> None:
    old_in = m.in_channels
    m.out_channels = m.weight.shape[0]
    if m.groups > 1 and m.groups == old_in:  # depthwise: one filter group per input channel
        m.groups = m.out_channels
    m.in_channels = m.weight.shape[1] * m.groups


def _fix_norm(m: nn.Module) -> None:
    t = m.weight if getattr(m, "weight", None) is not None else m.running_mean
    m.num_features = t.shape[0]


def _fix_layernorm(m: nn.LayerNorm) -> None:
    m.normalized_shape = tuple(m.weight.shape)


def _fix_embedding(m: nn.Embedding) -> None:
    m.num_embeddings, m.embedding_dim = m.weight.shape


def _fix_groupnorm(m: nn.GroupNorm) -> None:
    m.num_channels = m.weight.shape[0]


_FIXUPS: dict[type, Callable[[Any], None]] = {
    nn.Linear: _fix_linear,
    nn.Conv1d: _fix_conv,
    nn.Conv2d: _fix_conv,
    nn.Conv3d: _fix_conv,
    nn.BatchNorm1d: _fix_norm,
    nn.BatchNorm2d: _fix_norm,
    nn.BatchNorm3d: _fix_norm,
    nn.LayerNorm: _fix_layernorm,
    nn.Embedding: _fix_embedding,
    nn.GroupNorm: _fix_groupnorm,
}


def adapt_shapes(module: nn.Module, shapes: Mapping[str, tuple[int, ...]], *, where: str = "checkpoint") -> list[str]:
    """Shrink parameters and buffers to the stored shapes (dims may only get smaller) and fix the
    standard layers' size attributes. Returns the names of the tensors that changed."""
    changed_modules: dict[str, nn.Module] = {}
    changed: list[str] = []
    for name, t in list(module.state_dict(keep_vars=True).items()):
        stored = shapes.get(name)
        if stored is None or tuple(stored) == tuple(t.shape):
            continue
        if len(stored) != t.dim() or any(s > b for s, b in zip(stored, t.shape)):
            raise ModelError(
                f"{where}: tensor {name!r} has shape {tuple(stored)} but the model builds {tuple(t.shape)}; "
                "wrong --model or --model-config?"
            )
        mod_name, _, attr = name.rpartition(".")
        mod = module.get_submodule(mod_name) if mod_name else module
        fresh = torch.zeros(stored, dtype=t.dtype)
        if isinstance(t, nn.Parameter):
            setattr(mod, attr, nn.Parameter(fresh, requires_grad=t.requires_grad))
        else:
            mod._buffers[attr] = fresh
        changed_modules[mod_name] = mod
        changed.append(name)
    for mod in changed_modules.values():
        fix = _FIXUPS.get(type(mod))
        if fix is None:
            for cls, f in _FIXUPS.items():
                if isinstance(mod, cls):
                    fix = f
                    break
        if fix is not None:
            fix(mod)
    return changed


def input_shape(ckpt: Checkpoint, loader: ModelLoader, module: nn.Module) -> tuple[int, ...] | None:
    """The shape of one input sample, when known (built-in models, or a model's
    ``example_input_shape`` attribute)."""
    spec = loader.spec_for(ckpt)
    if spec and spec["ref"] in zoo.MODELS:
        return zoo.MODELS[spec["ref"]].input_shape
    shape = getattr(module, "example_input_shape", None)
    return tuple(shape) if shape else None


# Tokens per example when a Hugging Face text model is timed without --data.
HF_EXAMPLE_TOKENS = 128


def example_batch(ckpt: Checkpoint, loader: ModelLoader, module: nn.Module, batch: int, data: Dataset | None = None) -> torch.Tensor | None:
    """One input batch of ``batch`` samples: the first ones of ``data`` (repeated if fewer), else
    seeded noise of the model's known input shape (random token ids of ``HF_EXAMPLE_TOKENS`` for
    a Hugging Face text model); None when neither is available."""
    if data is not None:
        reps = -(-batch // len(data))
        return data.inputs.repeat(reps, *([1] * (data.inputs.dim() - 1)))[:batch]
    gen = torch.Generator().manual_seed(0)
    spec = loader.spec_for(ckpt) or {}
    hf_config = (spec.get("config") or {}) if spec.get("ref") == hf.HF_REF else {}
    vocab, positions = hf_config.get("vocab_size"), hf_config.get("max_position_embeddings", HF_EXAMPLE_TOKENS)
    if isinstance(vocab, int) and vocab > 1:
        tokens = min(HF_EXAMPLE_TOKENS, positions) if isinstance(positions, int) and positions > 0 else HF_EXAMPLE_TOKENS
        # Ids from 1 up: 0 is the padding id of most tokenizers, which the padding hook masks out.
        return torch.randint(1, vocab, (batch, tokens), generator=gen)
    shape = input_shape(ckpt, loader, module)
    if shape is None:
        return None
    return torch.rand((batch, *shape), generator=gen)


def storage_precisions(ckpt: Checkpoint) -> set[str]:
    """How the weights (float tensors of 2-D and up) are stored: format names of encoded ones
    (and the value dtype of sparse ones), dtype names of plain ones."""
    out: set[str] = set()
    for spec in ckpt.encodings.values():
        out.add(spec.get("codec", "?"))
        if spec.get("codec") == "pack-quantized":  # a Hugging Face directory's int4 / int8 (compressed-tensors)
            out.add(f"int{spec.get('bits', 8)}")
        if spec.get("codec", "").startswith("sparse"):
            out.add(spec.get("dtype", "float32"))
    taken = {k for keys in formats.stored_keys(ckpt.encodings, ckpt.name).values() for k in keys}
    for name, t in ckpt.tensors.items():
        if name not in taken and t.is_floating_point() and t.dim() >= 2:
            out.add(str(t.dtype).removeprefix("torch."))
    return out


def stored_int8(ckpt: Checkpoint) -> dict[str, Int8Weight]:
    """Module name -> the stored integers of each int8 weight with one scale per output channel
    and no column scales, so int8 compute multiplies exactly what was stored."""
    out = {}
    for name, spec in ckpt.encodings.items():
        if spec.get("codec") in ("int8", "int8-dynamic") and spec.get("granularity") == "channel" and not spec.get("column_scale"):
            shape = spec["shape"]
            if len(shape) == 2 and name.endswith(".weight"):
                q = ckpt.tensors[name].reshape(shape[0], -1)
                out[name.removesuffix(".weight")] = Int8Weight(q, ckpt.tensors[f"{name}_scale"].float().reshape(-1))
    return out


def first_output(y: Any) -> torch.Tensor:
    """Logits (or embeddings) from whatever a model returns: a tensor, a tuple, or a dict /
    ModelOutput (``logits`` if present, else its first value)."""
    if isinstance(y, (tuple, list)):
        return y[0]
    if isinstance(y, dict):
        return y.get("logits", next(iter(y.values())))
    return y


@dataclass(frozen=True)
class Task:
    """What a model's outputs are, so that they are scored the way its users use them.

    Attributes:
        kind: ``causal-lm`` (next-token logits: perplexity, fidelity per real token),
            ``sentence-embedding`` (a sentence-transformers directory: fidelity on the pooled,
            normalised embedding), ``classifier`` (class scores (N, C): accuracy, top-1) or
            ``outputs`` (anything else, e.g. a Hugging Face model's last hidden state).
        pooling / normalize: the sentence-transformers recipe (``1_Pooling/config.json`` modes,
            and whether ``modules.json`` ends in ``Normalize``).
        note: what of the recipe is not reproduced, if anything.
    """

    kind: str = "outputs"
    pooling: tuple[str, ...] = ()
    normalize: bool = False
    note: str | None = None


def is_causal_lm(module: nn.Module) -> bool:
    """A transformers model that generates text one token after another (decoder only)."""
    m = getattr(module, "_orig_mod", module)  # under torch.compile
    can_generate = getattr(m, "can_generate", None)
    config = getattr(m, "config", None)
    return callable(can_generate) and bool(can_generate()) and not getattr(config, "is_encoder_decoder", False)


def sentence_embedding_recipe(directory: Path) -> Task | None:
    """The sentence-transformers recipe of a model directory (``modules.json``: Transformer ->
    Pooling -> Normalize), or None when it holds none."""
    modules_file = directory / "modules.json"
    if not modules_file.is_file():
        return None
    try:
        modules = json.loads(modules_file.read_text())
        kinds = [(str(m["type"]).rpartition(".")[2], str(m.get("path", ""))) for m in modules]
    except (ValueError, KeyError, TypeError) as e:
        raise ModelError(f"{modules_file}: not a sentence-transformers modules list ({e})") from e
    pooling = next((path for kind, path in kinds if kind == "Pooling"), None)
    if pooling is None:
        return None
    pooling_file = directory / pooling / "config.json"
    try:
        cfg = json.loads(pooling_file.read_text()) if pooling_file.is_file() else {}
    except ValueError as e:
        raise ModelError(f"{pooling_file}: not valid JSON ({e})") from e
    mode = cfg.get("pooling_mode")  # sentence-transformers >= 5: one name or a list
    if mode is None:  # older files: one boolean per mode
        modes = tuple(m for m in POOLING_MODES if cfg.get(_LEGACY_POOLING_KEYS[m])) or ("mean",)
    else:
        modes = (mode,) if isinstance(mode, str) else tuple(mode)
    unknown = [m for m in modes if m not in POOLING_MODES]
    if unknown:
        raise ModelError(f"{pooling_file}: pooling mode {unknown[0]!r} is not one of {', '.join(POOLING_MODES)}")
    others = [kind for kind, _ in kinds if kind not in ("Transformer", "Pooling", "Normalize")]
    note = f"fidelity is measured on the pooled embedding, before {', '.join(others)} (not run by infercomp)" if others else None
    return Task("sentence-embedding", pooling=modes, normalize=any(k == "Normalize" for k, _ in kinds), note=note)


_LEGACY_POOLING_KEYS = {
    "cls": "pooling_mode_cls_token",
    "max": "pooling_mode_max_tokens",
    "mean": "pooling_mode_mean_tokens",
    "mean_sqrt_len_tokens": "pooling_mode_mean_sqrt_len_tokens",
    "weightedmean": "pooling_mode_weightedmean_tokens",
    "lasttoken": "pooling_mode_lasttoken",
}


def task_for(ckpt: Checkpoint, module: nn.Module, *, fallback: Task | None = None) -> Task:
    """How ``module`` (built from ``ckpt``) is scored: ``outputs`` unless it is a causal LM or a
    sentence-embedding model (the caller tells class scores (N, C) from other outputs once it has
    them). A Hugging Face model without a sentence-transformers recipe of its own (one file
    written from a directory) takes ``fallback``'s (the baseline's)."""
    if is_causal_lm(module):
        return Task("causal-lm")
    is_hf = (ckpt.model or {}).get("ref") == hf.HF_REF
    if is_hf:
        recipe = sentence_embedding_recipe(ckpt.path) if ckpt.path is not None and ckpt.path.is_dir() else None
        if recipe is None and fallback is not None and fallback.kind == "sentence-embedding":
            recipe = fallback
        if recipe is not None:
            return recipe
    return Task()


def call(module: nn.Module, x: torch.Tensor, mask: torch.Tensor | None) -> Any:
    """``module(x)``, with the attention mask for a model that takes one (a Hugging Face text model)."""
    return module(x) if mask is None else module(x, attention_mask=mask)


@torch.inference_mode()
def predict(module: nn.Module, data: Dataset, *, batch_size: int, device: torch.device, task: Task | None = None) -> torch.Tensor:
    """Outputs for every input, in order, as float32 on the CPU: shape (N, ...). For a
    ``sentence-embedding`` task, the pooled (and normalised) sentence embeddings (N, C)."""
    outs = []
    embed = task is not None and task.kind == "sentence-embedding"
    for i in range(0, len(data), batch_size):
        x = data.inputs[i : i + batch_size].to(device)
        mask = None if data.attention_mask is None or not embed else data.attention_mask[i : i + batch_size].to(device)
        y = call(module, x, mask)
        if embed:
            hidden = y["last_hidden_state"] if isinstance(y, dict) and "last_hidden_state" in y else first_output(y)
            outs.append(pool(hidden.float().cpu(), None if mask is None else mask.cpu(), task.pooling, normalize=task.normalize))
        else:
            outs.append(first_output(y).float().cpu())
    return torch.cat(outs)
