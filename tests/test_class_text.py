"""Class lists as people type them (commas and line breaks both separate classes) versus class files (the
reference's rule: one class per line, commas part of a name), and the background of benchmark presets."""

from __future__ import annotations

import argparse
import re
from importlib import resources

import pytest

from trident_core.classes import ClassListError, load_class_file, parse_classes
from trident_core.cli import classes_from_args
from trident_core.presets import get_preset


def _preset_background(name: str) -> tuple[str, ...]:
    """Line 0 of the preset's class file, read independently of the code under test."""
    text = resources.files("trident_core").joinpath("data", f"cls_{name}.txt").read_text(encoding="utf-8")
    return tuple(s.strip() for s in text.splitlines()[0].split(";"))


def test_typed_text_commas_and_line_breaks_both_separate_classes():
    cl = parse_classes("sky, person\ngrass, tree\r\nhorse; pony")
    assert cl.classes == (("sky",), ("person",), ("grass",), ("tree",), ("horse", "pony"))
    assert not cl.has_background


def test_class_file_keeps_commas_inside_names(tmp_path):
    f = tmp_path / "cls.txt"
    f.write_text("building, edifice\nsky\nhorse; pony\n", encoding="utf-8")
    assert load_class_file(str(f)).classes == (("building, edifice",), ("sky",), ("horse", "pony"))
    with_bg = load_class_file(str(f), background_first=True)
    assert with_bg.has_background and with_bg.names == ["building, edifice", "sky", "horse"]


@pytest.mark.parametrize("preset", ["voc21", "context60", "coco_object"])
def test_typed_classes_are_foreground_with_a_background_preset(preset):
    p = get_preset(preset)
    own = _preset_background(preset)
    cl = p.class_list("person, dog\ncat")
    assert cl.has_background
    assert cl.classes[1:] == (("person",), ("dog",), ("cat",))
    assert cl.classes[0] == own
    given = p.class_list("person, dog", background="void; nothing")
    assert given.classes == (("void", "nothing"), ("person",), ("dog",))


@pytest.mark.parametrize("preset", ["voc21", "voc20"])
def test_a_background_given_with_the_presets_own_list_is_its_class_0(preset):
    """Empty classes take the preset's list; a background given with them is class 0 (in place of the preset's own
    background: it was dropped without a word, and voc20 then had no background class at all)."""
    lines = resources.files("trident_core").joinpath("data", f"cls_{preset}.txt").read_text("utf-8").splitlines()
    foreground = [tuple(s.strip() for s in line.split(";")) for line in lines if line.strip()]
    if preset == "voc21":
        foreground = foreground[1:]
    cl = get_preset(preset).class_list("", background="ground; soil")
    assert cl.has_background and cl.classes == (("ground", "soil"), *foreground)
    with pytest.raises(ClassListError, match="'cat' appears in classes 1 and"):
        get_preset(preset).class_list(" ", background="cat")


def test_invisible_names_are_no_names():
    """A zero-width space or a byte-order mark alone is no class name (it was an invisible class)."""
    assert parse_classes("sky, \u200b, grass,\ufeff").classes == (("sky",), ("grass",))
    with pytest.raises(ClassListError, match="one class"):
        parse_classes("sky, \u200b")


def test_typed_names_leave_the_preset_background():
    """voc21's background synonyms include 'sky' and 'tree': typed as classes, they are classes."""
    cl = get_preset("voc21").class_list("sky, person, tree")
    assert cl.classes[1:] == (("sky",), ("person",), ("tree",))
    assert cl.classes[0] == tuple(n for n in _preset_background("voc21") if n not in ("sky", "tree"))


@pytest.mark.parametrize("make", [
    lambda: parse_classes("person"), lambda: parse_classes(" person; human ,"), lambda: parse_classes(["sky"]),
    lambda: get_preset("default").class_list("person"), lambda: get_preset("ade20k").class_list("wall"),
    lambda: get_preset("voc21").class_list("; ".join(_preset_background("voc21")))])  # every background name typed
def test_one_class_is_refused_it_would_label_every_pixel(make):
    """A softmax over one class is 1 everywhere: "person" alone made every pixel person, presented as success."""
    with pytest.raises(ClassListError, match=r"one class \(.*\) would label every pixel: .*name what else is in the "
                                             r"image too, e\.g\. '.*, background'"):
        make()


@pytest.mark.parametrize("one", ["sky", "background", "Grass", "person; sky",
                                 "background; sky; grass; person; dog; car"])
def test_the_one_class_advice_gives_class_lists_that_work(one):
    """The advice was "'sky, background' or 'sky, sky, grass'" for sky: a list refused for its duplicate."""
    with pytest.raises(ClassListError) as info:
        parse_classes(one)
    examples = re.findall(r"'([^']*)'", str(info.value).split("e.g.")[1])
    assert len(examples) == 2 and all(len(parse_classes(e)) >= 2 for e in examples)


def test_one_class_with_a_background_is_two_classes(tmp_path):
    assert parse_classes("person", background="sky").names == ["sky", "person"]
    assert get_preset("voc21").class_list("person").names[1:] == ["person"]  # the preset's background is class 0
    f = tmp_path / "one.txt"
    f.write_text("sky\n", encoding="utf-8")
    with pytest.raises(ClassListError, match="would label every pixel"):
        load_class_file(str(f))
    f.write_text("background\nsky\n", encoding="utf-8")
    assert load_class_file(str(f), background_first=True).names == ["background", "sky"]


