"""End-to-end `distill fit` on a tiny random diffusers teacher: every artefact, and resume."""

import csv
from pathlib import Path

import pytest
import torch

from conftest import run_cli

pytestmark = pytest.mark.slow


def _rows(run_dir: Path) -> list[dict]:
    with open(run_dir / "metrics.csv", newline="") as fh:
        return list(csv.DictReader(fh))


def _fit(run_dir, tiny_teacher, digits_shards, *extra):
    return run_cli("fit", "--config", "configs/digits.yaml", f"run.dir={run_dir}", f"teacher.path={tiny_teacher}",
                   f"data.path={digits_shards}", "data.batch_size=8", "trainer.checkpoint_every_steps=4",
                   "trainer.keep_checkpoints=2", "trainer.log_every_steps=2", "logging.samples_every_steps=4",
                   "logging.samples_per_class=3", "logging.progress_bar=false", "optim.ttur=2", *extra)


def test_fit_writes_every_artefact_and_resumes(tmp_path, tiny_teacher, digits_shards):
    run_dir = tmp_path / "run"
    r = _fit(run_dir, tiny_teacher, digits_shards, "trainer.max_steps=6")
    assert r.returncode == 0, r.stderr[-3000:]

    # the resolved config
    cfg = (run_dir / "config.yaml").read_text()
    assert "max_steps: 6" in cfg and str(tiny_teacher) in cfg
    # checkpoints: every 4 steps and at the end, the newest 2 kept, last.ckpt points at the newest
    ckpts = sorted(p.name for p in (run_dir / "checkpoints").glob("step=*.ckpt"))
    assert ckpts == ["step=0000004.ckpt", "step=0000006.ckpt"]
    last = run_dir / "checkpoints" / "last.ckpt"
    assert last.resolve().name == "step=0000006.ckpt"
    ckpt = torch.load(last, map_location="cpu", weights_only=False)
    assert ckpt["distill"]["step"] == 6
    keys = ckpt["state_dict"].keys()
    assert any(k.startswith("generator.") for k in keys) and any(k.startswith("ema.") for k in keys)
    assert any(k.startswith("fake_score.") for k in keys)
    assert not any(k.startswith("teacher.") for k in keys)  # frozen, reloaded from its folder
    assert len(ckpt["optimizer_states"]) == 2
    # the EMA differs from the generator after training (it was updated, not copied)
    g = {k[len("generator."):]: v for k, v in ckpt["state_dict"].items() if k.startswith("generator.")}
    e = {k[len("ema."):]: v for k, v in ckpt["state_dict"].items() if k.startswith("ema.")}
    assert g.keys() == e.keys() and any(not torch.equal(g[k], e[k]) for k in g)
    # sample grids at the start, every 4 steps and at the end: one row per class (10 rows of 3)
    pngs = sorted(p.name for p in (run_dir / "samples").glob("*.png"))
    assert pngs == ["step_0000000.png", "step_0000004.png", "step_0000006.png"]
    from PIL import Image

    im = Image.open(run_dir / "samples" / "step_0000006.png")
    assert im.height > im.width * 2  # 10 rows x 3 columns
    # metrics CSV: logged every 2 steps, namespaced names
    rows = _rows(run_dir)
    assert [int(r["step"]) for r in rows] == [2, 4, 6]
    for name in ("loss/generator_dm", "loss/fake_score", "time/step_seconds", "grad_norm/fake_score"):
        assert name in rows[0] and all(r[name] != "" for r in rows), name
    assert all(float(r["loss/fake_score"]) > 0 for r in rows)
    # W&B offline run files, with the id kept for resume
    run_id = (run_dir / "wandb_id.txt").read_text().strip()
    runs = list((run_dir / "wandb").glob("offline-run-*"))
    assert len(runs) == 1 and runs[0].name.endswith(run_id)
    assert list(runs[0].glob("run-*.wandb"))
    assert "done: 6 steps" in r.stdout and "samples" in r.stdout

    # the same command with a larger budget resumes from step 6 and continues the count
    r = _fit(run_dir, tiny_teacher, digits_shards, "trainer.max_steps=10")
    assert r.returncode == 0, r.stderr[-3000:]
    assert "resuming from" in r.stdout and "(step 6)" in r.stdout
    assert [int(r["step"]) for r in _rows(run_dir)] == [2, 4, 6, 8, 10]
    ckpt = torch.load(run_dir / "checkpoints" / "last.ckpt", map_location="cpu", weights_only=False)
    assert ckpt["distill"]["step"] == 10
    assert sorted(p.name for p in (run_dir / "checkpoints").glob("step=*.ckpt")) == ["step=0000008.ckpt",
                                                                                     "step=0000010.ckpt"]
    assert (run_dir / "wandb_id.txt").read_text().strip() == run_id
    assert "done: 4 steps" in r.stdout and "(now at step 10)" in r.stdout  # steps run by this call, then the total


def test_fit_data_that_does_not_fit_the_teacher(tmp_path, tiny_teacher):
    from distill.data import write_folder_shards
    from PIL import Image

    src = tmp_path / "imgs"
    for c in ("a", "b"):
        (src / c).mkdir(parents=True)
        for i in range(3):
            Image.new("L", (16, 16), color=i * 40).save(src / c / f"{i}.png")
    write_folder_shards(src, tmp_path / "shards", channels=1)
    r = run_cli("fit", "--config", "configs/digits.yaml", f"run.dir={tmp_path / 'run'}",
                f"teacher.path={tiny_teacher}", f"data.path={tmp_path / 'shards'}")
    assert r.returncode == 2
    assert "(1, 16, 16)" in r.stderr and "(1, 8, 8)" in r.stderr and "Traceback" not in r.stderr


def test_data_that_lies_about_itself_or_has_foreign_labels(tmp_path, tiny_teacher):
    import json

    from PIL import Image

    from distill.data import write_folder_shards

    src = tmp_path / "imgs"
    for c in range(12):  # more classes than the teacher knows
        (src / f"c{c:02d}").mkdir(parents=True)
        Image.new("L", (8, 8), color=c * 20).save(src / f"c{c:02d}" / "0.png")
    write_folder_shards(src, tmp_path / "many", channels=1)
    r = run_cli("fit", "--config", "configs/digits.yaml", f"run.dir={tmp_path / 'run'}",
                f"teacher.path={tiny_teacher}", f"data.path={tmp_path / 'many'}")
    assert r.returncode == 2 and "12 classes" in r.stderr and "Traceback" not in r.stderr

    src2 = tmp_path / "big"
    (src2 / "a").mkdir(parents=True)
    Image.new("L", (16, 16)).save(src2 / "a" / "0.png")
    write_folder_shards(src2, tmp_path / "lying", channels=1)
    meta = json.loads((tmp_path / "lying" / "meta.json").read_text())
    meta["resolution"] = [8, 8]  # meta.json says 8x8, the shards hold 16x16
    (tmp_path / "lying" / "meta.json").write_text(json.dumps(meta))
    r = run_cli("fit", "--config", "configs/digits.yaml", f"run.dir={tmp_path / 'run'}",
                f"teacher.path={tiny_teacher}", f"data.path={tmp_path / 'lying'}")
    assert r.returncode == 2 and "(1, 16, 16)" in r.stderr and "Traceback" not in r.stderr
    assert not (tmp_path / "run").exists()
