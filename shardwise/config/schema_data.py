"""Data-efficiency blocks: ``data_efficiency`` (curriculum data sampling, random-LTD token dropping) and the legacy
top-level ``curriculum_learning`` block (a sequence-length curriculum passed to the model's forward).

Key names and defaults are DeepSpeed 0.19's (``runtime/data_pipeline/constants.py``). DeepSpeed reads these blocks
as plain dicts and only looks inside when it builds the sampler or scheduler; here the keys are typed and the
requirements of each schedule are checked when the config is loaded (``data_efficiency_problems``), except the
values that name files or sampling strategies (``difficulty_type``, ``clustering_type``, index paths), which are
checked when the data sampler is built: templates keep placeholders there until a launch script fills them in.

As in DeepSpeed, the innermost ``enabled`` switch decides: ``curriculum_learning.enabled`` turns curriculum
sampling on and ``random_ltd.enabled`` turns random-LTD on, whatever the enclosing blocks' switches say.
"""

from __future__ import annotations

from typing import Annotated, Any, ClassVar, Literal

from pydantic import BeforeValidator, Field

from .errors import KIND_CONFLICT, KIND_TYPE, Problem, show
from .schema_base import AnyDict, Bool, NonNegInt, PosInt, Section, Str, _fail

SCHEDULE_TYPES = ("fixed_linear", "fixed_root", "fixed_discrete", "custom")


def _to_number(value: Any) -> Any:
    if isinstance(value, bool) or not isinstance(value, (int, float)):
        raise _fail("a number", "write a JSON number without quotes, e.g. 8")
    return value


#: an int stays an int (sequence lengths, percentiles), a float stays a float
Number = Annotated[int | float, BeforeValidator(_to_number)]
PosNumber = Annotated[int | float, BeforeValidator(_to_number), Field(gt=0)]


class CurriculumScheduleConfig(Section):
    """``schedule_config`` of a curriculum: which keys apply depends on the ``schedule_type``."""

    ds_strict: ClassVar[bool] = False

    total_curriculum_step: PosInt | None = None
    """fixed_linear / fixed_root: steps to go from min_difficulty to max_difficulty."""
    difficulty_step: PosInt | None = None
    """fixed_linear / fixed_root: every difficulty is a multiple of this (8 keeps sequence lengths Tensor-Core
    friendly)."""
    root_degree: PosNumber | None = None
    """fixed_root: degree of the root (2 = square root; 1 = linear)."""
    difficulty: list[Number] | None = None
    """fixed_discrete: the difficulties, in order."""
    max_step: list[NonNegInt] | None = None
    """fixed_discrete: the last step of each difficulty but the final one (one entry fewer than difficulty)."""


class _Schedule(Section):
    """Fields shared by a curriculum metric and the legacy block."""

    ds_strict: ClassVar[bool] = False

    min_difficulty: Number | None = None
    """Difficulty at the first step (required)."""
    max_difficulty: Number | None = None
    """Difficulty once the curriculum is over (required)."""
    schedule_type: Literal["fixed_linear", "fixed_root", "fixed_discrete", "custom"] | None = None
    """How difficulty grows with the step (required): fixed_linear, fixed_root, fixed_discrete, or custom (a
    function set with engine.set_custom_curriculum_learning_schedule)."""
    schedule_config: CurriculumScheduleConfig = Field(default_factory=CurriculumScheduleConfig)
    """Parameters of the schedule."""


class CurriculumMetricConfig(_Schedule):
    """One entry of ``curriculum_metrics``: a difficulty metric, the index files that rank samples by it, and its
    schedule. The metric named ``seqlen_truncate`` (Megatron-DeepSpeed's) cuts every batch to the difficulty."""

    index_to_sample_path: Str | None = None
    """Index file (prefix of .bin/.idx) listing sample ids per metric value (schedule_based clustering)."""
    index_to_metric_path: Str | None = None
    """Index file (prefix of .bin/.idx) with the metric value of each index_to_sample row (value difficulty)."""
    difficulty_type: Str | None = None
    """"value" (difficulty is a metric value) or "percentile" (difficulty is a percentile of the data)."""
    clustering_type: Str | None = None
    """"schedule_based" (sample only data at or below the difficulty) or "single_cluster" (sample from all data;
    the difficulty only drives batch post-processing, e.g. seqlen_truncate)."""


