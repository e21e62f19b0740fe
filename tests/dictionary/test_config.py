"""DictionaryConfig: validation names the field; levels accept widths or fractions."""

from __future__ import annotations

import pytest

from kukla.config import from_dict, to_dict
from kukla.errors import ConfigError
from kukla.pipeline.dictionary import DictionaryConfig, default_lr


@pytest.mark.parametrize("settings,field", [
    (dict(levels=[128, 64, 256]), "levels"),
    (dict(levels=[64, 128, 200]), "levels"),
    (dict(levels=[0.25, 0.5]), "levels"),
    (dict(k=256), "k"),
    (dict(k=300), "k"),
    (dict(k=None), "k"),
    (dict(arch="topk", k=2.5, levels=None), "k"),
    (dict(level_weights=[1.0, 2.0]), "level_weights"),
    (dict(arch="matryoshka-prefix", levels=None, level_weights=[1.0]), "level_weights"),
    (dict(d_out=32), "d_out"),
    (dict(aux_k=0), "aux_k"),
])
def test_invalid_settings_raise_an_error_naming_the_field(settings, field):
    base = dict(d_in=16, width=256, k=8, arch="matryoshka-batchtopk", levels=[32, 128, 256])
    base.update(settings)
    with pytest.raises(ConfigError) as err:
        DictionaryConfig(**base)
    assert err.value.field == field
    assert str(err.value).startswith(f"{field}: ")


def test_levels_given_as_fractions_become_widths():
    cfg = DictionaryConfig(d_in=16, width=1024, k=8, levels=[1 / 32, 3 / 32, 7 / 32, 15 / 32, 1])
    assert cfg.levels == [32, 96, 224, 480, 1024]


def test_fractional_k_is_accepted_for_batchtopk_and_configs_round_trip_through_from_dict():
    cfg = from_dict(DictionaryConfig, {"d_in": 16, "width": 64, "k": "2.5", "arch": "batchtopk"})
    assert cfg.k == 2.5 and cfg.prefixes == "none" and cfg.activation == "batchtopk"
    assert cfg.aux_k == 8 and cfg.d_out == 16


def test_arch_is_a_composition_of_activation_rule_and_prefix_scheme():
    prefix = DictionaryConfig(d_in=8, width=64, k=4, arch="matryoshka-prefix", activation="relu")
    assert (prefix.activation, prefix.prefixes) == ("relu", "sampled")
    topk_levels = DictionaryConfig(d_in=8, width=64, k=4, arch="topk", levels=[16, 64])
    assert (topk_levels.activation, topk_levels.prefixes) == ("topk", "levels")


@pytest.mark.parametrize("settings, activation, prefixes, label", [
    ({"activation": "topk", "prefixes": "sampled"}, "topk", "sampled", "matryoshka-sampled-topk"),
    ({"activation": "jumprelu", "prefixes": "levels"}, "jumprelu", "levels", "matryoshka-jumprelu"),
    ({"activation": "relu", "prefixes": "all"}, "relu", "all", "matryoshka-all-relu"),
    ({}, "batchtopk", "levels", "matryoshka-batchtopk"),
    ({"arch": "matryoshka-batchtopk"}, "batchtopk", "levels", "matryoshka-batchtopk"),
    ({"arch": "jumprelu"}, "jumprelu", "none", "jumprelu"),
    ({"arch": "matryoshka-prefix", "activation": "topk", "prefixes": "all"}, "topk", "all", "matryoshka-all-topk"),
    ({"arch": "batchtopk", "activation": "batchtopk", "prefixes": "none"}, "batchtopk", "none", "batchtopk"),
])
def test_activation_and_prefixes_combine_freely_and_arch_names_fill_them(settings, activation, prefixes, label):
    cfg = from_dict(DictionaryConfig, {"d_in": 8, "width": 64, "k": "4", **settings})
    assert (cfg.activation, cfg.prefixes, cfg.label) == (activation, prefixes, label)
    assert (cfg.levels is not None) == (prefixes == "levels")
    assert from_dict(DictionaryConfig, to_dict(cfg)) == cfg  # kukla.json's config reloads as itself


@pytest.mark.parametrize("settings, refused", [
    ({"arch": "topk", "prefixes": "sampled"}, "prefixes: arch topk trains prefixes none, not sampled"),
    ({"arch": "batchtopk", "prefixes": "levels"}, "prefixes: arch batchtopk trains prefixes none, not levels"),
    ({"arch": "matryoshka-prefix", "prefixes": "none"}, "prefixes sampled or all, not none"),
    ({"arch": "matryoshka-prefix", "prefixes": "levels"}, "prefixes sampled or all, not levels"),
    ({"arch": "matryoshka-batchtopk", "activation": "relu"}, "activation: arch matryoshka-batchtopk trains activation "
                                                             "batchtopk, not relu"),
])
def test_a_setting_beside_arch_is_what_arch_sets_or_refused(settings, refused):
    """Never overridden without a word: `--arch batchtopk --prefixes levels` is not a plain dictionary."""
    with pytest.raises(ConfigError, match=refused):
        from_dict(DictionaryConfig, {"d_in": 8, "width": 64, "k": "4", **settings})


def test_levels_need_the_levels_scheme():
    with pytest.raises(ConfigError, match="levels"):
        DictionaryConfig(d_in=8, width=64, k=4, prefixes="sampled", levels=[16, 64])


def test_default_learning_rate_scales_as_inverse_sqrt_width():
    assert default_lr(2**14) == pytest.approx(2e-4)
    assert default_lr(2**16) == pytest.approx(1e-4)
