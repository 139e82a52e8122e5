"""What a compression pass is: a named class with a validated config whose ``run``
returns a ``PassReport`` (one row of the compile report).

A pass implements ``apply`` (calibration -> decision -> rewrite); ``run`` wraps it
with the parts every pass shares: counting parameters, weight bytes and MACs before
and after, and measuring on the verification batches how far the outputs moved from
the previous stage. That measured error is what the pass reports, and the pass
manager (``onnxpress.pipeline.Pipeline``) checks the saved model against it.
"""

from __future__ import annotations

import abc
import dataclasses
import time
import types
import typing
from dataclasses import dataclass, field
from typing import Any, ClassVar

import onnx_ir as ir

from onnxpress.errors import OnnxpressError
from onnxpress.model_io import model_nbytes

if typing.TYPE_CHECKING:
    from onnxpress.pipeline import CompileContext


@dataclass
class PassConfig:
    """Base for pass configs. Fields are type-checked from their annotations when
    built from a dict (recipes, command line); subclasses add range checks in
    ``validate`` and call ``self.fail`` with a message that says what to use."""

    pass_name: ClassVar[str] = "pass"

    def __post_init__(self) -> None:
        self.validate()

    def validate(self) -> None:
        """Range and consistency checks; override in subclasses."""

    def fail(self, field_name: str, problem: str) -> typing.NoReturn:
        raise OnnxpressError(f"{self.pass_name}: '{field_name}' {problem}")

    @classmethod
    def from_dict(cls, values: dict[str, Any] | None) -> PassConfig:
        values = dict(values or {})
        hints = typing.get_type_hints(cls)
        known = {f.name for f in dataclasses.fields(cls) if f.init}
        unknown = sorted(set(values) - known)
        if unknown:
            raise OnnxpressError(
                f"{cls.pass_name}: unknown setting {unknown[0]!r}; valid settings: {', '.join(sorted(known)) or 'none'}"
            )
        return cls(**{k: _coerce(cls.pass_name, k, v, hints[k]) for k, v in values.items()})

    def to_dict(self) -> dict[str, Any]:
        return dataclasses.asdict(self)


def _coerce(pass_name: str, key: str, value: Any, annotation: Any) -> Any:
    """Check ``value`` against a field annotation, converting the harmless cases
    (int for float, a single string for a list of strings, numeric strings from the CLI)."""

    def bad(expected: str) -> typing.NoReturn:
        raise OnnxpressError(f"{pass_name}: '{key}' must be {expected}, got {value!r}")

    origin = typing.get_origin(annotation)
    if origin in (typing.Union, types.UnionType):
        options = typing.get_args(annotation)
        if value is None and type(None) in options:
            return None
        for option in options:
            if option is type(None):
                continue
            try:
                return _coerce(pass_name, key, value, option)
            except OnnxpressError:
                continue
        bad(" or ".join(_describe(o) for o in options))
    if origin is typing.Literal:
        choices = typing.get_args(annotation)
        if value not in choices:
            bad("one of " + ", ".join(repr(c) for c in choices))
        return value
    if origin in (list, tuple):
        (item_type, *_) = typing.get_args(annotation) or (Any,)
        if isinstance(value, str):
            value = [v for v in value.replace("|", ",").split(",") if v]
        if not isinstance(value, list | tuple):
            bad(f"a list of {_describe(item_type)}")
        return origin(_coerce(pass_name, key, v, item_type) for v in value)
    if annotation is bool:
        if isinstance(value, str) and value.lower() in ("true", "false", "1", "0", "yes", "no"):
            return value.lower() in ("true", "1", "yes")
        if not isinstance(value, bool):
            bad("true or false")
        return value
    if annotation in (int, float):
        expected = "an integer" if annotation is int else "a number"
        if isinstance(value, str):
            try:
                value = annotation(value)
            except ValueError:
                bad(expected)
        if isinstance(value, bool) or not isinstance(value, int if annotation is int else int | float):
            bad(expected)
        return annotation(value)
    if annotation is str:
        if not isinstance(value, str):
            bad("a string")
        return value
    return value


_PLAIN_NAMES = {int: "an integer", float: "a number", bool: "true or false", str: "a string", type(None): "null"}


def _describe(annotation: Any) -> str:
    if typing.get_origin(annotation) is typing.Literal:
        return "one of " + ", ".join(repr(c) for c in typing.get_args(annotation))
    if typing.get_origin(annotation) in (list, tuple):
        return "a list"
    return _PLAIN_NAMES.get(annotation, getattr(annotation, "__name__", str(annotation)))


