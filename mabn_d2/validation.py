"""The one place where a tool's arguments and config are checked, before anything is created.

Every user tool (``tools/train_net.py``, ``tools/lazyconfig_train_net.py``,
``tools/predict.py``, ``tools/convert_checkpoint.py``) loads its config and checks it here
before it creates ``OUTPUT_DIR``, takes its lock or writes a file; each problem is a
:class:`~mabn_d2.cli.UserError` naming the key (or option) and the fix, which the tools
report as one message with exit code 2 (:func:`mabn_d2.cli.run_tool`):

* YACS configs (:func:`load_yacs_cfg`): values are coerced the way a user expects (``1``
  where a float is expected is ``1.0``); another type (``BACKWARD_MOVING_AVERAGE yes``), an
  unknown key or an odd override list is an error naming the key;
* LazyConfig overrides (:func:`apply_lazy_overrides`): ``key=value`` with a dotted key that
  exists in the config, or is an argument of the LazyCall node it lands in, or one of the
  optional keys mabn_d2 reads (:data:`OPTIONAL_LAZY_KEYS`); ``+key=value`` adds a new key
  deliberately;
* numbers in range (:func:`validate_yacs_cfg`, :func:`validate_lazy_cfg`): iterations,
  batch sizes, periods, the MABN settings (with an upper bound on ``BUFFER_SIZE``), and a
  warning when MABN can never leave its warm-up within the schedule;
* ``OUTPUT_DIR`` (:func:`check_output_dir`): a folder that can be created and written;
* weights files (:func:`check_weights_file`): present, not empty, not text, a complete
  archive;
* the launch (:func:`check_launch_args`): ``--num-gpus`` >= 0 (0 and 1 run in this process,
  as detectron2's ``launch``), ``--num-machines`` >= 1, ``--machine-rank`` in range.
"""

from __future__ import annotations

import argparse
import difflib
import inspect
import logging
import math
import os
import re
from collections.abc import Sequence
from typing import Any

from .cli import UserError
from .file_io import check_output_dir, check_weights_file

__all__ = [
    "OPTIONAL_LAZY_KEYS",
    "MODEL_NORM_KEYS",
    "check_launch_args",
    "check_output_dir",
    "check_weights_file",
    "check_int",
    "check_number",
    "get_mabn_cfg",
    "load_yacs_cfg",
    "validate_yacs_cfg",
    "load_lazy_cfg",
    "apply_lazy_overrides",
    "validate_lazy_cfg",
    "warn_if_mabn_never_leaves_warmup",
]

logger = logging.getLogger(__name__)

# Optional LazyConfig keys that mabn_d2 reads (mabn_d2.engine.lazy_training): overrides may
# add them.
OPTIONAL_LAZY_KEYS = ("train.seed", "train.mabn_calibration", "train.precise_bn")
# The YACS parts whose NORM may be "MABN".
MODEL_NORM_KEYS = ("RESNETS", "FPN", "ROI_BOX_HEAD", "ROI_MASK_HEAD")
_DOTTED_KEY = re.compile(r"[A-Za-z_][A-Za-z0-9_]*(\.[A-Za-z0-9_]+)*")


# ---- single values ---------------------------------------------------------------------------

def check_int(value: Any, key: str, low: int, fix: str = "") -> int:
    """``value`` as an int >= ``low`` (an integral float such as ``1e3`` is accepted)."""
    number = value if isinstance(value, int) and not isinstance(value, bool) else None
    if isinstance(value, float) and math.isfinite(value) and value.is_integer():
        number = int(value)
    if number is None or number < low:
        raise UserError(f"{key} must be an integer >= {low}, got {value!r}" + (
            f"; {fix}" if fix else ""))
    return number


def check_number(value: Any, key: str, low: float, *, strict: bool = False) -> float:
    """``value`` as a finite float >= ``low`` (> with ``strict``)."""
    ok = isinstance(value, (int, float)) and not isinstance(value, bool) \
        and math.isfinite(value) and (value > low if strict else value >= low)
    if not ok:
        relation = ">" if strict else ">="
        raise UserError(f"{key} must be a finite number {relation} {low:g}, got {value!r}")
    return float(value)


# ---- launch arguments ------------------------------------------------------------------------

