"""NewBie-image's XML prompts: parsed, checked, placed on the canvas by each character's `<position>`, and written
out as NewBie reads them, or flattened to tags for the other families.  Torch-free.

An XML prompt is a prompt (after `job.prompt_template`) whose first non-blank text opens a section, `<character_N>`
or `<general_tags>` (NewBie's README writes them so):

    <character_1><n>miku</n><gender>1girl</gender><appearance>blue_hair, blue_eyes</appearance>
    <position>left</position></character_1>
    <general_tags><style>anime_style</style><background>city, night</background></general_tags>

It is parsed with `xml.etree` inside a wrapper element, so several sections may follow one another.  Sections are
`<character_1>` ... `<character_4>`, `<general_tags>` and `<caption>` (natural-language text); a section holds fields
(`<n>`, `<gender>`, `<appearance>`, `<clothing>`, `<pose>`, `<position>`, `<style>`, `<lighting>`, any name) and a
field holds text, comma-separated tags.  One clear error names the tag of whatever breaks that (:func:`parse`).

A character with a `<position>` (:data:`POSITIONS`) becomes a region prompt over that box of the picture: its own
section (as `<character_1>`, without `<position>`, which the box replaces) and the general tags.  The background
prompt is what remains: the characters without a position and the general tags.  `<count>` and `<caption>` speak
of the whole picture ("2girls"), so the split prompts leave them out; a prompt without any position is not split.
For `model=newbie` each text is XML, as NewBie trained on it (models/newbie.py puts it behind NewBie's system prompt
for XML); for the other families it is flattened to tags (:func:`flatten`).
"""
from __future__ import annotations

import re
import xml.etree.ElementTree as ET
from typing import Dict, List, NamedTuple, Optional, Tuple
from xml.sax.saxutils import escape

from .families import FAMILIES
from .spec import ConfigError

MAX_CHARACTERS = 4
GENERAL = ("general_tags", "caption")  # the sections that are not characters
WHOLE_PICTURE = ("count", "caption")  # fields about the whole picture: left out of the split prompts
_WRAP = "tessera_xml_prompt"  # the wrapper element the sections are parsed in
_START = re.compile(r"\s*<(character_\w*|general_tags)\b")
_CHARACTER = re.compile(r"character_([0-9]+)$")
_TAG = re.compile(r"<(/?)([^\s<>/!?]+)[^<>]*?(/?)>")

# <position>: a column (its x range), optionally after a row (its y range); a row alone is the center column.
# The box is [x0, y0, x1, y1] in fractions of the picture from the top left, as job.regions' boxes.
COLUMNS = {"left": (0.0, 0.4), "center_left": (0.2, 0.5), "center": (0.3, 0.7), "center_right": (0.5, 0.8),
           "right": (0.6, 1.0)}
ROWS = {"": (0.0, 1.0), "foreground": (0.0, 1.0), "top": (0.0, 0.6), "bottom": (0.4, 1.0),
        "background": (0.1, 0.7)}
POSITIONS: Dict[str, Tuple[float, float, float, float]] = {
    **{f"{row}_{col}" if row else col: (x0, y0, x1, y1)
       for row, (y0, y1) in ROWS.items() for col, (x0, x1) in COLUMNS.items()},
    **{row: (COLUMNS["center"][0], y0, COLUMNS["center"][1], y1) for row, (y0, y1) in ROWS.items() if row}}

# Attributes a character has one value of: a tag -> (attribute, value); two values are a conflict unless the
# character also carries one of the attribute's exempting tags.
COLOURS = ("aqua", "black", "blonde", "blue", "brown", "green", "grey", "gray", "orange", "pink", "purple", "red",
           "silver", "white", "yellow")
_COLOURED = re.compile(rf"((?:light|dark)_)?({'|'.join(COLOURS)})_(eyes|hair)$")
GENDERS = {"1girl": "girl", "1boy": "boy", "1other": "other"}
EXEMPT = {"eye colour": ("heterochromia", "multicolored_eyes"),
          "hair colour": ("multicolored_hair", "two-tone_hair", "gradient_hair", "streaked_hair", "split-color_hair",
                          "colored_inner_hair")}