@dataclass
class PassReport:
    """One row of the compile report: what one pass changed and what it cost.

    Two kinds of numbers, measured on the verification samples:

    - ``error`` / ``measured_error`` / ``vs_previous``: how far the raw outputs moved from
      the previous stage (relative L2 error, max |error|, row cosines). ``error`` is what the
      pass reports; the pass manager re-measures the saved model (``measured_error``) and
      refuses the stage when it is further off than reported.
    - ``vs_input``: end-to-end fidelity of the model after this pass against the compile's
      input model, in the model's own terms (``onnxpress.fidelity.TaskFidelity``: embedding
      cosine for encoders, perplexity change for decoders). A pass that changed nothing
      carries the previous stage's.
    """

    name: str
    modified: bool
    changes: dict[str, int] = field(default_factory=dict)
    params_before: int = 0
    params_after: int = 0
    macs_before: int = 0
    macs_after: int = 0
    weight_bytes_before: int = 0  # initializers, as stored
    weight_bytes_after: int = 0
    error: float = 0.0  # relative L2 error vs the previous stage, as the pass reports it
    measured_error: float | None = None  # the same, re-measured by the pass manager on the saved model
    vs_previous: dict[str, float] = field(default_factory=dict)
    vs_input: dict[str, Any] = field(default_factory=dict)
    vs_unseen: dict[str, Any] = field(default_factory=dict)  # the same on a domain the calibration never saw
    seconds: float = 0.0
    peak_rss_mb: float | None = None  # the process's peak memory during the pass and its verification
    details: dict[str, Any] = field(default_factory=dict)
    config: dict[str, Any] = field(default_factory=dict)

    def to_dict(self) -> dict[str, Any]:
        return dataclasses.asdict(self)


@dataclass
class Outcome:
    """What ``Pass.apply`` returns: counts of what changed and free-form details."""

    changes: dict[str, int] = field(default_factory=dict)
    details: dict[str, Any] = field(default_factory=dict)

    @property
    def modified(self) -> bool:
        return any(self.changes.values())


class Pass(abc.ABC):
    """A compression pass. Subclasses set ``name`` and ``config_class`` and implement ``apply``."""

    name: ClassVar[str]
    config_class: ClassVar[type[PassConfig]] = PassConfig
    lossless: ClassVar[bool] = False  # exact rewrites: verified to a tight tolerance
    needs_attention: ClassVar[bool] = False  # cannot apply to a model with no recognisable attention
    needs_calibration: ClassVar[bool] = False  # needs real calibration data, not synthetic tokens
    needs_original: ClassVar[bool] = False  # reads the compile's input model (ctx.original)
    # leaves a graph of branches picked by the input (prefill_path), which no other pass may follow
    splits_graph: ClassVar[bool] = False
    # memory the pass and its verification need beyond the model already held, in multiples of the
    # model's weight bytes in memory (for the warning before a pass that would not fit): by default
    # the verification's ONNX Runtime session, which loads one more copy of the weights
    memory_multiple: ClassVar[float] = 1.0
    # the same for the weights still read from the input's external data file, which every session
    # maps from that file: only what the pass makes of them takes memory (by default new weights
    # of the same size; passes that only rewire the graph: none)
    mapped_memory_multiple: ClassVar[float] = 1.0

    def working_memory(self, model: ir.Model) -> int:
        """Bytes the pass needs besides those multiples of the weights (a training batch's
        activations, for one): 0 unless a pass says otherwise."""
        return 0

    def __init__(self, config: PassConfig | dict[str, Any] | None = None):
        if config is None or isinstance(config, dict):
            config = self.config_class.from_dict(config)
        if not isinstance(config, self.config_class):
            raise TypeError(f"{self.name} expects a {self.config_class.__name__}, got {type(config).__name__}")
        self.config = config

    @abc.abstractmethod
    def apply(self, model: ir.Model, ctx: CompileContext) -> Outcome:
        """Calibrate, decide and rewrite ``model`` in place."""

    def run(self, model: ir.Model, ctx: CompileContext) -> PassReport:
        from onnxpress.analysis import count_macs, count_params

        start = time.perf_counter()
        params_before, macs_before, bytes_before = count_params(model), count_macs(model), model_nbytes(model)
        outcome = self.apply(model, ctx)
        if outcome.modified:
            ctx.forget_analysis()
        fidelity = ctx.measure_stage(model, self.name) if outcome.modified else None
        return PassReport(
            name=self.name,
            modified=outcome.modified,
            changes=outcome.changes,
            params_before=params_before,
            params_after=count_params(model),
            macs_before=macs_before,
            macs_after=count_macs(model),
            weight_bytes_before=bytes_before,
            weight_bytes_after=model_nbytes(model),
            error=fidelity.rel_l2 if fidelity else 0.0,
            vs_previous=fidelity.to_dict() if fidelity else {},
            seconds=time.perf_counter() - start,
            details=outcome.details,
            config=self.config.to_dict(),
        )


_REGISTRY: dict[str, type[Pass]] = {}


def register_pass(cls: type[Pass]) -> type[Pass]:
    """Class decorator: make a pass available by name to recipes and the CLI."""
    if cls.name in _REGISTRY and _REGISTRY[cls.name] is not cls:
        raise ValueError(f"two passes named {cls.name!r}")
    if cls.config_class is PassConfig:  # a pass without settings still gets its own config class
        cls.config_class = dataclasses.make_dataclass(f"{cls.__name__}Config", [], bases=(PassConfig,))
    cls.config_class.pass_name = cls.name
    _REGISTRY[cls.name] = cls
    return cls


def available_passes() -> dict[str, type[Pass]]:
    import onnxpress.passes  # noqa: F401  (registers the built-in passes)

    return dict(sorted(_REGISTRY.items()))


def get_pass(name: str) -> type[Pass]:
    passes = available_passes()
    if name not in passes:
        raise OnnxpressError(f"unknown pass {name!r}; available passes: {', '.join(passes)}")
    return passes[name]


def build_pass(name: str, settings: dict[str, Any] | None = None) -> Pass:
    return get_pass(name)(settings or {})