def check_launch_args(args: argparse.Namespace) -> None:
    """detectron2's ``default_argument_parser`` launch arguments, in range.

    ``--num-gpus 0`` runs in this process (world size <= 1), as detectron2's own ``launch``
    does; a negative count is an error."""
    check_int(args.num_gpus, "--num-gpus", 0,
              "give the number of processes per machine (0 or 1: train in this process)")
    check_int(args.num_machines, "--num-machines", 1)
    if not 0 <= args.machine_rank < args.num_machines:
        raise UserError(f"--machine-rank must be in [0, --num-machines - 1] = "
                        f"[0, {args.num_machines - 1}], got {args.machine_rank}")


# ---- files -----------------------------------------------------------------------------------

# ---- YACS configs ----------------------------------------------------------------------------

def _coerce(default: Any, value: Any, key: str) -> Any:
    """``value`` for a key whose default is ``default``, converted the way a user expects
    (an int where a float is expected), or a UserError naming the key."""
    if isinstance(default, bool):
        if isinstance(value, bool):
            return value
        raise UserError(f"{key} must be True or False, got {value!r}")
    if not isinstance(default, (int, float)):
        return value  # strings, lists, tuples, None: YACS's own rules
    number = isinstance(value, (int, float)) and not isinstance(value, bool)
    if isinstance(default, float) and number:
        return float(value)
    if number and (isinstance(value, int) or (math.isfinite(value) and value.is_integer())):
        return int(value)
    kind = "an integer" if isinstance(default, int) else "a number"
    raise UserError(f"{key} must be {kind} (default {default!r}), got {value!r}")


def _coerce_tree(defaults: Any, values: Any, prefix: str) -> None:
    """Coerce ``values`` (a loaded config's nodes) against ``defaults`` in place."""
    from yacs.config import CfgNode

    for name in list(values.keys()):
        if name not in defaults:
            continue  # YACS reports unknown keys (and handles renamed ones)
        key = f"{prefix}{name}"
        default, value = defaults[name], values[name]
        if isinstance(default, CfgNode) and isinstance(value, dict):
            _coerce_tree(default, value, key + ".")
        elif not isinstance(default, CfgNode):
            values[name] = _coerce(default, value, key)


def _coerced_pairs(cfg: Any, cfg_list: Sequence[str]) -> list[Any]:
    """``KEY VALUE`` overrides with each value decoded as YACS does and coerced against the
    key's current value (:func:`_coerce`)."""
    from yacs.config import CfgNode

    if len(cfg_list) % 2:
        raise UserError(
            f"config overrides must be KEY VALUE pairs, got {len(cfg_list)} words "
            f"({' '.join(map(str, cfg_list))}): e.g. SOLVER.MAX_ITER 1000")
    pairs: list[Any] = []
    for key, text in zip(cfg_list[0::2], cfg_list[1::2]):
        value = cfg._decode_cfg_value(text)
        node: Any = cfg
        parts = str(key).split(".")
        for part in parts[:-1]:
            node = node.get(part) if isinstance(node, CfgNode) else None
        if isinstance(node, CfgNode) and parts[-1] in node \
                and not isinstance(node[parts[-1]], CfgNode):
            value = _coerce(node[parts[-1]], value, str(key))
        pairs += [key, value]
    return pairs


def _merge_file(cfg: Any, config_file: str) -> None:
    """detectron2's ``cfg.merge_from_file`` with the file's values coerced first."""
    loaded = cfg.load_yaml_with_base(config_file, allow_unsafe=True)
    if loaded.get("VERSION", cfg.VERSION) != cfg.VERSION:  # detectron2 upgrades old configs
        cfg.merge_from_file(config_file)
        return
    _coerce_tree(cfg, loaded, "")
    cfg.merge_from_other_cfg(type(cfg)(loaded))


def get_mabn_cfg() -> Any:
    """detectron2's default config plus ``MODEL.MABN`` and ``DATASETS.REGISTER_COCO``: the
    keys and types every YACS value is checked against."""
    from detectron2.config import get_cfg

    from .data import add_dataset_config
    from .integration.config import add_mabn_config

    cfg = get_cfg()
    add_mabn_config(cfg)
    add_dataset_config(cfg)
    return cfg