class CurriculumLearningConfig(Section):
    """``data_efficiency.data_sampling.curriculum_learning``: curriculum data sampling."""

    ds_strict: ClassVar[bool] = False

    enabled: Bool = False
    """Sample training data by difficulty (the engine's data loader then uses shardwise's DataSampler)."""
    data_cluster_path: Str | None = None
    """Directory for data-cluster files (DeepSpeed writes them; shardwise keeps clusters in memory)."""
    curriculum_metrics: dict[str, CurriculumMetricConfig] = Field(default_factory=dict)
    """Metric name -> its index files and schedule (required when enabled)."""


class DataSamplingConfig(Section):
    """``data_efficiency.data_sampling``."""

    ds_strict: ClassVar[bool] = False

    enabled: Bool = False
    """Data-sampling switch (DeepSpeed decides by curriculum_learning.enabled alone; so does shardwise)."""
    num_epochs: PosInt = 1000
    """Epochs of data the curriculum sampler may draw from."""
    num_workers: NonNegInt = 0
    """Data-loader worker processes of the curriculum loader."""
    pin_memory: Bool = False
    """Pin the curriculum loader's batches in host memory."""
    curriculum_learning: CurriculumLearningConfig = Field(default_factory=CurriculumLearningConfig)
    """Curriculum learning by difficulty metrics."""
    dynamic_batching: AnyDict | None = None
    """Variable batch size with LR scaling (DeepSpeed 0.19; see the support table)."""


class RandomLTDScheduleParams(Section):
    """``random_ltd_schedule.schedule_config``."""

    ds_strict: ClassVar[bool] = False

    require_steps: PosInt | None = None
    """Steps to grow the kept-token count from min_value to max_value (required)."""
    seq_per_step: PosInt | None = None
    """The kept-token count is a multiple of this (required)."""


class RandomLTDScheduleConfig(Section):
    """``random_ltd.random_ltd_schedule``: how many tokens the random-LTD layers keep at each step."""

    ds_strict: ClassVar[bool] = False

    min_value: PosInt | None = None
    """Tokens kept at the first step (required)."""
    max_value: PosInt | None = None
    """Tokens kept once the schedule is over (required)."""
    schedule_type: Literal["fixed_linear"] = "fixed_linear"
    """Only fixed_linear exists (as in DeepSpeed)."""
    schedule_config: RandomLTDScheduleParams = Field(default_factory=RandomLTDScheduleParams)
    """Schedule parameters."""


class RandomLTDConfig(Section):
    """``data_efficiency.data_routing.random_ltd``: random layerwise token dropping."""

    ds_strict: ClassVar[bool] = False

    enabled: Bool = False
    """Layers converted with convert_to_random_ltd process a random subset of the tokens."""
    total_layer_num: PosInt | None = None
    """Layers of the model (for the consumed-layer-token count; required)."""
    random_ltd_layer_num: PosInt | None = None
    """Layers that drop tokens (required; must equal the length of random_ltd_layer_id)."""
    random_ltd_layer_id: list[NonNegInt] | None = None
    """Indices of the layers that drop tokens (required)."""
    model_mask_name: Str | None = None
    """Keyword name of the attention mask in the layer's forward (null: the layer takes no mask)."""
    model_type: Literal["encoder", "decoder"] | None = None
    """"decoder" (causal mask: kept tokens use the leading block of it) or "encoder" (the mask is gathered)."""
    hidden_state_order: Literal["batch_seq_dim", "seq_batch_dim"] | None = None
    """Layout of the hidden states entering the layer (required)."""
    random_ltd_schedule: RandomLTDScheduleConfig | None = None
    """Kept-token schedule (required)."""
    layer_token_lr_schedule: AnyDict | None = None
    """Layer-token LR schedule (DeepSpeed raises NotImplementedError for it; see the support table)."""
    micro_batch_size: PosInt | None = None
    """Set by the engine from train_micro_batch_size_per_gpu (as DeepSpeed does); a value here is ignored."""
    global_batch_size: PosInt | None = None
    """Set by the engine from train_batch_size (as DeepSpeed does); a value here is ignored."""


