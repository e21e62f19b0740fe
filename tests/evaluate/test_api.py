"""`evaluate(config)` end to end on real stores and saved dictionaries."""

from __future__ import annotations

import json
import os
import re
import signal
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pyarrow.parquet as pq
import pytest
import torch
from safetensors.numpy import load_file

from kukla.errors import KuklaError
from kukla.pipeline.dictionary import evaluation_rows
from kukla.pipeline.evaluate import AbsorptionConfig, DownstreamConfig, EvaluateConfig, evaluate
from kukla.storage import open_store
from tests.cli import kukla, one_line_error, stopped, stopping_at_read
from tests.evaluate.helpers import D, make_dictionary


def _config(dicts: list[Path], store: Path, out: Path, **kw) -> EvaluateConfig:
    kw = {"downstream": DownstreamConfig(enabled=False), "absorption": AbsorptionConfig(enabled=False), **kw}
    return EvaluateConfig(dictionaries=dicts, store=store, out=out, **kw)


def _heldout(store_path: Path) -> np.ndarray:
    """The rows evaluate scores: the held-out rows after the calibration split."""
    store = open_store(store_path)
    rows = evaluation_rows(store)
    return store.read("blocks.0.hook_resid_post", rows.start, rows.stop).double().numpy()


def _numpy_forward(path: Path, x: np.ndarray, width: int | None = None) -> tuple[np.ndarray, np.ndarray]:
    """Codes and reconstruction (from the first `width` latents) in float64, straight from the
    saved SAELens weights with the ReLU SAE math written out."""
    w = {k: v.astype(np.float64) for k, v in load_file(str(path / "sae_weights.safetensors")).items()}
    z = np.maximum((x - w["b_dec"]) @ w["W_enc"] + w["b_enc"], 0)
    width = width or z.shape[1]
    return z, z[:, :width] @ w["W_dec"][:width] + w["b_dec"]


@pytest.fixture(scope="module")
def dicts(tmp_path_factory: pytest.TempPathFactory, rows_store: Path) -> dict[str, Path]:
    root = tmp_path_factory.mktemp("dicts")
    eye = torch.eye(D)
    g = torch.Generator().manual_seed(1)
    mean = torch.from_numpy(_heldout(rows_store).mean(0)).float()
    return {
        "identity": make_dictionary(root / "identity", torch.cat([eye, -eye], 1), torch.cat([eye, -eye], 0)),
        "mean": make_dictionary(root / "mean", torch.zeros(D, 4), torch.randn(4, D, generator=g),
                                b_enc=-torch.ones(4), b_dec=mean),
        "random": make_dictionary(root / "random", torch.randn(D, 24, generator=g) / 3, torch.randn(24, D, generator=g),
                                  b_enc=torch.randn(24, generator=g), b_dec=mean, levels=[4, 10, 24]),
    }


@pytest.fixture(scope="module")
def report(tmp_path_factory: pytest.TempPathFactory, rows_store: Path, dicts: dict[str, Path]) -> Path:
    return evaluate(_config(list(dicts.values()), rows_store, tmp_path_factory.mktemp("report"), batch_size=256))


def test_metrics_equal_a_direct_float64_computation_whatever_the_batch_size(
        tmp_path: Path, rows_store: Path, dicts: dict[str, Path], report: Path) -> None:
    x = _heldout(rows_store)
    small = evaluate(_config(list(dicts.values()), rows_store, tmp_path / "b7", batch_size=7))
    for name, path in dicts.items():
        z, recon = _numpy_forward(path, x)
        ev = 1 - ((x - recon) ** 2).sum() / ((x - x.mean(0)) ** 2).sum()
        assert ev == pytest.approx({"identity": 1.0, "mean": 0.0}.get(name, ev), abs=1e-6)  # the two known cases
        for out in (report, small):
            m = json.loads((out / "metrics.json").read_text())["dictionaries"][name]["reconstruction"]
            assert m["n_tokens"] == len(x)
            assert m["explained_variance"] == pytest.approx(ev, abs=1e-5)
            assert m["l0"] == pytest.approx((z != 0).sum(1).mean(), abs=1e-3)
            assert m["dead_latents"] == int(((z != 0).sum(0) == 0).sum())
            for level, width in zip(m["levels"], [4, 10, 24] if name == "random" else []):
                recon_w = _numpy_forward(path, x, width)[1]
                ev_w = 1 - ((x - recon_w) ** 2).sum() / ((x - x.mean(0)) ** 2).sum()
                assert level["explained_variance"] == pytest.approx(ev_w, abs=1e-5)
                assert level["l0"] == pytest.approx((z[:, :width] != 0).sum(1).mean(), abs=1e-3)
        a, b = (json.loads((out / "metrics.json").read_text())["dictionaries"][name]["reconstruction"]
                for out in (report, small))
        # Only the float32 forward may differ with the batch (GEMM blocking); the float64 sums may not.
        assert a["explained_variance"] == pytest.approx(b["explained_variance"], rel=1e-8, abs=1e-12)