def load_yacs_cfg(config_file: str, opts: Sequence[str], freeze: bool = True) -> Any:
    """mabn_d2's YACS cfg (:func:`mabn_d2.engine.get_mabn_cfg`) with ``config_file`` and the
    ``KEY VALUE`` overrides ``opts`` merged, values coerced (see the module docstring).

    Raises:
        UserError: a missing file, an unknown key, a value of the wrong type (naming the key).
    """
    if not config_file:
        raise UserError("--config-file is required: the YAML config of the job")
    if not os.path.isfile(config_file):
        raise UserError(f"--config-file {config_file}: no such file")
    cfg = get_mabn_cfg()
    try:
        _merge_file(cfg, config_file)
    except UserError as error:
        raise UserError(f"{config_file}: {error}") from None
    except (KeyError, ValueError, AssertionError, TypeError) as error:
        raise UserError(f"{config_file}: {_yacs_message(error)}") from None
    try:
        cfg.merge_from_list(_coerced_pairs(cfg, list(opts)))
    except (KeyError, ValueError, AssertionError, TypeError) as error:
        if isinstance(error, UserError):
            raise
        raise UserError(f"command-line override: {_yacs_message(error)}") from None
    if freeze:
        cfg.freeze()
    return cfg


def _yacs_message(error: BaseException) -> str:
    message = str(error.args[0]) if error.args else str(error)
    if "Non-existent" in message:
        message += " (check its spelling: the keys are those of detectron2's defaults and " \
                   "MODEL.MABN, DATASETS.REGISTER_COCO, BATCH_STATS)"
    return message


def uses_mabn_yacs(cfg: Any) -> bool:
    return any(cfg.MODEL[part].get("NORM") == "MABN" for part in MODEL_NORM_KEYS
               if part in cfg.MODEL)


def validate_yacs_cfg(cfg: Any, *, eval_only: bool = False, resume: bool = False) -> None:
    """Numbers in range, MABN settings, ``OUTPUT_DIR`` and ``MODEL.WEIGHTS`` of a YACS job, before
    anything is created (see the module docstring).

    Raises:
        UserError: naming the key.
    """
    from .integration.config import calibration_from_cfg, settings_from_cfg

    try:
        settings = settings_from_cfg(cfg)
        calibration_from_cfg(cfg)
    except ValueError as error:
        raise UserError(str(error)) from None
    solver = cfg.SOLVER
    if not eval_only:
        check_int(solver.MAX_ITER, "SOLVER.MAX_ITER", 1, "the number of training iterations")
        check_int(solver.IMS_PER_BATCH, "SOLVER.IMS_PER_BATCH", 1)
        check_number(solver.BASE_LR, "SOLVER.BASE_LR", 0.0)
        check_int(solver.CHECKPOINT_PERIOD, "SOLVER.CHECKPOINT_PERIOD", 1)
        check_int(cfg.TEST.EVAL_PERIOD, "TEST.EVAL_PERIOD", 0)
        if settings is not None and uses_mabn_yacs(cfg):
            warn_if_mabn_never_leaves_warmup(
                settings.buffer_size, settings.warmup_iters, settings.renorm_start_iter,
                solver.MAX_ITER, "MODEL.MABN.", "SOLVER.MAX_ITER")
    check_int(cfg.DATALOADER.NUM_WORKERS, "DATALOADER.NUM_WORKERS", 0)
    check_int(cfg.MODEL.ROI_HEADS.NUM_CLASSES, "MODEL.ROI_HEADS.NUM_CLASSES", 1)
    check_output_dir(cfg.OUTPUT_DIR, "OUTPUT_DIR")
    if eval_only and not cfg.MODEL.WEIGHTS and not resume:
        raise UserError("--eval-only needs weights: MODEL.WEIGHTS path/to/model.pth, or "
                        f"--resume with a last_checkpoint in OUTPUT_DIR ({cfg.OUTPUT_DIR})")
    check_weights_file(cfg.MODEL.WEIGHTS, "MODEL.WEIGHTS")


