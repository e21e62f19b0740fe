"""What a training run leaves behind: SAELens-loadable dictionaries, a calibrated threshold, logs."""

from __future__ import annotations

import json
import time
from pathlib import Path

import pytest
import torch
from conftest import HOOK, TARGET
from safetensors.torch import load_file

from kukla.pipeline.dictionary import load_dictionary
from kukla.pipeline.train import TrainConfig, WandbConfig, train

SMALL = dict(batch_size=256, tokens=256 * 60, log_every=10, checkpoint_every=0, threads=1)


def test_trained_sae_loads_in_saelens_and_encodes_like_ours(store: Path, tmp_path: Path) -> None:
    from sae_lens import SAE

    [path] = train(TrainConfig(store=store, out=tmp_path, hook=HOOK, arch="matryoshka-batchtopk",
                               width=[64], k=[4], levels=[8, 64], **SMALL))
    ours = load_dictionary(path)
    theirs = SAE.load_from_disk(str(path), device="cpu")
    from kukla.storage import open_store

    x = open_store(store).read(HOOK, 0, 200).float()
    x[:5] *= 10  # massive-activation rows: SAELens' JumpReLU cannot cap their L0, kukla keeps the largest 16
    with torch.no_grad():
        mine, saelens = ours.encode(x), theirs.encode(x)
        uncapped = (saelens > 0).sum(1) <= 16
        assert int(ours.l0_cap) == 16 and uncapped[5:].float().mean() > 0.9 and not uncapped[:5].all()
        assert torch.allclose(saelens[uncapped], mine[uncapped], atol=1e-5)
        top = saelens[~uncapped].topk(16, dim=1)
        assert torch.allclose(torch.zeros_like(saelens[~uncapped]).scatter(1, top.indices, top.values),
                              mine[~uncapped], atol=1e-5)
        assert torch.allclose(theirs.decode(mine), ours.decode(mine), atol=1e-5)
    assert theirs.cfg.metadata.hook_name == HOOK and theirs.cfg.metadata.model_name == "test-rows"
    info = json.loads((path / "kukla.json").read_text())
    assert info["levels"] == [8, 64] and info["metadata"]["training"]["width"] == [64]
    assert info["l0_cap"] == 16 and "SAELens" in info["saelens_note"]


def test_trained_transcoder_loads_in_saelens(store: Path, tmp_path: Path) -> None:
    from sae_lens import SAE

    [path] = train(TrainConfig(store=store, out=tmp_path, input_hook=HOOK, target_hook=TARGET,
                               arch="matryoshka-batchtopk", width=[48], k=[4], levels=[12, 48], **SMALL))
    ours = load_dictionary(path)
    theirs = SAE.load_from_disk(str(path), device="cpu")
    from kukla.storage import open_store

    x = open_store(store).read(HOOK, 0, 100).float()
    with torch.no_grad():  # equal wherever kukla's L0 cap does not engage (SAELens has none)
        uncapped = (theirs.encode(x) > 0).sum(1) <= int(ours.l0_cap)
        assert uncapped.float().mean() > 0.9
        assert torch.allclose(theirs.decode(theirs.encode(x))[uncapped], ours(x)[uncapped], atol=1e-5)
    assert ours.d_out == 12 and ours.cfg.transcoder


def test_threshold_is_calibrated_on_rows_evaluate_never_scores(store: Path, tmp_path: Path) -> None:
    from kukla.pipeline.dictionary import calibration_rows, evaluation_rows
    from kukla.pipeline.evaluate import AbsorptionConfig, DownstreamConfig, EvaluateConfig, evaluate
    from kukla.storage import open_store

    [path] = train(TrainConfig(store=store, out=tmp_path, hook=HOOK, arch="batchtopk", width=[64], k=[3],
                               **SMALL))
    dictionary = load_dictionary(path)
    s = open_store(store)
    calibrated = json.loads((path / "kukla.json").read_text())["metadata"]["calibration"]
    lo, hi = calibrated["rows"]
    assert range(lo, hi) == calibration_rows(s) and calibrated["store_fingerprint"] == s.fingerprint
    assert s.n_rows - s.holdout_rows == lo < hi
    with torch.no_grad():  # on its own calibration rows the L0 is k by construction ...
        l0 = float((dictionary.encode(s.read(HOOK, lo, hi)) > 0).sum(dim=1).float().mean())
    saved = json.loads((path / "kukla.json").read_text())["inference_l0"]
    assert l0 == pytest.approx(saved, abs=1e-6) and l0 == pytest.approx(3, abs=0.05)  # the 4·k cap trims a few
    final = [json.loads(line) for line in (tmp_path / "metrics.jsonl").read_text().splitlines()][-1]
    assert final["final"] and final["inference_l0"] == pytest.approx(saved)

    report = evaluate(EvaluateConfig(dictionaries=[path], store=store, out=tmp_path / "report",
                                     downstream=DownstreamConfig(enabled=False),
                                     absorption=AbsorptionConfig(enabled=False)))
    metrics = json.loads((report / "metrics.json").read_text())
    scored = range(*metrics["store"]["eval_rows"])
    assert scored == evaluation_rows(s) and not set(scored) & set(range(lo, hi))  # disjoint
    assert metrics["store"]["calibration_rows"] == [lo, hi]
    entry = metrics["dictionaries"][path.name]
    assert entry["calibration_rows"] == [lo, hi] and not any("calibrated" in w for w in entry["warnings"])
    evaluated_l0 = entry["reconstruction"]["l0"]  # ... on unseen rows it is close to k, not equal to it
    assert evaluated_l0 != saved and abs(evaluated_l0 - 3) < 0.5


