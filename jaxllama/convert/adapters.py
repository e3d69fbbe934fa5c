"""LoRA adapters as files: a LoRA training run (its checkpoints hold the adapters alone) or a PEFT
folder (``adapter_config.json`` + ``adapter_model.safetensors``), read into one :class:`Adapter`;
PEFT export; and a :class:`MergedSource` that folds an adapter into its base tensor by tensor, so
``convert --merge-lora`` streams like any conversion.

PEFT names: ``base_model.model.model.layers.{i}.self_attn.q_proj.lora_A.weight`` is ``[rank, in]``
and ``lora_B.weight`` is ``[out, rank]`` (torch Linear layout); ours are ``lora_a [layers, in, rank]``
and ``lora_b [layers, rank, out]``. Scale ``alpha / rank`` (PEFT's rsLoRA, ``alpha / sqrt(rank)``, is
read as the equivalent alpha).
"""

from __future__ import annotations

import json
import math
import re
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np

from jaxllama.config import LORA_TARGETS, LoraConfig, ModelConfig
from jaxllama.convert.common import Source, atomic_output, expected_shape
from jaxllama.convert.hf_names import LAYER_KERNELS
from jaxllama.convert.validate import layer_indices, positive_int, positive_number
from jaxllama.errors import ConfigError

PEFT_CONFIG, PEFT_WEIGHTS = "adapter_config.json", "adapter_model.safetensors"
# HF module name -> our kernel path under layers/ (without /kernel)
MODULES = {ours.split("/")[1]: ours.rsplit("/", 1)[0] for ours, _ in LAYER_KERNELS}
_PEFT_KEY = "base_model.model.model.layers.{i}.{hf}.lora_{ab}.weight"
_PEFT_LAYER_RE = re.compile(r".*\.layers\.(\d+)\.")
_HF_MODULE = {ours.rsplit("/", 1)[0]: theirs.rsplit(".", 1)[0] for ours, theirs in LAYER_KERNELS}


@dataclass
class Adapter:
    """Adapters of ``targets`` for an ``n_layers`` model: ``tensors[module] = (A [L, in, r], B [L, r, out])``."""

    rank: int
    alpha: float
    targets: tuple[str, ...]
    tensors: dict[str, tuple[np.ndarray, np.ndarray]]
    n_layers: int
    base: str | None  # the base checkpoint, when known (a run's train.init_from; PEFT's base path)
    path: str
    dropout: float = 0.0
    run_cfg: Any = None  # a jaxllama run's Config
    tokenizer_dir: Path | None = None

    def lora_config(self) -> LoraConfig:
        return LoraConfig(rank=self.rank, alpha=self.alpha, dropout=self.dropout, targets=list(self.targets))

    def tree(self) -> dict:
        """The canonical adapter tree (``layers/self_attn/q_proj/lora_a`` ...) for the model."""
        layers: dict = {}
        for module, (a, b) in self.tensors.items():
            group, name = MODULES[module].split("/")
            layers.setdefault(group, {})[name] = {"lora_a": a, "lora_b": b}
        return {"layers": layers}

    def check_fits(self, m: ModelConfig, where: str) -> None:
        """An adapter for other base shapes is a one-line error naming the first tensor that differs."""
        if self.n_layers != m.n_layers:
            raise ConfigError(f"{self.path}: the adapter has {self.n_layers} layers, the base {where} has {m.n_layers}")
        for module, (a, b) in self.tensors.items():
            d_in, d_out = expected_shape(m, f"{MODULES[module]}/kernel")
            if a.shape[1:] != (d_in, self.rank) or b.shape[1:] != (self.rank, d_out):
                raise ConfigError(f"{self.path}: the {module} adapter is [{a.shape[1]} x {self.rank}] @ "
                                  f"[{self.rank} x {b.shape[2]}], but the base {where} has {module} [{d_in} x {d_out}]")


def is_adapter(path: str | Path) -> bool:
    """A PEFT folder, or a jaxllama run / step whose training config has ``train.lora.rank > 0``."""
    p = Path(path)
    if (p / PEFT_CONFIG).is_file():
        return True
    return _run_config(p) is not None


