"""Data cards of the image and multi-label tasks: image folders and image-path columns checked with Pillow
(a bad image is reported with its file, never a traceback; mixed colour modes become RGB), and `labels`
(several labels per row) from JSON lists or separated CSV cells, with errors naming the row."""

from __future__ import annotations

import struct
import zlib
from pathlib import Path

import pytest
from PIL import Image

from pipelines import tasks
from pipelines.data import load_card
from pipelines.errors import DataError


def card(folder: Path, body: str) -> Path:
    path = folder / "card.yaml"
    path.write_text("source: test\nlicense: MIT\n" + body)
    return path


def images(root: Path, spec: dict[str, list[tuple[str, Image.Image]]]) -> Path:
    for cls, items in spec.items():
        (root / cls).mkdir(parents=True, exist_ok=True)
        for name, im in items:
            im.save(root / cls / name)
    return root


def huge_png(path: Path, w: int, h: int) -> None:
    """A PNG whose header says w x h (no pixel data worth decoding): what a 20000 x 20000 upload looks like."""
    def chunk(kind, data):
        return struct.pack(">I", len(data)) + kind + data + struct.pack(">I", zlib.crc32(kind + data) & 0xFFFFFFFF)

    path.write_bytes(b"\x89PNG\r\n\x1a\n" + chunk(b"IHDR", struct.pack(">IIBBBBB", w, h, 8, 0, 0, 0, 0))
                     + chunk(b"IDAT", zlib.compress(b"\x00" * 16)) + chunk(b"IEND", b""))


def mixed(n=3):
    """Images of every common mode: grayscale, palette, RGBA, RGB (and CMYK, as JPEG: PNG has no CMYK)."""
    return [("l.png", Image.new("L", (12, 10), 100)), ("p.png", Image.new("P", (12, 10), 3)),
            ("rgba.png", Image.new("RGBA", (12, 10), (10, 20, 30, 0))), ("rgb.png", Image.new("RGB", (9, 9), (1, 2, 3))),
            ("cmyk.jpg", Image.new("CMYK", (16, 16), (0, 50, 100, 0)))][:n + 2]


def test_image_folder_card_reads_classes_and_converts_every_mode_to_rgb(tmp_path):
    root = images(tmp_path / "imgs", {"cat": mixed(), "dog": mixed()})
    c = load_card(card(tmp_path, f"format: imagefolder\nfiles: {{train: {root}}}\n"))
    assert c.label_names == ["cat", "dog"]  # sorted sub-folders, as datasets' imagefolder
    dsd = c.load(seed=0)
    n = len(dsd["train"]) + len(dsd["validation"])
    assert n == 10
    assert "CMYK 2" in c.split_notes["train"] and "converted to RGB when read" in c.split_notes["train"]
    task = tasks.get("image-classification")
    from transformers import ViTImageProcessor

    proc = ViTImageProcessor(size={"height": 16, "width": 16})
    batch = task.encode(dsd["train"], proc, tasks.EvalOptions())[:4]
    assert tuple(batch["pixel_values"].shape) == (4, 3, 16, 16)  # every mode as 3 channels


@pytest.mark.parametrize("bad, message", [
    (lambda p: p.write_bytes(Image.new("RGB", (40, 40)).tobytes()[:50]), "not an image Pillow can read"),
    (lambda p: p.write_bytes(_png(60)[:-40]), "cannot be decoded"),  # truncated
    (lambda p: Image.new("RGB", (1, 1)).save(p), "1x1 pixels: smaller than 4 pixels a side"),
    (lambda p: huge_png(p, 20000, 20000), "20000x20000 pixels is over the limit of 89,478,485 pixels"),
])
def test_a_bad_image_is_reported_with_its_file(tmp_path, bad, message):
    root = images(tmp_path / "imgs", {"a": mixed(1), "b": mixed(1)})
    target = root / "b" / "bad.png"
    bad(target)
    with pytest.raises(DataError) as e:
        load_card(card(tmp_path, f"format: imagefolder\nfiles: {{train: {root}}}\n")).load()
    assert str(target) in str(e.value) and message in str(e.value), str(e.value)


def _png(side: int) -> bytes:
    import io

    buf = io.BytesIO()
    Image.effect_noise((side, side), 60).save(buf, format="PNG")
    return buf.getvalue()


