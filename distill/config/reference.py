"""The config reference (docs/config.md), generated from the typed schema in distill/config/schema.py so
that it cannot drift: every key, its type, its default, and the comment written beside the field.

    python -m distill.config.reference > docs/config.md      (or: make docs)
"""

from __future__ import annotations

import dataclasses
import inspect
import io
import re
import tokenize
from enum import Enum

from data import teacher_config
from distill.config import schema

HEADER = """# Config reference

Generated from the typed schema (`distill/config/schema.py`, `data/teacher_config.py`) by
`python -m distill.config.reference > docs/config.md` (`make docs`); a test fails when this file is stale.
Set keys in a YAML file (`--config`, repeatable: later files win) or on the command line as
`key=value` (`train.lr=3e-4`, `teachers.vision.0.image_size=112`). An unknown key, a wrong type,
an unknown choice or a value outside its range (the `range` column: `>= 1`, `> 0`, `[0, 1)`, ...; a
float must also be finite) exits with code 2 and one line naming the key (and the allowed values);
`mmtp <command> --print-config` prints the resolved config without running anything.
"""


def field_comments(cls: type) -> dict[str, str]:
    """The comment beside each field, or the comment lines just above it."""
    comments: dict[str, str] = {}
    pending: list[str] = []
    line_start, name = True, None
    for tok in tokenize.generate_tokens(io.StringIO(inspect.getsource(cls)).readline):
        if tok.type == tokenize.COMMENT:
            text = tok.string.lstrip("#").strip()
            if name and not line_start:
                comments[name] = " ".join(filter(None, [comments.get(name), text]))
            else:
                pending.append(text)
        elif tok.type == tokenize.NAME and line_start:
            name, line_start = tok.string, False
            if pending:
                comments[name] = " ".join(pending)
                pending = []
        elif tok.type in (tokenize.NEWLINE, tokenize.NL):
            line_start = True
        elif tok.type not in (tokenize.INDENT, tokenize.DEDENT):
            line_start = False
    return comments


def _classes(kind: type) -> dict[str, type]:
    """The schema's dataclasses (kind=object) or enums (kind=Enum), by name."""
    return {name: obj for module in (schema, teacher_config) for name, obj in vars(module).items()
            if isinstance(obj, type) and issubclass(obj, kind) and obj is not kind
            and (kind is Enum or dataclasses.is_dataclass(obj))}


def _type_name(f: dataclasses.Field) -> str:
    """The annotation as written: `AdaptConfig | None`, not `data.teacher_config.AdaptConfig | None`."""
    return f.type.__name__ if isinstance(f.type, type) else re.sub(r"\b[a-z_]\w*\.", "", str(f.type))


def _nested(f: dataclasses.Field) -> type | None:
    """The dataclass a field holds (directly or as list items), if any."""
    for name, cls in _classes(object).items():
        if _type_name(f) in (name, f"list[{name}]", f"{name} | None"):
            return cls
    return None


def top_level_keys() -> list[tuple[str, str]]:
    """(key, one-line meaning) of every top-level config key: the comment beside it, else the first
    line of its section's docstring (for `mmtp --help`)."""
    comments = field_comments(schema.Config)
    out = []
    for f in dataclasses.fields(schema.Config):
        nested = _nested(f)
        doc = (inspect.getdoc(nested) or "").split("\n")[0] if nested else ""
        out.append((f.name, comments.get(f.name) or doc))
    return out


def _default(f: dataclasses.Field) -> str:
    if f.default is not dataclasses.MISSING:
        value = f.default
    elif f.default_factory is not dataclasses.MISSING:
        value = f.default_factory()
    else:
        return "required"
    if isinstance(value, Enum):
        value = value.value
    if dataclasses.is_dataclass(value):
        return ""
    if isinstance(value, list) and value and dataclasses.is_dataclass(value[0]):
        return f"{len(value)} entry" + ("" if len(value) == 1 else "s")
    if isinstance(value, list):
        value = [v.value if isinstance(v, Enum) else v for v in value]
    return "null" if value is None else f"`{value!r}`" if isinstance(value, str) else f"`{value}`"


def _type(f: dataclasses.Field) -> str:
    enums = _classes(Enum)
    name = _type_name(f)
    if name in enums:
        return " \\| ".join(e.value for e in enums[name])
    if name.startswith("list[") and name[5:-1] in enums:
        return "list of " + " \\| ".join(e.value for e in enums[name[5:-1]])
    return _type_name(f).replace("|", "\\|")


def render() -> str:
    out = [HEADER]
    sections: dict[type, list[str]] = {schema.Config: [""]}  # a class reached from several keys is listed once
    walked = 0
    while walked < len(sections):  # sections grows while it is walked, in order
        cls = list(sections)[walked]
        prefixes, walked = sections[cls], walked + 1
        title = " and ".join(p.rstrip(".") for p in prefixes) or "top level"
        doc = inspect.getdoc(cls) or ""
        doc = "" if doc.startswith(cls.__name__ + "(") else doc  # dataclass' generated signature
        out += [f"\n## {title}\n", *([doc + "\n"] if doc else []), "| key | type | default | range | meaning |",
                "|---|---|---|---|---|"]
        comments = field_comments(cls)
        for f in dataclasses.fields(cls):
            key = (prefixes[0] if len(prefixes) == 1 else "") + f.name
            meaning = comments.get(f.name, "")
            nested = _nested(f)
            if nested is not None:
                sub = prefixes[0] + f.name + (".N." if str(f.type).startswith("list") else ".")
                sections.setdefault(nested, []).append(sub)
                meaning = meaning or f"see `{sub.rstrip('.')}` below"
            spec = f"`{f.metadata['range']}`" if "range" in f.metadata else ""
            out.append(f"| `{key}` | {_type(f)} | {_default(f)} | {spec} | {meaning.replace('|', chr(92) + '|')} |")
    return "\n".join(out) + "\n"

if __name__ == "__main__":
    print(render(), end="")