class Section(NamedTuple):
    """A top-level element: its tag (`character_2`, `general_tags`) and its fields, (tag, text) in order."""

    tag: str
    fields: Tuple[Tuple[str, str], ...]

    def get(self, name: str) -> Optional[str]:
        return next((text for tag, text in self.fields if tag == name), None)

    def without(self, *names: str) -> "Section":
        return Section(self.tag, tuple((t, v) for t, v in self.fields if t not in names))


class XmlSplit(NamedTuple):
    """What an XML prompt renders as: the background prompt and the region prompts, (box, text) each."""

    format: str  # "xml" (NewBie) or "tags" (flattened for the other families)
    background: str
    regions: Tuple[Tuple[Tuple[float, float, float, float], str], ...]

    def key(self) -> list:
        """What the image id hashes of it."""
        return [self.format, self.background, [[list(box), text] for box, text in self.regions]]


def is_xml(text: str) -> bool:
    """Whether `text` is an XML prompt: its first non-blank text opens `<character_...>` or `<general_tags>`."""
    return isinstance(text, str) and _START.match(text) is not None


def tags_of(text: str) -> List[str]:
    """A field's comma-separated tags, stripped, empty ones dropped."""
    return [t.strip() for t in text.split(",") if t.strip()]


def _norm(tag: str) -> str:
    return re.sub(r"\s+", "_", tag.strip().lower())


# ------------------------------------------------------------------------------------------------ parsing


def parse(text: str, field: str = "prompt") -> Tuple[Section, ...]:
    """The sections of the XML prompt `text`, checked; a ConfigError of `field` naming the tag otherwise."""
    try:
        root = ET.fromstring(f"<{_WRAP}>{text}</{_WRAP}>")
    except ET.ParseError as e:
        raise _malformed(text, e, field) from None
    _no_loose_text(root.text, "the start", field)
    sections = []
    for el in root:
        sections.append(_section(el, field))
        _no_loose_text(el.tail, f"</{el.tag}>", field)
    _check_sections(sections, field)
    return tuple(sections)


def _malformed(text: str, error: ET.ParseError, field: str) -> ConfigError:
    """The parse error as one line naming the tag: the first tag left open or closed out of order, or the tag
    the parser stopped inside."""
    found = _unbalanced(text)
    if found:
        return ConfigError(field, found[0], f"malformed XML: {found[1]}")
    line, column = error.position
    column -= len(_WRAP) + 2 if line == 1 else 0
    offset = sum(len(s) + 1 for s in text.split("\n")[:line - 1]) + column
    inside = _unbalanced(text[:offset], at_end=False)
    why = str(error).split(":")[0]
    return ConfigError(field, inside or "(between the sections)", f"malformed XML at line {line}, column "
                       f"{column + 1}: {why} (write &, < and > in a tag as &amp;, &lt; and &gt;)")


def _unbalanced(text: str, at_end: bool = True):
    """(tag, why) of the first tag closed out of order or (`at_end`) never closed; with `at_end` False, the
    innermost tag still open at the end of `text` (a string), or None."""
    stack: List[str] = []
    for m in _TAG.finditer(text):
        close, name, empty = m.groups()
        if empty:
            continue
        if not close:
            stack.append(name)
        elif not stack:
            return f"</{name}>", f"</{name}> closes a tag that was never opened"
        elif stack[-1] != name:
            return f"<{stack[-1]}>", f"<{stack[-1]}> is still open where </{name}> closes"
        else:
            stack.pop()
    if not at_end:
        return f"<{stack[-1]}>" if stack else None
    return (f"<{stack[-1]}>", f"<{stack[-1]}> is never closed") if stack else None


def _no_loose_text(text: Optional[str], where: str, field: str) -> None:
    if text and text.strip():
        raise ConfigError(field, text.strip()[:40], f"text outside the sections (after {where}): an XML prompt "
                          "is <character_1> ... <character_4>, <general_tags> and <caption> elements, nothing between")