def test_the_command_line_refuses_one_class_before_it_makes_an_output_folder(tmp_path, capsys):
    from PIL import Image

    from trident_core.cli import main

    img = tmp_path / "a.png"
    Image.new("RGB", (32, 24)).save(img)
    out = tmp_path / "new" / "out"
    assert main(["segment", str(img), "--classes", "person", "--out", str(out), "--no-download"]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and "one class (person) would label every pixel" in err[0]
    assert not (tmp_path / "new").exists()


def test_a_background_typed_with_commas_is_one_class():
    """The background widget is one class: "sky, wall" was one name "sky, wall" beside a class "sky"."""
    assert parse_classes("person, dog", background="sky, wall\nfloor; ceiling").classes[0] == (
        "sky", "wall", "floor", "ceiling")
    with pytest.raises(ClassListError, match="'sky' appears in classes 1 and 2"):
        parse_classes("sky, person", background="sky, wall")


def test_preset_without_background_keeps_typed_list():
    assert not get_preset("ade20k").class_list("sky, person").has_background
    assert get_preset("default").class_list("a\nb").classes == (("a",), ("b",))


def _cli_args(classes: str, preset: str, background: str | None = None) -> argparse.Namespace:
    return argparse.Namespace(classes=classes, preset=preset, background=background)


def test_cli_file_keeps_line0_background_and_text_is_typed(tmp_path):
    f = tmp_path / "mine.txt"
    f.write_text("void; nothing\nperson, rider\ncar\n", encoding="utf-8")
    from_file = classes_from_args(_cli_args(str(f), "voc21"))
    assert from_file.classes == (("void", "nothing"), ("person, rider",), ("car",)) and from_file.has_background
    no_bg = classes_from_args(_cli_args(str(f), "default"))
    assert no_bg.classes == (("void", "nothing"), ("person, rider",), ("car",)) and not no_bg.has_background
    explicit = classes_from_args(_cli_args(str(f), "voc21", "dark"))
    assert explicit.classes[0] == ("dark",) and explicit.classes[1] == ("void", "nothing")
    typed = classes_from_args(_cli_args("person, rider\ncar", "voc21"))
    assert typed.classes[1:] == (("person",), ("rider",), ("car",))
    assert typed.classes[0] == _preset_background("voc21")



@pytest.mark.parametrize("name", ["voc21", "voc20", "context60", "context59", "coco_object", "coco_stuff",
                                  "city_scapes", "ade20k"])
def test_every_preset_list_loads(name):
    """COCO-Object's list names 'bed' as a background synonym and as a class, as the reference's file does."""
    p = get_preset(name)
    text = resources.files("trident_core").joinpath("data", p.class_file).read_text(encoding="utf-8")
    assert len(p.classes()) == len([ln for ln in text.splitlines() if ln.strip()])


@pytest.mark.parametrize("bad", [("sky", "grass"), (), ((),), (("sky",), ("",)), "sky, grass", ((1, 2),)])
def test_a_class_list_built_by_hand_in_another_layout_is_refused(bad):
    """("sky", "grass") was read as the classes s, k, y and g, r, a, s, s; () failed deep in torch.stack."""
    from trident_core.classes import ClassList

    with pytest.raises(ClassListError, match="tuple of tuples of names"):
        ClassList(bad)
    assert ClassList((("sky",), ("grass", "lawn"))).queries == ["sky", "grass", "lawn"]


def test_names_with_commas_are_selected_whole():
    """ADE20K's "building, edifice" could not be asked for: its comma split it into two unknown names."""
    from trident_core.classes import class_indices

    cl = get_preset("ade847").classes()
    building = next(i for i, c in enumerate(cl.classes) if c[0].startswith("building, edifice"))
    tree = next(i for i, c in enumerate(cl.classes) if c[0] == "tree")
    assert class_indices(cl, cl.classes[building][0]) == [building]
    assert class_indices(cl, f"tree, {cl.classes[building][0].upper().replace(', ', ',')}") == sorted([building, tree])
    with pytest.raises(ClassListError) as err:
        class_indices(cl, "building")  # one part of a name is no name
    message = str(err.value)
    assert f"{cl.classes[building][0]!r}" in message and "more" in message.splitlines()[-1]


@pytest.mark.parametrize("twin", ["ＳＫＹ", "Sky ", "SKY"])
def test_names_that_read_alike_are_one_name(twin):
    """A full-width or differently cased name was a second, different class beside "sky"."""
    with pytest.raises(ClassListError, match="appears in classes 1 and 3"):
        parse_classes(f"sky, grass, {twin}")


def test_composed_and_decomposed_accents_are_one_name():
    with pytest.raises(ClassListError, match="appears in classes 1 and 2"):
        parse_classes("caf\u00e9, cafe\u0301")


def test_too_many_classes_counts_the_background_and_says_so():
    names = ", ".join(f"thing {i}" for i in range(1000))
    assert len(parse_classes(names)) == 1000
    with pytest.raises(ClassListError, match=r"^1001 classes given \(1000 and the background\); at most 1000"):
        parse_classes(names, background="wall")
    with pytest.raises(ClassListError, match=r"^1001 classes given; at most 1000"):
        parse_classes(names + ", thing 1000")
