"""Study files: TOML read with ``tomllib`` and validated into dataclasses before any training.

Every error names the file, the table, the key and the bad value. ``--set budget.epochs=2`` style
overrides are applied to the parsed tables before validation, so they are checked the same way.
"""

import tomllib
from dataclasses import MISSING, dataclass, field, fields
from pathlib import Path
from typing import Any

from microsearch.compression import ACT_BITS, FILTER_PRUNERS, WEIGHT_BITS
from microsearch.evaluation.data import DataConfig
from microsearch.evaluation.score import RULES
from microsearch.evaluation.train import COMPILE, PRECISIONS, RECIPES, resolve_device, resolve_precision
from microsearch.models import BLOCKS, STEMS, create_model

GRANULARITIES = ("stage", "block")
STRUCTURED = (*FILTER_PRUNERS, "none")
UNSTRUCTURED = ("layer", "none")


class StudyError(ValueError):
    """A study file or override is wrong; the message names the key and the value."""


def _range(name: str, value: tuple, low: float, high: float) -> None:
    numbers = all(isinstance(v, int | float) and not isinstance(v, bool) for v in value)
    if len(value) != 2 or not numbers or not low <= value[0] <= value[1] <= high:
        raise ValueError(f"{name} must be [low, high] with {low} <= low <= high <= {high}, got {list(value)}")


@dataclass
class SpaceConfig:
    """Bounds of what each trial samples; ranges are [low, high], inclusive."""

    width: tuple[int, int] = (8, 32)  # stem / first-stage channels (log scale)
    depth: tuple[int, int] = (1, 3)  # residual blocks per stage
    multipliers: tuple[int, ...] = (1, 2, 4)  # stage widths relative to the first
    blocks: tuple[str, ...] = ("basic", "dwsep")  # block types to choose from
    stems: tuple[str, ...] = ("conv",)  # stems to choose from: conv (full resolution), stride2, s2d
    expansion: tuple[int, int] = (2, 6)  # inner channels / block width of an mbconv block
    stage_scale: tuple[float, float] = (1.0, 1.0)  # per-stage factor on the multipliers (searched if low < high)
    granularity: str = "stage"  # one pruning ratio and bit-width pair per "stage" or per "block"
    structured: tuple[float, float] = (0.0, 0.5)  # fraction of inner filters removed
    unstructured: tuple[float, float] = (0.0, 0.8)  # fraction of conv/linear weights zeroed
    weight_bits: tuple[int, int] = (2, 8)
    act_bits: tuple[int, int] = (4, 8)
    first_last_bits: int = 8  # stem convolution and classifier
    lr: tuple[float, float] = (0.05, 0.4)  # peak learning rate (log scale)
    weight_decay: tuple[float, float] = (1e-4, 1e-3)  # (log scale)
    cutout: tuple[int, int] = (0, 12)  # cutout square side in pixels
    mixup: tuple[float, float] = (0.0, 0.4)
    label_smoothing: tuple[float, float] = (0.0, 0.2)

    def __post_init__(self) -> None:
        _range("width", self.width, 1, 1024)
        _range("depth", self.depth, 1, 32)
        _range("structured", self.structured, 0, 0.95)
        _range("unstructured", self.unstructured, 0, 0.99)
        _range("weight_bits", self.weight_bits, min(WEIGHT_BITS), 8)  # the integer quantizers
        _range("act_bits", self.act_bits, min(ACT_BITS), 8)
        _range("lr", self.lr, 1e-5, 10)
        _range("weight_decay", self.weight_decay, 1e-7, 0.1)
        _range("cutout", self.cutout, 0, 32)
        _range("expansion", self.expansion, 1, 16)
        _range("stage_scale", self.stage_scale, 0.1, 8)
        _range("mixup", self.mixup, 0, 2)
        _range("label_smoothing", self.label_smoothing, 0, 0.5)
        if self.granularity not in GRANULARITIES:
            raise ValueError(f"granularity must be one of {GRANULARITIES}, got {self.granularity!r}")
        bad = [b for b in self.blocks if b not in BLOCKS]
        if bad or not self.blocks:
            raise ValueError(f"blocks must be a non-empty list of {sorted(BLOCKS)}, got {list(self.blocks)}")
        if not self.multipliers or min(self.multipliers) <= 0:
            raise ValueError(f"multipliers must be > 0, got {list(self.multipliers)}")
        bad = [s for s in self.stems if s not in STEMS]
        if bad or not self.stems:
            raise ValueError(f"stems must be a non-empty list of {sorted(STEMS)}, got {list(self.stems)}")
        if self.first_last_bits not in ACT_BITS:
            raise ValueError(f"first_last_bits must be one of {ACT_BITS}, got {self.first_last_bits}")


