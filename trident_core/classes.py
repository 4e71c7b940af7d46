"""Class lists: parse "sky, horse; pony, grass" into classes with synonyms, and an optional background class."""

from __future__ import annotations

import re
import unicodedata
from dataclasses import dataclass

UNLABELED = -1
"""Label of pixels under `prob_thd` when the class list has no background class (the reference would silently
pick class 0 there)."""

MAX_CLASSES = 1000


class ClassListError(ValueError):
    """A class list that cannot be used (empty, duplicate or unusable names)."""


@dataclass(frozen=True)
class ClassList:
    """Classes in label order; each class is one or more names (synonyms, "queries").

    With `has_background`, class 0 is the background and pixels under `prob_thd` get label 0; otherwise they get
    `UNLABELED`."""

    classes: tuple[tuple[str, ...], ...]
    has_background: bool = False

    def __post_init__(self) -> None:
        """Refuse a layout that would be read wrongly: ("sky", "grass") was taken for classes s, k, y and g, r, ..."""
        if (not isinstance(self.classes, (tuple, list)) or not self.classes
                or any(isinstance(c, str) or not c or not all(isinstance(n, str) and _visible(n) for n in c)
                       for c in self.classes)):
            raise ClassListError(f"ClassList takes classes as a tuple of tuples of names, not {self.classes!r}: "
                                 "use parse_classes('sky, grass') or ClassList((('sky',), ('grass', 'lawn')))")

    @property
    def names(self) -> list[str]:
        """One display name per class: its first synonym."""
        return [c[0] for c in self.classes]

    @property
    def queries(self) -> list[str]:
        """Every name of every class, in order."""
        return [q for c in self.classes for q in c]

    @property
    def query_class(self) -> list[int]:
        """For each query, the index of its class."""
        return [i for i, c in enumerate(self.classes) for _ in c]

    def __len__(self) -> int:
        return len(self.classes)


def _split_synonyms(entry: str) -> tuple[str, ...]:
    return tuple(s.strip() for s in entry.split(";") if _visible(s))


def _visible(name: str) -> bool:
    """Whether a name shows anything: not only spaces and invisible characters (a zero-width space, a BOM)."""
    return any(not unicodedata.category(c).startswith(("Z", "C")) for c in name)


def split_typed(text: str) -> list[str]:
    """Entries of typed text: commas and line breaks both separate classes ("sky, person" then "grass" on the
    next line is three classes)."""
    return re.split(r"[,\r\n]", text)


def parse_classes(text: str | list[str] | tuple[str, ...], background: str | None = None,
                  several: bool = True) -> ClassList:
    """Parse a class list as people type it.

    A string is typed text: commas and line breaks separate classes, `;` separates synonyms of one class
    ("sky, horse; pony, grass": three classes, the second with two names). A list holds one class per entry
    (commas are then part of a name, as in class files). `background`, when given (e.g. "sky; wall; floor", or
    typed with commas: "sky, wall, floor"), becomes class 0 with those names: one class whatever separates them.
    `several=False` lets one class through (a preset adds its background to it: `check_several` then)."""
    if not (isinstance(text, str) or isinstance(text, (list, tuple)) and all(isinstance(e, str) for e in text)):
        raise TypeError(f"classes must be typed text ('sky, grass') or a list of names (['sky', 'grass']), not "
                        f"{type(text).__name__}")
    if background is not None and not isinstance(background, str):
        raise TypeError(f"background must be text ('sky; wall'), not {type(background).__name__}")
    entries = split_typed(text) if isinstance(text, str) else list(text)
    classes = [syn for syn in (_split_synonyms(e) for e in entries) if syn]
    bg = tuple(n for e in split_typed(background) for n in _split_synonyms(e)) if background else ()
    return _class_list(classes, bg, several=several)


def parse_class_lines(lines: list[str], background_first: bool = False) -> ClassList:
    """A class file's lines by the reference's rule: one class per line, `;` between synonyms, commas part of a
    name (ADE20K's "building, edifice"); with `background_first`, line 0 is the background class. A name may
    appear in two classes, as in the reference's COCO-Object list ("bed" is a background synonym and a class)."""
    classes = [syn for syn in (_split_synonyms(line) for line in lines) if syn]
    if background_first and classes:
        return _class_list(classes[1:], classes[0], unique=False)
    return _class_list(classes, (), unique=False)


def load_class_file(path: str, background_first: bool = False) -> ClassList:
    """The class list of a class file (`--classes FILE`, the reference's cls_*.txt); see parse_class_lines."""
    return parse_class_lines(read_class_file(path), background_first)


