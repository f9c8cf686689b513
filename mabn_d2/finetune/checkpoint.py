"""Loading BN, FrozenBN, norm-less and MABN checkpoints into MABN models.

:mod:`mabn_d2.integration.patch` routes detectron2's ``DetectionCheckpointer._load_model`` (so
``DefaultTrainer``, ``DefaultPredictor`` and any ``DetectionCheckpointer``) through
:func:`load_model_with_mabn_conversion`. For every model it refuses a checkpoint with NaN or
infinite values (:func:`check_finite`, naming the tensors); into a model without MABN layers
it refuses a checkpoint with MABN layers (there is no exact inverse: the convs feeding MABN
were trained centralized, which the checkpoint does not record) and loads any other as
detectron2 does. For a model with MABN layers it works on the checkpoint's state dict
*before* detectron2 and fvcore see it, because both silently drop entries that do not fit
(``align_and_update_state_dicts`` and fvcore's shape filter only log a warning):

1. names: Caffe2 names are renamed with detectron2's ``convert_c2_detectron_names``, and
   checkpoints that need detectron2's matching heuristics (Caffe2, torchvision-converted) are
   aligned with ``align_and_update_state_dicts`` against the model's keys *plus* the BN keys
   each MABN layer can be converted from;
2. every MABN layer is filled (see :class:`MABNLoadReport` for the cases): from MABN entries
   as they are, from BN/FrozenBN entries by the exact fold
   (:func:`mabn_d2.finetune.convert.fold_bn`), from a Caffe2 frozen affine (``_bn_s``,
   ``_bn_b``) by the same fold with no statistics, from a norm-less conv (its bias) as an
   identity; or left to its initialization when the checkpoint has nothing for it or its conv;
3. anything that would be dropped or left half-loaded is an :class:`MABNCheckpointError`:
   shape or buffer-size mismatches of a norm layer or the conv feeding it, partial MABN
   state, entries of an unknown layout, statistics that match no layer;
4. detectron2 then loads the converted state dict (other layers as usual) and the report
   is logged; each MABN layer records its source in ``converted_from`` for
   :mod:`mabn_d2.finetune.calibration`.
"""

from __future__ import annotations

import logging
from collections import OrderedDict
from collections.abc import Callable, Mapping
from dataclasses import dataclass, field
from typing import Any

import numpy as np
import torch
from detectron2.checkpoint.c2_model_loading import (
    align_and_update_state_dicts,
    convert_c2_detectron_names,
)
from tabulate import tabulate
from torch import Tensor, nn
from torch.nn.modules.utils import consume_prefix_in_state_dict_if_present

from ..cli import UserError
from ..layer import MABN2d
from ..layer.centralization import CentralizesWeight
from .convert import (
    BN_KEYS,
    MABN_KEYS,
    MOVING_AVERAGE_KEYS,
    NO_STATISTICS,
    SOURCE_AFFINE,
    SOURCE_BN,
    SOURCE_BN_EPS,
    SOURCE_IDENTITY,
    SOURCE_MABN,
    SOURCE_NEW,
    fold_bn,
    has_usable_statistics,
    moving_average_state,
)

__all__ = [
    "CheckpointReadError",
    "MABNCheckpointError",
    "check_finite",
    "MABNLoadReport",
    "LayerLoad",
    "SOURCES_KEY",
    "convert_checkpoint_for_model",
    "load_model_with_mabn_conversion",
]

logger = logging.getLogger(__name__)

# Extra checkpoint entry written by tools/convert_checkpoint.py: {module: "bn" | "affine"}.
SOURCES_KEY = "mabn_d2_sources"
_STATISTICS = ("running_mean", "running_var", "running_second_moment", "chi2_buffer",
               "psi_buffer")
_DESCRIPTIONS = {
    SOURCE_MABN: "MABN entries",
    SOURCE_BN: "BN statistics, exact fold",
    SOURCE_AFFINE: "frozen affine, exact fold; no statistics",
    SOURCE_IDENTITY: "norm-less conv: identity + its bias; no statistics",
    SOURCE_NEW: "not in the checkpoint: initialized",
}


class CheckpointReadError(UserError, RuntimeError):
    """A weights file that is missing, truncated, damaged or not a checkpoint."""

    @classmethod
    def unreadable(cls, key: str, filename: str, error: BaseException) -> CheckpointReadError:
        """The error for ``filename`` (the value of ``key``) that reading failed with."""
        first_line = str(error).splitlines()[0] if str(error) else ""
        return cls(f"{key} {filename} cannot be read as a checkpoint ({type(error).__name__}: "
                   f"{first_line}): it is truncated, damaged or not a checkpoint file. Give the "
                   "path of a complete checkpoint (e.g. OUTPUT_DIR/model_final.pth of a "
                   "finished run).")


