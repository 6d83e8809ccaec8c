"""`distill data` as a user runs it."""

import json

from PIL import Image

from conftest import run_cli


def test_data_digits_cli(tmp_path):
    out = tmp_path / "digits"
    r = run_cli("data", "digits", "--out", str(out), "--val-fraction", "0.2", "--shard-size", "400", timeout=120)
    assert r.returncode == 0, r.stderr
    meta = json.loads((out / "meta.json").read_text())
    assert meta["train"] + meta["val"] == 1797 and abs(meta["val"] - 0.2 * 1797) <= 1
    assert len(list(out.glob("train-*.tar"))) == -(-meta["train"] // 400)
    assert f"wrote {meta['train']} train" in r.stdout
    # writing into a folder that already holds shards is refused, and nothing there is touched
    before = {p.name: p.stat().st_mtime_ns for p in out.iterdir()}
    r = run_cli("data", "digits", "--out", str(out), timeout=120)
    assert r.returncode == 2 and "Traceback" not in r.stderr and str(out) in r.stderr
    assert {p.name: p.stat().st_mtime_ns for p in out.iterdir()} == before


def test_data_shards_cli_from_a_folder_of_images(tmp_path):
    src = tmp_path / "imgs"
    for c, color in (("cat", (200, 10, 10)), ("dog", (10, 200, 10))):
        (src / c).mkdir(parents=True)
        for i in range(4):
            Image.new("RGB", (20, 20), color=color).save(src / c / f"{i}.jpg")
    r = run_cli("data", "shards", "--src", str(src), "--out", str(tmp_path / "out"), "--resolution", "16",
                timeout=120)
    assert r.returncode == 0, r.stderr
    meta = json.loads((tmp_path / "out" / "meta.json").read_text())
    assert meta["classes"] == ["cat", "dog"] and meta["channels"] == 3 and list(meta["resolution"]) == [16, 16]
    r = run_cli("data", "shards", "--src", str(tmp_path / "missing"), "--out", str(tmp_path / "o2"), timeout=120)
    assert r.returncode == 2 and "missing" in r.stderr and "Traceback" not in r.stderr
    r = run_cli("data", "digits", "--out", str(tmp_path / "o3"), "--val-fraction", "1.5", timeout=120)
    assert r.returncode == 2 and "--val-fraction" in r.stderr


def test_data_shards_cli_skips_empty_classes_and_unreadable_images_with_a_line_each(tmp_path):
    src, out = tmp_path / "imgs", tmp_path / "out"
    for c in ("2", "10", "empty"):
        (src / c).mkdir(parents=True)
    for c in ("2", "10"):
        for i in range(3):
            Image.new("RGB", (8, 8), color=(10 * int(c), 0, 0)).save(src / c / f"{i}.png")
    (src / "10" / "corrupt.png").write_bytes(b"\x89PNG\r\n\x1a\n not really a png")
    r = run_cli("data", "shards", "--src", str(src), "--out", str(out), timeout=120)
    assert r.returncode == 0, r.stderr
    meta = json.loads((out / "meta.json").read_text())
    assert meta["classes"] == ["2", "10"] and meta["num_classes"] == 2  # numbers sort as numbers
    assert meta["skipped_classes"] == ["empty"] and meta["skipped_images"] == 1
    assert meta["train"] + meta["val"] == 6
    # One line for each thing skipped, naming it; nothing else on stderr.
    lines = [line for line in r.stderr.splitlines() if line.strip()]
    assert len(lines) == 2, r.stderr
    assert str(src / "empty") in lines[0] and str(src / "10" / "corrupt.png") in lines[1]