def _class_list(classes: list[tuple[str, ...]], background: tuple[str, ...], unique: bool = True,
                several: bool = True) -> ClassList:
    """Foreground classes (and a background class 0 when `background` has names), checked for usability; with
    `unique`, each name may appear once (typed text: a repeated name is a slip); with `several`, at least two
    classes (`check_several`)."""
    if not classes:
        raise ClassListError("no class names given: type class names separated by commas or on separate lines, "
                             "e.g. 'sky, horse, grass' (use ';' between synonyms of one class: 'horse; pony')")
    if background:
        classes = [background, *classes]
    if len(classes) > MAX_CLASSES:
        with_bg = f" ({len(classes) - 1} and the background)" if background else ""
        raise ClassListError(f"{len(classes)} classes given{with_bg}; at most {MAX_CLASSES} are supported, the "
                             "background counted: name fewer")
    seen: dict[str, int] = {}
    for i, cls in enumerate(classes):
        for name in cls:
            key = name_key(name)
            if key in seen and (unique or seen[key] == i):
                where = "twice in one class" if seen[key] == i else f"in classes {seen[key] + 1} and {i + 1}"
                raise ClassListError(f"class name {name!r} appears {where}; each name may appear once. "
                                     "Merge them into one class with ';' between synonyms, or remove one.")
            seen[key] = i
    cl = ClassList(tuple(classes), bool(background))
    return check_several(cl) if several else cl


_EXAMPLE_NAMES = ("background", "sky", "grass", "person", "dog", "car", "cat", "thing 1", "thing 2", "thing 3")


def check_several(cl: ClassList) -> ClassList:
    """`cl` if it has two classes or more: one class would label every pixel (its probability is 1, or with n
    synonyms at least 1/n: nothing tells it from anything else)."""
    if len(cl) == 1:
        name, taken = cl.names[0], {name_key(n) for n in cl.classes[0]}
        a, b, c = [n for n in _EXAMPLE_NAMES if name_key(n) not in taken][:3]
        raise ClassListError(f"one class ({'; '.join(cl.classes[0])}) would label every pixel: each pixel gets the "
                             f"most likely of the classes named, so name what else is in the image too, e.g. "
                             f"'{name}, {a}' or '{name}, {b}, {c}'")
    return cl


def read_class_file(path: str) -> list[str]:
    """Lines of a class file (one class per line, '; ' between synonyms), as the reference's configs/cls_*.txt.

    A UTF-8 byte-order mark (Windows editors write one), blank lines and `#` comment lines are not class names."""
    try:
        with open(path, encoding="utf-8-sig") as f:
            lines = [line.strip() for line in f if line.strip() and not line.lstrip().startswith("#")]
    except UnicodeDecodeError as e:
        raise ClassListError(f"class file {path} is not UTF-8 text ({e.reason} at byte {e.start}): save it as UTF-8 "
                             "with one class per line") from None
    if not lines:
        raise ClassListError(f"class file {path} holds no class names (only blank or '#' comment lines): write one "
                             "class per line, e.g. 'sky' then 'horse; pony'")
    return lines


def name_key(name: str) -> str:
    """A name compared case- and spacing-insensitively, in Unicode's compatibility form: full-width "ｓｋｙ" is "sky",
    a composed and a decomposed "café" are one name, "Straße" is "strasse"."""
    return " ".join(unicodedata.normalize("NFKC", name).casefold().split())


def class_indices(classes: ClassList, text: str) -> list[int]:
    """Indices of the classes named in `text` (commas, line breaks or ';' between names; any synonym, case-insensitive).

    A name with commas in it (ADE20K's "building, edifice") is taken whole before its parts. An empty text selects
    every class; a name that is in no class raises ClassListError listing the classes."""
    lookup = {_comma_key(n): i for i, names in enumerate(classes.classes) for n in names}
    wanted = _wanted(text, lookup)
    if not wanted:
        return list(range(len(classes)))
    unknown = [n for n in wanted if n not in lookup]
    if unknown:
        shown = [repr("; ".join(c)) for c in classes.classes[:_LISTED]]
        more = f" and {len(classes) - _LISTED} more" if len(classes) > _LISTED else ""
        raise ClassListError(f"class name(s) {', '.join(map(repr, unknown))} not in the segmentation's classes: "
                             f"{', '.join(shown)}{more}")
    return sorted({lookup[n] for n in wanted})


_LISTED = 40  # classes an unknown-name error lists (ADE20K-Full has 847)


def _comma_key(name: str) -> str:
    """`name_key`, with commas spaced alike ("building,edifice" is "building, edifice")."""
    return ", ".join(name_key(part) for part in name.split(","))


def _wanted(text: str, known: dict[str, int] | None = None) -> list[str]:
    """The names in `text` (commas, line breaks or ';' between them), compared by `_comma_key`; parts joined by
    commas that together are a `known` name are that one name (the longest such run first)."""
    parts: list[tuple[str, str]] = []  # (name, the separator before it)
    for chunk in re.split(r"[;\r\n]", text):
        parts += [(p, "," if i else ";") for i, p in enumerate(chunk.split(","))]
    names, i = [], 0
    while i < len(parts):
        j = len(parts)
        while j > i + 1 and not (all(sep == "," for _, sep in parts[i + 1:j])
                                 and _comma_key(",".join(p for p, _ in parts[i:j])) in (known or {})):
            j -= 1
        joined = ",".join(p for p, _ in parts[i:j])
        if _visible(joined):
            names.append(_comma_key(joined))
        i = j
    return names


def named_classes(classes: ClassList, text: str) -> list[int]:
    """Indices of the classes named in `text` (`class_indices`); text naming none (empty, or only separators):
    every class but the background."""
    if _wanted(text):
        return class_indices(classes, text)
    return list(range(1 if classes.has_background else 0, len(classes)))