class MABNCheckpointError(UserError, RuntimeError):
    """A checkpoint that cannot be loaded into an MABN model without losing something."""


@dataclass(frozen=True)
class LayerLoad:
    """How one MABN layer was filled: ``source`` is one of ``mabn_d2.finetune.convert.SOURCE_*``."""

    name: str
    source: str
    note: str = ""


@dataclass
class MABNLoadReport:
    """What a checkpoint load did to each MABN layer of the model."""

    layers: list[LayerLoad] = field(default_factory=list)
    centralized_pretrained: list[str] = field(default_factory=list)

    def names(self, *sources: str) -> list[str]:
        return [layer.name for layer in self.layers if layer.source in sources]

    @property
    def without_statistics(self) -> list[str]:
        """Layers converted from weights without statistics: to calibrate before training."""
        return self.names(*NO_STATISTICS)

    def table(self) -> str:
        """One row per source: how many layers, and which (abbreviated)."""
        rows = []
        for source, description in _DESCRIPTIONS.items():
            names = self.names(source)
            if names:
                shown = ", ".join(names[:4]) + (f", ... ({len(names) - 4} more)"
                                                if len(names) > 4 else "")
                rows.append((description, len(names), shown))
        return tabulate(rows, headers=["MABN layers from", "count", "layers"], tablefmt="pipe")


def _norm_conv(model: nn.Module, name: str) -> tuple[str | None, nn.Module | None]:
    """The conv whose ``.norm`` is the MABN layer ``name`` (detectron2's Conv2d), if any."""
    parent_name, _, attr = name.rpartition(".")
    if attr != "norm":
        return None, None
    parent = model.get_submodule(parent_name) if parent_name else model
    weight = getattr(parent, "weight", None)
    if isinstance(weight, Tensor) and weight.dim() == 4:
        return parent_name, parent
    return None, None


def _bn_view(model_state: Mapping[str, Tensor], layers: Mapping[str, MABN2d],
             convs: Mapping[str, tuple[str | None, nn.Module | None]]) -> dict[str, Tensor]:
    """The model's keys plus, for each MABN layer, the BN keys it can be converted from and
    the bias of a bias-less conv feeding it: what detectron2's name matching aligns to."""
    view = dict(model_state)
    for name, layer in layers.items():
        for leaf in ("running_mean", "running_var"):
            view[f"{name}.{leaf}"] = layer.running_second_moment
        conv_name, conv = convs[name]
        if conv_name is not None and getattr(conv, "bias", None) is None:
            view[f"{conv_name}.bias"] = layer.bias
    return view


def _suffix_match(name: str, candidates: Mapping[str, Any]) -> Any:
    """The value of the longest candidate that ``name`` equals or ends with (``.``-aligned),
    detectron2's matching rule; None if there is none."""
    best = None
    for candidate in candidates:
        if (name == candidate or name.endswith("." + candidate)) and (
            best is None or len(candidate) > len(best)
        ):
            best = candidate
    return None if best is None else candidates[best]


def _mismatch(key: str, saved: Tensor, expected: tuple[int, ...], hint: str) -> str:
    return (f"{key}: shape {tuple(saved.shape)} in the checkpoint, {expected} in the model. "
            f"{hint}")


_ARCH_HINT = ("The config does not describe the checkpoint's architecture (depth, widths, "
              "norm placement): fix the config, or remove these entries to initialize the "
              "layer.")


