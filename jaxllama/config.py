"""Typed configuration: dataclasses filled from defaults, a YAML file, then dotted overrides.

``load_config("configs/llama3-8b.yaml", ["mesh.fsdp=-1", "optim.lr=3e-4"])`` returns a
:class:`Config` whose model fields are resolved from the preset and which has passed every check
that does not need devices. Every problem raises :class:`ConfigError` with one line naming the key.
Files and override values are read with bounds (size, nesting, YAML alias expansion; see
:mod:`jaxllama.config_checks`), and values quoted in errors are cut, so hostile input fails fast.
The defaults *are* the CPU demo that ``jaxllama train`` runs with no arguments.
"""

from __future__ import annotations

import dataclasses
import difflib
import os
import re
import typing
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import yaml

from jaxllama.config_checks import (MAX_RECORD_BYTES, check_size, coerce, cut, exists, load_yaml,  # noqa: F401
                                    one_line, parse_rules, parse_value, read_yaml_file, short, validate_rules)
from jaxllama.errors import ConfigError
from jaxllama.model.presets import PRESETS
from jaxllama.parallel.mesh import AXES

DTYPES = ("float32", "bfloat16", "float16")
ATTENTION_IMPLS = ("auto", "xla", "dot_product", "cudnn", "splash", "cpu_flash")
REMAT_POLICIES = ("none", "full", "save_dots")
SCHEDULES = ("cosine", "wsd", "constant")
ROPE_TYPES = ("default", "llama3")
DATA_FORMATS = ("auto", "text", "lines", "jsonl", "tfrecord", "chat", "prompt_completion", "preference")
CHAT_FORMATS = ("chat", "prompt_completion", "preference")  # JSONL records encoded (and masked) by the reader
LOSS_ON = ("assistant", "last_assistant", "all")
TRUNCATE_MODES = ("right", "left", "drop")
PACKING_MODES = ("pack", "concat")

# The default logical-axis rules (weights; activation_* names follow them, see parallel/sharding.py):
# batch rows over (data, fsdp), weights' embed over fsdp (FSDP), heads / MLP / vocabulary over tensor.
DEFAULT_RULES: list[list[Any]] = [
    ["batch", ["data", "fsdp"]],
    ["embed", "fsdp"],
    ["heads", "tensor"],
    ["kv_heads", "tensor"],
    ["mlp", "tensor"],
    ["vocab", "tensor"],
]


@dataclass
class ModelConfig:
    """Architecture (None = take it from the preset) and numerics of the decoder."""

    preset: str = "tiny"
    vocab_size: int | None = None
    dim: int | None = None
    n_layers: int | None = None
    n_heads: int | None = None
    n_kv_heads: int | None = None
    head_dim: int | None = None  # None: dim // n_heads
    ffn_dim: int | None = None
    max_position: int | None = None
    norm_eps: float | None = None
    rope_theta: float | None = None
    rope_type: str | None = None  # "default" or "llama3" (Llama 3.1 frequency scaling)
    rope_factor: float | None = None
    rope_low_freq_factor: float | None = None
    rope_high_freq_factor: float | None = None
    rope_original_max_position: int | None = None
    tie_embeddings: bool | None = None
    dtype: str = "auto"  # compute dtype; auto: bfloat16 on GPU/TPU, float32 on CPU
    param_dtype: str = "float32"
    attention: str = "auto"  # auto: splash on TPU, cudnn on GPU (dot_product for float32), cpu_flash on CPU
    # None: the preset's: scan (one compiled layer, compile time flat in depth) except `tiny`, whose 4
    # layers are unrolled: as quick to compile, and on CPU the scan's stacked residuals cost ~7% a step.
    scan_layers: bool | None = None
    remat: str = "none"


