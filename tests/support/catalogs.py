"""Builders for small fixture catalogs in a tmp folder (JPEGs made with Pillow, .h5 with h5py).

Reusable by any test: `make_jsonl_catalog(tmp_path)` gives a clean catalog, the
`make_flawed_*` builders give one bad row of each kind with the lines they sit on.
"""
from __future__ import annotations

import json
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
from PIL import Image

COLOURS = [(200, 30, 30), (30, 160, 40), (30, 60, 200), (220, 200, 40), (120, 40, 160), (20, 20, 20)]


def write_jpeg(path: Path, color: tuple[int, int, int] = (200, 30, 30), size: tuple[int, int] = (24, 32)) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    Image.new("RGB", size, color).save(path, "JPEG", quality=90)
    return path


def write_corrupt_jpeg(path: Path) -> Path:
    """A JPEG cut in half: it opens (the header is fine) but fails to decode."""
    write_jpeg(path, size=(64, 64))
    data = path.read_bytes()
    path.write_bytes(data[: len(data) // 2])
    return path


def myntra_record(ident: str, title: str, split: str = "train", **overrides: object) -> dict:
    """A products.jsonl record in the shared catalog's schema."""
    record = {
        "id": ident,
        "split": split,
        "gender": "Women",
        "masterCategory": "Apparel",
        "subCategory": "Topwear",
        "articleType": "Tops",
        "baseColour": "Red",
        "season": "Summer",
        "year": "2012",
        "usage": "Casual",
        "title": title,
        "image": f"images/{ident}.jpg",
        "width": 24,
        "height": 32,
    }
    record.update(overrides)
    return record


def write_jsonl(path: Path, lines: list[dict | str]) -> Path:
    """Dicts become JSON lines; strings are written as they are (malformed lines, blanks)."""
    path.parent.mkdir(parents=True, exist_ok=True)
    text = "\n".join(json.dumps(line) if isinstance(line, dict) else line for line in lines)
    path.write_text(text + "\n", encoding="utf-8")
    return path


def make_jsonl_catalog(root: Path, n: int = 6) -> Path:
    """A clean catalog folder: products.jsonl (train/val/test) + images/<id>.jpg."""
    splits = ["train", "train", "val", "test"]
    categories = [("Topwear", "Tshirts"), ("Shoes", "Casual Shoes"), ("Bags", "Handbags")]
    records = []
    for i in range(n):
        ident = str(1000 + i)
        category, subcategory = categories[i % len(categories)]
        records.append(
            myntra_record(
                ident, f"Product {ident} {subcategory}", split=splits[i % len(splits)],
                subCategory=category, articleType=subcategory,
            )
        )  # fmt: skip
        write_jpeg(root / "images" / f"{ident}.jpg", COLOURS[i % len(COLOURS)])
    write_jsonl(root / "products.jsonl", records)
    return root


@dataclass
class FlawedCatalog:
    """A fixture catalog and what a reader must find in it."""

    path: Path
    rows: int  # data rows (blank lines excluded)
    good_ids: list[str]  # products kept when images are decoded
    problems: dict[str, list[int]] = field(default_factory=dict)  # kind -> 1-based lines
    undecodable_ids: list[str] = field(default_factory=list)  # kept unless images are decoded


def make_flawed_jsonl_catalog(root: Path) -> FlawedCatalog:
    """One bad row of each kind, among good ones (and a blank line, which is not a row)."""
    images = root / "images"
    for ident, colour in zip(["1", "2", "5", "7"], COLOURS):
        write_jpeg(images / f"{ident}.jpg", colour)
    write_corrupt_jpeg(images / "5.jpg")
    absolute = write_jpeg(root / "elsewhere" / "seven.jpg", (1, 2, 3))
    lines: list[dict | str] = [
        myntra_record("1", "Red Cotton Top"),  # 1
        myntra_record("2", "Blue Denim Jeans", split="test", subCategory="Bottomwear", articleType="Jeans"),  # 2
        '{"id": "3", "title": "Broken',  # 3: bad JSON
        "",  # 4: blank, not a row
        myntra_record("4", "Green Scarf"),  # 5: image file missing
        myntra_record("5", "Yellow Cap"),  # 6: corrupt image
        myntra_record("1", "Second Red Top"),  # 7: duplicate id
        myntra_record("6", "   "),  # 8: empty title
        {"title": "No id here", "image": "images/1.jpg"},  # 9: missing id
        myntra_record("7", "Black Boots", split="validation", image=str(absolute), description="Ankle boots."),  # 10
        "[1, 2]",  # 11: not an object
        {"id": "8", "title": "No image"},  # 12: missing image
    ]
    write_jsonl(root / "products.jsonl", lines)
    return FlawedCatalog(
        path=root,
        rows=11,
        good_ids=["1", "2", "7"],
        problems={
            "malformed_row": [3, 9, 11, 12],
            "missing_image": [5],
            "corrupt_image": [6],
            "duplicate_id": [7],
            "empty_title": [8],
        },
        undecodable_ids=["5"],
    )


KAGGLE_HEADER = "id,gender,masterCategory,subCategory,articleType,baseColour,season,year,usage,productDisplayName"


def make_kaggle_catalog(root: Path) -> FlawedCatalog:
    """styles.csv + images/<id>.jpg as downloaded, with the real file's unquoted commas in titles."""
    lines = [
        KAGGLE_HEADER,  # 1
        "15970,Men,Apparel,Topwear,Shirts,Navy Blue,Fall,2011,Casual,Turtle Check Men Navy Blue Shirt",  # 2
        "39386,Men,Apparel,Bottomwear,Jeans,Blue,Summer,2012,Casual,Peter England Men Party Blue Jeans",  # 3
        "12345,Women,Accessories,Bags,Handbags,Black,Winter,2016,Casual,Lino Perros Women Black, Brown Handbag",  # 4
        "23456,Men,Footwear,Shoes,Casual Shoes,White,Summer,,Casual,Puma Men, White, Sneakers",  # 5
        "34567,Men,Apparel",  # 6: too few fields
        '45678,Women,Apparel,Topwear,Tops,Red,Summer,2012,Casual,"Quoted, Title Top"',  # 7
        "56789,Women,Apparel,Topwear,Tops,Pink,Summer,2012,Casual,Missing Image Top",  # 8
        "15970,Men,Apparel,Topwear,Shirts,Navy Blue,Fall,2011,Casual,Duplicate Shirt",  # 9
        "67890,Women,Apparel,Topwear,Tops,Pink,Summer,2012,Casual,",  # 10: empty title
    ]
    root.mkdir(parents=True, exist_ok=True)
    (root / "styles.csv").write_text("\r\n".join(lines) + "\r\n", encoding="utf-8")
    for i, ident in enumerate(["15970", "39386", "12345", "23456", "34567", "45678", "67890"]):
        write_jpeg(root / "images" / f"{ident}.jpg", COLOURS[i % len(COLOURS)])
    return FlawedCatalog(
        path=root,
        rows=9,
        good_ids=["15970", "39386", "12345", "23456", "45678"],
        problems={"malformed_row": [6], "missing_image": [8], "duplicate_id": [9], "empty_title": [10]},
    )


@dataclass
class FashionGenRow:
    product_id: bytes
    name: bytes
    description: bytes = b"A garment."
    category: bytes = b"TOPS"
    subcategory: bytes = b"T-SHIRTS"
    colour: tuple[int, int, int] = (128, 128, 128)


FASHIONGEN_TEXT = {
    "input_productID": "product_id",
    "input_name": "name",
    "input_description": "description",
    "input_category": "category",
    "input_subcategory": "subcategory",
}


def write_fashiongen_h5(path: Path, rows: list[FashionGenRow], side: int = 256) -> Path:
    """An .h5 in the Fashion-Gen schema: input_image [N,256,256,3] uint8, text columns [N,1] bytes."""
    import h5py

    path.parent.mkdir(parents=True, exist_ok=True)
    with h5py.File(path, "w") as f:
        images = f.create_dataset("input_image", (len(rows), side, side, 3), dtype=np.uint8)
        for i, row in enumerate(rows):
            images[i] = np.broadcast_to(np.array(row.colour, dtype=np.uint8), (side, side, 3))
        for dataset, attr in FASHIONGEN_TEXT.items():
            values = [getattr(row, attr) for row in rows]
            width = max(1, max(len(v) for v in values))
            f.create_dataset(dataset, data=np.array(values, dtype=f"S{width}").reshape(-1, 1))
    return path


def make_fashiongen_catalog(root: Path) -> FlawedCatalog:
    """Train + validation files; product 100 spans rows 1 and 3, 200 spans rows 2 and 6."""
    train = [
        FashionGenRow(b"100", b"Black Leather Jacket", b"Caf\xe9 leather, lined.", b"JACKETS & COATS",
                      b"LEATHER JACKETS", (10, 10, 10)),  # row 1: description is cp1252, not UTF-8
        FashionGenRow(b"200", b"Silk Scarf", b"Printed silk.", b"ACCESSORIES", b"SCARVES", (200, 0, 0)),
        FashionGenRow(b"100", b"Black Leather Jacket", b"Caf\xe9 leather, lined.", b"JACKETS & COATS",
                      b"LEATHER JACKETS", (20, 20, 20)),  # row 3: second photo of 100
        FashionGenRow(b"300", b"  ", b"No name.", b"TOPS", b"T-SHIRTS", (0, 200, 0)),  # row 4: empty title
        FashionGenRow(b"", b"Orphan Photo"),  # row 5: no product id
        FashionGenRow(b"200", b"Silk Scarf", b"Printed silk.", b"ACCESSORIES", b"SCARVES", (0, 0, 200)),  # row 6
    ]  # fmt: skip
    validation = [
        FashionGenRow("400".encode(), "Crêpe Dress".encode("utf-8"), b"Midi.", b"DRESSES", b"DAY DRESSES"),
    ]
    write_fashiongen_h5(root / "fashiongen_256_256_train.h5", train)
    write_fashiongen_h5(root / "fashiongen_256_256_validation.h5", validation)
    return FlawedCatalog(
        path=root,
        rows=7,
        good_ids=["100", "200", "400"],
        problems={"empty_title": [4], "malformed_row": [5]},
    )


def make_non_catalogs(root: Path) -> dict[str, Path]:
    """Files that are not catalogs at all, by what is wrong with them."""
    import h5py

    root.mkdir(parents=True, exist_ok=True)
    png = root / "photo.png"
    Image.new("RGB", (8, 8), (1, 2, 3)).save(png)
    files = {
        "unknown extension": root / "notes.txt",
        "png": png,
        "png named .jsonl": root / "photo.jsonl",
        "empty jsonl": root / "empty.jsonl",
        "garbage jsonl": root / "garbage.jsonl",
        "csv without the header": root / "other.csv",
        "empty csv": root / "empty.csv",
        "garbage h5": root / "garbage.h5",
        "h5 without the datasets": root / "wrong.h5",
        "empty folder": root / "empty_folder",
        "missing path": root / "does_not_exist.jsonl",
    }
    files["unknown extension"].write_text("id,title\n1,hat\n")
    files["png named .jsonl"].write_bytes(png.read_bytes())
    files["empty jsonl"].write_text("")
    files["garbage jsonl"].write_text("hello world\nthis is not json\n")
    files["csv without the header"].write_text("a,b,c\n1,2,3\n")
    files["empty csv"].write_text("")
    files["garbage h5"].write_bytes(b"not an hdf5 file at all\n" * 10)
    with h5py.File(files["h5 without the datasets"], "w") as f:
        f.create_dataset("foo", data=np.zeros((3, 1)))
    files["empty folder"].mkdir()
    return files


COLOUR_NAMES = ["Red", "Green", "Blue", "Yellow", "Purple", "Black"]  # names of COLOURS, in order
TRAINING_ARTICLES = [("Topwear", "Tshirts", "Cotton T-shirt"), ("Shoes", "Casual Shoes", "Canvas Casual Shoes"),
                     ("Bags", "Handbags", "Leather Handbag")]


def make_training_catalog(root: Path, n: int = 60) -> Path:
    """A train/val catalog whose titles name the photo's colour and article: something to learn."""
    records = []
    for i in range(n):
        colour = i % len(COLOUR_NAMES)
        category, article, noun = TRAINING_ARTICLES[i % len(TRAINING_ARTICLES)]
        ident = str(2000 + i)
        records.append(myntra_record(
            ident, f"Brand{i % 4} Women {COLOUR_NAMES[colour]} {noun}", split="val" if i % 5 == 0 else "train",
            subCategory=category, articleType=article, baseColour=COLOUR_NAMES[colour],
        ))  # fmt: skip
        write_jpeg(root / "images" / f"{ident}.jpg", COLOURS[colour])
    write_jsonl(root / "products.jsonl", records)
    return root
