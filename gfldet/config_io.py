"""Everything between a user's text and gfldet's config schema: the strict safe YAML loader,
`base:` chains, `--cfg-options` overrides, where each dotted key was set (its origin), YAML
output, and the messages for what pydantic refuses (key, value, what is allowed, closest key).

A file is a YAML mapping read by PyYAML's safe loader (no python tags, duplicate keys refused,
``1e-4`` a float as in YAML 1.2). Its ``base: other.yaml`` (relative to it; chains allowed,
cycles refused) is loaded first and the file deep-merged onto it: mappings merge key by key,
lists and scalars replace. Overrides ``a.b.c=value`` are merged last, the same way, each value
parsed as YAML (``8``, ``[8, 11]``, ``null``; ``abc`` is the string "abc"). A key of the layout
before issue 17 (``MOVED``) is an error naming its new place; a stored config is migrated.
"""

from __future__ import annotations

import copy
import dataclasses
import difflib
import functools
import logging
import numbers
import os
import re
import types
import typing
from collections.abc import Iterable, Sequence
from pathlib import Path
from typing import Annotated, Any, Literal

import yaml
from pydantic import TypeAdapter, ValidationError

log = logging.getLogger("gfldet")
OVERRIDE_SOURCE = "--cfg-options"
Origins = dict[str, str]  # dotted key -> the file (or OVERRIDE_SOURCE) that set it last


class ConfigError(ValueError):
    """A config file, an override or a config value is invalid; the message says which and why."""


class _StrictSafeLoader(yaml.SafeLoader):
    """PyYAML's SafeLoader (no python tags) that also rejects duplicate keys and reads
    exponent floats without a dot (``1e-4``) as floats, as YAML 1.2 does."""

    def construct_mapping(self, node: yaml.MappingNode, deep: bool = False) -> dict:
        seen: dict[Any, yaml.Node] = {}
        for key_node, _ in node.value:
            if key_node.tag == "tag:yaml.org,2002:merge":
                continue
            key = self.construct_object(key_node, deep=True)
            try:
                first = seen.setdefault(key, key_node)
            except TypeError:  # unhashable key: the base class reports it
                continue
            if first is not key_node:
                raise yaml.constructor.ConstructorError(
                    "while constructing a mapping", node.start_mark,
                    f"found duplicate key {key!r} (first defined on line "
                    f"{first.start_mark.line + 1})", key_node.start_mark)
        return super().construct_mapping(node, deep=deep)


_EXP_FLOAT = re.compile(r"^[-+]?(?:[0-9][0-9_]*(?:\.[0-9_]*)?|\.[0-9_]+)[eE][-+]?[0-9]+$")
_StrictSafeLoader.add_implicit_resolver("tag:yaml.org,2002:float", _EXP_FLOAT,
                                        list("-+0123456789."))


def _yaml_load(text: str) -> Any:
    return yaml.load(text, Loader=_StrictSafeLoader)  # noqa: S506 - a SafeLoader subclass


def _yaml_error(source: str, exc: yaml.YAMLError) -> ConfigError:
    mark = getattr(exc, "problem_mark", None) or getattr(exc, "context_mark", None)
    where = f"{source}:{mark.line + 1}:{mark.column + 1}" if mark is not None else source
    problem = getattr(exc, "problem", None) or str(exc)
    context = getattr(exc, "context", None)
    context_mark = getattr(exc, "context_mark", None)
    if context and context_mark is not None and context_mark is not mark:
        context = f"{context} (line {context_mark.line + 1})"
    detail = f"{context}: {problem}" if context else problem
    hint = (" (only plain YAML is accepted: tags such as !!python/... are refused)"
            if "constructor for the tag" in detail else "")
    return ConfigError(f"{where}: malformed YAML: {detail}{hint}")


