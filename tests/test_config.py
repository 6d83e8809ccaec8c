from pathlib import Path

import pytest

from conftest import REPO, run_cli
from distill.config import FitConfig, TeacherTrainConfig, all_keys, describe, load_config
from distill.errors import ConfigError, DistillError
from distill.train import _flat

CONFIGS = sorted((REPO / "configs").glob("*.yaml"))


def _schema_for(path: Path):
    return TeacherTrainConfig if path.name.startswith("teacher") else FitConfig


def test_there_are_configs():
    assert {p.name for p in CONFIGS} >= {"digits.yaml", "teacher-digits.yaml", "gmm.yaml"}


@pytest.mark.parametrize("path", CONFIGS, ids=lambda p: p.name)
def test_every_config_parses_and_builds(path, digits_shards, tiny_teacher, tiny_pipelines, digit_prompt_shards,
                                        tmp_path):
    """Each shipped config loads and builds its module, with tiny stand-ins of the same kind for its teacher and
    data (a text-to-image config gets a tiny pipeline of its layout and prompt shards)."""
    schema = _schema_for(path)
    overrides = [f"run.dir={tmp_path / 'run'}"]
    import yaml

    raw = yaml.safe_load(path.read_text())
    text = "prompts" in str(raw.get("data", {}).get("path"))  # the text-to-image configs read prompt shards
    if raw.get("data", {}).get("path") is not None or schema is TeacherTrainConfig:
        overrides.append(f"data.path={digit_prompt_shards if text and schema is FitConfig else digits_shards}")
    if raw.get("teacher", {}).get("kind", "diffusers") == "diffusers" and schema is FitConfig:
        teacher = tiny_pipelines["sdxl" if "xl" in path.name else "sd15"] if text else tiny_teacher
        overrides.append(f"teacher.path={teacher}")
    if raw.get("eval", {}).get("fid_ref") is not None:  # made by `make data`, which a fresh clone has not run
        overrides.append(f"eval.fid_ref={_stats(digits_shards, tmp_path / 'ref.npz')}")
    cfg = load_config(schema, path, overrides)
    # every key the YAML sets is a real key (load_config would have raised otherwise) and survives the merge
    flat = {k: v for k, v in _flat(raw).items()}
    for key, value in flat.items():
        if key in ("run.dir", "data.path", "teacher.path", "eval.fid_ref"):
            continue
        got = cfg
        for part in key.split("."):
            got = getattr(got, part)
        assert got == value or list(got) == value, key
    if schema is FitConfig:
        from distill.module import DMDModule

        module = DMDModule(cfg)
        assert module.step == 0 and module.max_steps == cfg.trainer.max_steps
    elif cfg.kind == "t2i":
        from distill.pretrain_t2i import T2ITeacherModule, load_digits

        T2ITeacherModule(cfg, *load_digits(digits_shards))
    else:
        from distill.pretrain import TeacherModule

        TeacherModule(cfg, (1, 8, 8), 10)


def _stats(shards, out):
    from distill.data import iterate_split
    from distill.metrics import build_extractor, compute_stats, save_stats

    extractor = build_extractor("digits")
    save_stats(out, {**compute_stats(extractor, iterate_split(shards, "train", batch_size=256)),
                     "extractor_id": extractor.extractor_id})
    return out


def test_every_key_has_help():
    for schema in (FitConfig, TeacherTrainConfig):
        for key, f in all_keys(schema).items():
            assert f.metadata.get("help"), key
    text = describe(FitConfig)
    assert "estimator.K" in text and "trainer.max_steps" in text and "run.dir" in text


def test_required_keys_exist():
    keys = all_keys(FitConfig)
    for key in ("run.dir", "trainer.max_steps", "trainer.seed", "data.batch_size", "teacher.path", "estimator.K",
                "estimator.proposal", "estimator.stratify"):
        assert key in keys


