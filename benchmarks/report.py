"""Write a benchmark's result as STEM.json + STEM.md (atomically) and print the markdown; the common head of
every latency report (checks first, then the machine and the measuring method)."""

from __future__ import annotations


def load_average() -> list[float] | None:
    """1/5/15-minute load averages (how busy the machine was while measuring)."""
    import os

    try:
        return [round(x, 2) for x in os.getloadavg()]
    except OSError:
        return None


def machine_line(machine: dict) -> str:
    m = machine or {}
    cpu = m.get("cpu_model") or m.get("processor") or "unknown CPU"
    parts = [f"{cpu}, {m.get('cpu_count', '?')} cores"]
    for k in ("gpu", "gpus", "gpu_driver", "cuda_torch", "platform", "python", "hostname"):
        if m.get(k):
            parts.append(f"{k} {m[k]}")
    return "Machine: " + "; ".join(str(p) for p in parts) + "."


def header_lines(title: str, res: dict, not_adding_up: list[str], spread_notes: list[str]) -> list[str]:
    """First line: whether the stage tables add up (and which do not). Then the title, a quick-run warning,
    the machine, the method, and a note for every figure whose rounds disagree."""
    if not_adding_up:
        first = ("**Stages do not add up to the total within its interval for: " + ", ".join(not_adding_up)
                 + "** (see the stage tables below).")
    else:
        first = "Every stage table below adds up to its total within the total's 95% interval."
    lines = [first, "", f"# {title}", ""]
    method = res.get("method") or {}
    if method.get("quick"):
        lines += ["**Quick run: short windows; every figure here is indicative only.**", ""]
    load = ""
    if res.get("load_average_start") is not None:
        load = (f" Load average (1/5/15 min) at start {res['load_average_start']}, at end "
                f"{res.get('load_average_end')}.")
    lines += [machine_line(res.get("machine", {})) + load, ""]
    if res.get("method_text"):
        lines += [f"Method: {res['method_text']}.", ""]
    if spread_notes:
        lines += ["Large spread between rounds (the machine was not quiet, or the path is unstable): "
                  + "; ".join(spread_notes) + ".", ""]
    for p in res.get("problems", []):
        lines.append(f"Problem: {p}")
    if res.get("problems"):
        lines.append("")
    return lines


def write_report(stem, res: dict, lines: list[str]) -> None:
    from onestep.provenance import atomic_write_bytes, atomic_write_json

    lines = lines + ["", f"Command: `{res['command']}`", machine_line(res.get("machine", {})),
                     f"Machine details: {res['machine']}", ""]
    atomic_write_json(f"{stem}.json", res)
    atomic_write_bytes(f"{stem}.md", "\n".join(lines).encode())
    print("\n".join(lines))