class _LayerConverter:
    """Converts the entries of one MABN layer (and of the conv feeding it)."""

    def __init__(self, name: str, layer: MABN2d, conv_name: str | None, conv: nn.Module | None,
                 state: Mapping[str, Tensor], affine_hint: Callable[[str], bool],
                 marked_source: str | None) -> None:
        self.name, self.layer, self.conv_name, self.conv = name, layer, conv_name, conv
        self.state = state
        self.affine_hint = affine_hint
        self.marked_source = marked_source
        prefix = name + "."
        self.leaves = {k[len(prefix):] for k in state
                       if k.startswith(prefix) and "." not in k[len(prefix):]}
        self.errors: list[str] = []
        self.consumed: set[str] = {prefix + leaf for leaf in self.leaves}

    def key(self, leaf: str) -> str:
        return f"{self.name}.{leaf}"

    def convert(self) -> tuple[dict[str, Tensor], LayerLoad]:
        self._check_shapes()
        if self.errors:
            return {}, LayerLoad(self.name, SOURCE_NEW)
        leaves = self.leaves
        if "running_second_moment" in leaves:
            return self._from_mabn()
        if leaves & {"running_mean", "running_var"}:
            return self._from_bn()
        if leaves & {"weight", "bias"}:
            return self._from_affine()
        return self._from_conv()

    def _check_shapes(self) -> None:
        unknown = self.leaves - set(MABN_KEYS) - set(BN_KEYS)
        if unknown:
            self.errors.append(
                f"{self.name}: checkpoint entries {sorted(unknown)} are neither BatchNorm "
                f"({', '.join(BN_KEYS)}) nor MABN ({', '.join(MABN_KEYS)}): the checkpoint "
                "was saved with a different layout. Convert it to one of these first."
            )
        channels = (self.layer.num_features,)
        for leaf in ("weight", "bias", "running_mean", "running_var", "running_second_moment"):
            saved = self.state.get(self.key(leaf))
            if saved is not None and tuple(saved.shape) != channels:
                self.errors.append(_mismatch(self.key(leaf), saved, channels, _ARCH_HINT))
        if self.conv_name is not None:
            saved = self.state.get(f"{self.conv_name}.weight")
            expected = tuple(self.conv.weight.shape)
            if saved is not None and tuple(saved.shape) != expected:
                self.errors.append(
                    _mismatch(f"{self.conv_name}.weight", saved, expected, _ARCH_HINT))

    def _moving_averages(self) -> dict[str, Tensor]:
        fresh = moving_average_state(self.layer.buffer_size, self.layer.num_features)
        return {self.key(leaf): value for leaf, value in fresh.items()}

    def _conv_bias(self) -> Tensor | None:
        """The checkpoint's bias of the conv feeding this layer, if the model's conv has none
        (consumed: it is folded into the MABN layer)."""
        key = f"{self.conv_name}.bias"
        if self.conv_name is None or getattr(self.conv, "bias", None) is not None \
                or key not in self.state:
            return None
        bias = self.state[key]
        if tuple(bias.shape) != (self.layer.num_features,):
            self.errors.append(_mismatch(key, bias, (self.layer.num_features,), _ARCH_HINT))
            return None
        self.consumed.add(key)
        return bias

    def _folded(self, source: str, note: str = "", **fold_args: Any
                ) -> tuple[dict[str, Tensor], LayerLoad]:
        statistics = has_usable_statistics(fold_args.get("running_mean"),
                                           fold_args.get("running_var"))
        conv_bias = self._conv_bias() if source != SOURCE_IDENTITY else None
        if conv_bias is not None:
            # norm(conv(x) + b) is norm'(conv(x)) with the norm's mean shifted by -b.
            zeros = torch.zeros(self.layer.num_features)
            fold_args["running_mean"] = fold_args.get("running_mean", zeros) - conv_bias
            fold_args.setdefault("running_var", torch.ones(self.layer.num_features))
            note = "conv bias folded in"
        folded = fold_bn(self.layer.num_features, mabn_eps=self.layer.eps, **fold_args)
        if source == SOURCE_BN and not statistics:
            source, note = SOURCE_AFFINE, "identity statistics (mean 0, var 1)"
        entries = {self.key("weight"): folded.weight, self.key("bias"): folded.bias,
                   self.key("running_second_moment"): folded.running_second_moment,
                   **self._moving_averages()}
        return entries, LayerLoad(self.name, source, note)

    def _from_mabn(self) -> tuple[dict[str, Tensor], LayerLoad]:
        leaves = self.leaves
        if leaves & {"running_mean", "running_var"}:
            self.errors.append(f"{self.name}: has both BN (running_mean/var) and MABN "
                               "(running_second_moment) entries")
        for leaf in ("weight", "bias"):
            if leaf not in leaves:
                self.errors.append(f"{self.name}: MABN entries without {self.key(leaf)}")
        present = leaves & set(MOVING_AVERAGE_KEYS)
        entries = {self.key(leaf): self.state[self.key(leaf)] for leaf in leaves & set(MABN_KEYS)}
        note = ""
        if not present:
            entries.update(self._moving_averages())
            note = "moving averages restarted"
        elif present != set(MOVING_AVERAGE_KEYS):
            self.errors.append(
                f"{self.name}: the checkpoint has {sorted(present)} but not "
                f"{sorted(set(MOVING_AVERAGE_KEYS) - present)}; keep all three (resume) or "
                "remove all three (restart the moving averages)")
        else:
            self._check_buffer_size()
        return entries, LayerLoad(self.name, self.marked_source or SOURCE_MABN, note)

    def _check_buffer_size(self) -> None:
        expected = (self.layer.buffer_size, self.layer.num_features)
        for leaf in ("chi2_buffer", "psi_buffer"):
            saved = self.state[self.key(leaf)]
            if tuple(saved.shape) == expected:
                continue
            if saved.dim() == 2 and saved.shape[1] == expected[1]:
                hint = (
                    f"The checkpoint was trained with MODEL.MABN.BUFFER_SIZE {saved.shape[0]}, "
                    f"the config has {expected[0]}. To resume that run set "
                    f"MODEL.MABN.BUFFER_SIZE {saved.shape[0]}; to fine-tune with another size, "
                    "restart the moving averages: python tools/convert_checkpoint.py IN OUT "
                    "--reset-moving-averages."
                )
            else:
                hint = _ARCH_HINT
            self.errors.append(_mismatch(self.key(leaf), saved, expected, hint))
            return

    def _from_bn(self) -> tuple[dict[str, Tensor], LayerLoad]:
        if not {"running_mean", "running_var"} <= self.leaves:
            self.errors.append(f"{self.name}: needs both running_mean and running_var")
            return {}, LayerLoad(self.name, SOURCE_NEW)
        args = {leaf: self.state[self.key(leaf)]
                for leaf in ("weight", "bias", "running_mean", "running_var")
                if leaf in self.leaves}
        return self._folded(SOURCE_BN, bn_eps=SOURCE_BN_EPS, **args)

    def _from_affine(self) -> tuple[dict[str, Tensor], LayerLoad]:
        if not {"weight", "bias"} <= self.leaves or not self.affine_hint(self.name):
            self.errors.append(
                f"{self.name}: the checkpoint has {sorted(self.leaves)} but no running "
                "statistics. That is a GroupNorm/LayerNorm (per-image statistics: it cannot "
                "be folded into MABN; keep NORM 'GN' for this part or remove the entries to "
                "train the layer from its initialization), or a frozen affine saved without "
                "statistics (convert it with tools/convert_checkpoint.py --affine)."
            )
            return {}, LayerLoad(self.name, SOURCE_NEW)
        # As detectron2's FrozenBatchNorm2d loads Caffe2's AffineChannel: mean 0, var 1.
        return self._folded(SOURCE_AFFINE, weight=self.state[self.key("weight")],
                            bias=self.state[self.key("bias")], bn_eps=SOURCE_BN_EPS)

    def _from_conv(self) -> tuple[dict[str, Tensor], LayerLoad]:
        if self.conv_name is None or f"{self.conv_name}.weight" not in self.state:
            return {}, LayerLoad(self.name, SOURCE_NEW)
        bias = self._conv_bias()
        # y = x + bias: weight = sqrt(1 + eps) with the placeholder second moment 1.
        return self._folded(SOURCE_IDENTITY, "conv bias" if bias is not None else "no bias",
                            bias=bias, bn_eps=0.0)


