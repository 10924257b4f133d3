"""The COCO detection format as pydantic models, and their errors worded for the person who
has to fix the file: the file, the record (``annotations[12]``, with its id when it has one), the
key, the bad value and what it must be.

Only structure is checked here: keys, types, finite numbers, positive sizes. An annotation's
``iscrowd`` and ``area`` may be missing (script-written files often leave them out):
``fill_optional_keys`` gives them COCO's values for a box without a mask. Other keys
(``segmentation``, ``info``, ...) are allowed, as in COCO. What the records mean together (unique
ids, references, boxes inside images) is ``checks.py``'s.
"""

from __future__ import annotations

import gc
import json
from collections.abc import Iterable
from pathlib import Path
from typing import Annotated, Any

from pydantic import ConfigDict, Field, TypeAdapter, ValidationError
from typing_extensions import NotRequired, TypedDict

# Some converters write 640.0; CocoDetection reads int(value), so integral floats are fine.
_Size = Annotated[float, Field(gt=0, multiple_of=1)]


# TypedDicts rather than models: only the errors are wanted, and keys beyond these are skipped
# (COCO's own extra keys, and segmentation polygons that would be costly to copy). A TypedDict
# without a config of its own takes its parent's: `CocoFile`'s strict config applies to all.
class CocoImage(TypedDict):
    id: int
    file_name: Annotated[str, Field(min_length=1)]
    width: _Size
    height: _Size


class CocoAnnotation(TypedDict):
    id: int
    image_id: int
    category_id: int
    bbox: Annotated[list[float], Field(min_length=4, max_length=4)]  # [x, y, width, height]
    # Strict: "0" is no int (it would be truthy, a crowd box, where tested as a bool).
    iscrowd: NotRequired[Annotated[int, Field(ge=0, le=1)]]
    area: NotRequired[Annotated[float, Field(ge=0)]]


class CocoCategory(TypedDict):
    id: int
    name: str


class CocoFile(TypedDict):
    # strict: True is not 1, "3" is not 3, 3.0 is not an id; allow_inf_nan: JSON's NaN is no number.
    __pydantic_config__ = ConfigDict(strict=True, allow_inf_nan=False)  # type: ignore[misc]
    images: list[CocoImage]
    annotations: list[CocoAnnotation]
    categories: list[CocoCategory]


_FILE = TypeAdapter(CocoFile)
LISTS = ("images", "annotations", "categories")
_RECORD = {"images": "image", "annotations": "annotation", "categories": "category"}
_RULE = {
    "id": "an integer", "image_id": "an integer", "category_id": "an integer",
    "file_name": "a non-empty string", "width": "a positive integer",
    "height": "a positive integer",
    "bbox": "[x, y, width, height] with 4 finite numbers", "name": "a string",
    "iscrowd": "0 or 1 (an integer; leave it out for 0)",
    "area": "a finite number >= 0 (leave it out for the box's width * height)",
}


def short(value: Any, limit: int = 80) -> str:
    text = json.dumps(value, default=str)
    return text if len(text) <= limit else text[: limit - 3] + "..."


def is_int(value: Any) -> bool:
    return isinstance(value, int) and not isinstance(value, bool)


def fill_optional_keys(annotations: Iterable[dict[str, Any]]) -> tuple[int, int]:
    """Give annotations without ``iscrowd`` 0 and without ``area`` their box's width * height
    (what COCO converters write for a box without a mask; pycocotools' evaluation reads both).
    The dicts are changed in place. Returns how many lacked (iscrowd, area)."""
    no_crowd = no_area = 0
    for ann in annotations:
        if "iscrowd" not in ann:
            ann["iscrowd"] = 0
            no_crowd += 1
        if "area" not in ann:
            _, _, w, h = ann["bbox"]
            ann["area"] = max(float(w), 0.0) * max(float(h), 0.0)
            no_area += 1
    return no_crowd, no_area


def structure_problems(data: Any, ann_file: Path) -> tuple[list[str], dict[str, set[int]] | None]:
    """Validate a loaded annotation file against ``CocoFile``. Returns one message per bad record
    (every problem of the file at once) and, per list, the positions of the bad records; None
    instead when the top level is unusable (not an object, or a list missing)."""
    # The validated copy is thrown away, and reference counting frees it. Without the pause, the
    # garbage collector would walk the whole parsed file again and again while the copy grows
    # (benchmarks/README.md, "COCO structure check").
    was_enabled = gc.isenabled()
    gc.disable()
    try:
        _FILE.validate_python(data)
        return [], {name: set() for name in LISTS}
    except ValidationError as err:
        errors = err.errors(include_url=False)
    finally:
        if was_enabled:
            gc.enable()
    if any(not e["loc"] for e in errors):
        return [f"{ann_file}: a COCO annotation file is a JSON object with images, annotations "
                f"and categories; got a {type(data).__name__}"], None
    top = [k for k in LISTS if not isinstance(data.get(k), list)]
    if top:
        return [f"{ann_file}: " + "; ".join(
            f"'{k}' is missing" if k not in data else
            f"'{k}' must be a list, got {type(data[k]).__name__}" for k in top)
            + " (COCO needs the lists images, annotations and categories)"], None
    keys: dict[tuple[str, int], dict[str, None]] = {}  # (list, position) -> bad keys, in order
    for e in errors:
        name, position, *key = e["loc"]
        keys.setdefault((name, position), {}).update(dict.fromkeys(key[:1]))
    bad: dict[str, set[int]] = {name: set() for name in LISTS}
    messages = []
    for (name, position), record_keys in keys.items():
        bad[name].add(position)
        record = data[name][position]
        where = f"{ann_file}: {name}[{position}]"
        if not isinstance(record, dict):
            messages.append(f"{where} must be a JSON object, got {short(record)}")
            continue
        if is_int(record.get("id")):
            where += f" ({_RECORD[name]} id {record['id']})"
        messages.append(f"{where}: " + "; ".join(
            f"'{k}' must be {_RULE[k]}, "
            + (f"got {short(record[k])}" if k in record else "but it is missing")
            for k in record_keys))
    return messages, bad
