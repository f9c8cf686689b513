"""MABN hyper-parameters in one place: names, defaults, valid ranges and their validation.

Every way of setting them reads the table :data:`SETTINGS`: the :class:`~mabn_d2.MABN2d`
constructor (its signature's defaults are checked against the table by the tests),
:class:`MABNSettings` (fields and defaults), detectron2's YAML node ``MODEL.MABN`` and its
documentation (:mod:`mabn_d2.integration.config`), LazyConfig validation
(:mod:`mabn_d2.integration.lazy_config`) and calibration. A bad value is refused with the
name the user wrote (``buffer_size``, ``MODEL.MABN.BUFFER_SIZE``, ``model.backbone.norm.
buffer_size``) and the valid range.

An :class:`MABNSettings` is also a norm factory in detectron2's sense: ``settings(C)`` builds
an :class:`~mabn_d2.MABN2d` of ``C`` channels, so it can be passed wherever detectron2 takes
a ``norm`` (``get_norm`` accepts callables), e.g. ``norm=L(MABNSettings)(buffer_size=4)``
in a LazyConfig.
"""

from __future__ import annotations

import math
import numbers
from collections.abc import Callable, Iterable, Mapping, Sequence
from dataclasses import dataclass, fields
from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:
    from .mabn import MABN2d

__all__ = ["Setting", "SETTINGS", "DEFAULTS", "MAX_BUFFER_SIZE", "MABNSettings", "check_setting",
           "check_known_names"]


def _is_number(value: Any) -> bool:
    return isinstance(value, numbers.Real) and not isinstance(value, bool)


def _as_int(value: Any) -> int | None:
    """``value`` as an int if it is an integer (int, NumPy integer, integral float), else None."""
    if isinstance(value, bool) or not _is_number(value):
        return None
    if isinstance(value, numbers.Integral):
        return int(value)
    return int(value) if math.isfinite(value) and float(value).is_integer() else None


def _as_float(value: Any) -> float | None:
    """``value`` as a finite float, else None."""
    if not _is_number(value) or not math.isfinite(float(value)):
        return None
    return float(value)


@dataclass(frozen=True)
class Setting:
    """One hyper-parameter: its argument name, YAML key, default, and valid values.

    Attributes:
        name: the :class:`~mabn_d2.MABN2d` argument and :class:`MABNSettings` field.
        key: the key under detectron2's ``MODEL.MABN``.
        default: the paper's value.
        convert: returns the normalized value, or None if the value is invalid.
        expected: the valid values, for error messages.
        doc: its meaning, in one line: ``add_mabn_config``'s docstring lists it (the README's
            config table says the same; a test compares them).
    """

    name: str
    key: str
    default: Any
    convert: Callable[[Any], Any]
    expected: str
    doc: str

    def check(self, value: Any, key: str | None = None) -> Any:
        """The normalized ``value``; raises ValueError naming ``key`` (default: ``name``)."""
        converted = self.convert(value)
        if converted is None:
            raise ValueError(f"{key or self.name} must be {self.expected}, got {value!r}")
        return converted


def _ranged_int(low: int, high: int | None = None) -> Callable[[Any], int | None]:
    def convert(value: Any) -> int | None:
        v = _as_int(value)
        return v if v is not None and v >= low and (high is None or v <= high) else None

    return convert


def _eps(value: Any) -> float | None:
    v = _as_float(value)
    return v if v is not None and v > 0 else None


def _momentum(value: Any) -> float | None:
    v = _as_float(value)
    return v if v is not None and 0 < v <= 1 else None


def _clip(value: Any) -> float | None:
    v = _as_float(value)
    return v if v is not None and v >= 1 else None


def _flag(value: Any) -> bool | None:
    return value if isinstance(value, bool) else None


MAX_BUFFER_SIZE = 1024