@pytest.mark.parametrize("override, key, fragment", [
    ("trainer.max_step=3", "trainer.max_step", "did you mean 'trainer.max_steps'"),
    ("trainer.max_steps=abc", "trainer.max_steps", "expected int"),
    ("trainer.max_steps=0", "trainer.max_steps", "expected an integer >= 1"),
    ("logging.progress_bar=maybe", "logging.progress_bar", "true or false"),
    ("teacher.kind=sd", "teacher.kind", "one of diffusers, gmm"),
    ("estimator.K=0", "estimator.K", "an integer >= 1 or auto"),
    ("estimator.K=many", "estimator.K", "an integer >= 1 or auto"),
    ("estimator.proposal=magic", "estimator.proposal", "one of uniform, adaptive"),
    ("estimator.stratify=global", "estimator.stratify", "only with several devices"),
    ("estimator.diagnostic_K=3", "estimator.diagnostic_K", "an even integer"),
    ("estimator.t_max=0.01", "estimator.t_max", "a fraction in"),
    ("optim.betas=[0.5]", "optim.betas", "two numbers"),
    ("teacher.guidance_scale=2", "teacher.guidance_scale", "unconditional"),
])
def test_bad_values_name_the_key(override, key, fragment):
    with pytest.raises(ConfigError) as e:
        load_config(FitConfig, REPO / "configs" / "gmm.yaml", [override])
    assert e.value.key == key
    assert fragment in str(e.value)


def test_batch_must_divide_across_devices():
    with pytest.raises(ConfigError, match="does not divide across 2 devices"):
        load_config(FitConfig, REPO / "configs" / "gmm.yaml", ["data.batch_size=255", "trainer.devices=2"])


def test_missing_files_and_bad_syntax(tmp_path):
    with pytest.raises(DistillError, match="not found"):
        load_config(FitConfig, tmp_path / "nope.yaml")
    bad = tmp_path / "bad.yaml"
    bad.write_text("trainer: [1, 2\n")
    with pytest.raises(DistillError, match="not valid YAML"):
        load_config(FitConfig, bad)
    with pytest.raises(DistillError, match="expected key=value"):
        load_config(FitConfig, REPO / "configs" / "gmm.yaml", ["trainer.max_steps"])
    with pytest.raises(ConfigError, match="teacher.path"):
        load_config(FitConfig, None, [f"teacher.path={tmp_path / 'none'}", f"data.path={tmp_path}"])


def test_a_missing_fid_ref_is_refused_only_when_the_in_loop_fid_reads_it(tmp_path):
    """`eval.fid_ref` names a file only `eval.fid_every_steps > 0` reads: with the in-loop FID off (how the README
    runs another pipeline with configs/t2i-digits.yaml) a missing file must not stop the run."""
    missing = f"eval.fid_ref={tmp_path / 'none.npz'}"
    gmm = REPO / "configs" / "gmm.yaml"
    with pytest.raises(ConfigError, match="does not exist") as e:
        load_config(FitConfig, gmm, [missing, "eval.fid_every_steps=5", "eval.features=raw"])
    assert e.value.key == "eval.fid_ref"
    assert load_config(FitConfig, gmm, [missing, "eval.fid_every_steps=0"]).eval.fid_every_steps == 0


@pytest.mark.parametrize("args, fragment", [
    (["trainer.max_stepz=3"], "config key 'trainer.max_stepz': unknown key; did you mean 'trainer.max_steps'?"),
    (["trainer.seed=x"], "config key 'trainer.seed': expected int, got 'x'"),
    (["data.batch_size=7", "trainer.devices=2"], "config key 'data.batch_size'"),
])
def test_cli_bad_input_exits_2_with_one_line_and_writes_nothing(args, fragment, tmp_path):
    run_dir = tmp_path / "run"
    r = run_cli("fit", "--config", "configs/gmm.yaml", f"run.dir={run_dir}", *args, timeout=120)
    assert r.returncode == 2, r.stderr
    lines = [l for l in r.stderr.strip().splitlines() if l.strip()]
    assert len(lines) == 1, r.stderr
    assert fragment in lines[0]
    assert "Traceback" not in r.stderr + r.stdout
    assert not run_dir.exists()


def test_cli_missing_teacher_folder(tmp_path, digits_shards):
    r = run_cli("fit", "--config", "configs/digits.yaml", f"run.dir={tmp_path / 'run'}",
                f"teacher.path={tmp_path / 'missing'}", f"data.path={digits_shards}", timeout=120)
    assert r.returncode == 2
    assert "teacher.path" in r.stderr and "does not exist" in r.stderr and "Traceback" not in r.stderr
    assert not (tmp_path / "run").exists()


def test_cli_help_explains_every_key():
    r = run_cli("fit", "--help", timeout=120)
    assert r.returncode == 0
    for key in all_keys(FitConfig):
        assert f"  {key} = " in r.stdout, key
    r = run_cli("data", "shards", "--help", timeout=120)
    assert r.returncode == 0 and "--resolution" in r.stdout and "--channels" in r.stdout
