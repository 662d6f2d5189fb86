"""`QuantPlan`: which precision, method and block size each weight group (TensorId) gets.

A plan is an ordered list of rules, TensorId glob pattern → `QuantSpec`, plus a default; the
first rule whose pattern matches a TensorId's canonical string wins (as llama.cpp's
`--tensor-type` and ModelOpt's wildcard configs do). Every exporter takes a plan; a uniform
export is `QuantPlan.uniform(precision)`. Plans travel in the manifest (`to_json` /
`from_json`) so a bundle says exactly what each expert was stored as.

The router, norms and biases are never quantized (spec §2.3: the router's softmax decides
which expert runs; EAQuant and ModelOpt keep it in full precision): a rule that would give the
router an integer or ggml type is refused.
"""

from __future__ import annotations

import fnmatch
from dataclasses import dataclass, field
from enum import Enum
from typing import Any

from .errors import InputError
from .vocab import Precision


class QuantMethod(str, Enum):
    """How the codes of a quantized group are chosen."""

    CAST = "cast"  # floating-point groups: a plain dtype cast
    RTN = "rtn"  # round to nearest
    IMATRIX_RTN = "imatrix-rtn"  # round to nearest weighted by activation importance
    GPTQ = "gptq"  # GPTQ on the group's own calibration tokens
    LLAMACPP = "llama.cpp"  # llama.cpp's llama_model_quantize chooses (file-type mixes)


@dataclass(frozen=True)
class QuantSpec:
    """Precision of one weight group.

    Attributes:
        precision: storage type.
        method: how the codes were chosen (CAST for floating point).
        group_size: weights per scale block (None: the type's own, e.g. 32 for q8_0, 256 for k-quants).
        base: the TensorId whose stored weights the codes are a difference from (a routed expert's
            input projection coded as the delta from its meta expert's); None: the weights themselves.
    """

    precision: Precision
    method: QuantMethod = QuantMethod.CAST
    group_size: int | None = None
    base: str | None = None

    def __post_init__(self) -> None:
        if self.precision.is_float and self.method is not QuantMethod.CAST:
            raise InputError(f"{self.precision.value} is floating point: its method is 'cast', not {self.method.value!r}")
        if self.group_size is not None and self.group_size < 1:
            raise InputError(f"group size must be at least 1, got {self.group_size}")
        if self.base is not None and self.precision.is_float:
            raise InputError(f"{self.precision.value} is floating point: only integer codes are stored as a delta from {self.base}")

    def to_json(self) -> dict[str, Any]:
        d: dict[str, Any] = {"precision": self.precision.value, "method": self.method.value, "group_size": self.group_size}
        if self.base is not None:  # only delta-coded projections carry it: other plans' JSON is unchanged
            d["base"] = self.base
        return d

    @classmethod
    def from_json(cls, d: dict[str, Any]) -> QuantSpec:
        return cls(Precision(d["precision"]), QuantMethod(d["method"]), d.get("group_size"), d.get("base"))


@dataclass(frozen=True)
class QuantRule:
    """`pattern` (a glob over TensorId strings, e.g. "layers.*.expert.3*") → `spec`.

    Attributes:
        note: measurements behind the choice (e.g. {"delta_kl": 1.2e-5}), kept in the manifest.
    """

    pattern: str
    spec: QuantSpec
    note: dict[str, Any] = field(default_factory=dict)

    def matches(self, tensor_id: str) -> bool:
        return fnmatch.fnmatchcase(tensor_id, self.pattern)


@dataclass(frozen=True)
class QuantPlan:
    """Ordered rules over TensorIds and a default spec (see the module docstring).

    Attributes:
        default: spec of every group no rule matches.
        rules: first match wins.
        calibration: hash of the calibration statistics the plan was made from (None: no calibration).
    """

    default: QuantSpec
    rules: tuple[QuantRule, ...] = ()
    calibration: str | None = None

    def __post_init__(self) -> None:
        for rule in self.rules:
            # a router TensorId is "layers.<i>.router": probe the pattern with every layer index a model may have
            if not rule.spec.precision.is_float and any(fnmatch.fnmatchcase(f"layers.{i}.router", rule.pattern) for i in range(256)):
                raise InputError(f"plan rule {rule.pattern!r} would quantize the router to {rule.spec.precision.value}: routers stay in floating point")

    @classmethod
    def uniform(cls, precision: Precision, method: QuantMethod | None = None) -> QuantPlan:
        """Every group at `precision` (the plan behind `export --precision/--quant`)."""
        m = method or (QuantMethod.CAST if precision.is_float else QuantMethod.LLAMACPP if precision.kind.value.startswith("ggml") else QuantMethod.RTN)
        return cls(QuantSpec(precision, m))

    @property
    def is_uniform(self) -> bool:
        return not self.rules

    @property
    def quantizes_groups(self) -> bool:
        """Whether a rule gives some group an integer or ggml type (a `medmoe-edge quantize` plan);
        a uniform export (`--quant q4_k_m`) is not one: its default is the file type."""
        return any(not r.spec.precision.is_float for r in self.rules)

    def spec_for(self, tensor_id: str) -> QuantSpec:
        """The spec of one TensorId (its canonical string)."""
        return next((r.spec for r in self.rules if r.matches(tensor_id)), self.default)

    def to_json(self) -> dict[str, Any]:
        return {
            "default": self.default.to_json(),
            "rules": [{"pattern": r.pattern, **r.spec.to_json(), "note": r.note} for r in self.rules],
            "calibration": self.calibration,
        }

    @classmethod
    def from_json(cls, d: dict[str, Any]) -> QuantPlan:
        rules = tuple(QuantRule(r["pattern"], QuantSpec.from_json(r), dict(r.get("note", {}))) for r in d.get("rules", []))
        return cls(QuantSpec.from_json(d["default"]), rules, d.get("calibration"))


__all__ = ["QuantMethod", "QuantPlan", "QuantRule", "QuantSpec"]