SETTINGS: tuple[Setting, ...] = (
    Setting("eps", "EPS", 1e-5, _eps, "a finite number > 0",
            "added to the second moment before the square root"),
    Setting("momentum", "MOMENTUM", 0.02, _momentum, "a number in (0, 1]",
            "weight of the newest value in the running second moment (PyTorch's convention: "
            "0.02 is the paper's history weight 0.98)"),
    # The upper bound keeps a typo (1e9) from allocating 2 x BUFFER_SIZE x channels floats
    # per layer (256 GB for a ResNet-50); the paper uses 16.
    Setting("buffer_size", "BUFFER_SIZE", 16, _ranged_int(1, MAX_BUFFER_SIZE),
            f"an integer in [1, {MAX_BUFFER_SIZE}]",
            "m: how many recent batch statistics the moving averages hold"),
    Setting("warmup_iters", "WARMUP_ITERS", 100, _ranged_int(0), "an integer >= 0",
            "batch statistics while t < WARMUP_ITERS (and while t <= BUFFER_SIZE)"),
    Setting("renorm_start_iter", "RENORM_START_ITER", 1000, _ranged_int(0), "an integer >= 0",
            "batch renormalisation once t > max(RENORM_START_ITER, WARMUP_ITERS)"),
    Setting("renorm_clip", "RENORM_CLIP", 5.0, _clip, "a finite number >= 1",
            "the renorm factor r is clipped to [1/RENORM_CLIP, RENORM_CLIP]"),
    Setting("backward_moving_average", "BACKWARD_MOVING_AVERAGE", True, _flag, "True or False",
            "the backward pass uses the moving average of Psi (the paper); False: this "
            "batch's Psi_B (ablation)"),
    Setting("centralize_weights", "CENTRALIZE_WEIGHTS", True, _flag, "True or False",
            "a detectron2 Conv2d whose norm is this layer uses centralized weights"),
    Setting("sync", "SYNC", False, _flag, "True or False",
            "batch statistics over all processes (like SyncBN) instead of per process"),
)
_BY_NAME = {s.name: s for s in SETTINGS}
# The paper's values, by argument name.
DEFAULTS: dict[str, Any] = {s.name: s.default for s in SETTINGS}


def check_setting(name: str, value: Any, key: str | None = None) -> Any:
    """Validate one setting by its argument ``name``; the error names ``key`` (default
    ``name``). ``momentum=None`` is accepted here (the layer's cumulative average)."""
    setting = _BY_NAME[name]
    if name == "momentum" and value is None:
        return None
    return setting.check(value, key)


def check_known_names(names: Iterable[str], valid: Sequence[str], key: Callable[[str], str],
                      what: str, context: str = "") -> None:
    """Refuse names outside ``valid`` (a misspelt key would otherwise be ignored): ValueError
    ``"<context>unknown <what> [<key(name)>...]; valid: [...]"``."""
    unknown = set(names) - set(valid)
    if unknown:
        raise ValueError(f"{context}unknown {what} {sorted(key(n) for n in unknown)}; valid: "
                         f"{[key(n) for n in valid]}")


@dataclass(frozen=True)
class MABNSettings:
    """A validated set of MABN hyper-parameters (defaults: the paper's), and the norm factory
    that builds layers with them: ``MABNSettings(buffer_size=4)(256)`` is an
    ``MABN2d(256, buffer_size=4)``.

    Invalid values raise ValueError naming the field. See :data:`SETTINGS` for the meaning
    and range of each field.
    """

    # The fields are SETTINGS' names in its order, with its defaults (a test checks the order).
    eps: float = DEFAULTS["eps"]
    momentum: float | None = DEFAULTS["momentum"]
    buffer_size: int = DEFAULTS["buffer_size"]
    warmup_iters: int = DEFAULTS["warmup_iters"]
    renorm_start_iter: int = DEFAULTS["renorm_start_iter"]
    renorm_clip: float = DEFAULTS["renorm_clip"]
    backward_moving_average: bool = DEFAULTS["backward_moving_average"]
    centralize_weights: bool = DEFAULTS["centralize_weights"]
    sync: bool = DEFAULTS["sync"]

    def __post_init__(self) -> None:
        for f in fields(self):
            object.__setattr__(self, f.name, check_setting(f.name, getattr(self, f.name)))

    @classmethod
    def from_mapping(cls, values: Mapping[str, Any], key: Callable[[str], str]) -> MABNSettings:
        """Settings from ``{name: value}`` (missing names take their default); errors name
        ``key(name)``, e.g. ``lambda n: "MODEL.MABN." + n.upper()``."""
        check_known_names(values, [s.name for s in SETTINGS], key, "MABN settings")
        checked = {name: check_setting(name, value, key(name)) for name, value in values.items()}
        return cls(**checked)

    def layer_kwargs(self) -> dict[str, Any]:
        """The :class:`~mabn_d2.MABN2d` keyword arguments."""
        return {f.name: getattr(self, f.name) for f in fields(self)}

    def __call__(self, num_features: int) -> MABN2d:
        """An :class:`~mabn_d2.MABN2d` of ``num_features`` channels with these settings (what
        detectron2's ``get_norm(norm, num_features)`` calls for a callable ``norm``)."""
        from .mabn import MABN2d

        return MABN2d(num_features, **self.layer_kwargs())