def _read_mapping(path: Path, display: str) -> dict:
    try:
        text = path.read_text(encoding="utf-8")
    except FileNotFoundError:
        raise ConfigError(f"config file not found: {display}") from None
    except (OSError, UnicodeDecodeError) as exc:
        raise ConfigError(f"cannot read config file {display}: {exc}") from None
    try:
        data = _yaml_load(text)
    except yaml.YAMLError as exc:
        raise _yaml_error(display, exc) from None
    if data is None:
        raise ConfigError(f"{display}: the file is empty; a config must be a YAML mapping "
                          "(write `{}` to use all defaults)")
    if not isinstance(data, dict):
        raise ConfigError(f"{display}: the top level must be a YAML mapping (key: value), "
                          f"got {type(data).__name__}")
    return data


def merge_into(dst: dict, src: dict, origins: Origins, source: str, prefix: str = "") -> None:
    """Deep-merge ``src`` onto ``dst`` in place (mappings merge, lists and scalars replace),
    recording ``source`` as the origin of every key it sets."""
    for key, value in src.items():
        dotted = f"{prefix}.{key}" if prefix else str(key)
        origins[dotted] = source
        if not (isinstance(value, dict) and isinstance(dst.get(key), dict)):  # replace
            for stale in [k for k in origins if k.startswith(dotted + ".")]:
                del origins[stale]
            dst[key] = {} if isinstance(value, dict) else copy.deepcopy(value)
        if isinstance(value, dict):
            merge_into(dst[key], value, origins, source, dotted)


def load_tree(path: Path, display: str, origins: Origins,
              chain: tuple[tuple[Path, str], ...] = ()) -> dict:
    """The mapping of ``path`` merged onto its ``base:`` chain; ``display`` names the file in
    messages."""
    resolved = path.resolve()
    if any(seen == resolved for seen, _ in chain):
        cycle = " -> ".join([name for _, name in chain] + [display])
        raise ConfigError(f"base cycle: {cycle}; remove one of these `base:` keys")
    data = _read_mapping(path, display)
    merged: dict = {}
    if "base" in data:
        base = data.pop("base")
        if not isinstance(base, str) or not base.strip():
            raise ConfigError(f"{display}: `base` must be a path to another YAML file "
                              f"(relative to {display}), got {base!r}")
        base_path = path.parent / base
        base_display = os.path.normpath(os.path.join(os.path.dirname(display), base))
        if not base_path.is_file():
            raise ConfigError(f"{display}: base file {base!r} not found (looked for "
                              f"{base_display}); `base` is relative to the file naming it")
        merged = load_tree(base_path, base_display, origins, (*chain, (resolved, display)))
    merge_into(merged, data, origins, display)
    return merged


def read(source: str | os.PathLike[str] | dict, overrides: Sequence[str] = (),
         name: str = "<dict>") -> tuple[dict, Origins]:
    """A config file (following ``base:``) or a mapping (named ``name``), with ``overrides``
    merged on top, and the origin of every key."""
    origins: Origins = {}
    if isinstance(source, dict):
        data: dict = {}
        merge_into(data, source, origins, name)
    else:
        data = load_tree(Path(source), os.fspath(source), origins)
    merge_into(data, parse_overrides(overrides), origins, OVERRIDE_SOURCE)
    return data, origins


def parse_overrides(items: Iterable[str]) -> dict:
    """Turn ``["optim.lr=0.02", "schedule.milestones=[16, 22]"]`` into a nested mapping; each
    value is parsed as YAML, later items win. A malformed item is a :class:`ConfigError`."""
    if isinstance(items, str):
        raise ConfigError("overrides must be a list of 'key=value' strings, not one string")
    out: dict = {}
    for item in items:
        if not isinstance(item, str) or "=" not in item:
            raise ConfigError(f"{OVERRIDE_SOURCE}: {item!r} is not of the form key=value "
                              "(e.g. optim.lr=0.02 or schedule.milestones=[16,22])")
        key, text = item.split("=", 1)
        if any(not p or p != p.strip() for p in key.strip().split(".")):
            raise ConfigError(f"{OVERRIDE_SOURCE}: {item!r} has an invalid key {key!r}; "
                              "use dotted names such as model.backbone.depth")
        try:
            value = _yaml_load(text)
        except yaml.YAMLError as exc:
            raise ConfigError(f"{OVERRIDE_SOURCE}: cannot parse the value of {item!r} as YAML "
                              f"({getattr(exc, 'problem', exc)}); quote strings that contain "
                              "YAML syntax") from None
        node, leaf = _parent(out, key.strip(), create=True)
        node[leaf] = value
    return out