def test_image_folder_mistakes(tmp_path):
    root = images(tmp_path / "imgs", {"a": mixed(1), "b": mixed(1)})
    (root / "stray.png").write_bytes(_png(8))
    with pytest.raises(DataError, match="a file directly in an imagefolder split"):
        load_card(card(tmp_path, f"format: imagefolder\nfiles: {{train: {root}}}\n")).load()
    (root / "stray.png").unlink()
    (root / "b" / "notes.txt").write_text("hi")
    with pytest.raises(DataError, match="notes.txt: not an image file name"):
        load_card(card(tmp_path, f"format: imagefolder\nfiles: {{train: {root}}}\n")).load()
    (root / "b" / "notes.txt").unlink()
    with pytest.raises(DataError, match=r"class folder 'b' is not one of label_names \['a', 'c'\]"):
        load_card(card(tmp_path, f"format: imagefolder\nfiles: {{train: {root}}}\nlabel_names: [a, c]\n")).load()
    with pytest.raises(DataError, match="folder not found"):
        load_card(card(tmp_path, f"format: imagefolder\nfiles: {{train: {tmp_path / 'nope'}}}\n"))


def test_csv_with_an_image_path_column(tmp_path):
    images(tmp_path, {"pics": mixed(2)})
    (tmp_path / "d.csv").write_text("file,label\npics/l.png,cat\npics/p.png,dog\npics/rgba.png,cat\npics/rgb.png,dog\n")
    body = "format: csv\nfiles: {train: d.csv}\ncolumns: {image: file, label: label}\nlabel_names: [cat, dog]\n"
    dsd = load_card(card(tmp_path, body)).load(seed=0)
    row = dsd["train"][0]
    assert row["image"].size in {(12, 10), (9, 9)} and row["label"] in (0, 1)
    (tmp_path / "d.csv").write_text("file,label\npics/l.png,cat\npics/missing.png,dog\n")
    with pytest.raises(DataError, match=r"d.csv: row 2 \(line 3\): image file not found: .*missing.png"):
        load_card(card(tmp_path, body)).load()


# ---------------------------------------------------------------- several labels per row


def test_labels_from_json_lists_and_separated_csv_cells(tmp_path):
    (tmp_path / "d.jsonl").write_text('{"t": "a", "y": ["x", "z"]}\n{"t": "b", "y": []}\n{"t": "c", "y": ["z", "z", 1]}\n')
    (tmp_path / "v.jsonl").write_text('{"t": "a", "y": ["x"]}\n')
    body = "format: jsonl\nfiles: {train: d.jsonl, validation: v.jsonl}\ncolumns: {text: t, labels: y}\nlabel_names: [x, y, z]\n"
    ds = load_card(card(tmp_path, body)).load()["train"]
    assert ds["labels"] == [[0, 2], [], [1, 2]]  # names or ids, sorted, distinct; [] = no label
    (tmp_path / "d.csv").write_text('t,y\na,"x,z"\nb,\nc, y\n')
    (tmp_path / "v.csv").write_text("t,y\na,x\n")
    csv = "format: csv\nfiles: {train: d.csv, validation: v.csv}\ncolumns: {text: t, labels: y}\nlabel_names: [x, y, z]\n"
    assert load_card(card(tmp_path, csv)).load()["train"]["labels"] == [[0, 2], [], [1]]
    (tmp_path / "d.csv").write_text("t,y\nc, y ; z\nd,x\n")
    assert load_card(card(tmp_path, csv + "label_separator: ';'\n")).load()["train"]["labels"] == [[1, 2], [0]]


def test_bad_labels_name_the_row(tmp_path):
    (tmp_path / "d.jsonl").write_text('{"t": "a", "y": ["x"]}\n{"t": "b", "y": ["x", "w"]}\n')
    body = "format: jsonl\nfiles: {train: d.jsonl}\ncolumns: {text: t, labels: y}\nlabel_names: [x, y]\n"
    with pytest.raises(DataError, match=r"d.jsonl: row 2 \(line 2\): label 'w' in column 'y' is not one of label_names"):
        load_card(card(tmp_path, body)).load()
    (tmp_path / "d.jsonl").write_text('{"t": "a", "y": ["x"]}\n{"t": "b", "y": null}\n')
    with pytest.raises(DataError, match=r"row 2 \(line 2\): missing labels \(null\) in column 'y'; write \[\]"):
        load_card(card(tmp_path, body)).load()
    with pytest.raises(DataError, match="map either `label` .* or `labels`"):
        load_card(card(tmp_path, body.replace("labels: y", "labels: y, label: t")))