def test_report_is_self_contained_and_the_latent_table_loads(report: Path, rows_store: Path,
                                                             dicts: dict[str, Path]) -> None:
    page = (report / "report.html").read_text()
    assert "<img" in page and "data:image/png;base64," in page
    assert not re.search(r"(src|href)=['\"](?!data:|#)", page), "report.html refers to an outside resource"
    assert "http://" not in page and "https://" not in page
    assert "| explained variance |" in (report / "report.md").read_text()
    table = pq.read_table(report / "latents_random.parquet").to_pydict()
    assert len(table["latent"]) == 24
    assert table["level"][:5] == [0, 0, 0, 0, 1] and table["level"][-1] == 2
    store = open_store(rows_store)
    for latent in range(24):
        rows = table["top_rows"][latent]
        assert len(rows) == len(table["top_contexts"][latent]) <= 8
        assert all(r in evaluation_rows(store) for r in rows)
        if rows:  # the top row's activation is the table's max activation
            x = store.read("blocks.0.hook_resid_post", rows[0], rows[0] + 1).double().numpy()
            top_code = _numpy_forward(dicts["random"], x)[0][0, latent]
            assert table["max_activation"][latent] == pytest.approx(top_code, rel=1e-4)


def test_one_scored_row_gives_a_report_that_says_ev_is_undefined(tmp_path: Path, rows_store: Path,
                                                                 dicts: dict[str, Path]) -> None:
    """One row has no variance around its mean: EV is n/a, per Matryoshka level too, not a crash."""
    out = evaluate(_config([dicts["random"]], rows_store, tmp_path / "out", max_tokens=1))
    levels = json.loads((out / "metrics.json").read_text())["dictionaries"]["random"]["reconstruction"]["levels"]
    assert [lv["explained_variance"] for lv in levels] == [None, None, None]
    assert "4: EV n/a, L0 " in (out / "report.md").read_text()


def test_a_rerun_into_the_same_out_leaves_only_its_own_latent_tables(tmp_path: Path, rows_store: Path,
                                                                      dicts: dict[str, Path]) -> None:
    """Evaluating other dictionaries into a used report folder does not leave the earlier ones' tables
    beside a metrics.json that no longer names them."""
    out = evaluate(_config([dicts["identity"], dicts["mean"]], rows_store, tmp_path / "out"))
    evaluate(_config([dicts["identity"]], rows_store, out))
    assert sorted(p.name for p in out.glob("latents_*.parquet")) == ["latents_identity.parquet"]
    assert list(json.loads((out / "metrics.json").read_text())["dictionaries"]) == ["identity"]


def test_dictionaries_whose_names_differ_only_in_punctuation_each_keep_their_latent_table(
        tmp_path: Path, rows_store: Path) -> None:
    """A table file name keeps letters, digits and -_. only: "a b" and "a_b" must not share one."""
    paths = [make_dictionary(tmp_path / name, torch.zeros(D, width), torch.zeros(width, D))
             for name, width in (("a b", 4), ("a_b", 6))]
    out = evaluate(_config(paths, rows_store, tmp_path / "out"))
    widths = {name: m["width"] for name, m in json.loads((out / "metrics.json").read_text())["dictionaries"].items()}
    tables = {p.name: len(pq.read_table(p)) for p in out.glob("latents_*.parquet")}
    assert sorted(tables.values()) == sorted(widths.values()) == [4, 6]
    assert all(tables["latents_" + re.sub(r"[^\w.-]", "_", name) + ".parquet"] == w for name, w in widths.items())


def test_the_same_member_of_two_sweeps_is_named_by_its_sweep_both_times(tmp_path: Path, rows_store: Path) -> None:
    """Two training runs name their members alike (`…-w32-k2-s1` from `--seed 0,1` and from `--seed 1`):
    the first was left bare, so it read as the one member of that name, the second alone got its folder."""
    paths = [make_dictionary(tmp_path / sweep / name, torch.zeros(D, width), torch.zeros(width, D))
             for sweep, name, width in (("sweep-a", "member", 4), ("sweep-b", "member", 6), ("sweep-b", "other", 8))]
    out = evaluate(_config(paths, rows_store, tmp_path / "out"))
    widths = {name: m["width"] for name, m in json.loads((out / "metrics.json").read_text())["dictionaries"].items()}
    assert widths == {"sweep-a/member": 4, "sweep-b/member": 6, "other": 8}
    assert sorted(p.name for p in out.glob("latents_*.parquet")) == [
        "latents_other.parquet", "latents_sweep-a_member.parquet", "latents_sweep-b_member.parquet"]


