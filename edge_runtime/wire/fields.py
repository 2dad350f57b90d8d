"""Field rules of the wire messages: the validators, `ErrorCode` and the `_RULES` table.

`_RULES` maps every field name used by any message to the rule that checks and normalises its
value; together with the dataclasses in `messages` it is the schema. A rule takes (field name,
value) and returns the normalised value or raises MalformedMessage. Rules build new containers, so
a message never shares a dict or list with its caller; arrays are kept by reference (copying
megabytes per message would hurt on a Pi). This module defines no message class and does no
encoding; it was split from `messages` only to keep each file short.
"""

from __future__ import annotations

import enum
import math
from functools import partial
from typing import Any, Callable

import numpy as np

from .errors import _DTYPES, _MAX_INT, _MAX_ITEMS, _MAX_NDIM, _MAX_WORKER_ITEMS, _TENSOR_DTYPES, MAX_ROUND, MalformedMessage
from .topics import validate_id

_Rule = Callable[[str, Any], Any]


def _v_str(what: str, v: Any, max_len: int = 4096, empty: bool = True) -> str:
    if not isinstance(v, str) or len(v) > max_len or (not empty and not v):
        raise MalformedMessage(f"{what} must be a {'' if empty else 'non-empty '}string of at most {max_len} chars")
    return v


def _v_int(what: str, v: Any, lo: int = 0, hi: int = _MAX_INT) -> int:
    if isinstance(v, bool) or not isinstance(v, (int, np.integer)) or not lo <= v <= hi:
        raise MalformedMessage(f"{what} must be an integer in [{lo}, {hi}], got {v!r:.80}")
    return int(v)


def _v_float(what: str, v: Any, lo: float = -math.inf, positive: bool = False) -> float:
    if isinstance(v, bool) or not isinstance(v, (int, float, np.integer, np.floating)):
        raise MalformedMessage(f"{what} must be a number, got {type(v).__name__}")
    try:
        v = float(v)
    except OverflowError:  # an int too large for a float
        v = math.inf
    if not math.isfinite(v) or v < lo or (positive and v <= 0):
        raise MalformedMessage(f"{what} must be finite and {'> 0' if positive else f'>= {lo}'}, got {v}")
    return v


def _v_list(what: str, v: Any, item: _Rule, max_items: int = _MAX_ITEMS) -> list:
    if not isinstance(v, (list, tuple)) or len(v) > max_items:
        raise MalformedMessage(f"{what} must be a list of at most {max_items} items")
    return [item(f"{what}[{i}]", x) for i, x in enumerate(v)]


def _v_dict(what: str, v: Any, value: _Rule, key_len: int = 256, max_items: int = _MAX_ITEMS) -> dict:
    if not isinstance(v, dict) or len(v) > max_items:
        raise MalformedMessage(f"{what} must be a dict of at most {max_items} items")
    return {_v_str(f"{what} key", k, key_len, empty=False): value(f"{what}[{k!r}]", x) for k, x in v.items()}


def _v_slots(what: str, v: Any) -> list[int]:
    slots = _v_list(what, v, partial(_v_int, hi=1 << 20))
    if not slots or len(set(slots)) != len(slots):
        raise MalformedMessage(f"{what} must list distinct global expert indices, got {slots}")
    return slots


# the dtypes whose `.name` is in _DTYPES, either byte order, as objects: `dtype.name` is a slow property
# (a sixth of an update's decode, measured with `fftmoe bench fleet` shapes)
_ARRAY_DTYPES = frozenset(np.dtype(name).newbyteorder(order) for name in _DTYPES for order in "<>")


def all_finite(a: np.ndarray) -> bool:
    """No NaN or +-Inf in `a`: the decoder's test of every array, and the aggregator's `validate_update`.
    One exact call; its bool temporary is a quarter of a float32 array. Measured per array (196 KB /
    1.5 KB): 4.0 / 1.1 us, against 5.5 / 2.6 for min + max (which the aggregator used, 8% of its CPU in
    `fftmoe bench fleet` sampled with py-spy) and 3.3 / 1.7 for a BLAS self-dot, which needs an
    overflow fallback and np.errstate around it."""
    return bool(np.isfinite(a).all())


def _v_array(what: str, a: Any) -> np.ndarray:
    if not isinstance(a, np.ndarray) or a.dtype not in _ARRAY_DTYPES or a.ndim > _MAX_NDIM:
        raise MalformedMessage(f"{what} must be a float32 or float16 ndarray of at most {_MAX_NDIM} dims")
    if not all_finite(a):
        raise MalformedMessage(f"{what} contains NaN or Inf")
    return a


def _v_sums(what: str, a: Any) -> np.ndarray:
    """A worker's exact partial sum: an int64 ndarray (broker_server/exact_sums.py)."""
    if not isinstance(a, np.ndarray) or a.dtype != _TENSOR_DTYPES["int64"] or a.ndim > _MAX_NDIM:
        raise MalformedMessage(f"{what} must be an int64 ndarray of at most {_MAX_NDIM} dims")
    return a