@dataclass
class BudgetConfig:
    epochs: int = 10  # training epochs per trial, before compression
    finetune_epochs: int = 2  # retraining epochs after pruning
    finetune_lr: float = 0.02  # peak learning rate of that retraining
    trials: int = 50  # trials per worker
    timeout: float | None = None  # seconds per worker; None: no limit
    batch_size: int | None = None  # None: the recipe's (baseline 256, fast 128)
    tta: bool = False  # flip test-time augmentation (its second pass is scored)
    recipe: str = "baseline"  # training recipe, a name in microsearch.evaluation.train.RECIPES

    def __post_init__(self) -> None:
        if self.recipe not in RECIPES:
            raise ValueError(f"recipe must be one of {list(RECIPES)}, got {self.recipe!r}")
        for name in ("epochs", "trials"):
            if getattr(self, name) < 1:
                raise ValueError(f"{name} must be >= 1, got {getattr(self, name)}")
        b = self.batch_size
        if b is not None and (not isinstance(b, int) or isinstance(b, bool) or b < 1):
            raise ValueError(f"batch_size must be an integer >= 1 (or absent: the recipe's), got {b!r}")
        if self.finetune_epochs < 0:
            raise ValueError(f"finetune_epochs must be >= 0, got {self.finetune_epochs}")
        if self.finetune_lr <= 0:
            raise ValueError(f"finetune_lr must be > 0, got {self.finetune_lr}")
        if self.timeout is not None and (not isinstance(self.timeout, int | float) or self.timeout <= 0):
            raise ValueError(f"timeout must be > 0 seconds, got {self.timeout}")


@dataclass
class RetrainConfig:
    """The final model's budget: the best trials are retrained longer than a trial trains."""

    epochs: int = 0  # training epochs before compression; 0: a trial's ([budget] epochs)
    finetune_epochs: int = 0  # after pruning; 0: a trial's
    recipe: str = ""  # a name in RECIPES; "": a trial's
    lr: float = 0.0  # peak learning rate; 0: a trial's (a long quantized run may need a lower one)
    top: int = 3  # lowest-score trials (at trial_target) retrained as final candidates

    def __post_init__(self) -> None:
        if self.recipe and self.recipe not in RECIPES:
            raise ValueError(f"recipe must be one of {list(RECIPES)} or empty, got {self.recipe!r}")
        if min(self.epochs, self.finetune_epochs, self.lr) < 0 or self.top < 1:
            raise ValueError(f"need epochs, finetune_epochs, lr >= 0 and top >= 1, got {self}")