def test_a_dictionary_of_another_width_or_hook_is_refused(tmp_path: Path, rows_store: Path) -> None:
    wide = make_dictionary(tmp_path / "wide", torch.zeros(D + 1, 4), torch.zeros(4, D + 1))
    with pytest.raises(KuklaError, match=f"d_in {D + 1}.*{D} wide"):
        evaluate(_config([wide], rows_store, tmp_path / "out"))
    elsewhere = make_dictionary(tmp_path / "elsewhere", torch.zeros(D, 4), torch.zeros(4, D),
                                hook="blocks.3.hook_resid_post")
    with pytest.raises(KuklaError, match="lacks"):
        evaluate(_config([elsewhere], rows_store, tmp_path / "out"))


def test_missing_model_skips_downstream_with_a_note_or_fails_when_required(
        tmp_path: Path, rows_store: Path, dicts: dict[str, Path]) -> None:
    out = evaluate(_config([dicts["identity"]], rows_store, tmp_path / "out", downstream=DownstreamConfig(), max_tokens=100))
    metrics = json.loads((out / "metrics.json").read_text())
    assert any("downstream metrics and absorption skipped" in n for n in metrics["notes"])
    assert "downstream" not in metrics["dictionaries"]["identity"]
    assert metrics["store"]["eval_tokens"] == 100
    with pytest.raises(KuklaError, match="downstream-require"):
        evaluate(_config([dicts["identity"]], rows_store, tmp_path / "out2", downstream=DownstreamConfig(require=True)))


def test_a_directory_that_is_no_dictionary_is_one_error_line_and_nothing_is_written(
        tmp_path: Path, rows_store: Path) -> None:
    (tmp_path / "empty").mkdir()
    code, output = kukla("evaluate", tmp_path / "empty", "--store", rows_store, "--out", tmp_path / "out",
                         "--no-downstream")
    one_line_error(code, output, "not a dictionary directory")
    assert len(output.splitlines()) == 1, output
    assert not (tmp_path / "out" / "metrics.json").exists()


def test_a_file_or_a_dictionary_given_twice_is_refused_by_name(tmp_path: Path, rows_store: Path,
                                                               dicts: dict[str, Path]) -> None:
    (tmp_path / "weights.safetensors").write_bytes(b"")
    code, output = kukla("evaluate", tmp_path / "weights.safetensors", "--store", rows_store, "--out", tmp_path / "a")
    one_line_error(code, output, "weights.safetensors is a file: give a folder kukla train wrote")
    again = Path(f"{dicts['identity']}/../{dicts['identity'].name}")  # the same folder, spelt another way
    code, output = kukla("evaluate", dicts["identity"], again, "--store", rows_store, "--out", tmp_path / "b")
    one_line_error(code, output, "dictionaries:", "is given twice: give each dictionary once")
    assert not (tmp_path / "a").exists() and not (tmp_path / "b").exists()


def _files(folder: Path) -> dict[str, bytes]:
    return {str(p.relative_to(folder)): p.read_bytes() for p in sorted(folder.rglob("*")) if p.is_file()}


def test_an_evaluation_stopped_by_sigterm_or_an_error_keeps_the_report_the_folder_held(
        tmp_path: Path, rows_store: Path, dicts: dict[str, Path]) -> None:
    """A re-evaluation stopped part-way (a preemption, a missing model) deleted the old metrics.json
    and tables first and left the new tables beside the old report.html: neither evaluation."""
    out = evaluate(_config(list(dicts.values())[:2], rows_store, tmp_path / "report"))
    held = _files(out)
    args = ["evaluate", *map(str, dicts.values()), "--store", str(rows_store), "--out", str(out),
            "--no-downstream", "--no-absorption"]
    repo = Path(__file__).resolve().parents[2]
    proc = subprocess.Popen([sys.executable, *stopping_at_read(r"/templates/report\.css$"), *args], cwd=repo,
                            env={**os.environ, "PYTHONPATH": str(repo)}, stdout=subprocess.PIPE,
                            stderr=subprocess.PIPE, text=True)  # stopped with the new tables and report.md written
    deadline = time.monotonic() + 120
    while not stopped(proc) and time.monotonic() < deadline:
        assert proc.poll() is None, proc.communicate()
        time.sleep(0.05)
    assert any(out.glob(".partial-*/latents_*.parquet"))
    proc.send_signal(signal.SIGTERM)
    proc.send_signal(signal.SIGCONT)
    _, err = proc.communicate(timeout=120)
    assert proc.returncode == 143 and "Traceback" not in err, err
    assert err.strip().splitlines()[-1].startswith(f"stopped: SIGTERM: the evaluation stopped; {out} keeps"), err
    assert _files(out) == held

    with pytest.raises(KuklaError, match="downstream metrics are required"):
        evaluate(_config(list(dicts.values()), rows_store, out, downstream=DownstreamConfig(require=True)))
    assert _files(out) == held
    evaluate(_config(list(dicts.values()), rows_store, out))
    assert sorted(json.loads((out / "metrics.json").read_text())["dictionaries"]) == sorted(dicts)
    assert not any(out.glob(".partial-*")) and len(list(out.glob("latents_*.parquet"))) == len(dicts)