@dataclass
class MeshConfig:
    """Mesh axis sizes (one may be -1: fill) and logical-axis rules."""

    data: int = 1
    fsdp: int = -1
    tensor: int = 1
    # Across slices (DCN) on multi-slice TPU pods; the ICI sizes above are per slice.
    dcn_data: int = 1
    dcn_fsdp: int = 1
    dcn_tensor: int = 1
    rules: list = field(default_factory=lambda: [list(r) for r in DEFAULT_RULES])


# The ModelConfig fields that decide parameter shapes: a checkpoint and a config that differ in any of
# them cannot be combined (resume, train.init_from); the rest (rope, eps) change the function only.
SHAPE_FIELDS = ("vocab_size", "dim", "n_layers", "n_heads", "n_kv_heads", "head_dim", "ffn_dim", "tie_embeddings")


@dataclass
class DataConfig:
    """Where documents come from, how they become tokens, and how tokens become [batch, seq_len] rows.

    source: ``stdlib`` (the demo corpus), ``synthetic``, ``tfds:NAME[:VERSION]``, or a file glob
    (optionally ``files:GLOB``) of text, JSONL or TFRecord files.
    """

    source: str = "stdlib"
    seq_len: int = 128
    global_batch: int = 16
    tokenizer: str | None = None  # a tokenizer file/folder; None with stdlib: train one and cache it
    format: str = "auto"  # files: auto | text (a document per file) | lines | jsonl | tfrecord | chat | prompt_completion
    text_key: str = "text"  # the field holding text in JSONL, TFRecord and TFDS records
    tfds_data_dir: str | None = None
    split: str = "train"  # TFDS split read for training
    packing: str = "pack"  # pack (documents never cross a row; pad the rest) | concat (concatenate and chunk)
    add_bos: bool | None = None  # None: the tokenizer family's convention
    add_eos: bool | None = None
    shuffle: bool = True
    shuffle_buffer: int = 1024  # documents
    eval_source: str | None = None  # a separate eval source (same syntax as source)
    eval_split: str = "validation"  # TFDS split read for eval when eval_source is a tfds: source
    eval_fraction: float = 0.0  # else hold out this fraction of the training source's documents
    prefetch: int = 4  # batches prepared ahead in a background thread
    skip_bad_records: bool = False  # skip (and count) empty files, invalid UTF-8, bad JSONL/TFRecord records
    max_record_bytes: int = MAX_RECORD_BYTES  # a larger JSONL line, TFRecord record or text document is a bad record
    # chat / prompt_completion (fine-tuning; see jaxllama/data/chat_data.py):
    loss_on: str = "assistant"  # assistant (every assistant turn) | last_assistant | all (every token)
    chat_template: str = "auto"  # auto (the tokenizer's Jinja template, else Llama 3/2 by its tokens) | jinja | llama3 | llama2
    truncate: str = "right"  # a conversation longer than seq_len + 1 tokens: right (keep the start) | left | drop
    pairs_per_row: int = 4  # preference: pairs packed into one row at most (both sides of a pair share a row)


@dataclass
class OptimConfig:
    lr: float = 3e-3
    b1: float = 0.9
    b2: float = 0.95
    eps: float = 1e-8
    weight_decay: float = 0.1  # applied to kernels and embeddings, never to norm scales
    clip_norm: float = 1.0  # 0 disables clipping
    schedule: str = "cosine"  # cosine | wsd (warmup-stable-decay) | constant
    warmup_steps: int = 20
    min_lr_ratio: float = 0.1  # final lr = lr * min_lr_ratio
    decay_fraction: float = 0.2  # wsd: fraction of steps spent decaying


LORA_TARGETS = ("q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj")


@dataclass
class LoraConfig:
    """LoRA adapters (``rank`` 0: full fine-tuning). Targets are Hugging Face module names; the delta
    ``alpha / rank * x A B`` starts at zero (B = 0), as in PEFT."""

    rank: int = 0
    alpha: float = 16.0
    dropout: float = 0.0  # on the adapter's input, training only
    targets: list = field(default_factory=lambda: list(LORA_TARGETS))
    quantize: str = "none"  # QLoRA: the frozen base's block projections in int8 (per channel) or int4 (grouped)
    group_size: int = 128  # int4: input rows per scale