def where(origins: Origins, key: str) -> str:
    """Where the dotted ``key`` (or its nearest parent) was set, for a message."""
    key = re.sub(r"\[\d+\]", "", key)
    while key:
        if key in origins:
            src = origins[key]
            return "from --cfg-options" if src == OVERRIDE_SOURCE else f"in {src}"
        key = key.rpartition(".")[0]
    return "default"


def show(value: Any) -> str:
    """A value as it would be written in YAML (short)."""
    if isinstance(value, str):
        return repr(value) if len(value) <= 80 else repr(value[:77]) + "..."
    if isinstance(value, tuple):
        value = list(value)
    try:
        text = yaml.safe_dump(value, default_flow_style=True, width=10_000).strip()
    except yaml.YAMLError:
        text = repr(value)
    text = text.removesuffix("\n...").removesuffix("...").strip()
    return text if len(text) <= 80 else text[:77] + "..."


class _Dumper(yaml.SafeDumper):
    """SafeDumper writing mappings in block style and lists of scalars inline ([8, 11])."""


def _represent_list(dumper: yaml.SafeDumper, data: list) -> yaml.Node:
    flow = all(not isinstance(v, dict | list) for v in data)
    return dumper.represent_sequence("tag:yaml.org,2002:seq", data, flow_style=flow)


_Dumper.add_representer(list, _represent_list)
# so that a string such as "1e5" is quoted, as the loader would read it as a float
_Dumper.add_implicit_resolver("tag:yaml.org,2002:float", _EXP_FLOAT, list("-+0123456789."))


class _Foreign:
    """A value of no YAML type (a torch tensor, ...) on its way to validation, which refuses it:
    pydantic's float would take anything with __float__. `_explain` names the value inside."""

    def __init__(self, value: Any) -> None:
        self.value = value


def as_data(obj: Any, extras: bool = False) -> Any:
    """A config object as plain YAML-able types in schema order (tuples become lists). With
    `extras` (for validation), also the attributes set on a section that are none of its keys (a
    typo such as `cfg.schedule.epoch = 2`), reported then as unknown keys; and Python's values
    converted as their YAML would be: os.PathLike -> str, numpy integers -> int, numpy floats ->
    float, any other non-YAML value (a tensor) refused."""
    if dataclasses.is_dataclass(obj) and not isinstance(obj, type):
        names = [f.name for f in dataclasses.fields(obj)]
        names += [n for n in vars(obj) if n not in names] if extras else []
        data = {n: as_data(getattr(obj, n), extras) for n in names}
        for name, tp in typing.get_type_hints(type(obj)).items() if extras else ():
            base, _, nullable = _unwrap(tp)
            given = getattr(obj, name, None)
            if isinstance(given, dict) and dataclasses.is_dataclass(base) and not nullable and (
                    lacks := _lacking(base, given)):  # `_explain` words it
                data[name][_PARTIAL] = (lacks, next(iter(given.items()), None))
        return data
    if isinstance(obj, list | tuple):
        return [as_data(v, extras) for v in obj]
    if isinstance(obj, dict):
        return {k: as_data(v, extras) for k, v in obj.items()}
    if not extras or obj is None or isinstance(obj, str | bool | int | float):
        return copy.deepcopy(obj)
    if isinstance(obj, os.PathLike):
        return os.fspath(obj)
    if isinstance(obj, numbers.Integral | numbers.Real):  # numpy scalars; not np.bool_
        return int(obj) if isinstance(obj, numbers.Integral) else float(obj)
    return _Foreign(obj)


_PARTIAL = "<partial section>"  # as_data's mark on a section given as a dict lacking keys


