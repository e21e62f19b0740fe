"""`kukla store …`: info, verify (and what it says about a damaged chunk), finalize, import, one-line errors."""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import numpy as np
import pytest
import torch
from safetensors.torch import save_file

from kukla.cli.app import app
from kukla.errors import KuklaError
from kukla.storage import open_store
from kukla.storage.importer import import_arrays
from tests.cli import kukla, one_line_error, runner

from .conftest import store_files, write_sequences  # noqa: TID252


def _stdout(*args: str) -> str:
    result = runner.invoke(app, [str(a) for a in args])
    assert result.exit_code == 0, result.output
    return result.stdout


def test_import_npy_and_safetensors_gives_a_finalized_shuffled_store(tmp_path: Path) -> None:
    x = np.random.default_rng(0).standard_normal((200, 16)).astype(np.float32)
    x[:, 0] = np.arange(200)  # ids exact in bf16 up to 256
    y = torch.from_numpy(-x[:, :8].copy()).to(torch.bfloat16)
    np.save(tmp_path / "x.npy", x)
    save_file({"mlp_out": y}, tmp_path / "y.safetensors")
    code, out = kukla("store", "import", tmp_path / "s", "--hook", f"resid_post:6={tmp_path / 'x.npy'}",
                      "--hook", f"mlp={tmp_path / 'y.safetensors'}", "--store-dtype", "float32")
    assert code == 0, out
    store = open_store(tmp_path / "s")
    a, b = store.read("blocks.6.hook_resid_post").numpy(), store.read("mlp").numpy()
    assert sorted(a[:, 0].tolist()) == list(range(200)) and a[:, 0].tolist() != list(range(200))
    np.testing.assert_array_equal(b[:, 0], -a[:, 0])  # hooks stay aligned through the shuffle
    info = json.loads(_stdout("store", "info", tmp_path / "s", "--json"))
    assert info["tokens"] == 200 and info["hooks"] == {"blocks.6.hook_resid_post": 16, "mlp": 8}  # short form expanded
    assert info["finalized"] and info["dtype"] == "float32" and info["bytes_on_disk"] > 0
    assert info["compression_ratio"] == pytest.approx(info["bytes_uncompressed"] / info["bytes_on_disk"])


def test_import_maps_its_input_files_only_while_it_reads_a_block(tmp_path: Path,
                                                                monkeypatch: pytest.MonkeyPatch) -> None:
    """A mapping held for the whole import keeps every page read so far resident, so the import's
    RSS would end at the inputs' size (hundreds of GB at 10⁸ rows). No input file is still mapped
    while a segment is written."""
    from kukla.storage.part import StoreWriter

    maps = Path("/proc/self/maps")
    if not maps.exists():
        pytest.skip("needs /proc/self/maps (Linux)")
    rng = np.random.default_rng(0)
    files = {"x": tmp_path / "x.npy", "y": tmp_path / "y.safetensors", "ids": tmp_path / "ids.npy"}
    np.save(files["x"], rng.standard_normal((40, 8, 16)).astype(np.float32))
    save_file({"y": torch.from_numpy(rng.standard_normal((40, 8, 4)).astype(np.float32))}, files["y"])
    np.save(files["ids"], rng.integers(0, 50, (40, 8)))
    mapped: list[list[str]] = []
    write = StoreWriter.write_segment

    def noting(self: StoreWriter, segment: int, rows) -> None:
        text = maps.read_text()
        mapped.append([name for name, path in files.items() if str(path) in text])
        write(self, segment, rows)

    monkeypatch.setattr(StoreWriter, "write_segment", noting)
    import_arrays(tmp_path / "s", {"a": str(files["x"]), "b": str(files["y"])}, tokens=files["ids"],
                  rows_per_segment=64)
    assert mapped == [[]] * 5  # 40 sequences of 8 rows, 8 sequences a segment
    assert open_store(tmp_path / "s").n_rows == 320


def test_an_import_rerun_that_reads_its_inputs_by_another_path_keeps_its_store(tmp_path: Path) -> None:
    """A rescheduled import job may see its input files under another mount; the same files are the
    same run (its rerun found "a store of a different run" and stopped), other contents are not."""
    first, moved = tmp_path / "host-a" / "x.npy", tmp_path / "host-b" / "x.npy"
    first.parent.mkdir()
    moved.parent.mkdir()
    np.save(first, np.random.default_rng(0).standard_normal((300, 8)).astype(np.float32))
    import_arrays(tmp_path / "s", {"h": str(first)})
    kept = store_files(tmp_path / "s")
    shutil.copy2(first, moved)  # contents, size and mtime
    assert import_arrays(tmp_path / "s", {"h": str(moved)}) == (300, 0)
    assert store_files(tmp_path / "s") == kept and open_store(tmp_path / "s").where == {"h": str(first)}
    np.save(moved, np.ones((300, 8), np.float32))
    with pytest.raises(KuklaError, match="holds a store of a different run \\(files\\.h\\.mtime: "):
        import_arrays(tmp_path / "s", {"h": str(moved)})