class DataRoutingConfig(Section):
    """``data_efficiency.data_routing``."""

    ds_strict: ClassVar[bool] = False

    enabled: Bool = False
    """Data-routing switch (DeepSpeed decides by random_ltd.enabled alone; so does shardwise)."""
    random_ltd: RandomLTDConfig = Field(default_factory=RandomLTDConfig)
    """Random layerwise token dropping."""


class DataEfficiencyConfig(Section):
    """``data_efficiency``: DeepSpeed's data-efficiency library (curriculum sampling, random-LTD)."""

    ds_strict: ClassVar[bool] = False

    enabled: Bool = False
    """Library switch (DeepSpeed decides by the innermost switches; so does shardwise)."""
    seed: NonNegInt = 1234
    """Seed of the curriculum sampler's random generator (the same on every rank)."""
    data_sampling: DataSamplingConfig = Field(default_factory=DataSamplingConfig)
    """Curriculum data sampling."""
    data_routing: DataRoutingConfig = Field(default_factory=DataRoutingConfig)
    """Random-LTD token routing."""


class LegacyCurriculumConfig(_Schedule):
    """The legacy top-level ``curriculum_learning`` block: the engine passes ``curriculum_seqlen`` (the current
    difficulty) to the model's forward, which truncates its input (Megatron-DeepSpeed's GPT does)."""

    enabled: Bool = False
    """Run the legacy curriculum (DeepSpeed 0.19.8 refuses it; shardwise keeps 0.19.6's behaviour)."""
    curriculum_type: Str = "seqlen"
    """"seqlen": pass curriculum_seqlen to forward; other types only keep the schedule (engine API)."""


# -- load-time requirements (called from checks.py) -------------------------------------------------------------------
_NEEDS = {
    "fixed_linear": ("total_curriculum_step", "difficulty_step"),
    "fixed_root": ("total_curriculum_step", "difficulty_step", "root_degree"),
    "fixed_discrete": ("difficulty", "max_step"),
    "custom": (),
}


def _problem(path: str, message: str, kind: str = KIND_TYPE) -> Problem:
    return Problem(path, message, kind)


def schedule_problems(sched: _Schedule, path: str) -> list[Problem]:
    """What an enabled curriculum schedule at ``path`` lacks (DeepSpeed fails on these when it builds it)."""
    problems = []
    for key in ("min_difficulty", "max_difficulty", "schedule_type"):
        if getattr(sched, key) is None:
            problems.append(_problem(f"{path}.{key}", f"{path}.{key}: missing; the curriculum needs it. Fix: add "
                                     f"\"{key}\" (see docs/data_efficiency.md)."))
    if sched.schedule_type is None:
        return problems
    sc = sched.schedule_config
    for key in _NEEDS[sched.schedule_type]:
        if getattr(sc, key) is None:
            problems.append(_problem(f"{path}.schedule_config.{key}",
                                     f"{path}.schedule_config.{key}: missing; schedule_type "
                                     f"\"{sched.schedule_type}\" needs it. Fix: add \"{key}\" to schedule_config."))
    if sched.schedule_type == "fixed_discrete" and sc.difficulty is not None and sc.max_step is not None:
        if not sc.difficulty or len(sc.difficulty) != len(sc.max_step) + 1:
            problems.append(_problem(f"{path}.schedule_config", f"{path}.schedule_config: difficulty has "
                                     f"{len(sc.difficulty)} entries and max_step {len(sc.max_step)}; fixed_discrete "
                                     "needs one more difficulty than max_step (the last difficulty holds for every "
                                     "later step). Fix: e.g. \"difficulty\": [8, 16, 32], \"max_step\": [100, 200].",
                                     KIND_CONFLICT))
    if (sched.min_difficulty is not None and sched.max_difficulty is not None
            and sched.max_difficulty < sched.min_difficulty):
        problems.append(_problem(f"{path}.max_difficulty", f"{path}: max_difficulty {show(sched.max_difficulty)} < "
                                 f"min_difficulty {show(sched.min_difficulty)}. Fix: swap them.", KIND_CONFLICT))
    return problems