def _lacking(section: type, given: dict, prefix: str = "") -> list[str]:
    """The keys of `section` (with those of its required sections) that dict `given` lacks."""
    lacks = []
    for name, tp in typing.get_type_hints(section).items():
        base, _, nullable = _unwrap(tp)
        if name not in given:
            lacks.append(prefix + name)
        elif isinstance(given[name], dict) and dataclasses.is_dataclass(base) and not nullable:
            lacks += _lacking(base, given[name], f"{prefix}{name}.")
    return lacks


def to_yaml(data: dict) -> str:
    """``data`` as block-style YAML in its own key order, readable by the loader above."""
    return yaml.dump(data, Dumper=_Dumper, sort_keys=False, default_flow_style=False,
                     allow_unicode=True, width=100)


# ------------------------------------------------------------------ pydantic errors -> messages
# A schema is a tree of dataclasses whose leaves are Annotated types (Strict, Field bounds or
# pattern). RULES_ERROR is the error type of a model validator reporting several broken
# cross-field rules at once; its context holds ``problems``: (dotted key, value, allowed) each.

RULES_ERROR = "gfldet_rules"
_BOUNDS = ("greater_than", "greater_than_equal", "less_than", "less_than_equal")


def _unwrap(tp: Any) -> tuple[Any, list, bool]:
    """``Annotated[X, ...] | None`` -> (X, its metadata with Field constraints flattened, whether
    null is allowed)."""
    nullable = typing.get_origin(tp) in (typing.Union, types.UnionType)
    if nullable:  # the schema's unions are all `X | None`
        tp = next(a for a in typing.get_args(tp) if a is not type(None))
    if typing.get_origin(tp) is not Annotated:
        return tp, [], nullable
    base, *extra = typing.get_args(tp)
    return base, [m for e in extra for m in [e, *getattr(e, "metadata", [])]], nullable


@functools.cache
def _fields(cls: type, prefix: str = "") -> dict[str, Any]:
    """Every valid dotted key under ``cls`` (sections included) -> its annotation, in schema
    order."""
    fields = {}
    for name, tp in typing.get_type_hints(cls, include_extras=True).items():
        fields[prefix + name] = tp
        if dataclasses.is_dataclass(section := _unwrap(tp)[0]):
            fields.update(_fields(section, f"{prefix}{name}."))
    return fields


def _at(root: type, loc: Sequence) -> Any:
    """The annotation at a pydantic error location such as ('data', 'train_short_side', 0)."""
    if not isinstance(loc[-1], int):
        return _fields(root)[_dotted(loc)]
    base = _unwrap(_at(root, loc[:-1]))[0]  # an item of list[X] or tuple[X, Y]
    args = typing.get_args(base)
    return args[0] if typing.get_origin(base) is list else args[loc[-1]]


def _type_name(tp: Any) -> str:
    base, _, nullable = _unwrap(tp)
    origin, args = typing.get_origin(base), typing.get_args(base)
    if origin is list:
        name = f"list[{_type_name(args[0])}]"
    elif origin is tuple:
        name = f"tuple[{', '.join(map(_type_name, args))}] (a list of {len(args)})"
    elif dataclasses.is_dataclass(base):
        name = f"a mapping ({base.__name__})"
    else:
        name = {bool: "bool (true/false)"}.get(base, getattr(base, "__name__", ""))
    return name + (" or null" if nullable else "")


def _allowed(tp: Any) -> str:
    """What a value of ``tp`` must be: a range, one of its literals, or its Field description."""
    base, meta, nullable = _unwrap(tp)
    b = {k: getattr(m, k) for m in meta for k in ("ge", "gt", "le", "lt") if hasattr(m, k)}
    lo = ("[", b["ge"]) if "ge" in b else ("(", b["gt"]) if "gt" in b else None
    hi = ("]", b["le"]) if "le" in b else (")", b["lt"]) if "lt" in b else None
    if lo and hi:
        text = f"in {lo[0]}{lo[1]}, {hi[1]}{hi[0]}"
    elif lo:
        text = f"{'>=' if lo[0] == '[' else '>'} {lo[1]}"
    elif typing.get_origin(base) is Literal:
        text = "one of " + ", ".join(show(a) for a in typing.get_args(base))
    else:
        text = next(m.description for m in meta if getattr(m, "description", None))
    return text + (" or null" if nullable else "")


