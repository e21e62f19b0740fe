"""report.html for a 65k-latent dictionary: its size, how long the browser data takes to build,
and how fast headless Chromium opens it and one latent.

The store is real (StoreWriter + finalize) with real TinyStories text tokenized by the
embedded Gemma tokenizer (262k vocabulary, so token strings are realistic) and cut into
windows of 128 tokens kept whole in `windows/*` as harvest does, and random d=16 activations; the dictionary is a real 65,536-latent ReLU SAE with Matryoshka levels
whose bias makes it fire on ≈ 0.6% of tokens. The activations carry no meaning: what is
measured is the report's size and load time, which depend on the latent count, the top
examples and the context length, not on d.

Prints kukla's figures beside the floor: Chromium opening a blank page, and the report's
raw payload (JSON before compression); and the contexts of 10,000 rows looked up in the
store's windows beside the scan an older store (no `windows/*`) needs, on the same rows.

Usage: python benchmarks/report_bench.py [--width 65536] [--rows 40000] [--keep DIR]
"""

from __future__ import annotations

import argparse
import json
import resource
import shutil
import sys
import tempfile
import time
from pathlib import Path

import numpy as np
import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))  # this checkout's kukla, not an installed one

from kukla.pipeline.dictionary import Dictionary, DictionaryConfig, save_dictionary
from kukla.pipeline.evaluate import AbsorptionConfig, DownstreamConfig, EvaluateConfig, evaluate
from kukla.pipeline.models import EMBEDDED_MODEL, convert_embedded_gemma
from kukla.pipeline.evaluate.contexts import row_contexts
from kukla.storage import StoreWriter, finalize_store, open_store

HOOK = "blocks.6.hook_resid_post"
TEXT = Path("/work/shared/data/tinystories/train.jsonl")
D = 16
SEQ = 128