OBJECTIVES = ("lm", "dpo", "simpo", "orpo")
DPO_LOSSES = ("sigmoid", "robust", "hinge", "ipo")
DPO_REFERENCES = ("auto", "base", "separate", "cached")


@dataclass
class DpoConfig:
    """Preference tuning (``train.objective=dpo|simpo|orpo`` on ``data.format=preference``), TRL's definitions."""

    beta: float = 0.1  # dpo, simpo: the reward scale; orpo: the weight of the odds-ratio term (lambda)
    loss: str = "sigmoid"  # sigmoid (with label_smoothing: cDPO) | robust | hinge | ipo
    label_smoothing: float = 0.0
    reference: str = "auto"  # auto: base with LoRA, else separate | base (the frozen base, adapters off) | separate
    # | cached (one pass stores the reference's log-probabilities of every sequence: no reference in training)
    reference_path: str | None = None  # separate: the reference's weights (default: train.init_from)
    simpo_gamma: float = 0.5  # simpo: the target reward margin


@dataclass
class TrainConfig:
    steps: int = 100
    log_every: int = 10
    seed: int = 0
    grad_accum: int = 1  # micro-batches per step, accumulated inside the jitted step
    z_loss: float = 0.0
    loss_chunk: int = 0  # sequence positions per loss chunk; 0: chosen from the vocabulary size
    max_nonfinite: int = 5  # consecutive non-finite losses before the run stops
    peak_flops: float | None = None  # per device, for MFU; None: table, or measured on CPU
    tensorboard: bool = True
    progress: bool = True  # progress bar on a terminal
    init_from: str | None = None  # start from these weights (HF/Meta/GGUF/jaxllama); optimizer starts fresh
    eval_every: int = 0  # steps between evals (when eval data is configured); 0: only at the end
    eval_batches: int = 0  # batches per eval; 0: one whole pass over the eval data (synthetic: 8)
    lora: LoraConfig = field(default_factory=LoraConfig)
    objective: str = "lm"  # lm (next-token loss) | dpo | simpo | orpo (preference pairs)
    dpo: DpoConfig = field(default_factory=DpoConfig)


@dataclass
class CheckpointConfig:
    """Orbax checkpoints of the training state under ``dir`` (default RUN_DIR/checkpoints; gs:// works)."""

    enabled: bool = True
    every: int = 50  # save every N steps (and always at the end and on SIGTERM); 0: only those
    keep: int = 3  # most recent checkpoints kept
    keep_every: int = 0  # also keep every checkpoint whose step is a multiple of this; 0: none
    async_save: bool = True  # write in the background while training continues
    dir: str | None = None


@dataclass
class Config:
    model: ModelConfig = field(default_factory=ModelConfig)
    mesh: MeshConfig = field(default_factory=MeshConfig)
    data: DataConfig = field(default_factory=DataConfig)
    optim: OptimConfig = field(default_factory=OptimConfig)
    train: TrainConfig = field(default_factory=TrainConfig)
    checkpoint: CheckpointConfig = field(default_factory=CheckpointConfig)
    run_dir: str | None = None  # None: a new folder under runs/

    def to_dict(self) -> dict:
        return dataclasses.asdict(self)


# ---------------------------------------------------------------------------------------------
# Loading


def load_config(path: str | Path | None = None, overrides: list[str] | tuple[str, ...] = (),
                checkpoint_model: Any = None) -> Config:
    """Defaults <- YAML file <- ``key=value`` overrides, then preset resolution and validation.
    ``checkpoint_model`` (``path -> ModelConfig``): with ``train.init_from`` and no ``model.preset``, the
    architecture is read from the checkpoint through it (:func:`jaxllama.train.init_from.load_train_config`
    passes the converters' reader; this module imports none of them)."""
    return config_from_dict({} if path is None else _read_yaml(Path(path)), overrides, checkpoint_model)


