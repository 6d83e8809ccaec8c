"""Bad config input found by a first-time user: each gives one line naming the key (or file) and what was expected,
exit status 2, and nothing written."""

from __future__ import annotations

import pytest

from conftest import REPO
from distill.cli import main
from distill.config import FitConfig, TeacherTrainConfig, all_keys, describe, load_config
from distill.errors import ConfigError, DistillError

GMM = REPO / "configs" / "gmm.yaml"
DIGITS = REPO / "configs" / "digits.yaml"
TEACHER = REPO / "configs" / "teacher-digits.yaml"


def _cli_error(capsys, *argv: str) -> str:
    """Run `distill ARGV` in-process: exit status 2 and exactly one line on stderr, which is returned."""
    code = main(list(argv))
    out, err = capsys.readouterr()
    assert code == 2, err
    lines = [line for line in err.splitlines() if line.strip()]
    assert len(lines) == 1, err
    assert "Traceback" not in err + out
    return lines[0]


# 1. Non-finite numbers.

UNBOUNDED = [  # (schema, key, expected) for the float fields whose range has no upper end: inf used to pass
    (FitConfig, "optim.lr_generator", "a finite number > 0"),
    (FitConfig, "optim.lr_fake_score", "a finite number > 0"),
    (FitConfig, "optim.weight_decay", "a finite number >= 0"),
    (FitConfig, "optim.grad_clip", "a finite number >= 0"),
    (FitConfig, "teacher.guidance_scale", "a finite number >= 0"),
    (FitConfig, "teacher.gmm_radius", "a finite number > 0"),
    (FitConfig, "teacher.gmm_std", "a finite number > 0"),
    (FitConfig, "estimator.adaptive_smoothing", "a finite number >= 0"),
    (FitConfig, "generator.lora_alpha", "a finite number > 0"),
    (FitConfig, "fake_score.lora_alpha", "a finite number > 0"),
    (FitConfig, "gan.weight_generator", "a finite number >= 0"),
    (FitConfig, "gan.weight_discriminator", "a finite number >= 0"),
    (TeacherTrainConfig, "optim.lr", "a finite number > 0"),
    (TeacherTrainConfig, "optim.weight_decay", "a finite number >= 0"),
    (TeacherTrainConfig, "optim.grad_clip", "a finite number >= 0"),
    (TeacherTrainConfig, "sample_guidance_scale", "a finite number >= 0"),
    (TeacherTrainConfig, "vae.lr", "a finite number > 0"),
    (TeacherTrainConfig, "vae.kl_weight", "a finite number >= 0"),
]
BOUNDED = [
    (FitConfig, "generator.ema_decay"), (FitConfig, "estimator.t_min"), (FitConfig, "estimator.t_max"),
    (FitConfig, "estimator.adaptive_ema"), (FitConfig, "estimator.adaptive_floor"),
    (FitConfig, "estimator.adaptive_mix"), (FitConfig, "estimator.auto_ema"),
    (TeacherTrainConfig, "optim.ema_decay"), (TeacherTrainConfig, "unet.class_dropout"),
    (TeacherTrainConfig, "t2i.caption_dropout"),
]


def _load(schema, overrides, tmp_path):
    if schema is TeacherTrainConfig:
        return load_config(schema, TEACHER, [f"data.path={tmp_path}", *overrides])
    return load_config(schema, GMM, overrides)


def test_every_float_field_is_covered():
    for schema in (FitConfig, TeacherTrainConfig):
        floats = {k for k, f in all_keys(schema).items() if "float" in str(f.type)}
        listed = {k for s, k, *_ in UNBOUNDED + BOUNDED if s is schema}
        assert floats == (listed | {"optim.betas"} if schema is FitConfig else listed | {"eval.guidance_scales"})


@pytest.mark.parametrize("schema, key, expected", UNBOUNDED, ids=lambda v: v if isinstance(v, str) else "")
@pytest.mark.parametrize("value", ["inf", ".inf", "nan", "-inf"])
def test_unbounded_floats_must_be_finite(schema, key, expected, value, tmp_path):
    with pytest.raises(ConfigError) as e:
        _load(schema, [f"{key}={value}"], tmp_path)
    assert e.value.key == key
    assert f"expected {expected}, got " in str(e.value)


