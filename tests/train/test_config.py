"""TrainConfig: one object for the CLI, TOML and Python; per-dictionary settings reach each member unchanged."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
from conftest import HOOK, TARGET

from kukla.config import load_config
from kukla.errors import ConfigError
from kukla.pipeline.train.config import TrainConfig, learning_rate


def test_a_toml_sweep_builds_every_member_with_its_own_config(tmp_path: Path) -> None:
    toml = tmp_path / "sweep.toml"
    toml.write_text('store = "s.zarr"\nout = "o"\nhook = "h"\narch = "matryoshka-batchtopk"\n'
                    'width = [64, 128]\nk = [4, 8.5]\nseed = [0, 1]\nlevels = [0.25, 1]\naux_coefficient = 0.1\n')
    config = load_config(TrainConfig, toml)
    members = config.members(d_in=16, d_out=16)
    assert len(members) == 8 and len({m.name for m in members}) == 8
    wide = [m for m in members if m.config.width == 128]
    assert all(m.config.levels == [32, 128] and m.config.aux_coefficient == 0.1 for m in wide)
    assert {m.config.k for m in members} == {4.0, 8.5} and {m.seed for m in members} == {0, 1}


def test_default_levels_are_the_documented_fractions() -> None:
    [member] = TrainConfig(store=Path("s"), out=Path("o"), hook="h", width=[4096], k=[32]).members(8, 8)
    assert member.config.levels == [128, 384, 896, 1920, 4096]


@pytest.mark.parametrize("changes, field", [
    ({"hook": None}, "hook"), ({"input_hook": "a"}, "hook"), ({"k": [64]}, "k"),
    ({"levels": [8, 4, 64]}, "levels"), ({"levels": [8, 16, 32]}, "levels"), ({"width": [64, 64]}, "width"),
    ({"warmup": 2.0}, "warmup"), ({"width": [64, 128], "k": [4, 80]}, "k"),  # one sweep member is invalid
    ({"hook": None, "input_hook": "resid_post:3", "target_hook": "blocks.3.hook_resid_post"}, "target_hook"),
])
def test_bad_settings_name_their_field(changes: dict, field: str) -> None:
    settings = dict(store=Path("s"), out=Path("o"), hook="h", width=[64], k=[4])
    with pytest.raises(ConfigError) as error:
        TrainConfig(**{**settings, **changes})
    assert error.value.field == field and str(error.value).startswith(f"{field}: ")


def test_learning_rate_warms_up_then_decays_to_zero() -> None:
    config = TrainConfig(store=Path("s"), out=Path("o"), hook="h", width=[64], k=[4], warmup=0.1, decay_start=0.8)
    rates = [learning_rate(config, 1.0, step, 100) for step in range(100)]
    assert rates[0] == pytest.approx(0.1) and rates[9] == pytest.approx(1.0)
    assert rates[50] == 1.0 and rates[90] == pytest.approx(0.5) and rates[99] == pytest.approx(0.05)


def test_dead_latent_window_fits_the_run_unless_given() -> None:
    def window(**kw) -> int:
        [member] = TrainConfig(store=Path("s"), out=Path("o"), hook="h", width=[64], k=[4], **kw).members(8, 8)
        return int(member.config.dead_tokens)

    assert window(tokens=120_000) == 12_000  # a tenth of a short run: aux-k can engage
    assert window(tokens=10**9) == 10_000_000  # OpenAI's 10M in a long one
    assert window(tokens=120_000, dead_tokens=500_000) == 500_000  # as given (the log says it never engages)


def test_l0_cap_is_a_multiple_of_k_rounded_up() -> None:
    config = TrainConfig(store=Path("s"), out=Path("o"), hook="h", width=[64], k=[4.5], l0_cap=3)
    assert config.l0_cap_for(config.members(8, 8)[0].config) == 14
    with pytest.raises(ConfigError) as error:
        TrainConfig(store=Path("s"), out=Path("o"), hook="h", width=[64], k=[4], l0_cap=0.5)
    assert error.value.field == "l0_cap"


def _train_cli(*args: str):
    from typer.testing import CliRunner

    from kukla.cli.app import app

    return CliRunner().invoke(app, ["train", *args])


def test_train_config_reads_the_train_section_of_a_run_file(store: Path, tmp_path: Path) -> None:
    run_file = tmp_path / "pipeline.toml"
    run_file.write_text(f'[run]\nout = "{tmp_path / "run"}"\n[harvest]\nsource = "toy-tree"\n'
                        f'[[train]]\nhook = "{HOOK}"\narch = "topk"\nwidth = [32]\nk = [4]\n'
                        'tokens = 1024\nbatch_size = 256\nthreads = 1\n')
    result = _train_cli(str(store), "--out", str(tmp_path / "o"), "--config", str(run_file), "--k", "3")
    assert result.exit_code == 0, result.output
    cfg = json.loads((tmp_path / "o" / "topk-w32-k3-s0" / "cfg.json").read_text())
    assert (cfg["d_sae"], cfg["k"], cfg["metadata"]["hook_name"]) == (32, 3, HOOK)  # the file's width, the flag's k


def test_train_config_with_several_train_runs_names_kukla_run(tmp_path: Path) -> None:
    run_file = tmp_path / "pipeline.toml"
    run_file.write_text('[[train]]\nwidth = [32]\n[[train]]\nwidth = [64]\n')
    result = _train_cli("s.zarr", "--config", str(run_file))
    assert result.exit_code == 2 and f"kukla run {run_file} --stages train" in result.output, result.output
    flat = tmp_path / "flat.toml"
    flat.write_text('width = [32]\n')
    result = _train_cli("s.zarr", "--config", str(flat))
    assert result.exit_code == 2 and "put this stage's settings under [train]" in result.output, result.output


@pytest.mark.parametrize("flags, hooks", [
    (["--hook", "resid_post:0"], (HOOK, HOOK)),
    (["--input-hook", "resid_post:0", "--target-hook", "mlp_out:0"], (HOOK, TARGET)),
])
def test_train_takes_hook_short_forms(store: Path, tmp_path: Path, flags: list[str], hooks: tuple) -> None:
    result = _train_cli(str(store), "--out", str(tmp_path), "--width", "32", "--k", "4", "--tokens", "512",
                        "--batch-size", "256", "--threads", "1", *flags)
    assert result.exit_code == 0, result.output
    [cfg_file] = tmp_path.glob("*/cfg.json")
    cfg = json.loads(cfg_file.read_text())
    assert (cfg["metadata"]["hook_name"], cfg["metadata"].get("hook_name_out", cfg["metadata"]["hook_name"])) == hooks


def test_a_batch_the_ranks_cannot_share_names_a_size_they_can() -> None:
    config = TrainConfig(store="s.zarr", out=Path("o"), hook=HOOK, batch_size=255)
    assert config.local_batch(1) == 255
    with pytest.raises(ConfigError, match="batch_size: 255 does not split evenly over 2 ranks: give a multiple of 2, "
                                          "such as 256"):
        config.local_batch(2)
