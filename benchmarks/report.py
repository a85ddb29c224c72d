"""Write a benchmark's result as STEM.json + STEM.md (atomically) and print the markdown."""

from __future__ import annotations


def write_report(stem, res: dict, lines: list[str]) -> None:
    from onestep.provenance import atomic_write_bytes, atomic_write_json

    lines = lines + ["", f"Command: `{res['command']}`", f"Machine: {res['machine']}", ""]
    atomic_write_json(f"{stem}.json", res)
    atomic_write_bytes(f"{stem}.md", "\n".join(lines).encode())
    print("\n".join(lines))