def convert_checkpoint_for_model(
    model: nn.Module,
    state: Mapping[str, Tensor],
    *,
    affine_hint: Callable[[str], bool] = lambda name: False,
    marked_sources: Mapping[str, str] | None = None,
) -> tuple[OrderedDict[str, Tensor], MABNLoadReport]:
    """Convert a state dict with the model's names into one the MABN model loads fully.

    Args:
        model: the model (not wrapped in DDP).
        state: checkpoint entries, already named as in ``model`` (after detectron2's renaming
            and alignment for Caffe2/torchvision files).
        affine_hint: True for the MABN layers whose weight/bias without statistics are a
            frozen BN affine (Caffe2 ``_bn_s``/``_bn_b``) rather than GroupNorm's.
        marked_sources: ``{module: source}`` written by ``tools/convert_checkpoint.py``
            (module names matched as suffixes of the model's).

    Returns:
        ``(converted, report)``; ``converted`` keeps every entry not about an MABN layer.

    Raises:
        MABNCheckpointError: listing every problem found (see the module docstring).
    """
    layers = {name: m for name, m in model.named_modules() if isinstance(m, MABN2d)}
    model_keys = set(model.state_dict())
    converted: OrderedDict[str, Tensor] = OrderedDict()
    report = MABNLoadReport()
    errors: list[str] = []
    consumed: set[str] = set()
    conv_names: dict[str, str] = {}
    for name, layer in layers.items():
        conv_name, conv = _norm_conv(model, name)
        if conv_name is not None:
            conv_names[conv_name] = name
        marked = _suffix_match(name, marked_sources or {})
        converter = _LayerConverter(name, layer, conv_name, conv, state, affine_hint, marked)
        entries, load = converter.convert()
        errors += converter.errors
        consumed |= converter.consumed
        converted.update(entries)
        report.layers.append(load)
        if load.source in (SOURCE_BN, *NO_STATISTICS) and isinstance(conv, CentralizesWeight):
            report.centralized_pretrained.append(conv_name)
    for key, value in state.items():
        if key not in consumed:
            converted[key] = value
    errors += _unmatched_entries(converted, model_keys, layers, conv_names)
    if errors:
        shown = "\n  ".join(errors[:20]) + (f"\n  ... {len(errors) - 20} more"
                                            if len(errors) > 20 else "")
        raise MABNCheckpointError(
            f"The checkpoint cannot be loaded into this MABN model:\n  {shown}")
    metadata = getattr(state, "_metadata", None)
    if metadata is not None:
        converted._metadata = metadata  # type: ignore[attr-defined]
    return converted, report