def _dotted(loc: Sequence) -> str:
    return "".join(f"[{p}]" if isinstance(p, int) else f".{p}" for p in loc).lstrip(".")


def _unknown(root: type, loc: tuple) -> str:
    """An unknown key's message, with the closest valid key here or anywhere in the tree."""
    name, prefix, fields = loc[-1], _dotted(loc[:-1]), _fields(root)
    names = [k.rpartition(".")[2] for k in fields if k.rpartition(".")[0] == prefix]
    close = difflib.get_close_matches(name, names, n=1, cutoff=0.7)
    suggestion = f"{prefix}.{close[0]}".lstrip(".") if close else None
    if suggestion is None:  # maybe the key exists elsewhere in the tree (e.g. optim.epochs)
        leaves = {k.rpartition(".")[2]: k for k in reversed(fields)}
        near = [name] if name in leaves else difflib.get_close_matches(name, leaves, 1, 0.8)
        suggestion = leaves[near[0]] if near else None
    hint = f"; did you mean '{suggestion}'?" if suggestion else ";"
    scope = f"'{prefix}'" if prefix else "the top level"
    return f"unknown key '{_dotted(loc)}'{hint} valid keys at {scope}: {', '.join(names)}"


def _explain(err: Any, root: type) -> list[tuple[str, str]]:
    """(dotted key, message) for one pydantic error (several for RULES_ERROR)."""
    loc, kind, value = tuple(err["loc"]), err["type"], err["input"]
    value = value.value if isinstance(value, _Foreign) else value
    if kind == RULES_ERROR:
        return [(k, f"{k}={show(v)} is invalid: must be {a}") for k, v, a in err["ctx"]["problems"]]
    if kind in ("missing", "too_long") and loc and isinstance(loc[-1], int):
        loc = loc[:-1]  # a tuple of the wrong length: name the whole key
    key = _dotted(loc)
    if loc and loc[-1] == _PARTIAL:  # a dict cannot merge onto the section it replaced
        (lacks, item), key = value, _dotted(loc[:-1])
        fix = f"cfg.{key}.{item[0]} = {item[1]!r}" if item else f"cfg.{key}.KEY = VALUE"
        return [(key, f"{key}: a dict replaces the whole section, and this one lacks "
                      f"{', '.join(lacks)} (the schema's defaults would replace the config's "
                      f"values): set keys one by one ({fix}) or give all of them")]
    if kind in ("unexpected_keyword_argument", "extra_forbidden"):
        return [(key, _unknown(root, loc))]
    if kind == "invalid_key":  # the location ends with the key itself
        key = f"{_dotted(loc[:-1])}.{value}".lstrip(".")
        return [(key, f"{key}: keys must be strings, got {show(value)} ({type(value).__name__})")]
    if kind == "finite_number":
        return [(key, f"{key}: expected a finite float, got {show(value)}")]
    tp = _at(root, loc)
    if kind in (*_BOUNDS, "literal_error", "string_pattern_mismatch"):
        if type(value) is int and _unwrap(tp)[0] is float:
            value = float(value)  # as the config would hold it
        return [(key, f"{key}={show(value)} is invalid: must be {_allowed(tp)}")]
    got = "null" if value is None else type(value).__name__
    return [(key, f"{key}: expected {_type_name(tp)}, got {show(value)} ({got})")]


def report(header: str, errors: list[str]) -> str:
    """One message for one or several problems."""
    if len(errors) == 1:
        return f"{header}: {errors[0]}"
    return f"{header} ({len(errors)} problems):\n" + "\n".join(f"  - {e}" for e in errors)


