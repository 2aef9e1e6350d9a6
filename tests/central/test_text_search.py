"""Text search: CLIP BPE tokenizer (open_clip's format) and a real ONNX text tower through central's encoder."""

from __future__ import annotations

import gzip
import shutil
from dataclasses import replace
from pathlib import Path

import numpy as np
import pytest
from sqlalchemy.orm import Session

from central import store
from central.clip_bpe import ClipBpeTokenizer, bytes_to_unicode
from central.config import SearchConfig
from central.encoder import Encoder
from central.search import Query, Searcher
from tests.central.conftest import make_message, tx
from tokenline import manifest as mf

MERGES = ["s c", "sc r", "a t", "c h</w>", "scr at", "scrat ch</w>", "p i", "t </w>", "pi t</w>"]


def _vocab(path: Path) -> Path:
    with gzip.open(path, "wt", encoding="utf-8") as fh:
        fh.write("#version: 0.2\n" + "\n".join(MERGES) + "\n")
    return path


def test_clip_bpe_merges_truncates_and_pads(tmp_path):
    tok = ClipBpeTokenizer(_vocab(tmp_path / "bpe.txt.gz"))
    base = 512  # 256 bytes + 256 end-of-word variants
    assert tok.encode("Scratch") == [base + MERGES.index("scrat ch</w>")]
    assert tok.encode("pit &amp; pit") == [base + 8, tok.encoder[bytes_to_unicode()[ord("&")] + "</w>"], base + 8]
    ids = tok("scratch scratch scratch", context_length=3)
    assert ids.tolist() == [[tok.sot, base + 5, tok.eot]]  # truncated, last id stays end-of-text
    padded = tok("pit", context_length=6)
    assert padded.tolist() == [[tok.sot, base + 8, tok.eot, 0, 0, 0]]


def _text_tower(path: Path, vocab_size: int, dim: int, seed: int) -> np.ndarray:
    """A real ONNX text tower: mean of embedding rows of the non-pad ids, L2-normalized."""
    import onnx
    from onnx import TensorProto, helper, numpy_helper

    table = np.random.default_rng(seed).standard_normal((vocab_size, dim)).astype(np.float32)
    table[0] = 0.0  # pad id contributes nothing
    nodes = [helper.make_node("Gather", ["table", "input_ids"], ["emb"], axis=0),
             helper.make_node("ReduceSum", ["emb", "ax1"], ["s"], keepdims=0),
             helper.make_node("ReduceL2", ["s", "ax1"], ["n"], keepdims=1),
             helper.make_node("Div", ["s", "n"], ["text_embedding"])]
    g = helper.make_graph(nodes, "text", [helper.make_tensor_value_info("input_ids", TensorProto.INT64, [1, 8])],
                          [helper.make_tensor_value_info("text_embedding", TensorProto.FLOAT, [1, dim])],
                          [numpy_helper.from_array(table, "table"),
                           numpy_helper.from_array(np.array([1], np.int64), "ax1")])
    model = helper.make_model(g, opset_imports=[helper.make_opsetid("", 18)])
    model.ir_version = 9
    onnx.save(model, str(path))
    return table


def test_text_query_through_onnx_text_tower(tmp_path, engine, tiny_model_dir):
    d = tmp_path / "model"
    shutil.copytree(tiny_model_dir, d)
    vocab = _vocab(d / "bpe_simple_vocab_16e6.txt.gz")
    tok = ClipBpeTokenizer(vocab)
    n_vocab = max(tok.encoder.values()) + 1
    table = _text_tower(d / "text.onnx", n_vocab, 384, seed=4)
    base = mf.Manifest.from_file(tiny_model_dir)
    man = base.model_copy(update={
        "text": mf.TextSpec(onnx="text.onnx", context_length=8, vocab_size=n_vocab, tokenizer="open_clip_bpe",
                            tokenizer_files=[vocab.name]),
        "files": list(base.files) + [mf.FileSpec(path="text.onnx", sha256=mf.sha256_file(d / "text.onnx"),
                                                 role="text_encoder"),
                                     mf.FileSpec(path=vocab.name, sha256=mf.sha256_file(vocab), role="tokenizer")]})
    man.write(d / "manifest.json")
    model = tx(engine, store.register_model, mf.Manifest.from_file(d), d)
    assert model.has_text
    enc = Encoder(model, ["CPUExecutionProvider"])
    v = enc.encode_text("Scratch")
    ids = tok("scratch", 8)[0]
    want = table[ids].sum(0)
    assert np.allclose(v, want / np.linalg.norm(want), atol=1e-5)
    # frames whose tokens contain that direction rank first (late interaction with one query token)
    rng = np.random.default_rng(0)
    msgs = [make_message(model.manifest, rng, seq=i) for i in range(30)]
    t = msgs[7].summary.tokens.copy()
    t[3] = v
    msgs[7] = replace(msgs[7], summary=replace(msgs[7].summary, tokens=t))
    with Session(engine) as s, s.begin():
        store.insert_frames(s, [store.frame_row(m, model.id, 0) for m in msgs])
    hits = Searcher(engine, SearchConfig(rerank_weight=0.5)).search(model, Query(model.id, v, v[None, :]), 3)
    assert hits[0].frame_id == msgs[7].frame_id.hex() and hits[0].matches[0]["token"] == 3
    with pytest.raises(Exception):
        enc.encode_text("   ")