def _random_ltd_problems(ltd: RandomLTDConfig, path: str) -> list[Problem]:
    problems = []
    for key in ("total_layer_num", "random_ltd_layer_num", "random_ltd_layer_id", "model_type",
                "hidden_state_order", "random_ltd_schedule"):
        if getattr(ltd, key) is None:
            problems.append(_problem(f"{path}.{key}", f"{path}.{key}: missing; random-LTD needs it. Fix: add "
                                     f"\"{key}\" (see docs/data_efficiency.md)."))
    ids, num = ltd.random_ltd_layer_id, ltd.random_ltd_layer_num
    if ids is not None and num is not None and len(ids) != num:
        problems.append(_problem(f"{path}.random_ltd_layer_num", f"{path}.random_ltd_layer_num = {num} but "
                                 f"random_ltd_layer_id lists {len(ids)} layers. Fix: make them agree.", KIND_CONFLICT))
    sched = ltd.random_ltd_schedule
    if sched is not None:
        spath = f"{path}.random_ltd_schedule"
        for key, value in (("min_value", sched.min_value), ("max_value", sched.max_value),
                           ("schedule_config.require_steps", sched.schedule_config.require_steps),
                           ("schedule_config.seq_per_step", sched.schedule_config.seq_per_step)):
            if value is None:
                problems.append(_problem(f"{spath}.{key}", f"{spath}.{key}: missing; the random-LTD schedule needs "
                                         f"it. Fix: add it."))
        step = sched.schedule_config.seq_per_step
        if sched.min_value is not None and step is not None and sched.min_value < step:
            problems.append(_problem(f"{spath}.min_value", f"{spath}: min_value {sched.min_value} < schedule_config."
                                     f"seq_per_step {step}, so the first steps would keep 0 tokens (the kept count is "
                                     f"rounded down to a multiple of seq_per_step). Fix: set min_value >= {step}.",
                                     KIND_CONFLICT))
        if sched.min_value is not None and sched.max_value is not None and sched.max_value < sched.min_value:
            problems.append(_problem(f"{spath}.max_value", f"{spath}: max_value {sched.max_value} < min_value "
                                     f"{sched.min_value}. Fix: swap them.", KIND_CONFLICT))
    return problems


def data_efficiency_problems(de: DataEfficiencyConfig, legacy: LegacyCurriculumConfig | None) -> list[Problem]:
    """Load-time requirements of the enabled data-efficiency features (empty when consistent)."""
    problems: list[Problem] = []
    cl = de.data_sampling.curriculum_learning
    path = "data_efficiency.data_sampling.curriculum_learning"
    if cl.enabled and not cl.curriculum_metrics:
        problems.append(_problem(f"{path}.curriculum_metrics", f"{path}.curriculum_metrics: missing or empty "
                                 "while curriculum learning is enabled. Fix: add at least one metric, e.g. "
                                 "\"seqlen_truncate\" (see docs/data_efficiency.md)."))
    if cl.enabled:
        for name, metric in cl.curriculum_metrics.items():
            problems += schedule_problems(metric, f"{path}.curriculum_metrics.{name}")
    if de.data_routing.random_ltd.enabled:
        problems += _random_ltd_problems(de.data_routing.random_ltd, "data_efficiency.data_routing.random_ltd")
    if legacy is not None and legacy.enabled:
        problems += schedule_problems(legacy, "curriculum_learning")
    return problems