# ------------------------------------------------------------------ keys that moved
# Issue 17 put each key under the part whose constructor reads it. A file or override naming an
# old key is refused with its new name; a stored config (a checkpoint's, read by
# config.config_from_dict) written before is moved by this table, and the log says so.
MOVED = {
    "model.loss.box_repr": "model.head.box_repr",
    "model.loss.dirac_init_distance": "model.head.dirac_init_distance",
    "model.head.octave_base_scale": "model.priors.octave_base_scale",
    "model.head.dgqp_topk": "model.head.dgqp.topk",
    "model.head.dgqp_channels": "model.head.dgqp.channels",
    "model.head.dgqp_add_mean": "model.head.dgqp.add_mean",
}
DGQP = "model.head.dgqp"  # was a bool switch; now GFLv2's section: true -> {}, false -> null
_DGQP_SWITCH = (f"{DGQP} is GFLv2's section now: write {DGQP}: {{}} (the paper's settings) "
                "instead of true, null instead of false")


def _parent(data: dict, dotted: str, create: bool = False) -> tuple[dict | None, str]:
    """The mapping holding ``dotted``'s last part (None if there is none), and that part."""
    *parents, leaf = dotted.split(".")
    for part in parents:
        if create and not isinstance(data.get(part), dict):
            data[part] = {}
        data = data.get(part)
        if not isinstance(data, dict):
            return None, leaf
    return data, leaf


def _pop_old_keys(data: dict) -> list[tuple[str, Any]]:
    """(key, value) of each key of the old layout in ``data`` (the DGQP switch first), removed
    from it."""
    out = []
    for old in (DGQP, *MOVED):
        node, leaf = _parent(data, old)
        if node is not None and leaf in node and (old != DGQP or isinstance(node[leaf], bool)):
            out.append((old, node.pop(leaf)))
    return out


def migrate(data: dict, source: str) -> dict:
    """A copy of the stored config ``data`` with the keys of the old layout moved (logged);
    ``source`` is a checkpoint's path, or "<dict>" for a mapping given in Python."""
    data, done, switch = copy.deepcopy(data), [], None
    for old, value in _pop_old_keys(data):
        new = MOVED.get(old, DGQP)
        if old == DGQP:
            switch = value
            value = {} if switch else None
            done.append(f"{DGQP}: {show(switch)} -> {show(value)}")
        elif new.startswith(DGQP + ".") and switch is not True:
            done.append(f"{old} dropped (GFLv1)")
            continue
        else:
            done.append(f"{old} -> {new}")
        node, leaf = _parent(data, new, create=True)
        node[leaf] = value
    # The callers name a checkpoint by its path; "<dict>" (config_from_dict's default) is a
    # mapping a user wrote, for whom the export advice makes no sense.
    fix = ("Use the new keys (a YAML file or --cfg-options refuses the old ones)"
           if source == "<dict>" else
           "tools/export.py CHECKPOINT --format weights writes a copy that loads without this note")
    if done:
        log.warning("%s: config written before gfldet's keys moved to the parts that read them; "
                    "migrated: %s. %s", source, ", ".join(done), fix)
    return data


_adapter = functools.cache(TypeAdapter)


def check(root: type, data: dict) -> tuple[Any, list[tuple[str, str]]]:
    """Validate ``data`` as ``root``: (the object, []) or (None, every problem as (dotted key,
    message))."""
    try:
        return _adapter(root).validate_python(data), []
    except ValidationError as exc:
        errors = exc.errors(include_url=False)
    problems = []
    for err in errors:
        try:
            problems += _explain(err, root)
        except (KeyError, IndexError, TypeError, StopIteration):  # a shape not foreseen above
            key = _dotted(err["loc"])
            problems.append((key, f"{key}: {err['msg']}, got {show(err['input'])}"))
    return None, problems


def build(root: type, data: dict, origins: Origins, name: str) -> Any:
    """``data`` validated as ``root``, or a ConfigError naming every problem and where it was
    set."""
    moved = [(old, _DGQP_SWITCH if old == DGQP else f"{old} moved to {MOVED[old]}")
             for old, _ in _pop_old_keys(data)]
    obj, problems = check(root, data)
    if problems := moved + problems:
        lines = [f"{msg} [{where(origins, key)}]" for key, msg in problems]
        raise ConfigError(report(f"invalid config {name}", lines))
    return obj