def config_from_dict(tree: dict, overrides: list[str] | tuple[str, ...] = (), checkpoint_model: Any = None) -> Config:
    """A Config from a nested dict (e.g. a run's saved config.yaml) and ``key=value`` overrides, validated.
    Every error is one line of bounded length, whatever the input quoted in it."""
    try:
        return _config_from_dict(tree, overrides, checkpoint_model)
    except ConfigError as e:
        if one_line(str(e)) != str(e):  # a safety net under the quoting of values (config_checks.short)
            raise ConfigError(one_line(str(e))) from None
        raise


def _config_from_dict(tree: dict, overrides: list[str] | tuple[str, ...], checkpoint_model: Any) -> Config:
    check_size(tree, "config")
    cfg = Config()
    _apply_tree(cfg, tree, prefix="")
    preset_given = isinstance(tree.get("model"), dict) and "preset" in tree["model"]
    for item in overrides:
        key, sep, raw = item.partition("=")
        if not sep or not key:
            raise ConfigError(f"override {short(item)}: expected key=value, e.g. train.steps=100")
        _set(cfg, key.strip(), _parse_scalar(raw, key.strip()))
        preset_given = preset_given or key.strip() == "model.preset"
    if cfg.train.init_from and not preset_given and checkpoint_model is not None:
        _model_from_checkpoint(cfg, checkpoint_model)
    resolve_model(cfg.model)
    validate(cfg)
    if cfg.train.init_from and "://" not in cfg.train.init_from:  # a run's saved config works from anywhere
        cfg.train.init_from = str(Path(cfg.train.init_from).expanduser().resolve())
    ref = cfg.train.dpo.reference_path
    if ref and "://" not in ref:
        cfg.train.dpo.reference_path = str(Path(ref).expanduser().resolve())
    return cfg


def _model_from_checkpoint(cfg: Config, read: Any) -> None:
    """Fine-tuning without a preset: the architecture of ``train.init_from`` (fields set explicitly win)."""
    path = cfg.train.init_from
    if "://" not in path and not exists(path):
        raise ConfigError(f"train.init_from: {cut(path)}: no such file or folder")
    try:
        stored = read(path)
    except ConfigError as e:
        raise ConfigError(f"train.init_from: {e}") from None
    m = cfg.model
    for f in dataclasses.fields(ModelConfig):
        if f.default is None and getattr(m, f.name) is None:  # an architecture field the user left unset
            setattr(m, f.name, getattr(stored, f.name))
    m.preset = stored.preset


def save_config(cfg: Config, path: str | Path) -> list[str]:
    """Write ``cfg`` as YAML; returns what differs from the file it replaces (``optim.lr: 0.003 -> 0.001``),
    so a resumed run can say which settings it changed."""
    path = Path(path)
    try:
        before = load_yaml(path.read_text()) if path.is_file() else None
    except (OSError, UnicodeDecodeError, yaml.YAMLError):
        before = None
    now = cfg.to_dict()
    tmp = path.with_name(f".{path.name}.tmp-{os.getpid()}")  # temp + rename: a full disk leaves the old file whole
    try:
        tmp.write_text(yaml.safe_dump(now, sort_keys=False))
        tmp.replace(path)
    finally:
        tmp.unlink(missing_ok=True)
    if not isinstance(before, dict):
        return []
    old, new = _flat(before), _flat(now)
    return [f"{k}: {short(old.get(k))} -> {short(new.get(k))}" for k in new if k in old and old[k] != new[k]]


def _flat(tree: dict, prefix: str = "") -> dict:
    out = {}
    for k, v in tree.items():
        if isinstance(v, dict):
            out.update(_flat(v, f"{prefix}{k}."))
        else:
            out[f"{prefix}{k}"] = v
    return out