@dataclass
class DistillConfig:
    """Knowledge distillation from a float teacher: one trained once per study and data, then
    cached, or a saved model trained on the study's training split."""

    teacher: str = ""  # a registered model name, e.g. "resnet56"; "": no distillation
    teacher_file: str = ""  # or a saved model (`microsearch train ... --out DIR`: DIR/model.pt)
    # or several saved models that teach together: the mean of their logits (an ensemble of other
    # networks is a stronger teacher than any of them)
    teacher_files: tuple[str, ...] = ()
    teacher_args: dict = field(default_factory=dict)  # its config overrides, e.g. {width = 32}
    teacher_epochs: int = 30
    teacher_recipe: str = "fast"
    teacher_lr: float = 0.2
    weight: tuple[float, float] = (0.9, 0.9)  # of the distillation loss (searched if low < high)
    temperature: tuple[float, float] = (4.0, 4.0)  # (searched if low < high)
    tta: bool = False  # soft labels from the teacher's mean logits on the image and its mirror
    # Candidates whose float network has exactly the layers of the start model (init_file, else the
    # teacher) start from its trained weights (quantization-aware fine-tuning, no float warm-up);
    # the others train from scratch.
    init: bool = False
    # A saved float model to start from instead of the teacher, e.g. the candidates' own float
    # network while a stronger model of other layers teaches (LSQ's start, distillation's teacher).
    init_file: str = ""

    def __post_init__(self) -> None:
        if not isinstance(self.teacher_args, dict):
            raise ValueError(f"teacher_args must be a table, got {self.teacher_args!r}")
        given = [key for key in ("teacher", "teacher_file", "teacher_files") if getattr(self, key)]
        if len(given) > 1:
            raise ValueError(
                "give one of teacher (a model to train once), teacher_file (a saved model) or teacher_files "
                f"(saved models that teach together), not {' and '.join(given)}"
            )
        if self.tta and not self.enabled:
            raise ValueError("tta = true averages the teacher over the mirror: give a teacher")
        if self.init and not (self.enabled or self.init_file):
            raise ValueError(
                "init = true starts candidates from trained weights: give init_file, teacher or teacher_file"
            )
        if self.init and self.teacher_files and not self.init_file:
            raise ValueError("init = true with teacher_files: give init_file, the model candidates start from")
        if self.init_file and not self.init:
            raise ValueError("init_file is the model candidates start from: set init = true")
        if not all(isinstance(f, str) and f for f in self.teacher_files):
            raise ValueError(f"teacher_files must be a list of model file paths, got {list(self.teacher_files)}")
        for key, file in [("teacher_file", self.teacher_file), ("init_file", self.init_file)] + [
            ("teacher_files", f) for f in self.teacher_files
        ]:
            if file and not Path(file).expanduser().is_file():
                raise ValueError(f"{key}: no model file at {file}")
        if self.teacher:
            create_model(self.teacher, **self.teacher_args)  # names a wrong model or argument now
        if self.teacher_recipe not in RECIPES:
            raise ValueError(f"teacher_recipe must be one of {list(RECIPES)}, got {self.teacher_recipe!r}")
        if self.teacher_epochs < 1 or self.teacher_lr <= 0:
            raise ValueError(
                f"need teacher_epochs >= 1 and teacher_lr > 0, got {self.teacher_epochs}, {self.teacher_lr}"
            )
        _range("weight", self.weight, 0, 1)
        _range("temperature", self.temperature, 0.1, 100)

    @property
    def enabled(self) -> bool:
        return bool(self.teacher or self.saved_teachers)

    @property
    def saved_teachers(self) -> list[str]:
        """The saved models that teach (their mean logits); empty when the teacher is trained here."""
        return [self.teacher_file] if self.teacher_file else list(self.teacher_files)


@dataclass
class CompressionConfig:
    structured: str = "li"  # filter pruning method: li | thinet | none
    unstructured: str = "layer"  # magnitude pruning with the sampled per-layer ratios, or none

    def __post_init__(self) -> None:
        if self.structured not in STRUCTURED:
            raise ValueError(f"structured must be one of {STRUCTURED}, got {self.structured!r}")
        if self.unstructured not in UNSTRUCTURED:
            raise ValueError(f"unstructured must be one of {UNSTRUCTURED}, got {self.unstructured!r}")