def _run_config(p: Path):
    """The training Config of a LoRA run or step dir, else None."""
    from jaxllama.checkpoint.params import as_path, resolve_params_dirs

    if not p.is_dir():
        return None
    try:
        step = resolve_params_dirs(str(p))[0]  # the dir itself, or a run's newest complete step
    except ConfigError:
        return None
    if not (step / "train").is_dir():  # a params-only export: no training config, so no adapter
        return None
    import orbax.checkpoint as ocp

    from jaxllama.checkpoint.params import _quiet_orbax
    from jaxllama.config import config_from_dict

    try:
        with _quiet_orbax():
            saved = ocp.JsonCheckpointHandler().restore(as_path(step) / "train")
        tree = saved["config"]
    except Exception:  # noqa: BLE001 - an unreadable train item: not something we can call an adapter
        return None
    if not (tree.get("train", {}).get("lora", {}) or {}).get("rank"):
        return None
    tree = {**tree, "train": {**tree["train"], "init_from": None}}  # the base need not still exist to read it
    cfg = config_from_dict(tree)
    cfg.train.init_from = saved["config"]["train"].get("init_from")
    return cfg


def read_adapter(path: str | Path) -> Adapter:
    p = Path(path)
    if (p / PEFT_CONFIG).is_file():
        return _read_peft(p)
    cfg = _run_config(p)
    if cfg is None:
        raise ConfigError(f"{path}: not a LoRA adapter (a PEFT folder with {PEFT_CONFIG}, or a jaxllama run trained "
                          "with train.lora.rank > 0)")
    from jaxllama.checkpoint.params import load_params

    tree, _ = load_params(str(p))
    layers = tree["layers"]
    tensors = {}
    for module, ours in MODULES.items():
        group, name = ours.split("/")
        node = layers.get(group, {}).get(name)
        if node is not None:
            tensors[module] = (np.asarray(node["lora_a"]), np.asarray(node["lora_b"]))
    tok = next((d for d in (p / "tokenizer", p.parent.parent / "tokenizer") if d.is_dir()), None)  # run, or step
    lc = cfg.train.lora
    return Adapter(lc.rank, float(lc.alpha), tuple(lc.targets), tensors, cfg.model.n_layers, cfg.train.init_from,
                   str(path), float(lc.dropout), cfg, tok)


def _read_peft(p: Path) -> Adapter:
    from jaxllama.convert.safetensors_io import SafetensorsFile

    try:
        conf = json.loads((p / PEFT_CONFIG).read_text())
    except (OSError, json.JSONDecodeError) as e:
        raise ConfigError(f"{p / PEFT_CONFIG}: not valid JSON ({e})") from None
    where = str(p / PEFT_CONFIG)
    if not isinstance(conf, dict):
        raise ConfigError(f"{where}: expected a JSON object")
    if conf.get("peft_type", "LORA") != "LORA":
        raise ConfigError(f"{where}: peft_type {conf.get('peft_type')!r}; only LORA adapters are supported")
    for key, bad in (("use_dora", True), ("bias", lambda v: v not in (None, "none")),
                     ("rank_pattern", lambda v: bool(v)), ("alpha_pattern", lambda v: bool(v)),
                     ("layers_to_transform", lambda v: v is not None), ("modules_to_save", lambda v: bool(v))):
        value = conf.get(key)
        if (bad(value) if callable(bad) else value == bad):
            raise ConfigError(f"{where}: {key}={value!r} is not supported (plain LoRA on the block projections)")
    targets = conf.get("target_modules")
    if isinstance(targets, str):
        targets = [targets]
    if not isinstance(targets, list) or not targets or any(t not in LORA_TARGETS for t in targets):
        raise ConfigError(f"{where}: target_modules {targets!r}: expected a list of {', '.join(LORA_TARGETS)}")
    if "r" not in conf:
        raise ConfigError(f"{where}: missing key r")
    rank, alpha = positive_int(conf["r"], where, "r"), positive_number(conf.get("lora_alpha", 8), where, "lora_alpha")
    if conf.get("use_rslora"):
        alpha = alpha * math.sqrt(rank)  # rsLoRA scales by alpha / sqrt(r)
    weights = p / PEFT_WEIGHTS
    if not weights.is_file():
        raise ConfigError(f"{p}: no {PEFT_WEIGHTS} (adapter_model.bin is not read: it is a pickle)")
    f = SafetensorsFile(weights)
    keys = {k.replace(".default.weight", ".weight") for k in f.keys()}
    layer_ids = sorted(layer_indices(keys, _PEFT_LAYER_RE))
    n_layers = (max(layer_ids) + 1) if layer_ids else 0
    tensors = {}
    for module in targets:
        a_list, b_list = [], []
        for i in range(n_layers):
            names = [_PEFT_KEY.format(i=i, hf=_HF_MODULE[MODULES[module]], ab=ab) for ab in "AB"]
            for n in names:
                if n not in f.entries:
                    raise ConfigError(f"{weights}: tensor {n} missing (target_modules names {module})")
            a, b = (np.asarray(f.get(n), np.float32) for n in names)
            if a.shape[0] != rank or b.shape[1] != rank:
                raise ConfigError(f"{weights}: {names[0]} is {list(a.shape)} and lora_B {list(b.shape)}, not rank {rank}")
            a_list.append(a.T)
            b_list.append(b.T)
        tensors[module] = (np.stack(a_list), np.stack(b_list))
    base = conf.get("base_model_name_or_path")
    return Adapter(rank, alpha, tuple(targets), tensors, n_layers, base if base and Path(base).exists() else None,
                   str(p), float(conf.get("lora_dropout", 0.0)))