def _unmatched_entries(converted: Mapping[str, Tensor], model_keys: set[str],
                       layers: Mapping[str, MABN2d], conv_names: Mapping[str, str]) -> list[str]:
    """Entries the model does not have that belong to normalization layers: statistics of any
    kind, or entries detectron2's name matching left unaligned because of their shape."""
    targets = {**{n: n for n in layers}, **conv_names}
    errors = []
    for key, value in converted.items():
        if key in model_keys:
            continue
        module, _, leaf = key.rpartition(".")
        if module in layers:
            continue  # entries of unknown layout: reported by the layer's conversion
        if module in conv_names:
            errors.append(f"{key}: {module} (feeding {conv_names[module]}) has no such entry "
                          "in the model")
            continue
        layer = next((t for t in targets if module and t.endswith("." + module)), None)
        if layer is not None:  # detectron2's name matching left it out: its shape
            errors.append(f"{key} (shape {tuple(value.shape)}) fits no entry of "
                          f"{layer}: wrong shape. {_ARCH_HINT}")
        elif leaf in _STATISTICS:
            errors.append(f"{key}: normalization statistics that match no normalization layer "
                          "of the model (a norm name or layout mismatch)")
    return errors


def _c2_affine_hint(renamed_to_original: Mapping[str, str]) -> Callable[[str], bool]:
    """For Caffe2 checkpoints: does an MABN layer's ``weight`` come from a ``_bn_s`` blob
    (frozen BN affine) rather than ``_gn_s`` (GroupNorm)?"""
    affine = {k: orig.endswith(("_bn_s", "_bn_b")) for k, orig in renamed_to_original.items()}
    return lambda name: bool(_suffix_match(f"{name}.weight", affine))


def _ndarrays_to_tensors(state: dict[str, Any]) -> None:
    """In place, as fvcore's checkpointer does before loading: numpy arrays (Caffe2 ``.pkl``)
    become tensors; any other non-tensor is an error naming its key."""
    for key, value in state.items():
        if isinstance(value, np.ndarray):
            state[key] = torch.from_numpy(value)
        elif not isinstance(value, torch.Tensor):
            raise ValueError(f"Unsupported type found in checkpoint! {key}: {type(value)}")