def test_an_import_holds_out_the_rows_asked_for_and_a_rebuild_changes_them(tmp_path: Path) -> None:
    """Imported rows are evaluated on their held-out tail: 1% of 32,000 rows left 160 scored rows
    and no setting to change it (finalize refused it on the finished store: "rebuild the store")."""
    np.save(tmp_path / "x.npy", np.random.default_rng(0).standard_normal((3000, 4)).astype(np.float32))
    hook = ("--hook", f"h={tmp_path / 'x.npy'}")
    assert kukla("store", "import", tmp_path / "s", *hook, "--holdout-rows", "600")[0] == 0
    assert open_store(tmp_path / "s").holdout_rows == 600
    one_line_error(*kukla("store", "import", tmp_path / "s", *hook, "--holdout-rows", "900"),
                   "already finalized with shuffle seed 0 and 600 held-out rows", "--overwrite")
    assert open_store(tmp_path / "s").holdout_rows == 600  # kept
    assert kukla("store", "import", tmp_path / "s", *hook, "--holdout-rows", "900", "--overwrite")[0] == 0
    store = open_store(tmp_path / "s")
    assert (store.holdout_rows, store.n_rows) == (900, 3000)
    one_line_error(*kukla("store", "import", tmp_path / "t", *hook, "--holdout-rows", "-1"),
                   "holdout_rows: must be 0 or more")


def test_import_refuses_or_drops_nonfinite_rows(tmp_path: Path) -> None:
    x = np.ones((50, 4), np.float32)
    x[[3, 7, 9], 1] = [np.nan, np.inf, -np.inf]
    np.save(tmp_path / "x.npy", x)
    code, out = kukla("store", "import", tmp_path / "s", "--hook", f"h={tmp_path / 'x.npy'}")
    one_line_error(code, out, "row 3 holds NaN or inf", "--drop-nonfinite")
    assert not (tmp_path / "s").exists()  # nothing half-written is left behind
    code, out = kukla("store", "import", tmp_path / "s", "--hook", f"h={tmp_path / 'x.npy'}", "--drop-nonfinite")
    assert code == 0 and "dropped 3 rows" in out, out
    assert open_store(tmp_path / "s").n_rows == 47


def test_import_errors_are_one_line(tmp_path: Path) -> None:
    np.save(tmp_path / "a.npy", np.ones((10, 4), np.float32))
    np.save(tmp_path / "b.npy", np.ones((9, 4), np.float32))
    np.save(tmp_path / "i.npy", np.ones((10, 4), np.int64))
    one_line_error(*kukla("store", "import", tmp_path / "s", "--hook", f"a={tmp_path / 'a.npy'}",
                          "--hook", f"b={tmp_path / 'b.npy'}"), "different row counts", "a=10", "b=9")
    one_line_error(*kukla("store", "import", tmp_path / "s", "--hook", f"i={tmp_path / 'i.npy'}"),
                   "unsupported dtype int64")
    one_line_error(*kukla("store", "import", tmp_path / "s", "--hook", f"a={tmp_path / 'a.npy'}",
                          "--codec", "brotli"), "unknown codec 'brotli'")
    one_line_error(*kukla("store", "import", tmp_path / "s", "--hook", f"a={tmp_path / 'a.npy'}",
                          "--store-dtype", "int8"), "store_dtype: 'int8' is not one of bfloat16, float16, float32")


def test_import_refuses_two_files_for_one_hook(tmp_path: Path) -> None:
    """A second file for a hook (its full name or short form) is refused, not silently kept instead of the first."""
    np.save(tmp_path / "a.npy", np.ones((10, 4), np.float32))
    np.save(tmp_path / "b.npy", np.zeros((10, 4), np.float32))
    one_line_error(*kukla("store", "import", tmp_path / "s", "--hook", f"resid_post:6={tmp_path / 'a.npy'}",
                          "--hook", f"blocks.6.hook_resid_post={tmp_path / 'b.npy'}"),
                   "hook: blocks.6.hook_resid_post is given twice", "a.npy", "b.npy")
    assert not (tmp_path / "s").exists()