def _v_lane(what: str, v: Any) -> str:
    return v if v == "" else _v_id(what, v)  # "" = no lane: upload to the server's topic


def _v_dtype(what: str, v: Any) -> str:
    if not isinstance(v, str) or v not in _DTYPES:
        raise MalformedMessage(f"{what} must be one of {sorted(_DTYPES)}, got {v!r:.40}")
    return v


class ErrorCode(enum.IntEnum):
    """Why a device could not produce an Update; travels by name."""

    UNKNOWN_TIER = 1
    SCHEMA_VERSION = 2
    BAD_HASH = 3  # the task's chunks failed their sha256
    BAD_TASK = 4  # the task decoded but cannot be executed (shapes, slots, params missing)
    TRAINING_FAILED = 5
    OUT_OF_MEMORY = 6
    DEADLINE_MISSED = 7
    INTERNAL = 99


def _v_code(what: str, v: Any) -> ErrorCode:
    if isinstance(v, str) and v in ErrorCode.__members__:
        return ErrorCode[v]
    if not isinstance(v, ErrorCode):
        raise MalformedMessage(f"{what} must be an ErrorCode or its name, got {v!r:.40}")
    return v


def _v_bool(what: str, v: Any) -> bool:
    if not isinstance(v, (bool, np.bool_)):
        raise MalformedMessage(f"{what} must be a bool, got {v!r:.40}")
    return bool(v)


def _v_head_den(what: str, v: Any) -> list[float]:
    """A worker's weight per head row; a 1.2 worker sent one number for every row: [that number]."""
    if isinstance(v, (int, float)) and not isinstance(v, bool):
        return [_v_float(what, v, lo=0.0)]
    return _v_list(what, v, item=partial(_v_float, lo=0.0))


def _v_id(what: str, v: Any) -> str:
    return validate_id(v, what, MalformedMessage)


# The rule of every field name used by any message: together with the dataclasses, the schema.
_ROUND: _Rule = partial(_v_int, hi=MAX_ROUND)
_NONNEG: _Rule = partial(_v_float, lo=0.0)
_POSITIVE: _Rule = partial(_v_float, positive=True)
_RULES: dict[str, _Rule] = {
    "federation": _v_id, "device_id": _v_id, "profile": _v_id, "tier": _v_id,
    "round": _ROUND, "last_round_seen": _ROUND,
    "runtime": partial(_v_dict, value=partial(_v_str, max_len=256)),
    "online": _v_bool,
    "timestamp": _NONNEG, "lambda_bal": _NONNEG, "lambda_het": _NONNEG, "logit_prior": _NONNEG,
    "own_labels_only": _v_bool, "report_label_counts": _v_bool,
    "label_counts": partial(_v_list, item=_v_int),
    "learning_rate": _POSITIVE, "deadline_s": _POSITIVE,
    "local_steps": partial(_v_int, lo=1), "num_samples": partial(_v_int, lo=1),
    "slot_map": partial(_v_dict, value=_v_slots),
    "het_target": partial(_v_dict, value=partial(_v_list, item=_NONNEG)),
    "expert_usage": partial(_v_dict, value=partial(_v_list, item=_NONNEG)),
    "expert_tokens": partial(_v_dict, value=partial(_v_list, item=_v_int)),
    "upload_dtype": _v_dtype,
    "params": partial(_v_dict, value=_v_array, key_len=512),
    "metrics": partial(_v_dict, value=_v_float),
    "note": _v_str, "message": _v_str, "code": _v_code,
    # sharded aggregation: a device's upload lane, and the coordinator <-> worker messages
    "upload_lane": _v_lane, "worker_id": _v_id, "session": _v_id, "ok": _v_bool, "reason": _v_str,
    "tiers": partial(_v_dict, value=_v_id, max_items=_MAX_WORKER_ITEMS),
    "slot_maps": partial(_v_dict, value=partial(_v_dict, value=_v_slots), max_items=_MAX_WORKER_ITEMS),
    "settings": partial(_v_dict, value=partial(_v_str, max_len=256)),
    "devices": partial(_v_list, item=_v_id, max_items=_MAX_WORKER_ITEMS),
    "norms": partial(_v_list, item=_NONNEG, max_items=_MAX_WORKER_ITEMS),
    "den": partial(_v_dict, value=partial(_v_list, item=_NONNEG)),
    "tokens": partial(_v_dict, value=partial(_v_list, item=_NONNEG)),
    "head_den": _v_head_den, "samples": _v_int, "bytes_in": _v_int, "bytes_folded": _v_int, "clipped": _v_int,
    "partial_sums": partial(_v_dict, value=_v_sums, key_len=512),  # the params of a WorkerPartial
}
