"""Query encoders for search: the registered model's ONNX image encoder (and text tower) under ONNX Runtime.

Images go through ``tokenline.preprocess`` (the one implementation the edge uses too) and the runtime's
``OnnxRuntimeRunner`` (the edge's session setup and output checks), so a query image is encoded exactly as a
camera frame is. Sessions are loaded lazily, once per model, and verified against the manifest's sha256s.
"""

from __future__ import annotations

import logging
import threading
from pathlib import Path
from typing import Dict, Sequence

import numpy as np

from central.errors import Internal, Invalid, Unavailable
from central.store import ModelInfo
from runtime.runners import OnnxRuntimeRunner, RunnerError
from tokenline.manifest import ManifestError, verify_files
from tokenline.preprocess import DEFAULT_MAX_PIXELS, ImageError, decode_image, preprocess
from tokenline.summary import Summary

log = logging.getLogger(__name__)


class Encoder:
    """One model's image encoder (and text tower when the manifest has one)."""

    def __init__(self, model: ModelInfo, providers: Sequence[str]) -> None:
        """``Unavailable`` when the model's directory is unknown here or its files do not verify or load."""
        if model.model_dir is None:
            raise Unavailable(f"model {model.name!r} is registered without a model directory; run "
                              "`tokenline-central register-model <dir>` on this host", reason="model_not_loaded")
        self.model = model
        self.dir = Path(model.model_dir)
        try:
            verify_files(model.manifest, self.dir)
        except ManifestError as exc:
            raise Unavailable(str(exc), reason="model_files") from None
        try:
            self.runner = OnnxRuntimeRunner(self.dir, model.manifest, providers=list(providers))
        except RunnerError as exc:
            raise Unavailable(str(exc), reason="model_load") from None
        self._text = None
        self._tokenizer = None
        self._lock = threading.Lock()

    def encode_pixels(self, pixels: np.ndarray) -> Summary:
        with self._lock:
            return self.runner.run(pixels[None].astype(np.float32))[0]

    def encode_frame(self, frame: np.ndarray) -> Summary:
        return self.encode_pixels(preprocess(frame, self.model.manifest.input))

    def encode_image_bytes(self, data: bytes, max_pixels: int = DEFAULT_MAX_PIXELS) -> Summary:
        """The summary of an encoded image file (JPEG, PNG, ...); ``Invalid`` when it does not decode or its
        header declares more than ``max_pixels`` (reason ``too_many_pixels``, nothing decoded)."""
        try:
            frame = decode_image(data, max_pixels)
        except ImageError as exc:
            reason = "too_many_pixels" if exc.reason == "too_many_pixels" else "bad_image"
            raise Invalid(f"query image: {exc}", reason=reason) from None
        return self.encode_frame(frame)

    def _load_text(self) -> None:
        spec = self.model.manifest.text
        if spec is None:
            raise Invalid(f"model {self.model.name!r} has no text tower; search by example image instead",
                          reason="no_text_tower")
        import onnxruntime as ort

        if not spec.tokenizer_files:
            raise Unavailable(f"model {self.model.name!r}: the export ships no tokenizer files", reason="tokenizer")
        path = self.dir / spec.tokenizer_files[0]
        if spec.tokenizer == "open_clip_bpe":
            from central.clip_bpe import ClipBpeTokenizer

            bpe = ClipBpeTokenizer(path)
            self._tokenizer = lambda text: bpe(text, spec.context_length)
        else:
            from tokenizers import Tokenizer

            tok = Tokenizer.from_file(str(path))
            tok.enable_truncation(spec.context_length)
            tok.enable_padding(length=spec.context_length, pad_id=spec.pad_id)
            self._tokenizer = lambda text: np.asarray([tok.encode(text).ids], np.int64)
        self._text = ort.InferenceSession(str(self.dir / spec.onnx), providers=self.runner.providers)

    def encode_text(self, text: str) -> np.ndarray:
        """Unit-norm text embedding [D] in the image embedding's space."""
        text = (text or "").strip()
        if not text:
            raise Invalid("text query is empty", reason="empty_text")
        with self._lock:
            if self._text is None:
                self._load_text()
            spec = self.model.manifest.text
            assert spec is not None and self._tokenizer is not None
            ids = self._tokenizer(text)
            feeds = {spec.input_name: ids}
            names = [i.name for i in self._text.get_inputs()]
            if "attention_mask" in names:
                feeds["attention_mask"] = (ids != spec.pad_id).astype(np.int64)
            (vec,) = self._text.run([spec.output_name], feeds)
        v = np.asarray(vec, np.float32).reshape(-1)
        if v.shape[0] != self.model.embedding_dim:
            raise Internal(f"text tower returned dim {v.shape[0]}, model has {self.model.embedding_dim}",
                           reason="text_dim")
        return v / max(float(np.linalg.norm(v)), 1e-12)


class EncoderPool:
    """Lazily loaded encoders, one per model id."""

    def __init__(self, providers: Sequence[str]) -> None:
        self.providers = list(providers)
        self._enc: Dict[int, Encoder] = {}
        self._lock = threading.Lock()

    def get(self, model: ModelInfo) -> Encoder:
        with self._lock:
            enc = self._enc.get(model.id)
            if enc is None or enc.model.model_dir != model.model_dir:
                enc = self._enc[model.id] = Encoder(model, self.providers)
            return enc