def test_readers_give_one_line_errors_for_bad_paths(tmp_path: Path) -> None:
    one_line_error(*kukla("store", "info", tmp_path / "missing"), "does not exist")
    (tmp_path / "folder").mkdir()
    (tmp_path / "folder" / "zarr.json").write_text('{"zarr_format": 3, "node_type": "group"}')
    one_line_error(*kukla("store", "verify", tmp_path / "folder"), "not a kukla store")
    write_sequences(tmp_path / "w", 4, 16, finish=False)
    code, out = kukla("store", "info", tmp_path / "w")
    assert code == 0 and "NOT finalized: rank(s) 0 have not finished writing: rerun the same harvest" in out
    one_line_error(*kukla("store", "finalize", tmp_path / "w"), "rank 0 of 1 has not finished")


def test_finalize_then_verify_then_a_damaged_chunk_is_named(tmp_path: Path) -> None:
    write_sequences(tmp_path / "s", 16, 16)
    code, out = kukla("store", "finalize", tmp_path / "s", "--memory-budget", "64KiB", "--seed", "3")
    assert code == 0, out
    assert open_store(tmp_path / "s").meta["shuffle_seed"] == 3
    assert _stdout("store", "verify", tmp_path / "s").startswith("ok: every chunk")
    shard = tmp_path / "s" / "acts" / "blocks.0.hook_resid_post" / "c" / "1" / "0"
    data = bytearray(shard.read_bytes())
    data[40] ^= 0xFF  # flip a byte inside the first chunk of shard 1
    shard.write_bytes(bytes(data))
    code, out = kukla("store", "verify", tmp_path / "s")
    damaged = [line for line in out.splitlines() if line.startswith("damaged:")]
    assert code == 2 and len(damaged) == 1, out
    shard_rows = open_store(tmp_path / "s").arrays["acts/blocks.0.hook_resid_post"].shards[0]
    assert f"acts/blocks.0.hook_resid_post rows {shard_rows}-{shard_rows + 15}" in damaged[0]
    assert "restore it" in damaged[0]
    shard.unlink()
    code, out = kukla("store", "verify", tmp_path / "s")
    missing = [line for line in out.splitlines() if line.startswith("damaged:")]
    assert code == 2 and len(missing) == 1, out  # one line for the shard, not one per chunk
    assert f"rows {shard_rows}-" in missing[0] and "missing" in missing[0] and "restore it" in missing[0]


def test_finalize_workers_then_commit_from_the_cli(tmp_path: Path) -> None:
    path = tmp_path / "s"
    write_sequences(path, 8, 16)
    for worker in (1, 0):  # any order: each does its share, then whatever is left
        code, out = kukla("store", "finalize", path, "--workers", "2", "--worker", worker, "--memory-budget", "64KiB")
        assert code == 0 and f"worker {worker} of 2 done" in out, out
    assert json.loads((path / "zarr.json").read_text())["attributes"]["kukla"]["state"] == "finalizing"
    assert "finalized" in _stdout("store", "finalize", path, "--memory-budget", "64KiB")
    assert sorted(open_store(path).read("tokens/token_id").tolist()) == list(range(128))
    one_line_error(*kukla("store", "finalize", path, "--workers", "2", "--worker", "2"), "worker")


def test_a_chunk_dropped_from_its_shard_index_fails_verify_as_it_fails_readers(tmp_path: Path) -> None:
    """zarr reads a chunk marked empty in a shard index as zeros; verify must see what the reader sees."""
    from kukla.errors import KuklaError
    from kukla.storage.shards import crc32c

    write_sequences(tmp_path / "s", 16, 16)
    assert kukla("store", "finalize", tmp_path / "s", "--memory-budget", "64KiB")[0] == 0
    store = open_store(tmp_path / "s")
    name = "acts/blocks.0.hook_resid_post"
    shard_rows, chunk_rows = store.arrays[name].shards[0], store.chunk_rows
    shard = tmp_path / "s" / name / "c" / "1" / "0"
    data = bytearray(shard.read_bytes())
    size = shard_rows // chunk_rows * 16 + 4
    index = np.frombuffer(bytes(data[-size:-4]), "<u8").copy()
    index[:2] = np.iinfo(np.uint64).max  # chunk 0 of shard 1: "not written"
    data[-size:] = index.tobytes() + np.uint32(crc32c(index.view(np.uint8))).tobytes()
    shard.write_bytes(bytes(data))
    with pytest.raises(KuklaError, match=f"rows {shard_rows}-{shard_rows + chunk_rows - 1}"):
        open_store(tmp_path / "s").read(name, shard_rows, shard_rows + chunk_rows)
    code, out = kukla("store", "verify", tmp_path / "s")
    damaged = [line for line in out.splitlines() if line.startswith("damaged:")]
    assert code == 2 and len(damaged) == 1 and f"rows {shard_rows}-{shard_rows + chunk_rows - 1}" in damaged[0], out