def _read_yaml(path: Path) -> dict:
    tree = read_yaml_file(path)  # bounded: size, depth, alias expansion, binary (see config_checks)
    if tree is None:
        return {}
    if not isinstance(tree, dict):
        raise ConfigError(f"config file {cut(path)}: expected a mapping of sections, got {type(tree).__name__}")
    return tree


def _parse_scalar(raw: str, key: str = "value") -> Any:
    """Values are YAML scalars/lists: 3e-4, true, [a, b]; anything unparsable stays a string (bounded:
    an alias bomb or deep nesting is an error naming ``key``)."""
    return parse_value(raw, key)


def _apply_tree(obj: Any, tree: dict, prefix: str) -> None:
    for key, value in tree.items():
        key = str(key)
        current = getattr(obj, key, None) if "." not in key else None
        if isinstance(value, dict) and dataclasses.is_dataclass(current):
            _apply_tree(current, value, prefix=f"{prefix}{key}.")
        else:
            _set(obj, key, value, full=f"{prefix}{key}")


def _set(obj: Any, key: str, value: Any, full: str | None = None) -> None:
    """Set a dotted key on nested dataclasses, checking the name and coercing the type."""
    full = full or key
    head, _, rest = key.partition(".")
    names = {f.name for f in dataclasses.fields(obj)}
    section = full[: len(full) - len(key)].rstrip(".")
    if head not in names:
        raise ConfigError(_unknown(cut(full), names, section))
    current = getattr(obj, head)
    if rest:
        if not dataclasses.is_dataclass(current):
            raise ConfigError(f"{cut(full)}: unknown key ({cut(full[: len(full) - len(rest) - 1])} is a value, not a "
                              "section)")
        _set(current, rest, value, full)
        return
    if dataclasses.is_dataclass(current):
        raise ConfigError(f"{full}: is a section; set its keys, e.g. {full}.{dataclasses.fields(current)[0].name}=...")
    hint = typing.get_type_hints(type(obj))[head]
    setattr(obj, head, coerce(full, value, hint))


def _unknown(full: str, names: set[str], section: str) -> str:
    prefix = f"{section}." if section else ""
    options = sorted(prefix + n for n in names)
    close = difflib.get_close_matches(full, options, n=1)
    hint = f" (did you mean {close[0]}?)" if close else ""
    return f"unknown config key {full}{hint}; {('keys of ' + section) if section else 'sections'}: {', '.join(options)}"


# ---------------------------------------------------------------------------------------------
# Preset resolution and validation


def resolve_model(m: ModelConfig) -> None:
    """Fill every None architecture field from the preset (in place)."""
    if m.preset not in PRESETS:
        raise ConfigError(f"model.preset: unknown preset {short(m.preset)}; choose one of {', '.join(PRESETS)}")
    preset = {**dict(rope_type="default", rope_factor=1.0, rope_low_freq_factor=1.0, rope_high_freq_factor=4.0,
                     rope_original_max_position=8192, tie_embeddings=False, head_dim=None,
                     scan_layers=True), **PRESETS[m.preset]}
    for name, value in preset.items():
        if getattr(m, name) is None:
            setattr(m, name, value)
    if m.head_dim is None and m.dim and m.n_heads:
        m.head_dim = m.dim // m.n_heads


def _choice(key: str, value: str, options: tuple[str, ...]) -> None:
    if value not in options:
        raise ConfigError(f"{key}: {short(value)} is not one of {', '.join(options)}")


def _positive(key: str, value: float | int) -> None:
    if value <= 0:
        raise ConfigError(f"{key}: must be positive, got {short(value)}")