def _section(el: ET.Element, field: str) -> Section:
    """One top-level element as a Section: a known section, no attributes, fields of text only, each once."""
    if el.tag not in GENERAL and not _CHARACTER.match(el.tag):
        raise ConfigError(field, f"<{el.tag}>", "unknown section: an XML prompt holds <character_1> ... "
                          "<character_4>, <general_tags> and <caption>")
    _no_attributes(el, f"<{el.tag}>", field)
    if el.tag == "caption":
        _leaf(el, f"<{el.tag}>", field)
        return Section("caption", (("caption", (el.text or "").strip()),))
    if el.text and el.text.strip():
        raise ConfigError(field, f"<{el.tag}>", f"holds text outside its fields ({el.text.strip()[:40]!r}): put it "
                          "in a field such as <appearance> or <other>")
    fields, seen = [], set()
    for child in el:
        name = f"<{el.tag}><{child.tag}>"
        _no_attributes(child, name, field)
        _leaf(child, name, field)
        if child.tag in seen:
            raise ConfigError(field, name, "given twice: write each field once, its tags comma-separated")
        seen.add(child.tag)
        _no_loose_text(child.tail, f"</{child.tag}> in <{el.tag}>", field)
        fields.append((child.tag, (child.text or "").strip()))
    return Section(el.tag, tuple(fields))


def _no_attributes(el: ET.Element, name: str, field: str) -> None:
    if el.attrib:
        raise ConfigError(field, name, f"XML attributes ({', '.join(el.attrib)}) are not read: write values as "
                          "fields")


def _leaf(el: ET.Element, name: str, field: str) -> None:
    if len(el):
        raise ConfigError(field, f"{name}<{el[0].tag}>", "nesting deeper than two levels: a section "
                          "(<character_N>, <general_tags>) holds fields, and a field holds text (comma-separated tags)")


def _check_sections(sections: List[Section], field: str) -> None:
    """Each section once; characters numbered 1 to 4, each one's position known and its own, no attribute of one
    given two values."""
    seen, places = set(), {}
    for s in sections:
        if s.tag in seen:
            raise ConfigError(field, f"<{s.tag}>", "given twice: write each section once")
        seen.add(s.tag)
        if s.tag in GENERAL:
            continue
        number = int(_CHARACTER.match(s.tag).group(1))
        if number > MAX_CHARACTERS:
            raise ConfigError(field, f"<{s.tag}>", f"more than four characters: NewBie's XML prompts hold "
                              f"<character_1> ... <character_{MAX_CHARACTERS}>")
        if number < 1:
            raise ConfigError(field, f"<{s.tag}>",
                              f"characters are numbered <character_1> ... <character_{MAX_CHARACTERS}>")
        place = position_of(s, field)
        if place and place in places:
            raise ConfigError(field, f"<{s.tag}><position>", f"{place!r} is <{places[place]}>'s position too: give "
                              "each character its own")
        if place:
            places[place] = s.tag
        _check_conflicts(s, field)


def position_of(s: Section, field: str = "prompt") -> Optional[str]:
    """A character's position, normalised (`Center Left` -> `center_left`, `centre` -> `center`), or None."""
    raw = s.get("position")
    if not raw:
        return None
    place = re.sub(r"[\s-]+", "_", raw.strip().lower()).replace("centre", "center")
    if place not in POSITIONS:
        raise ConfigError(field, f"<{s.tag}><position>", f"unknown position {raw!r}: a column "
                          f"({', '.join(COLUMNS)}), optionally after a row ({', '.join(r + '_' for r in ROWS if r)}), "
                          "or a row alone (README: the position table)")
    return place


