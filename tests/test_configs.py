"""Every config file composes; pre-flight validation catches bad keys, values, paths and names."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import pytest
from omegaconf import open_dict

from interpzoo.preflight import ConfigError, check_override_keys, validate_config
from tests.conftest import CONF_DIR, ROOT

GROUPS = ["data", "model", "backbone", "trainer", "logger", "callbacks", "debug", "experiment"]
OPTIONS = [(g, p.stem) for g in GROUPS for p in sorted((ROOT / "conf" / g).glob("*.yaml"))]


@pytest.mark.parametrize("group, option", OPTIONS, ids=[f"{g}={o}" for g, o in OPTIONS])
def test_every_config_file_composes_and_validates(make_cfg, group: str, option: str) -> None:
    cfg = make_cfg([f"{group}={option}"], shrink=False)
    assert cfg.data is not None and cfg.model is not None
    try:
        validate_config(cfg)
    except ConfigError as e:
        # Only real-data paths may be missing here (tests with fake trees cover those datamodules).
        lines = [ln for ln in str(e).splitlines()[1:] if ln.strip()]
        assert all("no such file" in ln or "required (???)" in ln for ln in lines), str(e)


def test_eval_config_requires_ckpt_path(make_cfg) -> None:
    cfg = make_cfg([], config_name="eval", shrink=False)
    with pytest.raises(ConfigError, match="ckpt_path"):
        from interpzoo.run import evaluate

        with open_dict(cfg):
            cfg.ckpt_path = None
        evaluate(cfg)


def test_unknown_constructor_key_gets_did_you_mean(make_cfg) -> None:
    cfg = make_cfg(["+data.batch_sise=3", "+model.optimiser={}"], shrink=False)
    with pytest.raises(ConfigError) as e:
        validate_config(cfg)
    msg = str(e.value)
    assert "data.batch_sise" in msg and "did you mean 'batch_size'" in msg
    assert "model.optimiser" in msg and "did you mean 'optimizer'" in msg


def test_wrong_value_type_and_registry_names(make_cfg) -> None:
    cfg = make_cfg(
        ["data.n_train=lots", "model.net.name=protopnett", "model.net.backbone.name=resnet81"], shrink=False
    )
    with pytest.raises(ConfigError) as e:
        validate_config(cfg)
    msg = str(e.value)
    assert "data.n_train='lots': expected int" in msg
    assert "model.net.name: unknown model 'protopnett'" in msg and "did you mean 'protopnet'" in msg
    assert "model.net.backbone.name='resnet81'" in msg and "did you mean 'resnet18'" in msg


def test_net_keys_checked_against_the_architecture(make_cfg) -> None:
    """Keys under model.net are the constructor arguments of the architecture model.net.name names."""
    cfg = make_cfg(["+model.net.prototypes_per_clas=3", "+model.net.backbone.widht=8"], shrink=False)
    with pytest.raises(ConfigError) as e:
        validate_config(cfg)
    msg = str(e.value)
    assert "model.net.prototypes_per_clas: architecture 'protopnet'" in msg
    assert "did you mean 'prototypes_per_class'" in msg
    assert "model.net.backbone.widht: backbones take no 'widht'" in msg and "did you mean 'width'" in msg
    # another name, another signature: dropout is a baseline argument, prototype_dim is not
    validate_config(make_cfg(["model=baseline", "model.net.dropout=0.2"], shrink=False))
    cfg = make_cfg(["model=baseline", "+model.net.prototype_dim=8"], shrink=False)
    with pytest.raises(ConfigError, match="model.net.prototype_dim: architecture 'baseline'"):
        validate_config(cfg)
    # the backbone= group composes into every model; an architecture without a trunk ignores it
    validate_config(make_cfg(["model=softae", "backbone=resnet34"], shrink=False))
    # an unknown key beside net (a LightningModule argument) is still caught, with did-you-mean
    cfg = make_cfg(["+model.align_evry=3"], shrink=False)
    with pytest.raises(ConfigError, match="model.align_evry: ProtoPNetModule has no argument"):
        validate_config(cfg)
    cfg = make_cfg(["model=cw", "+model.align_evry=3"], shrink=False)
    with pytest.raises(ConfigError, match="did you mean 'align_every'"):
        validate_config(cfg)


@pytest.mark.parametrize(
    "override, new",
    [
        ("model.model_args.prototypes_per_class=3", "model.net.prototypes_per_class=3"),
        ("model.arch=protopnet_resnet34", "model.net.name=protopnet_resnet34"),
        ("model.backbone.width=8", "model.net.backbone.width=8"),
    ],
)
def test_old_spellings_get_the_new_key(make_cfg, override: str, new: str) -> None:
    """The keys of interpzoo 0.1 (arch, model_args, backbone under model) are answered with their new place."""
    with pytest.raises(ConfigError) as e:
        check_override_keys(CONF_DIR, "train", [override])
    old_key = override.split("=")[0]
    assert f"{old_key} was renamed to {new.split('=')[0]}" in str(e.value) and repr(new) in str(e.value)
    check_override_keys(CONF_DIR, "train", [new])  # the new spelling is accepted
    # in a config file (or a + override), the composed config gets the same answer
    with pytest.raises(ConfigError, match=f"{old_key.split('.')[1]} was renamed to model.net"):
        validate_config(make_cfg([f"+{override}"], shrink=False))


def test_missing_data_folder_named(make_cfg, tmp_path: Path) -> None:
    cfg = make_cfg(["data=imagefolder", f"data.root={tmp_path / 'nowhere'}"], shrink=False)
    with pytest.raises(ConfigError, match=r"data.root=.*nowhere.*no such file or folder"):
        validate_config(cfg)


def test_override_key_typo_did_you_mean() -> None:
    with pytest.raises(ConfigError, match=r"model has no key 'optimzer'; did you mean 'optimizer'"):
        check_override_keys(CONF_DIR, "train", ["model=baseline", "model.optimzer.lr=0.1"])
    with pytest.raises(ConfigError, match=r"trainer has no key 'max_epoch'; did you mean 'max_epochs'"):
        check_override_keys(CONF_DIR, "train", ["trainer.max_epoch=3"])
    check_override_keys(CONF_DIR, "train", ["trainer.max_epochs=3", "+trainer.foo=1", "data=digits"])


def test_cli_reports_typo_before_any_work(tmp_path: Path) -> None:
    out = subprocess.run(
        [sys.executable, str(ROOT / "train.py"), "trainer.max_epoch=1", f"paths.log_dir={tmp_path}"],
        capture_output=True,
        text=True,
        cwd=tmp_path,
        timeout=120,
    )
    assert out.returncode == 2
    assert "did you mean 'max_epochs'" in out.stderr
    assert not any(tmp_path.iterdir())  # nothing was started


def test_cli_help_lists_groups() -> None:
    out = subprocess.run(
        [sys.executable, str(ROOT / "train.py"), "--help"], capture_output=True, text=True, timeout=120
    )
    assert out.returncode == 0
    for group in ("data", "model", "backbone", "trainer", "logger", "debug", "experiment"):
        assert f"{group}:" in out.stdout