def warn_if_mabn_never_leaves_warmup(buffer_size: int, warmup_iters: int,
                                     renorm_start_iter: int, max_iter: int, prefix: str,
                                     max_iter_key: str) -> bool:
    """Warn (log and ``RuntimeWarning``) when the schedule ends before MABN leaves its
    warm-up (batch statistics while ``t < WARMUP_ITERS`` or ``t <= BUFFER_SIZE``) or before
    its renormalization starts (``t > max(RENORM_START_ITER, WARMUP_ITERS)``); True if it
    warned. ``prefix`` spells the keys (``MODEL.MABN.`` or ``mabn.``)."""
    import warnings

    upper = prefix.endswith("MABN.")
    name = (lambda n: prefix + n.upper()) if upper else (lambda n: prefix + n)
    if max(warmup_iters, buffer_size) >= max_iter:
        message = (
            f"MABN never leaves its warm-up: {name('warmup_iters')}={warmup_iters} / "
            f"{name('buffer_size')}={buffer_size} but {max_iter_key}={max_iter}; the whole run "
            "normalizes with batch statistics (plain BN) and the moving averages are never "
            f"used. Lower them below {max_iter_key} or train longer.")
    elif max(renorm_start_iter, warmup_iters) >= max_iter:
        message = (
            f"MABN's renormalization never starts: {name('renorm_start_iter')}="
            f"{renorm_start_iter} but {max_iter_key}={max_iter}. Lower it below "
            f"{max_iter_key} or train longer if you want it.")
    else:
        return False
    logger.warning("mabn_d2: %s", message)
    warnings.warn(message, RuntimeWarning, stacklevel=2)
    return True


# ---- LazyConfigs -----------------------------------------------------------------------------

def _parameters(target: Any) -> tuple[set[str], bool] | None:
    """(argument names, takes **kwargs) of a LazyCall target, or None if unknown."""
    try:
        signature = inspect.signature(target)
    except (TypeError, ValueError):
        return None
    names = {p.name for p in signature.parameters.values()
             if p.kind not in (p.VAR_POSITIONAL, p.VAR_KEYWORD)}
    return names, any(p.kind == p.VAR_KEYWORD for p in signature.parameters.values())


def _is_optional_key(key: str) -> bool:
    return any(key == k or key.startswith(k + ".") for k in OPTIONAL_LAZY_KEYS)


def check_override_key(cfg: Any, key: str) -> None:
    """``key`` (dotted) exists in ``cfg``, or is an argument of the LazyCall node it lands in,
    or an optional key mabn_d2 reads.

    Raises:
        UserError: naming the key, what its parent holds, and the closest match.
    """
    from omegaconf import DictConfig, ListConfig, OmegaConf

    from .integration.lazy_config import target_of

    parts = key.split(".")
    node: Any = cfg
    for i, part in enumerate(parts):
        path = ".".join(parts[: i + 1])
        parent = ".".join(parts[:i]) or "the config"
        if isinstance(node, ListConfig):
            if not part.isdigit() or int(part) >= len(node):
                raise UserError(f"override {key}: {parent} is a list of {len(node)} items, "
                                f"{part!r} is not an index of it")
            if i == len(parts) - 1:
                return
            node = node[int(part)]
            continue
        if not isinstance(node, DictConfig):
            raise UserError(f"override {key}: {parent} is a value ({node!r}), not a node with "
                            "keys")
        if part in node:
            if i == len(parts) - 1 or OmegaConf.is_interpolation(node, part):
                return  # an interpolation is checked where it points
            node = node[part]
            continue
        if _is_optional_key(path):
            return
        target = target_of(node) if "_target_" in node else None
        if target is not None and i == len(parts) - 1:
            signature = _parameters(target)
            if signature is None or part in signature[0] or signature[1]:
                return
            name = getattr(target, "__qualname__", str(target))
            raise UserError(
                f"override {key}: {parent} builds {name}, which has no argument {part!r}; its "
                f"arguments: {', '.join(sorted(signature[0] - {'self'}))}")
        keys = [str(k) for k in node.keys() if k != "_target_"]
        close = difflib.get_close_matches(part, keys, n=1)
        hint = f"; did you mean {'.'.join([*parts[:i], close[0]])}?" if close else ""
        raise UserError(
            f"override {key}: no such key ({parent} has {', '.join(sorted(keys)) or 'no keys'})"
            f"{hint} To add a new key on purpose, write +{key}=...")