@pytest.mark.parametrize("schema, key", BOUNDED, ids=lambda v: v if isinstance(v, str) else "")
@pytest.mark.parametrize("value", ["inf", "nan", "-inf"])
def test_bounded_floats_refuse_non_finite(schema, key, value, tmp_path):
    with pytest.raises(ConfigError) as e:
        _load(schema, [f"{key}={value}"], tmp_path)
    assert e.value.key == key


@pytest.mark.parametrize("value", ["[nan, 0.9]", "[0.9, .inf]", "[0.9, [1]]"])
def test_betas_must_be_finite_numbers(value):
    with pytest.raises(ConfigError) as e:
        load_config(FitConfig, GMM, [f"optim.betas={value}"])
    assert e.value.key == "optim.betas" and "two numbers in [0, 1)" in str(e.value)


def test_cli_inf_learning_rate(capsys, tmp_path):
    line = _cli_error(capsys, "fit", "--config", str(GMM), f"run.dir={tmp_path / 'run'}", "optim.lr_generator=inf")
    assert "config key 'optim.lr_generator': expected a finite number > 0, got inf" in line
    assert not (tmp_path / "run").exists()


# 2. generator.t_init.

def test_t_init_must_be_non_negative(digits_shards, tiny_teacher, tmp_path):
    with pytest.raises(ConfigError) as e:  # a diffusers teacher: T is unknown until it is loaded, -1 is not
        load_config(FitConfig, DIGITS, ["generator.t_init=-1", f"teacher.path={tiny_teacher}",
                                        f"data.path={digits_shards}"])
    assert e.value.key == "generator.t_init" and "an integer >= 0" in str(e.value)
    with pytest.raises(ConfigError) as e:
        load_config(FitConfig, GMM, ["generator.t_init=-1"])
    assert e.value.key == "generator.t_init" and "an integer >= 0" in str(e.value)


@pytest.mark.parametrize("t_init", [100, 2000, -1])
def test_generator_checks_t_init_against_the_teacher(t_init):
    from distill.module import gmm_teacher
    from distill.teachers import Generator

    cfg = load_config(FitConfig, GMM, ["teacher.num_timesteps=100"])
    with pytest.raises(ConfigError) as e:
        Generator(gmm_teacher(cfg), t_init)
    assert e.value.key == "generator.t_init"
    assert f"expected an index in [0, 100) of the teacher's 100 time steps, got {t_init}" in str(e.value)
    assert Generator(gmm_teacher(cfg), 99).t_init == 99
    assert Generator(gmm_teacher(cfg)).t_init == 99


def test_module_refuses_t_init_past_the_teacher():
    from distill.module import DMDModule

    cfg = load_config(FitConfig, GMM, ["teacher.num_timesteps=100"])
    cfg.generator.t_init = 100  # past the config check (as a diffusers teacher's T is known only once loaded)
    with pytest.raises(ConfigError, match=r"generator.t_init.*\[0, 100\)"):
        DMDModule(cfg)


def test_cli_t_init_past_a_diffusers_teacher(capsys, digits_shards, tiny_teacher, tmp_path):
    line = _cli_error(capsys, "fit", "--config", str(DIGITS), f"run.dir={tmp_path / 'run'}",
                      f"teacher.path={tiny_teacher}", f"data.path={digits_shards}", "generator.t_init=2000",
                      "eval.fid_every_steps=0")
    assert "config key 'generator.t_init': expected an index in [0, 1000) of the teacher's 1000 time steps" in line
    assert not (tmp_path / "run").exists()


# 3.-6. The config file itself.

def test_config_not_utf8(capsys, tmp_path):
    bad = tmp_path / "latin1.yaml"
    bad.write_bytes("run:\n  name: caf\u00e9\n".encode("latin-1"))
    with pytest.raises(DistillError, match=r"latin1.yaml.*is not UTF-8 text.*expected a YAML file"):
        load_config(FitConfig, bad)
    line = _cli_error(capsys, "fit", "--config", str(bad), f"run.dir={tmp_path / 'run'}")
    assert "is not UTF-8 text" in line and str(bad) in line
    assert not (tmp_path / "run").exists()


