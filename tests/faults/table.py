"""The fault table: one line per row, then the problems of failed rows and why rows skipped."""

from __future__ import annotations

from collections.abc import Sequence

from .core import Row

COLUMNS = ("fault", "goal", "runs", "groups in", "groups done", "stopped", "lost",
           "duplicated", "alerts raised", "result")


def _cells(r: Row) -> tuple[str, ...]:
    if r.skipped:
        return (r.fault, r.goal, "-", "-", "-", "-", "-", "-", "-", "SKIP")
    return (r.fault, r.goal, str(r.runs), str(r.groups_in), str(r.groups_done), str(r.stopped),
            str(r.lost), str(r.duplicated), str(r.alerts), r.result)


def render(rows: Sequence[Row], elapsed_s: float | None = None) -> str:
    table = [COLUMNS] + [_cells(r) for r in rows]
    widths = [max(len(t[i]) for t in table) for i in range(len(COLUMNS))]
    numeric = set(range(2, 9))

    def line(cells: Sequence[str]) -> str:
        return "  ".join(c.rjust(w) if i in numeric else c.ljust(w)
                         for i, (c, w) in enumerate(zip(cells, widths, strict=True))).rstrip()

    out = [line(COLUMNS), "  ".join("-" * w for w in widths)]
    out += [line(c) for c in table[1:]]
    failed = [r for r in rows if r.problems and not r.skipped]
    skipped = [r for r in rows if r.skipped]
    n_ok = sum(1 for r in rows if r.ok and not r.skipped)
    summary = (f"{n_ok} ok, {len(failed)} failed, {len(skipped)} skipped"
               f" — lost {sum(r.lost for r in rows)}, duplicated {sum(r.duplicated for r in rows)}")
    if elapsed_s is not None:
        summary += f" — {elapsed_s:.0f} s"
    out += ["", summary]
    for r in failed:
        out.append(f"\nFAIL {r.fault}:")
        out += [f"  - {p}" for p in r.problems]
    for r in skipped:
        out.append(f"SKIP {r.fault}: {r.skipped}")
    return "\n".join(out)
