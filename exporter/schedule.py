"""Merge schedules: how many tokens each block merges (constant r, a per-block list, or a target count).

The schedule is fixed at export time, so every tensor shape in the exported graph is static. Counts are of
patch tokens; prefix tokens ([CLS], registers) are never merged and not counted here.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import List, Optional, Sequence


class ScheduleError(ValueError):
    """A merge schedule that cannot be applied to the model."""


@dataclass(frozen=True)
class Schedule:
    r_per_block: List[int]  # tokens merged in block i (after its attention)
    patches_per_block: List[int]  # patch tokens entering block i
    final_patches: int

    @property
    def total_merged(self) -> int:
        return sum(self.r_per_block)


def _clip(r: int, n: int, floor: int) -> int:
    """At most half of the tokens in one step (bipartite), never below the floor."""
    return max(0, min(r, n // 2, n - floor))


def make_schedule(
    num_patches: int,
    depth: int,
    r: Optional[int] = None,
    r_list: Optional[Sequence[int]] = None,
    target: Optional[int] = None,
    floor: int = 1,
) -> Schedule:
    """Build a schedule from exactly one of ``r`` (constant), ``r_list`` (one per block) or ``target``.

    ``floor`` is the fewest patch tokens any block may leave (the summary head needs at least K). With
    ``target`` the smallest constant r that reaches the target is used and the last merges are trimmed so
    exactly ``target`` tokens remain.
    """
    given = [v is not None for v in (r, r_list, target)]
    if sum(given) > 1:
        raise ScheduleError("give only one of r, r_list and target")
    if floor < 1 or floor > num_patches:
        raise ScheduleError(f"floor {floor} must be between 1 and the patch count {num_patches}")
    if r_list is not None:
        r_list = [int(v) for v in r_list]
        if len(r_list) != depth:
            raise ScheduleError(f"r_list has {len(r_list)} entries; the model has {depth} blocks")
        if any(v < 0 for v in r_list):
            raise ScheduleError("r_list entries must be >= 0")
        wanted = r_list
    elif target is not None:
        if not floor <= target <= num_patches:
            raise ScheduleError(f"target {target} must be between the floor {floor} and {num_patches}")
        floor = target
        wanted = [num_patches] * depth  # clipped below to half per block, stopping at the target
        for const in range(0, num_patches + 1):
            trial = _apply(num_patches, [const] * depth, floor)
            if trial.final_patches <= target:
                wanted = [const] * depth
                break
    else:
        if r is not None and r < 0:
            raise ScheduleError("r must be >= 0")
        wanted = [int(r or 0)] * depth
    return _apply(num_patches, wanted, floor)


def _apply(num_patches: int, wanted: Sequence[int], floor: int) -> Schedule:
    n, rs, ns = num_patches, [], []
    for want in wanted:
        ns.append(n)
        rr = _clip(want, n, floor)
        rs.append(rr)
        n -= rr
    return Schedule(r_per_block=rs, patches_per_block=ns, final_patches=n)