def validate(cfg: Config) -> None:
    """Every check that needs no devices. Mesh sizes and shard shapes are checked by the program
    (:func:`jaxllama.program.build_program`), which knows the devices and the layout."""
    m, d, o, t = cfg.model, cfg.data, cfg.optim, cfg.train
    for name in ("vocab_size", "dim", "n_layers", "n_heads", "n_kv_heads", "head_dim", "ffn_dim",
                 "max_position", "norm_eps", "rope_theta", "rope_factor"):
        _positive(f"model.{name}", getattr(m, name))
    if m.n_heads % m.n_kv_heads:
        raise ConfigError(f"model.n_kv_heads={m.n_kv_heads} must divide model.n_heads={m.n_heads}")
    _choice("model.rope_type", m.rope_type, ROPE_TYPES)
    _choice("model.dtype", m.dtype, ("auto",) + DTYPES)
    _choice("model.param_dtype", m.param_dtype, DTYPES)
    _choice("model.attention", m.attention, ATTENTION_IMPLS)
    _choice("model.remat", m.remat, REMAT_POLICIES)
    _positive("data.seq_len", d.seq_len)
    if m.attention == "cudnn" and m.dtype not in ("auto", "bfloat16", "float16"):
        raise ConfigError(f"model.attention=cudnn needs model.dtype bfloat16 or float16 (cuDNN flash attention "
                          f"takes half precision), got {m.dtype}; use model.attention=auto or dot_product")
    if m.attention == "splash" and d.seq_len % 128:
        raise ConfigError(f"data.seq_len={d.seq_len}: model.attention=splash needs a multiple of 128")
    _positive("data.global_batch", d.global_batch)
    if d.seq_len > m.max_position:
        raise ConfigError(f"data.seq_len={d.seq_len} exceeds the model's positions (model.max_position={m.max_position})")
    _choice("data.format", d.format, DATA_FORMATS)
    _choice("data.packing", d.packing, PACKING_MODES)
    _choice("data.loss_on", d.loss_on, LOSS_ON)
    _choice("data.chat_template", d.chat_template, ("auto", "jinja", "llama3", "llama2"))
    _choice("data.truncate", d.truncate, TRUNCATE_MODES)
    if d.format in CHAT_FORMATS:
        for key, src in (("data.source", d.source), ("data.eval_source", d.eval_source)):
            if src is not None and (src in ("stdlib", "synthetic") or src.startswith("tfds:")):
                raise ConfigError(f"{key}={src}: data.format={d.format} reads JSONL files; give a file glob "
                                  f"(e.g. {key}=chat.jsonl)")
    if d.shuffle_buffer < 1 or d.prefetch < 0:
        raise ConfigError("data.shuffle_buffer must be >= 1 and data.prefetch >= 0")
    if not 0 <= d.eval_fraction < 1:
        raise ConfigError(f"data.eval_fraction: must be in [0, 1), got {d.eval_fraction}")
    for name in ("lr", "eps"):
        _positive(f"optim.{name}", getattr(o, name))
    for name in ("b1", "b2"):
        if not 0 <= getattr(o, name) < 1:
            raise ConfigError(f"optim.{name}: must be in [0, 1), got {getattr(o, name)}")
    for name in ("weight_decay", "clip_norm", "warmup_steps"):
        if getattr(o, name) < 0:
            raise ConfigError(f"optim.{name}: must be >= 0, got {getattr(o, name)}")
    if not 0 <= o.min_lr_ratio <= 1:
        raise ConfigError(f"optim.min_lr_ratio: must be in [0, 1], got {o.min_lr_ratio}")
    if not 0 < o.decay_fraction <= 1:
        raise ConfigError(f"optim.decay_fraction: must be in (0, 1], got {o.decay_fraction}")
    _choice("optim.schedule", o.schedule, SCHEDULES)
    if t.init_from and "://" not in t.init_from and not exists(t.init_from):
        raise ConfigError(f"train.init_from: {cut(t.init_from)}: no such file or folder")
    if not 0 <= t.seed < 2**32:  # JAX keys take 32 bits (a larger seed is silently truncated); NumPy refuses < 0
        raise ConfigError(f"train.seed: must be in [0, 2^32), got {t.seed}")
    if cfg.run_dir is not None and not cfg.run_dir.strip():  # Path("") is the current folder
        raise ConfigError("run_dir: empty; name a folder (or leave it unset for runs/<timestamp>)")
    _positive("data.max_record_bytes", d.max_record_bytes)
    if t.eval_every < 0 or t.eval_batches < 0:
        raise ConfigError("train.eval_every and train.eval_batches must be >= 0")
    for name in ("steps", "log_every", "grad_accum", "max_nonfinite"):
        _positive(f"train.{name}", getattr(t, name))
    if t.loss_chunk < 0 or t.z_loss < 0:
        raise ConfigError("train.loss_chunk and train.z_loss must be >= 0")
    if t.peak_flops is not None:
        _positive("train.peak_flops", t.peak_flops)
    if d.global_batch % t.grad_accum:
        raise ConfigError(f"data.global_batch={d.global_batch} must be divisible by train.grad_accum={t.grad_accum}")
    _validate_lora(t.lora)
    _validate_objective(cfg)
    _validate_mesh_shape(cfg.mesh)
    for name in ("every", "keep_every"):
        if getattr(cfg.checkpoint, name) < 0:
            raise ConfigError(f"checkpoint.{name}: must be >= 0, got {getattr(cfg.checkpoint, name)}")
    _positive("checkpoint.keep", cfg.checkpoint.keep)