@dataclass
class PrunerConfig:
    """Stop a trial whose validation accuracy at epoch k is below what every feasible trial had at
    k, each feasible curve scaled to end at the target (see ``search/pruner.py``)."""

    warmup_epochs: int = 2  # never stop at or before this epoch
    margin: float = 0.05  # accuracy below that floor that is still tolerated
    min_feasible: int = 1  # feasible trials needed before anything is stopped

    def __post_init__(self) -> None:
        if self.warmup_epochs < 0 or self.min_feasible < 1 or not 0 <= self.margin < 1:
            raise ValueError(
                f"need warmup_epochs >= 0, min_feasible >= 1, 0 <= margin < 1; got "
                f"{self.warmup_epochs}, {self.min_feasible}, {self.margin}"
            )


@dataclass
class StudyConfig:
    name: str
    path: Path  # the study file; relative storage paths are resolved beside it
    target: float = 0.90  # validation accuracy the final (retrained) model must reach
    trial_target: float | None = None  # what a trial must reach at the trial budget; None: target
    rule: str = "lab4"
    storage: str | None = None  # None: sqlite:///<study folder>/<name>.db
    artifacts: str | None = None  # folder for trial model files; None: <study folder>/<name>-artifacts
    seed: int = 0  # data split and training seed (samplers draw a fresh seed per process)
    device: str = "auto"
    precision: str = "auto"  # auto | bf16 | fp32: how this worker trains (not part of the definition)
    compile: str = "auto"  # auto | on | off: torch.compile of the training step
    heartbeat: int = 60  # seconds between heartbeats (RDB storages)
    grace: int = 180  # seconds without a heartbeat before a trial is failed and retried
    data: DataConfig = field(default_factory=DataConfig)
    budget: BudgetConfig = field(default_factory=BudgetConfig)
    space: SpaceConfig = field(default_factory=SpaceConfig)
    compression: CompressionConfig = field(default_factory=CompressionConfig)
    pruner: PrunerConfig = field(default_factory=PrunerConfig)
    retrain: RetrainConfig = field(default_factory=RetrainConfig)
    distill: DistillConfig = field(default_factory=DistillConfig)
    enqueue: list[dict[str, Any]] = field(default_factory=list)  # starting points (param values)

    def __post_init__(self) -> None:
        for name in ("storage", "artifacts"):
            if getattr(self, name) is not None and not isinstance(getattr(self, name), str):
                raise ValueError(f"{name} must be a string, got {getattr(self, name)!r}")
        if not 0 < self.target <= 1:
            raise ValueError(f"target must be in (0, 1], got {self.target}")
        if self.trial_target is None:
            self.trial_target = self.target
        if not isinstance(self.trial_target, int | float) or not 0 < self.trial_target <= 1:
            raise ValueError(f"trial_target must be in (0, 1], got {self.trial_target!r}")
        if self.rule not in RULES:
            raise ValueError(f"rule must be one of {list(RULES)}, got {self.rule!r}")
        if self.heartbeat < 1 or self.grace <= self.heartbeat:
            raise ValueError(f"need heartbeat >= 1 and grace > heartbeat, got {self.heartbeat}, {self.grace}")
        if self.precision not in PRECISIONS:
            raise ValueError(f"precision must be one of {PRECISIONS}, got {self.precision!r}")
        if self.compile not in COMPILE:
            raise ValueError(f"compile must be one of {COMPILE}, got {self.compile!r}")
        resolve_precision(self.precision, resolve_device(self.device))

    @property
    def artifacts_dir(self) -> Path:
        return Path(self.artifacts).expanduser() if self.artifacts else self.path.parent / f"{self.name}-artifacts"

    @property
    def storage_url(self) -> str:
        """The storage URL; by default an SQLite file beside the study file."""
        if self.storage is None:
            return f"sqlite:///{(self.path.parent / f'{self.name}.db').resolve()}"
        return self.storage


_SECTIONS = {
    "data": DataConfig,
    "budget": BudgetConfig,
    "space": SpaceConfig,
    "compression": CompressionConfig,
    "pruner": PrunerConfig,
    "retrain": RetrainConfig,
    "distill": DistillConfig,
}