def _attribute(tag: str) -> Optional[Tuple[str, str]]:
    """(attribute, value) of a tag that sets one: blue_eyes -> (eye colour, blue), 1girl -> (gender, girl)."""
    t = _norm(tag)
    if t in GENDERS:
        return "gender", GENDERS[t]
    m = _COLOURED.match(t)
    if not m:
        return None
    colour = (m.group(1) or "") + m.group(2).replace("gray", "grey")
    return ("eye colour" if m.group(3) == "eyes" else "hair colour"), colour


def _check_conflicts(s: Section, field: str) -> None:
    """No attribute of one character given two values (blue_eyes and red_eyes) unless an exempting tag says so."""
    tags = [(name, t) for name, text in s.fields for t in tags_of(text)]
    present = {_norm(t) for _, t in tags}
    seen: Dict[str, Tuple[str, str, str]] = {}
    for name, t in tags:
        got = _attribute(t)
        if not got or any(e in present for e in EXEMPT.get(got[0], ())):
            continue
        attribute, value = got
        if attribute in seen and seen[attribute][0] != value:
            _, first, where = seen[attribute]
            exempt = EXEMPT.get(attribute)
            raise ConfigError(field, f"<{s.tag}>", f"conflicting {attribute}s: {first} (<{where}>) and {t} "
                              f"(<{name}>); one a character" + (f", or add {exempt[0]}" if exempt else ""))
        seen.setdefault(attribute, (value, t, name))


# ------------------------------------------------------------------------------------------- writing out


def to_xml(sections: Tuple[Section, ...]) -> str:
    """Sections as NewBie's README writes them: one element a line, a blank line between sections."""
    return "\n\n".join(f"<{s.tag}>\n" + "".join(f"<{t}>{escape(v)}</{t}>\n" for t, v in s.fields) + f"</{s.tag}>"
                       for s in sections if s.fields)


def _spaced(tag: str) -> str:
    return re.sub(r"(?<=\w)_(?=\w)", " ", tag)


def flatten(sections: Tuple[Section, ...]) -> str:
    """Sections as one comma-separated tag prompt for the other families: every field's tags in the order written,
    underscores between word characters as spaces (`blue_hair` -> `blue hair`), `<position>` left out."""
    return ", ".join(_spaced(t) for s in sections for name, text in s.fields if name != "position"
                     for t in tags_of(text))


def _numbered(characters: List[Section]) -> List[Section]:
    return [Section(f"character_{k}", s.fields) for k, s in enumerate(characters, 1)]


def split(sections: Tuple[Section, ...]):
    """(background sections, [(box, sections)]) of a parsed prompt: each placed character, as <character_1> with the
    general tags, over its position's box; the background the unplaced characters and the general tags; the
    whole-picture fields (<count>, <caption>) in neither.  None when no character has a position."""
    placed = [(POSITIONS[p], s) for s in sections if s.tag not in GENERAL and (p := position_of(s))]
    if not placed:
        return None
    general = tuple(s.without(*WHOLE_PICTURE) for s in sections if s.tag in GENERAL)
    rest = _numbered([s for s in sections if s.tag not in GENERAL and not position_of(s)])
    regions = [(box, (Section("character_1", s.without("position").fields),) + general) for box, s in placed]
    return tuple(rest) + general, regions


def expand(text: str, family: str, field: str = "prompt") -> Optional[XmlSplit]:
    """What an XML prompt renders as for `family` (None for a plain prompt): for a family that reads XML (its
    FamilySpec.xml_prompts: NewBie) the prompt as written when no character is placed, else the split as XML; for
    the other families the same, flattened to tags."""
    if not is_xml(text):
        return None
    sections = parse(text, field)
    write, fmt = (to_xml, "xml") if FAMILIES[family].xml_prompts == "xml" else (flatten, "tags")
    parts = split(sections)
    if parts is None:
        return XmlSplit(fmt, text if fmt == "xml" else flatten(sections), ())
    background, regions = parts
    return XmlSplit(fmt, write(background), tuple((box, write(s)) for box, s in regions))


def check(text: str, field: str) -> None:
    """Raise the ConfigError of `field` naming the tag if `text` is an XML prompt that does not parse or check."""
    if is_xml(text):
        parse(text, field)