def _validate_objective(cfg: Config) -> None:
    t, d, p = cfg.train, cfg.data, cfg.train.dpo
    _choice("train.objective", t.objective, OBJECTIVES)
    _choice("train.dpo.loss", p.loss, DPO_LOSSES)
    _choice("train.dpo.reference", p.reference, DPO_REFERENCES)
    _positive("train.dpo.beta", p.beta)
    _positive("data.pairs_per_row", d.pairs_per_row)
    if not 0 <= p.label_smoothing < 0.5:
        raise ConfigError(f"train.dpo.label_smoothing: must be in [0, 0.5), got {p.label_smoothing}")
    if t.objective != "lm" and d.format != "preference":
        raise ConfigError(f"train.objective={t.objective} with data.format={d.format}: preference objectives "
                          "(dpo, simpo, orpo) train on data.format=preference")
    if t.objective == "orpo" and p.label_smoothing:
        raise ConfigError("train.dpo.label_smoothing: ORPO has none (it applies to dpo sigmoid/robust and simpo)")
    if t.objective != "dpo":
        return
    if d.packing != "pack":
        raise ConfigError("data.packing=concat: preference pairs are packed whole (data.packing=pack)")
    if p.reference == "base" and not t.lora.rank:
        raise ConfigError("train.dpo.reference=base is the frozen base seen without the adapters: it needs LoRA "
                          "(train.lora.rank); without it use train.dpo.reference=separate")
    mode = reference_mode(cfg)
    if (mode == "separate" or (mode == "cached" and not t.lora.rank)) and not (p.reference_path or t.init_from):
        raise ConfigError(f"train.dpo.reference={mode} needs the reference's weights: set train.dpo.reference_path "
                          "(or train.init_from, which it defaults to)")
    if p.reference_path and "://" not in p.reference_path and not exists(p.reference_path):
        raise ConfigError(f"train.dpo.reference_path: {cut(p.reference_path)}: no such file or folder")


def reference_mode(cfg: Config) -> str:
    """How a DPO run gets its reference: ``base`` (LoRA's frozen base, no second copy), ``separate``, or
    ``cached`` (log-probabilities computed once before training, from the base with LoRA and no
    ``train.dpo.reference_path``, else from that path or ``train.init_from``)."""
    ref = cfg.train.dpo.reference
    return ("base" if cfg.train.lora.rank else "separate") if ref == "auto" else ref