def build_store(path: Path, rows: int, windows: bool = True) -> Path:
    """`rows` rows of TinyStories windows; with `windows`, the whole windows too (the last one's
    unstored tail has windows/row −1, as a harvest's dropped tokens do)."""
    from transformers import AutoTokenizer

    tokenizer = AutoTokenizer.from_pretrained(convert_embedded_gemma())
    ids: list[int] = []
    with TEXT.open() as f:
        for line in f:
            ids += tokenizer(json.loads(line)["text"])["input_ids"]
            if len(ids) >= rows + SEQ:
                break
    n_windows = -(-rows // SEQ)
    window_ids = np.asarray(ids[:n_windows * SEQ], dtype=np.int32).reshape(n_windows, SEQ)
    token_id = window_ids.reshape(-1)[:rows]
    g = np.random.default_rng(0)
    acts = g.standard_normal((rows, D)).astype(np.float32)
    meta = {"hooks": {HOOK: D}, "source": "bench", "model": {"name": EMBEDDED_MODEL}, "context_size": SEQ}
    segment = {f"acts/{HOOK}": acts, "tokens/token_id": token_id,
               "tokens/sequence": (np.arange(rows) // SEQ).astype(np.int64),
               "tokens/position": (np.arange(rows) % SEQ).astype(np.int32)}
    if windows:
        segment |= {"windows/sequence": np.arange(n_windows, dtype=np.int64), "windows/token_id": window_ids}
    writer = StoreWriter.open(path, meta, dtype="float32")
    writer.write_segment(0, segment)
    writer.finish()
    writer.close()
    finalize_store(path, holdout_rows=rows // 4)
    return path


def build_dictionary(path: Path, width: int) -> Path:
    g = torch.Generator().manual_seed(0)
    levels = [width // 64, width // 16, width // 4, width]
    d = Dictionary(DictionaryConfig(d_in=D, width=width, arch="relu", levels=levels))
    with torch.no_grad():
        d.W_enc.copy_(torch.randn(D, width, generator=g) / D ** 0.5)
        d.b_enc.fill_(-2.5)  # pre-activations ~ N(−2.5, 1): fires on ≈ 0.6% of tokens
        d.W_dec.copy_(torch.nn.functional.normalize(torch.randn(width, D, generator=g), dim=1))
        d.b_dec.zero_()
    return save_dictionary(d, path, {"hooks": {"input": HOOK}})


def time_contexts(store_path: Path, context_tokens: int) -> float:
    """Seconds (CPU) to look up the contexts of 10,000 rows spread over the store."""
    store = open_store(store_path)
    rows = np.linspace(0, store.n_rows - 1, 10_000).astype(np.int64).tolist()
    start = time.process_time()
    row_contexts(store, rows, context_tokens)
    return time.process_time() - start


def open_in_chromium(html: Path, latent: int) -> dict[str, float]:
    from playwright.sync_api import sync_playwright

    flags = ["--no-sandbox", "--disable-gpu", "--disable-background-networking", "--disable-component-update",
             "--disable-sync", "--no-first-run"]
    blank = html.parent / "blank.html"
    blank.write_text("<!DOCTYPE html><html><body><script>document.body.dataset.ready='1'</script></body></html>")
    out = {}
    with sync_playwright() as p, tempfile.TemporaryDirectory() as profile:
        context = p.chromium.launch_persistent_context(profile, executable_path=shutil.which("chromium"), headless=True,
                                                       args=flags)
        page = context.new_page()
        for name, target in (("blank", blank), ("report", html)):
            start = time.perf_counter()
            page.goto(target.resolve().as_uri())
            page.wait_for_selector("body[data-ready='1']", state="attached", timeout=120_000)
            out[f"{name}_load_s"] = time.perf_counter() - start
        page.fill("#search", str(latent))
        start = time.perf_counter()
        page.click("#latents tr.row")
        page.wait_for_selector("#latent-title")
        out["open_latent_s"] = time.perf_counter() - start
        context.close()
    return out


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--width", type=int, default=65536)
    parser.add_argument("--rows", type=int, default=40000)
    parser.add_argument("--keep", type=Path, default=None, help="keep the store and report here")
    args = parser.parse_args()
    torch.set_num_threads(1)
    root = args.keep or Path(tempfile.mkdtemp(prefix="report-bench-"))
    root.mkdir(parents=True, exist_ok=True)
    store = build_store(root / "store.zarr", args.rows)
    dictionary = build_dictionary(root / "sae", args.width)
    config = EvaluateConfig(dictionaries=[dictionary], store=store, out=root / "report",
                            downstream=DownstreamConfig(enabled=False), absorption=AbsorptionConfig(enabled=False),
                            batch_size=2048)
    cpu = time.process_time()
    out = evaluate(config)
    cpu = time.process_time() - cpu
    windowed = time_contexts(store, config.context_tokens)
    scanned = time_contexts(build_store(root / "no-windows.zarr", args.rows, windows=False), config.context_tokens)
    html = out / "report.html"
    page = html.read_text()
    start = page.index('id="kukla-data">') + len('id="kukla-data">')
    index_bytes = len(page[start:page.index("</script>", start)].encode())
    metrics = json.loads((out / "metrics.json").read_text())["dictionaries"]["sae"]
    timing = open_in_chromium(html, latent=args.width - 1)
    size = html.stat().st_size
    print(f"dictionary: {args.width} latents, levels {metrics['levels']}, L0 {metrics['reconstruction']['l0']:.1f}, "
          f"{metrics['reconstruction']['n_tokens']} eval tokens, {args.rows} store rows")
    print(f"evaluate (whole, no downstream): {cpu:.1f} CPU-s, peak RSS "
          f"{resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024:.0f} MB")
    print(f"report.html: {size / 2**20:.1f} MiB ({size / args.width:.0f} bytes per latent); "
          f"index JSON {index_bytes / 2**20:.1f} MiB, compressed detail pages {(size - index_bytes) / 2**20:.1f} MiB")
    print(f"chromium: report ready in {timing['report_load_s']:.2f} s (blank page {timing['blank_load_s']:.2f} s: "
          f"{timing['report_load_s'] / timing['blank_load_s']:.1f}× the floor); "
          f"opening latent {args.width - 1} (decodes its page) {timing['open_latent_s']:.2f} s")
    print(f"contexts of 10,000 rows ({config.context_tokens + 1} tokens each): from windows/* {windowed:.3f} CPU-s, "
          f"by a scan of the store (no windows/*) {scanned:.3f} CPU-s ({scanned / windowed:.1f}x)")
    if args.keep is None:
        shutil.rmtree(root)


if __name__ == "__main__":
    main()