def test_config_is_a_folder(capsys, tmp_path):
    with pytest.raises(DistillError) as e:
        load_config(FitConfig, tmp_path)
    assert "is a folder" in str(e.value) and "expected a YAML file" in str(e.value)
    assert "not found" not in str(e.value)
    line = _cli_error(capsys, "fit", "--config", str(REPO / "configs"), f"run.dir={tmp_path / 'run'}")
    assert "is a folder" in line and "configs" in line
    assert not (tmp_path / "run").exists()


@pytest.mark.parametrize("text, where", [
    ("trainer:\n  max_steps: 10\n  seed: a: b\n", "line 3, column 10"),  # at the second colon
    ("trainer: [1, 2\n", "line 2, column 1"),
    ("optim:\n\tlr_generator: 1\n", "line 2, column 1"),
])
def test_yaml_syntax_error_gives_line_and_column(capsys, tmp_path, text, where):
    bad = tmp_path / "bad.yaml"
    bad.write_text(text)
    with pytest.raises(DistillError, match="not valid YAML") as e:
        load_config(FitConfig, bad)
    assert where in str(e.value) and "\n" not in str(e.value)
    line = _cli_error(capsys, "fit", "--config", str(bad), f"run.dir={tmp_path / 'run'}")
    assert where in line and "bad.yaml" in line


def test_duplicate_yaml_keys_are_refused(capsys, tmp_path):
    dup = tmp_path / "dup.yaml"
    dup.write_text("optim:\n  lr_generator: 1.0e-3\n  lr_fake_score: 1.0e-3\n  lr_generator: 2.0e-3\n")
    with pytest.raises(ConfigError) as e:
        load_config(FitConfig, dup)
    assert e.value.key == "optim.lr_generator" and "lines 2 and 4" in str(e.value)
    line = _cli_error(capsys, "fit", "--config", str(dup), f"run.dir={tmp_path / 'run'}")
    assert "'optim.lr_generator'" in line and "lines 2 and 4" in line and "dup.yaml" in line
    assert not (tmp_path / "run").exists()
    # a whole section twice, and a duplicate inside an override's value
    dup.write_text("trainer:\n  max_steps: 5\nestimator:\n  K: 2\ntrainer:\n  seed: 1\n")
    with pytest.raises(ConfigError, match="lines 1 and 5") as e:
        load_config(FitConfig, dup)
    assert e.value.key == "trainer"
    with pytest.raises(ConfigError) as e:
        load_config(FitConfig, GMM, ["estimator={K: 2, K: 3}"])
    assert e.value.key == "estimator.K"


def test_yaml_anchors_and_merge_keys_are_not_duplicates(tmp_path):
    ok = tmp_path / "merge.yaml"
    ok.write_text("optim:\n  lr_generator: &lr 1.0e-3\n  lr_fake_score: *lr\n"
                  "trainer:\n  <<: {max_steps: 7, seed: 3}\n  seed: 4\n")
    cfg = load_config(FitConfig, ok, ["teacher.kind=gmm", "generator.init=mlp", "fake_score.init=mlp",
                                      "data.path=null"])
    assert cfg.optim.lr_fake_score == 1e-3 and (cfg.trainer.max_steps, cfg.trainer.seed) == (7, 4)


# 7. estimator.K as a quoted number.

def test_quoted_K_is_an_integer_in_files_and_overrides(tmp_path):
    f = tmp_path / "k.yaml"
    f.write_text(GMM.read_text().replace("  K: 1 ", '  K: "4"'))
    assert "K: \"4\"" in f.read_text()
    cfg = load_config(FitConfig, f)
    assert cfg.estimator.K == 4 and type(cfg.estimator.K) is int
    for override in ("estimator.K='4'", 'estimator.K="4"', "estimator.K=4"):
        cfg = load_config(FitConfig, GMM, [override])
        assert cfg.estimator.K == 4 and type(cfg.estimator.K) is int, override
    assert load_config(FitConfig, GMM, ["estimator.K='auto'"]).estimator.K == "auto"
    assert load_config(FitConfig, GMM, ["trainer.max_steps='100'"]).trainer.max_steps == 100  # the same rule
    for bad in ("estimator.K='0'", "estimator.K='4.0'", "estimator.K=4.0", "estimator.K=true", "estimator.K='-4'"):
        with pytest.raises(ConfigError, match="an integer >= 1 or auto") as e:
            load_config(FitConfig, GMM, [bad])
        assert e.value.key == "estimator.K", bad