def reference_weights(cfg: Config) -> tuple[str, str]:
    """(path, the setting that names it) of a DPO reference read from disk: ``train.dpo.reference_path``,
    default ``train.init_from``."""
    t = cfg.train
    return (t.dpo.reference_path, "train.dpo.reference_path") if t.dpo.reference_path else \
        (t.init_from, "train.init_from")


def _validate_lora(lora: LoraConfig) -> None:
    if lora.rank < 0:
        raise ConfigError(f"train.lora.rank: must be >= 0 (0: no adapters), got {lora.rank}")
    if not lora.rank:
        if lora.quantize != "none":
            raise ConfigError(f"train.lora.quantize={lora.quantize}: a quantized base is frozen, so it needs LoRA "
                              "adapters to train (set train.lora.rank)")
        return
    _positive("train.lora.alpha", lora.alpha)
    _choice("train.lora.quantize", lora.quantize, ("none", "int8", "int4"))
    _positive("train.lora.group_size", lora.group_size)
    if not 0 <= lora.dropout < 1:
        raise ConfigError(f"train.lora.dropout: must be in [0, 1), got {lora.dropout}")
    targets = [lora.targets] if isinstance(lora.targets, str) else lora.targets
    if not targets:
        raise ConfigError(f"train.lora.targets: empty; name some of {', '.join(LORA_TARGETS)}")
    for name in targets:
        if name not in LORA_TARGETS:
            close = difflib.get_close_matches(cut(str(name)), LORA_TARGETS, n=1)
            hint = f" (did you mean {close[0]}?)" if close else ""
            raise ConfigError(f"train.lora.targets: {short(name)} matches no linear layer of the blocks{hint}; "
                              f"they are {', '.join(LORA_TARGETS)}")
    lora.targets = list(dict.fromkeys(targets))


def _validate_mesh_shape(mesh: MeshConfig) -> None:
    sizes = {k: getattr(mesh, k) for k in AXES}
    for k, v in sizes.items():
        if v == 0 or v < -1:
            raise ConfigError(f"mesh.{k}: must be a positive size or -1 (fill), got {v}")
    if sum(v == -1 for v in sizes.values()) > 1:
        raise ConfigError(f"mesh: at most one of data, fsdp, tensor may be -1, got {sizes}")
    for k in AXES:
        _positive(f"mesh.dcn_{k}", getattr(mesh, f"dcn_{k}"))
    validate_rules(mesh.rules, "mesh.rules")


_UNITS = {"": 1, "b": 1, "kb": 10**3, "mb": 10**6, "gb": 10**9, "tb": 10**12,
          "kib": 2**10, "mib": 2**20, "gib": 2**30, "tib": 2**40, "k": 2**10, "m": 2**20, "g": 2**30, "t": 2**40}


def parse_size(text: str, key: str) -> int:
    """Sizes everywhere (``--device-memory``, ``--shard-size``): ``"80GB"`` -> 80e9 bytes, ``"80GiB"`` and
    ``"80G"`` -> 80 * 2^30, ``"1.5e9"`` -> bytes.

    SI units are decimal (an "80GB" H100 reads as 74.5 GiB, the conservative side of its 79.6 GiB
    usable); write GiB (or G) for binary.
    """
    m = re.fullmatch(r"\s*([0-9]*\.?[0-9]+(?:[eE][+-]?[0-9]+)?)\s*([A-Za-z]*)\s*", str(text)[:100])
    unit = m.group(2).lower() if m else None
    if not m or unit not in _UNITS:
        raise ConfigError(f"{key}: {short(text)} is not a size; write e.g. 80GB, 95GiB, 16G or a number of bytes")
    value = float(m.group(1)) * _UNITS[unit]
    if not 0 < value < float("inf"):
        raise ConfigError(f"{key}: must be positive and finite, got {short(text)}")
    return int(value)