def apply_lazy_overrides(cfg: Any, overrides: Sequence[str]) -> Any:
    """``LazyConfig.apply_overrides(cfg, overrides)`` after checking each override:
    ``key=value`` with a dotted key that :func:`check_override_key` accepts; ``+key=value``
    adds a key without that check.

    Raises:
        UserError: an override without ``=``, with an empty or malformed key, or an unknown
            key (naming it).
    """
    from detectron2.config import LazyConfig

    plain = []
    for override in overrides:
        key, sep, _ = str(override).partition("=")
        added = key.startswith("+")
        key = key.lstrip("+").strip()
        if not sep:
            raise UserError(f"override {override!r} has no '=': write key=value, e.g. "
                            "train.max_iter=1000")
        if not _DOTTED_KEY.fullmatch(key):
            raise UserError(f"override {override!r}: the part before '=' must be a dotted key "
                            "such as train.max_iter, got " + (repr(key) if key else "nothing"))
        if not added:
            check_override_key(cfg, key)
        plain.append(str(override).lstrip("+") if added else str(override))
    try:
        return LazyConfig.apply_overrides(cfg, plain)
    except Exception as error:  # hydra's parser: a value it cannot parse
        raise UserError(f"overrides {' '.join(plain)}: {error}") from None


def load_lazy_cfg(config_file: str, overrides: Sequence[str]) -> Any:
    """``LazyConfig.load(config_file)`` with the checked ``overrides`` applied."""
    from detectron2.config import LazyConfig

    if not config_file or not os.path.isfile(config_file):
        raise UserError(f"--config-file {config_file!r}: no such file")
    return apply_lazy_overrides(LazyConfig.load(config_file), overrides)


def validate_lazy_cfg(cfg: Any, *, eval_only: bool = False, resume: bool = False) -> dict:
    """Numbers in range, MABN nodes (:func:`mabn_d2.integration.lazy_config.validate_lazy_config`;
    ``train.precise_bn`` is checked by :func:`mabn_d2.engine.lazy_training.lazy_setup`),
    ``buffer_size`` bounded), ``train.output_dir`` and ``train.init_checkpoint`` of a
    LazyConfig job, before anything is created. Returns the MABN settings nodes.

    Raises:
        UserError: naming the full key.
    """
    from omegaconf import OmegaConf

    from .integration.lazy_config import SETTINGS_NODE, validate_lazy_config
    from .layer.settings import MABNSettings

    try:
        nodes = validate_lazy_config(cfg)
    except ValueError as error:
        raise UserError(str(error)) from None
    train = cfg.train

    def value(key: str, default: Any = None) -> Any:
        return OmegaConf.select(cfg, key, default=default)

    if not eval_only:
        max_iter = check_int(value("train.max_iter"), "train.max_iter", 1,
                             "the number of training iterations")
        check_int(value("train.eval_period", 0), "train.eval_period", 0)
        check_int(value("train.log_period", 20), "train.log_period", 1)
        check_int(value("train.checkpointer.period", 1), "train.checkpointer.period", 1)
        check_int(value("dataloader.train.total_batch_size", 1),
                  "dataloader.train.total_batch_size", 1)
        node = nodes.get(SETTINGS_NODE)
        if node is not None:
            arguments = {k: node[k] for k in node.keys() if k != "_target_"}
            settings = MABNSettings(**arguments) if arguments.keys() <= set(
                MABNSettings.__dataclass_fields__) else None
            if settings is not None:
                warn_if_mabn_never_leaves_warmup(
                    settings.buffer_size, settings.warmup_iters, settings.renorm_start_iter,
                    max_iter, SETTINGS_NODE + ".", "train.max_iter")
    num_classes = value("model.roi_heads.num_classes")
    if num_classes is not None:
        check_int(num_classes, "model.roi_heads.num_classes", 1)
    check_output_dir(train.output_dir, "train.output_dir")
    if eval_only and not train.init_checkpoint and not resume:
        raise UserError("--eval-only needs weights: train.init_checkpoint=path/to/model.pth, or "
                        f"--resume with a last_checkpoint in train.output_dir "
                        f"({train.output_dir})")
    check_weights_file(train.init_checkpoint or "", "train.init_checkpoint")
    return nodes