# 8. A section given a scalar.

@pytest.mark.parametrize("override, key", [
    ("estimator=3", "estimator"), ("trainer=[1, 2]", "trainer"), ("run=x", "run"), ("estimator=null", "estimator"),
])
def test_section_given_a_value(override, key):
    with pytest.raises(ConfigError) as e:
        load_config(FitConfig, GMM, [override])
    assert e.value.key == key
    assert "expected a section of keys" in str(e.value) and f"{key}." in str(e.value)


def test_cli_section_given_a_value(capsys, tmp_path):
    line = _cli_error(capsys, "fit", "--config", str(GMM), f"run.dir={tmp_path / 'run'}", "estimator=3")
    assert "config key 'estimator': expected a section of keys (e.g. estimator.K=" in line and "got 3" in line
    f = tmp_path / "s.yaml"
    f.write_text("estimator: 3\n")
    line = _cli_error(capsys, "fit", "--config", str(f), f"run.dir={tmp_path / 'run'}")
    assert "config key 'estimator': expected a section of keys" in line
    assert not (tmp_path / "run").exists()


# 9. List fields.

@pytest.mark.parametrize("override, fragment", [
    ("optim.betas=0.9", "expected a list of two numbers such as [0.0, 0.999], got 0.9"),
    ("optim.betas=null", "expected a list of two numbers such as [0.0, 0.999], got None"),
    ("optim.betas={a: 1}", "expected a list of two numbers such as [0.0, 0.999], got {'a': 1}"),
    ("optim.betas=[a, 0.9]", "expected a list of two numbers such as [0.0, 0.999], got 'a'"),
])
def test_betas_not_a_list(override, fragment):
    with pytest.raises(ConfigError) as e:
        load_config(FitConfig, GMM, [override])
    assert e.value.key == "optim.betas"
    assert fragment in str(e.value) and "AnyNode" not in str(e.value) and "list[" not in str(e.value)


@pytest.mark.parametrize("value, got", [("32", "got 32"), ("[a, 64]", "got 'a'"), ("abc", "got 'abc'")])
def test_block_out_channels_not_a_list(value, got, tmp_path):
    with pytest.raises(ConfigError) as e:
        load_config(TeacherTrainConfig, TEACHER, [f"data.path={tmp_path}", f"unet.block_out_channels={value}"])
    assert e.value.key == "unet.block_out_channels"
    assert "expected a list of channel counts" in str(e.value) and "such as [32, 64]" in str(e.value)
    assert got in str(e.value) and "AnyNode" not in str(e.value)


def test_cli_betas_scalar(capsys, tmp_path):
    line = _cli_error(capsys, "fit", "--config", str(GMM), f"run.dir={tmp_path / 'run'}", "optim.betas=0.9")
    assert line.endswith("config key 'optim.betas': expected a list of two numbers such as [0.0, 0.999], got 0.9")


# 10. Intervals counted in generator updates.

@pytest.mark.parametrize("key", ["estimator.diagnostic_every", "estimator.auto_every", "estimator.adaptive_warmup",
                                 "estimator.adaptive_refresh_every"])
def test_generator_update_intervals_say_so(key, capsys):
    text = all_keys(FitConfig)[key].metadata["help"]
    assert "generator updates (one every optim.ttur steps)" in text
    assert " steps " not in text.replace("optim.ttur steps", "")
    help_text = describe(FitConfig)
    assert help_text[help_text.index(f"  {key} = "):].splitlines()[1].strip() == text


def test_config_comments_say_generator_updates():
    for path in (REPO / "configs").glob("*.yaml"):
        for line in path.read_text().splitlines():
            for key in ("diagnostic_every", "auto_every", "adaptive_warmup", "adaptive_refresh_every"):
                if line.strip().startswith(f"{key}:") and "#" in line:
                    assert "generator updates" in line, (path.name, line)