def _check_type(where: str, default: Any, value: Any) -> Any:
    """Match ``value`` against the type of the field's default; lists become tuples."""
    if isinstance(default, bool):
        ok = isinstance(value, bool)
    elif isinstance(default, int) and not isinstance(default, bool):
        ok = isinstance(value, int) and not isinstance(value, bool)
    elif isinstance(default, float):
        ok = isinstance(value, int | float) and not isinstance(value, bool)
    elif isinstance(default, str):
        ok = isinstance(value, str)
    elif isinstance(default, tuple):
        ok = isinstance(value, list | tuple)
        value = tuple(value) if ok else value
    else:
        ok = True
    if not ok:
        raise StudyError(f"{where} = {value!r} has the wrong type (expected like {default!r})")
    return value


def _build(cls: type, table: dict[str, Any], where: str, **extra: Any):
    if not isinstance(table, dict):
        raise StudyError(f"{where} must be a table, got {table!r}")
    known = {f.name: f for f in fields(cls)}
    for key in table:
        if key not in known or key in extra:
            raise StudyError(f"unknown key {where}.{key}; known keys: {', '.join(sorted(set(known) - set(extra)))}")
    values = {}
    for key, value in table.items():
        f = known[key]
        default = None if f.default is MISSING else f.default
        values[key] = _check_type(f"{where}.{key}", default, value)
    try:
        return cls(**values, **extra)
    except (ValueError, TypeError) as e:
        raise StudyError(f"{where}: {e}") from None


def _apply_override(tables: dict[str, Any], assignment: str) -> None:
    key, sep, raw = assignment.partition("=")
    if not sep:
        raise StudyError(f"--set {assignment!r} is not of the form section.key=value")
    try:
        value = tomllib.loads(f"v = {raw}")["v"]
    except tomllib.TOMLDecodeError:
        value = raw  # a bare string
    section, _, name = key.rpartition(".")
    target = tables.setdefault(section, {}) if section else tables.setdefault("study", {})
    target[name] = value


def load_study(path: str | Path, overrides: list[str] = ()) -> StudyConfig:
    """Read and validate a study file, e.g. ``load_study("studies/smoke.toml", ["budget.trials=4"])``."""
    path = Path(path)
    if not path.is_file():
        raise StudyError(f"no study file at {path}")
    try:
        tables = tomllib.loads(path.read_text())
    except UnicodeDecodeError:
        raise StudyError(f"{path}: not a study file (binary, not TOML text)") from None
    except tomllib.TOMLDecodeError as e:
        raise StudyError(f"{path}: not valid TOML: {e}") from None
    for assignment in overrides:
        _apply_override(tables, assignment)
    try:
        unknown = sorted(set(tables) - {"study", "enqueue", *_SECTIONS})
        if unknown:
            raise StudyError(f"unknown table [{unknown[0]}]; known: [study], {', '.join(_SECTIONS)}, [[enqueue]]")
        study = dict(tables.get("study", {}))
        # What a study is about is never a default: no search on synthetic data by omission.
        if "target" not in study:
            raise StudyError("[study] target is missing: the validation accuracy to reach, e.g. target = 0.90")
        if "source" not in tables.get("data", {}):
            raise StudyError('[data] source is missing: the images, e.g. source = "cifar10"')
        if "name" not in study:
            study["name"] = path.stem
        sections = {name: _build(cls, tables.get(name, {}), f"[{name}]") for name, cls in _SECTIONS.items()}
        enqueue = tables.get("enqueue", [])
        if not isinstance(enqueue, list) or not all(isinstance(e, dict) for e in enqueue):
            raise StudyError("[[enqueue]] must be an array of tables of parameter values")
        return _build(StudyConfig, study, "[study]", path=path, enqueue=enqueue, **sections)
    except StudyError as e:
        raise StudyError(f"{path}: {e}") from None
