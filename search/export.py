"""One row per trial as parquet (pyarrow), and the reader that gives the same values back.

Columns: ``number``, ``state``, ``value`` (Optuna's value, exactly as stored), ``value_meaning`` ("val_bpb" for
a completed trial, "rank_retention" for a pruned one: Optuna stores a pruned trial's last intermediate value),
``datetime_start``/``datetime_complete``, ``params_<name>``, ``user_attrs_<name>`` and ``intermediate_values``.
Series (``curve_*`` user attrs, intermediate values) are maps; scalars get their own arrow type; anything mixed
is stored as JSON text (marked in the field's metadata) so that it still reads back equal.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import optuna
import pyarrow as pa
import pyarrow.parquet as pq
from optuna.trial import TrialState

_JSON = {b"encoding": b"json"}
_MEANING = {TrialState.COMPLETE: "val_bpb", TrialState.PRUNED: "rank_retention"}


def _is_number(value: Any) -> bool:
    return isinstance(value, (int, float)) and not isinstance(value, bool)


def _column(name: str, values: list[Any]) -> tuple[pa.Field, pa.Array]:
    """The narrowest arrow column holding ``values`` (None = absent); JSON text when nothing narrower fits."""
    present = [v for v in values if v is not None]
    if present and all(isinstance(v, bool) for v in present):
        kind: pa.DataType = pa.bool_()
    elif present and all(isinstance(v, int) and not isinstance(v, bool) for v in present):
        kind = pa.int64()
    elif present and all(_is_number(v) for v in present):
        kind = pa.float64()
        values = [None if v is None else float(v) for v in values]
    elif present and all(isinstance(v, str) for v in present):
        kind = pa.string()
    elif present and all(isinstance(v, dict) and all(isinstance(k, str) and (x is None or _is_number(x))
                                                     for k, x in v.items()) for v in present):
        kind = pa.map_(pa.string(), pa.float64())  # a series {str(step): value}; None points stay None
        values = [None if v is None else [(k, None if x is None else float(x)) for k, x in v.items()]
                  for v in values]
    else:
        field = pa.field(name, pa.string(), metadata=_JSON)
        return field, pa.array([None if v is None else json.dumps(v) for v in values], type=pa.string())
    return pa.field(name, kind), pa.array(values, type=kind)


def trials_table(study: optuna.Study) -> pa.Table:
    """The study's trials as an arrow table (see the module docstring for the columns)."""
    trials = study.get_trials(deepcopy=False)
    columns: dict[str, list[Any]] = {
        "number": [t.number for t in trials],
        "state": [t.state.name for t in trials],
        "value": [t.value if t.values is not None and len(t.values) == 1 else None for t in trials],
        "value_meaning": [_MEANING.get(t.state) if t.values is not None else None for t in trials],
        "datetime_start": [t.datetime_start for t in trials],
        "datetime_complete": [t.datetime_complete for t in trials],
    }
    fields = [pa.field("number", pa.int64()), pa.field("state", pa.string()), pa.field("value", pa.float64()),
              pa.field("value_meaning", pa.string()), pa.field("datetime_start", pa.timestamp("us")),
              pa.field("datetime_complete", pa.timestamp("us"))]
    arrays = [pa.array(columns[f.name], type=f.type) for f in fields]
    for prefix, get in (("params_", lambda t: t.params), ("user_attrs_", lambda t: t.user_attrs)):
        names = sorted({key for t in trials for key in get(t)})
        for key in names:
            field, array = _column(prefix + key, [get(t).get(key) for t in trials])
            fields.append(field)
            arrays.append(array)
    field, array = _column("intermediate_values", [{str(k): v for k, v in t.intermediate_values.items()}
                                                     for t in trials])
    fields.append(pa.field("intermediate_values", pa.map_(pa.string(), pa.float64())))
    arrays.append(array.cast(fields[-1].type) if trials else pa.array([], type=fields[-1].type))
    return pa.Table.from_arrays(arrays, schema=pa.schema(fields, metadata={b"study_name": study.study_name.encode()}))


def write_trials_parquet(study: optuna.Study, path: Path) -> Path:
    """Write ``trials_table(study)`` to ``path``."""
    pq.write_table(trials_table(study), path)
    return path


def read_trials_parquet(path: Path) -> list[dict[str, Any]]:
    """Rows as {number, state, value, value_meaning, datetime_start, datetime_complete, params, user_attrs,
    intermediate_values}. A null cell is left out of ``params``/``user_attrs``: the study had no such key for
    that trial, or its value was None."""
    table = pq.read_table(path)
    rows: list[dict[str, Any]] = []
    for record in table.to_pylist():
        row: dict[str, Any] = {"params": {}, "user_attrs": {}}
        for field in table.schema:
            value = record[field.name]
            if field.metadata == _JSON and value is not None:
                value = json.loads(value)
            elif pa.types.is_map(field.type) and value is not None:
                value = dict(value)
            for prefix, bucket in (("params_", "params"), ("user_attrs_", "user_attrs")):
                if field.name.startswith(prefix):
                    if value is not None:
                        row[bucket][field.name[len(prefix):]] = value
                    break
            else:
                row[field.name] = value
        row["intermediate_values"] = {int(k): v for k, v in (row.get("intermediate_values") or {}).items()}
        rows.append(row)
    return rows
