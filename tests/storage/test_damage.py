"""Damage that decodes (altered array metadata, static arrays, NaN rows) is caught by verify and
refused by readers; bad import input is refused before anything is written, an old store
survives a failed --overwrite, and an import stopped by a full disk finishes when rerun."""

from __future__ import annotations

import json
import subprocess
from pathlib import Path

import numpy as np
import pytest
import zarr

from kukla.errors import KuklaError
from kukla.storage import StoreWriter, finalize_store, open_store
from kukla.storage.store import verify_store
from tests.cli import kukla, one_line_error

from .conftest import HOOKS, write_sequences  # noqa: TID252

HOOK = "blocks.0.hook_resid_post"


def _finalized(path: Path, dtype: str = "float32") -> Path:
    write_sequences(path, 8, 16, dtype=dtype)
    finalize_store(path, memory_budget_bytes=64 << 10)
    return path


def test_an_array_dtype_edited_in_zarr_json_fails_verify_and_is_refused_by_readers(tmp_path: Path) -> None:
    path = _finalized(tmp_path / "s", dtype="bfloat16")
    assert verify_store(path) == []
    meta = path / "acts" / HOOK / "zarr.json"
    doc = json.loads(meta.read_text())
    assert doc["data_type"] == "uint16"
    meta.write_text(json.dumps({**doc, "data_type": "int16"}))
    problems = verify_store(path)
    assert len(problems) == 1 and "says data_type int16" in problems[0] and "uint16" in problems[0]
    with pytest.raises(KuklaError, match="the array metadata was altered"):
        open_store(path).read(HOOK)


def test_a_truncated_array_zarr_json_is_named_by_verify_in_one_line(tmp_path: Path) -> None:
    path = _finalized(tmp_path / "s")
    meta = path / "tokens" / "token_id" / "zarr.json"
    meta.write_text(meta.read_text()[:40])
    code, out = kukla("store", "verify", path)
    one_line_error(code, out, "1 problem(s)")
    assert "damaged: " in out and "tokens/token_id/zarr.json is missing or damaged" in out


def test_a_static_array_changed_on_disk_fails_its_checksum(tmp_path: Path) -> None:
    path = tmp_path / "s"
    write_sequences(path, 8, 16, finish=False)
    with StoreWriter.open(path, {"model": "toy", "hooks": HOOKS, "context_size": 16}, dtype="float32", chunk_rows=16) as writer:
        writer.put_static("static/directions", np.arange(12, dtype=np.float32).reshape(3, 4))
        writer.finish()
    finalize_store(path, memory_budget_bytes=64 << 10)
    assert verify_store(path) == []
    zarr.open_array(str(path / "static" / "directions"), mode="r+")[1, 2] = 99.0  # decodes fine, but wrong
    problems = verify_store(path)
    assert len(problems) == 1 and "static/directions" in problems[0] and "checksum mismatch" in problems[0]
    with pytest.raises(KuklaError, match="checksum mismatch"):
        open_store(path).read("static/directions")


def test_verify_finds_nan_rows(tmp_path: Path) -> None:
    path = _finalized(tmp_path / "s")
    array = zarr.open_array(str(path / "acts" / HOOK), mode="r+")
    array[5, 3] = np.nan
    array[77, 0] = np.inf
    problems = verify_store(path)
    assert problems == [f"acts/{HOOK}: 2 row(s) hold NaN or inf (rows 5, 77): rebuild the store from finite "
                        "activations (import --drop-nonfinite drops such rows)"]


def test_bad_import_settings_and_files_are_refused_before_anything_is_written(tmp_path: Path) -> None:
    np.save(tmp_path / "a.npy", np.ones((100, 4), np.float32))
    out = tmp_path / "s"
    one_line_error(*kukla("store", "import", out, "--hook", f"a={tmp_path / 'a.npy'}", "--codec", "zstd-99"),
                   "zstd levels run from -131072 to 22")
    one_line_error(*kukla("store", "import", out, "--hook", f"a={tmp_path / 'a.npy'}", "--memory-budget", "1KiB"),
                   "too small")
    truncated = tmp_path / "t.npy"
    truncated.write_bytes((tmp_path / "a.npy").read_bytes()[:900])
    one_line_error(*kukla("store", "import", out, "--hook", f"t={truncated}"), "not a readable .npy file")
    assert not out.exists()
    one_line_error(*kukla("store", "info", tmp_path / "a.npy"), "is not a kukla store")


def test_a_failed_overwrite_keeps_the_old_store_and_a_good_one_replaces_it(tmp_path: Path) -> None:
    old, bad, new = (np.random.default_rng(i).standard_normal((64, 4)).astype(np.float32) for i in range(3))
    bad[40, 2] = np.nan
    for name, x in (("old", old), ("bad", bad), ("new", new)):
        np.save(tmp_path / f"{name}.npy", x)
    out = tmp_path / "s"
    assert kukla("store", "import", out, "--hook", f"h={tmp_path / 'old.npy'}", "--store-dtype", "float32")[0] == 0
    code, output = kukla("store", "import", out, "--hook", f"h={tmp_path / 'bad.npy'}", "--overwrite")
    one_line_error(code, output, "row 40 holds NaN")
    kept = open_store(out).read("h").numpy()
    np.testing.assert_array_equal(np.sort(kept, axis=0), np.sort(old, axis=0))
    code, output = kukla("store", "import", out, "--hook", f"h={tmp_path / 'new.npy'}", "--store-dtype", "float32",
                         "--overwrite")
    assert code == 0, output
    np.testing.assert_array_equal(np.sort(open_store(out).read("h").numpy(), axis=0), np.sort(new, axis=0))
    assert not Path(f"{out}.importing").exists()


def test_an_import_out_of_disk_during_finalize_finishes_when_rerun(tmp_path: Path, small_disk: Path) -> None:
    x = np.random.default_rng(0).standard_normal((4096, 32)).astype(np.float32)  # 512 KiB, as stored
    np.save(tmp_path / "x.npy", x)
    args = ["store", "import", small_disk / "s", "--hook", f"h={tmp_path / 'x.npy'}", "--store-dtype", "float32",
            "--codec", "none", "--memory-budget", "256KiB", "--seed", "3"]
    code, output = kukla(*args)  # the segments fit on 1 MiB, the shuffle's runs beside them do not
    one_line_error(code, output, "disk full while finalizing", "rerun the same command")
    subprocess.run(["mount", "-o", "remount,size=16m", str(small_disk)], check=True)  # space is freed
    code, output = kukla(*args)
    assert code == 0, output
    whole = tmp_path / "whole"
    assert kukla(*args[:2], whole, *args[3:])[0] == 0
    assert not [p for p in (small_disk / "s").rglob("*.tmp-*")]  # no partial file left by the full disk
    a, b = open_store(small_disk / "s"), open_store(whole)
    np.testing.assert_array_equal(a.read_stored("h"), b.read_stored("h"))
    assert a.n_rows == 4096 and verify_store(small_disk / "s") == []