def load_model_with_mabn_conversion(checkpointer: Any, checkpoint: dict[str, Any],
                                    load_model: Callable[[Any, dict[str, Any]], Any]) -> Any:
    """``DetectionCheckpointer._load_model`` for models with MABN layers (see module doc).

    Args:
        checkpointer: the ``DetectionCheckpointer``.
        checkpoint: what its ``_load_file`` returned (``"model"``, ``"__author__"``, ...).
        load_model: detectron2's original ``_load_model``.
    """
    from .model_record import RECORD_KEY, check_model_record  # it imports this module

    model = checkpointer.model
    state = checkpoint["model"]
    _ndarrays_to_tensors(state)
    if state and all(key.startswith("module.") for key in state):  # saved from a DDP model
        consume_prefix_in_state_dict_if_present(state, "module.")
    check_finite(state)
    # What the state dict cannot show (centralized convs, norm kinds): checked first.
    check_model_record(model, checkpoint.pop(RECORD_KEY, None), state)
    if not any(isinstance(m, MABN2d) for m in model.modules()):
        _refuse_mabn_entries(state)
        return load_model(checkpointer, checkpoint)
    affine_hint: Callable[[str], bool] = lambda name: False  # noqa: E731
    if checkpoint.get("matching_heuristics", False):
        if checkpoint.get("__author__") == "Caffe2":
            state, renamed_to_original = convert_c2_detectron_names(state)
            affine_hint = _c2_affine_hint(renamed_to_original)
        layers = {n: m for n, m in model.named_modules() if isinstance(m, MABN2d)}
        convs = {n: _norm_conv(model, n) for n in layers}
        state = align_and_update_state_dicts(
            _bn_view(model.state_dict(), layers, convs), state, c2_conversion=False)
        checkpoint["matching_heuristics"] = False  # done: detectron2 must not redo it
    converted, report = convert_checkpoint_for_model(
        model, state, affine_hint=affine_hint, marked_sources=checkpoint.pop(SOURCES_KEY, None))
    checkpoint["model"] = converted
    incompatible = load_model(checkpointer, checkpoint)
    for load in report.layers:
        model.get_submodule(load.name).converted_from = load.source
    _log_report(report)
    checkpointer.mabn_load_report = report
    return incompatible


_FINITE_FIX = ("It comes from a run that diverged or from a conversion with invalid "
               "arguments; load an earlier checkpoint of that run, or convert again.")


def check_finite(state: Mapping[str, Any], what: str = "The checkpoint",
                 fix: str = _FINITE_FIX) -> None:
    """Refuse a state dict with NaN or infinite values (a diverged run, a bad conversion):
    loaded, they make every output NaN without an error.

    Raises:
        MABNCheckpointError: ``"<what> has NaN or infinite values in ...: <tensors>. <fix>"``.
    """
    bad = [key for key, value in state.items()
           if isinstance(value, Tensor) and value.is_floating_point()
           and not bool(torch.isfinite(value).all())]
    if bad:
        shown = ", ".join(bad[:10]) + (f", ... ({len(bad) - 10} more)" if len(bad) > 10 else "")
        raise MABNCheckpointError(
            f"{what} has NaN or infinite values in {len(bad)} tensors: {shown}. {fix}")


def _refuse_mabn_entries(state: Mapping[str, Any]) -> None:
    """A model without MABN layers cannot take an MABN checkpoint: its BN/GN/FrozenBN layers
    would keep their own initial statistics (detectron2 only warns about the MABN entries it
    drops), and the convs that fed MABN were trained centralized (``w - mean(w)``), which a
    plain conv does not compute; the checkpoint does not record which convs were.

    Raises:
        MABNCheckpointError: naming the MABN layers of the checkpoint.
    """
    layers = sorted({key.rpartition(".")[0] for key in state
                     if key.rpartition(".")[2] == "running_second_moment"})
    if layers:
        shown = ", ".join(layers[:4]) + (f", ... ({len(layers) - 4} more)"
                                         if len(layers) > 4 else "")
        raise MABNCheckpointError(
            f"The checkpoint has {len(layers)} MABN layers ({shown}) but the model has none: "
            "loaded into other normalizations they would compute something else. Build the "
            "model with NORM \"MABN\" where the checkpoint has it (the training run's "
            "config.yaml), or, for inference without normalization cost, load it into that "
            "MABN model and fold it with mabn_d2.fuse_mabn.")


def _log_report(report: MABNLoadReport) -> None:
    logger.info("mabn_d2: MABN layers loaded from the checkpoint:\n%s", report.table())
    if report.centralized_pretrained:
        logger.warning(
            "mabn_d2: %d convs with weights from the checkpoint use centralized weights "
            "(MODEL.MABN.CENTRALIZE_WEIGHTS), which changes their pretrained function (e.g. %s). "
            "Exclude them with MODEL.MABN.CENTRALIZE_EXCLUDE (see docs/finetuning.md).",
            len(report.centralized_pretrained), ", ".join(report.centralized_pretrained[:3]),
        )
    missing = report.without_statistics
    if missing:
        logger.info(
            "mabn_d2: %d MABN layers were converted from weights without statistics; "
            "calibrate them on training data before training (done by MABNTrainer when "
            "MODEL.MABN.CALIBRATION.MODE is 'auto'; or mabn_d2.calibrate_mabn).", len(missing),
        )