def write_peft(adapter: Adapter, dst: str | Path) -> Path:
    """A PEFT adapter folder that ``peft.PeftModel.from_pretrained(hf_base, dst)`` loads."""
    from jaxllama.convert.safetensors_io import write_safetensors

    config = {
        "peft_type": "LORA", "task_type": "CAUSAL_LM", "r": adapter.rank, "lora_alpha": adapter.alpha,
        "lora_dropout": adapter.dropout, "target_modules": list(adapter.targets), "bias": "none",
        "fan_in_fan_out": False, "inference_mode": True, "init_lora_weights": True, "use_rslora": False,
        "use_dora": False, "modules_to_save": None, "layers_to_transform": None, "rank_pattern": {},
        "alpha_pattern": {}, "base_model_name_or_path": adapter.base, "revision": None,
    }
    specs, arrays = [], {}
    for module in adapter.targets:
        a, b = adapter.tensors[module]
        for i in range(adapter.n_layers):
            for ab, arr in (("A", a[i].T), ("B", b[i].T)):
                name = _PEFT_KEY.format(i=i, hf=_HF_MODULE[MODULES[module]], ab=ab)
                arrays[name] = np.ascontiguousarray(arr, np.float32)
                specs.append((name, arrays[name].shape, np.dtype(np.float32)))
    with atomic_output(dst) as out:
        out.mkdir(parents=True, exist_ok=True)
        (out / PEFT_CONFIG).write_text(json.dumps(config, indent=2))
        write_safetensors(out / PEFT_WEIGHTS, specs, arrays.__getitem__)
    return Path(dst)


def base_source(adapter: Adapter, base: str | None, dtype: Any = None) -> Source:
    """The base model's source: ``base`` (``--base``), else the adapter's recorded base."""
    from jaxllama.convert.api import open_source

    path = base or adapter.base
    if path is None:
        raise ConfigError(_no_base(adapter, "pass --base PATH"))
    return open_source(path, dtype)


def _no_base(adapter: Adapter, advice: str) -> str:
    if adapter.run_cfg is not None:  # trained with no train.init_from: over its seed's random weights
        return (f"{adapter.path}: this LoRA run trained over randomly initialized weights (no train.init_from), "
                f"which are not saved; {advice} to use the adapter over a real base")
    return f"{adapter.path}: the adapter does not name a local base model; {advice}"


def load_base(adapter: Adapter) -> Any:
    """The adapter's base as a :class:`jaxllama.convert.api.LoadedModel` (no adapter folded in)."""
    from jaxllama.convert.api import load_model

    if adapter.base is None:
        raise ConfigError(_no_base(adapter, f"give the base as MODEL with --lora {adapter.path}"))
    return load_model(adapter.base)


def open_merged(path: str | Path, base: str | None = None, dtype: Any = None) -> "MergedSource":
    """The adapter at ``path`` folded into its base (``base``, else the one it records), with the run's
    own tokenizer when it has one (the one it was fine-tuned with)."""
    import dataclasses

    adapter = read_adapter(path)
    src = base_source(adapter, base, dtype)
    extras = src.extras
    if adapter.tokenizer_dir is not None:
        extras = dataclasses.replace(extras, tokenizer_dir=adapter.tokenizer_dir, cleanup=extras.cleanup)
    return MergedSource(src, adapter, extras)


class MergedSource(Source):
    """``base`` with ``adapter`` folded into each adapted kernel as it is read (``--merge-lora``)."""

    def __init__(self, base: Source, adapter: Adapter, extras: Any = None):
        adapter.check_fits(base.model_cfg, str(base.path))
        self.base, self.adapter = base, adapter
        self.model_cfg, self.dtype, self.path = base.model_cfg, base.dtype, base.path
        self.extras = extras or base.extras
        self._by_kernel = {f"{MODULES[m]}/kernel": t for m, t in adapter.tensors.items()}

    def _read(self, name: str, layer: int | None) -> np.ndarray:
        from jaxllama.model.lora import fold

        arr = self.base.get(name, layer)
        if layer is not None and name in self._by_kernel:
            a, b = self._by_kernel[name]
            arr = fold(arr, a[layer], b[layer], self.adapter.alpha, self.adapter.rank)
        return arr

    def close(self) -> None:
        self.base.close()
        super().close()