def test_metrics_log_has_a_line_per_member_per_log_step(store: Path, tmp_path: Path) -> None:
    paths = train(TrainConfig(store=store, out=tmp_path, hook=HOOK, arch="topk", width=[32, 64], k=[4],
                              **SMALL))
    lines = [json.loads(line) for line in (tmp_path / "metrics.jsonl").read_text().splitlines()]
    steps = [line for line in lines if not line.get("final")]
    assert sorted({line["step"] for line in steps}) == list(range(10, 61, 10))
    assert {line["dictionary"] for line in steps} == {p.name for p in paths}
    for line in steps:
        assert {"loss", "fvu", "l0", "dead_pct", "tokens_per_s", "lr"} <= set(line)
        assert line["l0"] == pytest.approx(4) and 0 <= line["fvu"] < 1.5
    first, last = steps[0], steps[-1]
    assert last["fvu"] < first["fvu"]  # it learns


def test_metrics_log_is_strict_json_for_an_uncalibrated_dictionary(store: Path, tmp_path: Path) -> None:
    """jq, JavaScript and pandas' strict readers refuse NaN: a relu run has no inference L0, so null."""
    def refuse(constant: str) -> None:
        raise ValueError(f"{constant} is not JSON")

    train(TrainConfig(store=store, out=tmp_path, hook=HOOK, arch="relu", width=[32], **SMALL))
    lines = [json.loads(line, parse_constant=refuse) for line in (tmp_path / "metrics.jsonl").read_text().splitlines()]
    assert lines[-1]["final"] and lines[-1]["inference_l0"] is None


@pytest.mark.slow
def test_wandb_offline_run_is_written(store: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("WANDB_MODE", "offline")
    train(TrainConfig(store=store, out=tmp_path, hook=HOOK, arch="topk", width=[32], k=[4],
                      wandb=WandbConfig(enabled=True, project="kukla-test"), **SMALL))
    runs = list((tmp_path / "wandb").glob("offline-run-*"))
    assert len(runs) == 1
    [record] = list(runs[0].glob("run-*.wandb"))
    # wandb's service process appends the records; on a loaded machine that lands shortly after finish().
    deadline = time.monotonic() + 60
    while b"topk-w32-k4-s0/fvu" not in record.read_bytes() and time.monotonic() < deadline:
        time.sleep(0.5)
    assert b"topk-w32-k4-s0/fvu" in record.read_bytes()


def test_a_wandb_project_without_wandb_says_it_logs_nowhere(store: Path, tmp_path: Path,
                                                         kukla_log: pytest.LogCaptureFixture) -> None:
    train(TrainConfig(store=store, out=tmp_path, hook=HOOK, arch="topk", width=[32], k=[4],
                      wandb=WandbConfig(project="mine"), **SMALL))
    assert any("W&B is off" in r.getMessage() and "--wandb" in r.getMessage() for r in kukla_log.records)
    assert not (tmp_path / "wandb").exists()


def test_sweep_member_equals_the_same_dictionary_trained_alone(store: Path, tmp_path: Path) -> None:
    sweep = train(TrainConfig(store=store, out=tmp_path / "sweep", hook=HOOK, arch="batchtopk",
                              width=[32, 64], k=[2, 4], **SMALL))
    assert sorted(p.name for p in sweep) == sorted(f"batchtopk-w{w}-k{k}-s0" for w in (32, 64) for k in (2, 4))
    [alone] = train(TrainConfig(store=store, out=tmp_path / "alone", hook=HOOK, arch="batchtopk",
                                width=[64], k=[4], **SMALL))
    from_sweep = load_file(str(tmp_path / "sweep" / alone.name / "sae_weights.safetensors"))
    by_itself = load_file(str(alone / "sae_weights.safetensors"))
    for name, value in by_itself.items():
        assert torch.equal(from_sweep[name], value), name
    # one stream for the whole sweep: the cursor advanced once per step, not once per member
    state = torch.load(tmp_path / "sweep" / "checkpoints" / "step-00000060" / "trainer_state.pt",
                       weights_only=False)
    cursor = state["streams"][0]
    assert cursor["epoch"] * (3584 // 256) + cursor["batch"] == 60
    assert len(state["members"]) == 4


def test_a_seed_sweeps_member_trains_alone_on_the_same_batches_with_its_data_seed(tmp_path: Path) -> None:
    """The data order follows the sweep's first seed, so `--seed 1` alone trained other batches than
    the s1 member of `--seed 0,1` (on a store of several chunks) and no setting could match it."""
    from stores import sparse_rows

    from tests.stores import write_store as write_columns

    rows, _ = sparse_rows(6144, 16, 64, seed=3)
    store = write_columns(tmp_path / "chunks.zarr", {HOOK: rows}, holdout_rows=512, chunk_rows=512,
                          meta={"model": "test-rows"})
    settings = dict(store=store, hook=HOOK, arch="topk", width=[32], k=[4], **SMALL)
    [_, member] = train(TrainConfig(out=tmp_path / "sweep", seed=[0, 1], **settings))
    [alone] = train(TrainConfig(out=tmp_path / "alone", seed=[1], data_seed=0, **settings))
    [other] = train(TrainConfig(out=tmp_path / "other", seed=[1], **settings))
    weights = [load_file(p / "sae_weights.safetensors") for p in (member, alone, other)]
    assert all(torch.equal(weights[0][k], weights[1][k]) for k in weights[0])
    assert not all(torch.equal(weights[0][k], weights[2][k]) for k in weights[0])  # data seed 1: other batches
