"""Turning the benchmark's samples into bench/results.md and bench/results.png,
and py-spy's raw (collapsed-stack) output into a where-the-time-goes summary."""

from __future__ import annotations

import math
import re
import statistics
from collections import Counter
from pathlib import Path
from typing import Any

SIZES = (4096, 102400)
CONCURRENCY = (1, 8, 32)
CELLS = [(s, c) for s in SIZES for c in CONCURRENCY]


def _size(size: int) -> str:
    return f"{size // 1024} KB"


# -- numbers -------------------------------------------------------------------------------


def measured_configs(result: dict[str, Any], phase: str = "main") -> list[dict[str, Any]]:
    """Configurations with numbers in ``phase`` (one that failed midway is marked †)."""
    names = {s["conf"] for s in _ok(result, phase)}
    out = []
    for c in result["configs"]:
        if c["name"] in names:
            out.append({**c, "label": c["label"] + (" †" if c["skipped"] else "")})
    return out


def _ok(result: dict[str, Any], phase: str = "main") -> list[dict[str, Any]]:
    return [s for s in result["samples"] if s["ok"] and s.get("phase", "main") == phase]


def throughput(result: dict[str, Any], phase: str = "main") -> dict[tuple[str, int, int], float]:
    """Median messages/second per (configuration, size, concurrency)."""
    out: dict[tuple[str, int, int], list[float]] = {}
    for s in _ok(result, phase):
        out.setdefault((s["conf"], s["size"], s["conc"]), []).append(s["rate"])
    return {k: statistics.median(v) for k, v in out.items()}


def spread(result: dict[str, Any], phase: str = "main"
           ) -> dict[tuple[str, int, int], tuple[float, float, int]]:
    out: dict[tuple[str, int, int], list[float]] = {}
    for s in _ok(result, phase):
        out.setdefault((s["conf"], s["size"], s["conc"]), []).append(s["rate"])
    return {k: (min(v), max(v), len(v)) for k, v in out.items()}


def cpu_per_message(result: dict[str, Any], phase: str = "main"
                    ) -> dict[tuple[str, int], float]:
    """Median milter CPU milliseconds per message, per (configuration, size)."""
    out: dict[tuple[str, int], list[float]] = {}
    for s in _ok(result, phase):
        out.setdefault((s["conf"], s["size"]), []).append(1000 * s["cpu"] / s["count"])
    return {k: statistics.median(v) for k, v in out.items()}


def helper_cpu_per_message(result: dict[str, Any], phase: str = "main"
                           ) -> dict[tuple[str, int], float]:
    """Median CPU milliseconds per message of ipv6milter's check helpers."""
    out: dict[tuple[str, int], list[float]] = {}
    for s in _ok(result, phase):
        if "helper_cpu" in s:
            out.setdefault((s["conf"], s["size"]), []).append(
                1000 * s["helper_cpu"] / s["count"])
    return {k: statistics.median(v) for k, v in out.items()}


def peak_rss(result: dict[str, Any], pred: Any = None, phase: str = "main",
             key: str = "peak_rss_kib") -> dict[str, float]:
    """Max VmHWM (MiB) of any one process of a configuration's milters (a
    worker) over the runs ``pred`` keeps; with ``key="total_rss_kib"`` (or
    ``"total_pss_kib"``) the peak of the sampled sum over all its processes."""
    out: dict[str, float] = {}
    for s in result["samples"]:
        if s.get("phase", "main") == phase and (pred is None or pred(s)):
            out[s["conf"]] = max(out.get(s["conf"], 0.0), s.get(key, 0) / 1024)
    return out


def processes(result: dict[str, Any], phase: str = "main") -> dict[str, int]:
    """The most processes a configuration's milters had during a run."""
    out: dict[str, int] = {}
    for s in result["samples"]:
        if s.get("phase", "main") == phase:
            out[s["conf"]] = max(out.get(s["conf"], 0), s.get("procs", 0))
    return out


def worker_count(result: dict[str, Any], phase: str = "main") -> dict[str, int]:
    """The most worker processes (``ipv6milter-wN``) a configuration had."""
    out: dict[str, int] = {}
    for s in result["samples"]:
        if s.get("phase", "main") == phase and s.get("workers"):
            out[s["conf"]] = max(out.get(s["conf"], 0), s["workers"])
    return out


def workers(procs: int) -> int:
    """Workers of a process tree: a prefork parent does not serve mail."""
    return max(1, procs - 1)


def latency(result: dict[str, Any], phase: str = "main"
            ) -> dict[tuple[str, int], tuple[float, float, int]]:
    """p50, p95 (ms) and count of the timed c=1 sessions."""
    out = {}
    for key, values in result.get("latency", {}).items():
        ph, name, size = key.split("|")
        if ph != phase:
            continue
        v = sorted(values)
        out[(name, int(size))] = (_q(v, 0.5) * 1000, _q(v, 0.95) * 1000, len(v))
    return out


def _q(v: list[float], q: float) -> float:
    if not v:
        return math.nan
    pos = (len(v) - 1) * q
    lo = int(pos)
    hi = min(lo + 1, len(v) - 1)
    return v[lo] + (v[hi] - v[lo]) * (pos - lo)


# p50 at c=1 of ipv6milter (default configuration) before issue #18: bench/results.md
# of 2026-12-01 16:47 UTC, the "no worse than today" reference.
TODAY_P50_MS = {4096: 4.9, 102400: 6.7}
IPV6 = ("ipv6milter", "ipv6milter_w1")  # the default configuration, and Workers 1
PEERS = ("opendkim", "rspamd")  # the C peers of issue #18
MAIN_CELLS = [(4096, 8), (4096, 32), (102400, 8), (102400, 32)]


def _ratio_target(out: list[tuple[str, str, bool | None]], name: str,
                  a: float | None, b: float | None, limit: float, at_most: bool = False,
                  unit: str = "/s", fmt: str = "{:.0f}") -> None:
    if not a or not b:
        out.append((name, "not measured", None))
        return
    r = a / b
    out.append((name, f"{fmt.format(a)} vs {fmt.format(b)}{unit} = {r:.2f}x",
                r <= limit if at_most else r >= limit))


def targets(result: dict[str, Any]) -> list[tuple[str, str, bool | None]]:
    """The targets of issue #18, for the default configuration: (target, measured, met)."""
    tp = throughput(result)
    lat = latency(result)
    cpu = cpu_per_message(result)
    me = "ipv6milter"
    out: list[tuple[str, str, bool | None]] = []
    c4, o4 = cpu.get((me, 4096)), cpu.get(("opendkim", 4096))
    _ratio_target(out, "milter CPU per 4 KB message ≤ 1.2x OpenDKIM's", c4, o4, 1.2, True,
                  " ms", "{:.2f}")
    out.append(("milter CPU per 4 KB message ≤ 1.3 ms", f"{c4:.2f} ms", c4 <= 1.3) if c4
               else ("milter CPU per 4 KB message ≤ 1.3 ms", "not measured", None))
    _ratio_target(out, "milter CPU per 100 KB message ≤ 1.5x OpenDKIM's", cpu.get((me, 102400)),
                  cpu.get(("opendkim", 102400)), 1.5, True, " ms", "{:.2f}")
    for conc in (8, 32):
        a = tp.get((me, 4096, conc))
        _ratio_target(out, f"4 KB c={conc}: throughput ≥ 1.0x OpenDKIM", a,
                      tp.get(("opendkim", 4096, conc)), 1.0)
        _ratio_target(out, f"4 KB c={conc}: throughput ≥ rspamd", a,
                      tp.get(("rspamd", 4096, conc)), 1.0)
    for conc in (8, 32):
        a = tp.get((me, 102400, conc))
        _ratio_target(out, f"100 KB c={conc}: throughput ≥ 1.5x rspamd", a,
                      tp.get(("rspamd", 102400, conc)), 1.5)
        _ratio_target(out, f"100 KB c={conc}: throughput ≥ 0.8x OpenDKIM", a,
                      tp.get(("opendkim", 102400, conc)), 0.8)
    for size, conc in CELLS:
        _ratio_target(out, f"{_size(size)} c={conc}: throughput ≥ 1.5x the chain",
                      tp.get((me, size, conc)), tp.get(("chain", size, conc)), 1.5)
    for size in SIZES:
        v = lat.get((me, size))
        name = f"{_size(size)} c=1: p50 no worse than before (#18: {TODAY_P50_MS[size]} ms)"
        if v is None:
            out.append((name, "not measured", None))
            continue
        w1 = lat.get(("ipv6milter_w1", size))
        also = f"; Workers 1 in this run {w1[0]:.1f} ms" if w1 else ""
        out.append((name, f"{v[0]:.1f} ms{also}", v[0] <= TODAY_P50_MS[size]))
    _ratio_target(out, "moonshot: milter CPU per 4 KB message ≤ rspamd's", c4,
                  cpu.get(("rspamd", 4096)), 1.0, True, " ms", "{:.2f}")
    # Summed over every process of the daemon (parent, workers, metrics, the
    # check helpers and their zygote), per worker.  RSS counts the pages a
    # forked helper shares with its worker again in each helper; PSS counts
    # them once, which is the memory the host gives the milter.
    n = worker_count(result).get(me) or workers(processes(result).get(me, 0))
    for key, label in (("total_pss_kib", "PSS"), ("total_rss_kib", "RSS")):
        total = peak_rss(result, key=key).get(me)
        name = f"(issue #12, kept) total {label} ≤ 64 MiB per worker"
        out.append((name, f"{total:.1f} MiB / {n} worker(s) = {total / n:.1f} MiB",
                    total / n <= 64) if total else (name, "not measured", None))
    return out


def ratios_markdown(result: dict[str, Any]) -> list[str]:
    """ipv6milter (each configuration) against OpenDKIM, rspamd and the chain."""
    tp = throughput(result)
    cpu = cpu_per_message(result)
    rows = [c for c in measured_configs(result) if c["name"] in IPV6]
    if not rows:
        return []

    def ratio(a: float | None, b: float | None) -> str:
        return f"{a / b:.2f}x" if a and b else "-"

    lines = [
        "## ipv6milter against OpenDKIM, rspamd and the chain",
        "",
        "Ratios of the medians above (ipv6milter / peer): throughput (higher is better) and"
        " milter CPU per message (lower is better).",
        "",
        "| configuration | peer | " + " | ".join(f"{_size(s)} c={c}" for s, c in MAIN_CELLS)
        + " | CPU/msg 4 KB | CPU/msg 100 KB |",
        "|---|---|" + "---:|" * (len(MAIN_CELLS) + 2),
    ]
    for c in rows:
        for peer in PEERS:
            cells = [ratio(tp.get((c["name"], s, k)), tp.get((peer, s, k))) for s, k in MAIN_CELLS]
            cells += [ratio(cpu.get((c["name"], s)), cpu.get((peer, s))) for s in SIZES]
            lines.append(f"| {c['label']} | {peer} | " + " | ".join(cells) + " |")
    lines += [
        "",
        "Throughput against dkimpy-milter + pyspf-milter chained, every cell:",
        "",
        "| configuration | " + " | ".join(f"{_size(s)} c={c}" for s, c in CELLS) + " |",
        "|---|" + "---:|" * len(CELLS),
    ]
    for c in rows:
        cells = [ratio(tp.get((c["name"], s, k)), tp.get(("chain", s, k))) for s, k in CELLS]
        lines.append(f"| {c['label']} | " + " | ".join(cells) + " |")
    helpers = helper_cpu_per_message(result)
    if any(helpers.get((c["name"], s)) for c in rows for s in SIZES):
        lines += [
            "",
            "Of that CPU, what the check helpers took (the last line of defence: SPF and DKIM"
            " run in processes of their own, isolation.py), median ms per message:",
            "",
            "| configuration | " + " | ".join(f"helpers {_size(s)}" for s in SIZES) + " |",
            "|---|" + "---:|" * len(SIZES),
        ]
        for c in rows:
            cells = []
            for s in SIZES:
                h, t = helpers.get((c["name"], s)), cpu.get((c["name"], s))
                cells.append(f"{h:.2f} of {t:.2f} ms" if h is not None and t else "-")
            lines.append(f"| {c['label']} | " + " | ".join(cells) + " |")
    lines.append("")
    return lines


def scoping_markdown(result: dict[str, Any]) -> list[str]:
    """IPv4 clients with ipv6milter in smtpd_milters, and with smtpd_milter_maps."""
    confs = measured_configs(result, "scoping")
    if not confs:
        return []
    tp = throughput(result, "scoping")
    cpu = cpu_per_message(result, "scoping")
    lat = latency(result, "scoping")
    cells = sorted({(s["size"], s["conc"]) for s in _ok(result, "scoping")})
    rounds = max((s["round"] for s in _ok(result, "scoping")), default=0)
    lines = [
        "## Scoping: what IPv4 clients cost (smtpd_milter_maps)",
        "",
        "The same Postfix and ipv6milter; load from 127.0.0.1 (an IPv4 client, out of"
        " scope) through a listener with ipv6milter in `smtpd_milters`, and through one"
        " that also has `smtpd_milter_maps = cidr:…` with `0.0.0.0/0 DISABLE` (only IPv6"
        " clients reach the milter); the last row sends from [::1] through the map, to"
        f" show IPv6 clients still go through. Messages/second, median of {rounds} rounds;"
        " in brackets the ratio to Postfix alone with the IPv4 client; milter CPU over"
        " the runs.",
        "",
        "| configuration | " + " | ".join(f"{_size(s)} c={c}" for s, c in cells)
        + " | p50 4 KB c=1 | milter CPU/msg |",
        "|---|" + "---:|" * (len(cells) + 2),
    ]
    for c in confs:
        row = []
        for s, k in cells:
            v, b = tp.get((c["name"], s, k)), tp.get(("v4_postfix", s, k))
            if v is None:
                row.append("-")
            elif not b or c["name"] == "v4_postfix":
                row.append(f"{v:.0f}")
            else:
                row.append(f"{v:.0f} ({v / b:.2f})")
        p = lat.get((c["name"], 4096))
        row.append(f"{p[0]:.1f} ms" if p else "-")
        v = cpu.get((c["name"], 4096))
        row.append(f"{v:.3f} ms" if v is not None and c["daemons"] else "-")
        lines.append(f"| {c['label']} | " + " | ".join(row) + " |")
    lines.append("")
    return lines


# -- results.md ------------------------------------------------------------------------------


def _noise_note(result: dict[str, Any]) -> list[str]:
    """A warning when the machine was busier than its cores: then only the
    ratios within the run and the CPU per message are worth quoting."""
    mach = result["info"]["machine"]
    try:
        cores = int(mach["nproc"])
        loads = [float(mach[k].split()[0]) for k in ("loadavg_at_start", "loadavg_at_end")
                 if k in mach]
    except (KeyError, ValueError, IndexError):
        return []
    if not loads or max(loads) <= cores:
        return []
    sp = spread(result)
    swings = [hi / lo for (lo, hi, n) in sp.values() if lo > 0 and n > 1]
    worst = f" up to {max(swings):.1f}x" if swings else ""
    return [
        f"**Noisy machine**: the load average reached {max(loads):.0f} on {cores} cores (other"
        f" work ran at the same time); throughput moved{worst} between the rounds of one cell"
        " (spread table below). Quote the ratios between configurations of this run and the"
        " CPU per message, which the load distorts least, not the absolute rates.",
        "",
    ]



def markdown(result: dict[str, Any]) -> str:
    info = result["info"]
    mach = info["machine"]
    confs = measured_configs(result)
    tp = throughput(result)
    sp = spread(result)
    base = {(s, c): tp.get(("postfix", s, c)) for s, c in CELLS}
    rounds = result["args"]["rounds"]
    lines = [
        "# ipv6milter benchmark",
        "",
        f"{info['date']}; {mach['nproc']} cores ({mach['cpu']}), Linux {mach['kernel']},"
        f" Debian {mach['debian']}; load average at start {mach['loadavg_at_start']},"
        f" at end {mach.get('loadavg_at_end', '?')} (other work on the machine counts too).",
        "",
        *_noise_note(result),
        "Written by `make bench` (bench/run.py); method and analysis in docs/performance.md."
        f" ipv6milter's Workers key: {info.get('workers', 'not probed')}.",
        "One private Postfix, one smtpd listener per configuration; `smtp-source` from"
        " [::1], one SMTP session per message, DKIM-signed (rsa-sha256 2048,"
        " relaxed/relaxed), SPF passing through one `include`; every milter on a"
        " **unix socket**; Postfix discards the load after the milters ran.",
        f"Messages/second, median of {rounds} rounds with the configurations alternating;"
        " in brackets the ratio to Postfix alone.",
        "",
        "| configuration | " + " | ".join(f"{_size(s)} c={c}" for s, c in CELLS) + " |",
        "|---|" + "---:|" * len(CELLS),
    ]
    for c in confs:
        cells = []
        for s, k in CELLS:
            v = tp.get((c["name"], s, k))
            if v is None:
                cells.append("-")
            elif c["name"] == "postfix" or not base[(s, k)]:
                cells.append(f"{v:.0f}")
            else:
                cells.append(f"{v:.0f} ({v / base[(s, k)]:.2f})")
        lines.append(f"| {c['label']} | " + " | ".join(cells) + " |")
    lat = latency(result)
    cpu = cpu_per_message(result)
    rss = peak_rss(result)
    total = peak_rss(result, key="total_rss_kib")
    pss = peak_rss(result, key="total_pss_kib")
    nproc = processes(result)
    lines += [
        "",
        "Latency of one SMTP session at c=1 (connect to the reply to QUIT, timed by"
        " bench/load.py's client; p50/p95 in ms), milter CPU per message (utime+stime,"
        " /proc/PID/stat, of every process of the milters — a prefork parent and its"
        " workers, exited ones included — over the smtp-source runs; median ms), and"
        " memory in MiB: the summed RSS right after start, the peak RSS of any one process"
        " (VmHWM, reset before each run: per worker), and the peak of the summed RSS and"
        " PSS of all the processes (sampled at 10 Hz; PSS counts pages a worker shares"
        " with its parent once). Processes: the most a configuration had (the chain: two"
        " daemons).",
        "",
        "| configuration | 4 KB p50 | 4 KB p95 | 100 KB p50 | 100 KB p95 |"
        " CPU/msg 4 KB | CPU/msg 100 KB | RSS idle | peak RSS per process | peak total RSS"
        " | peak total PSS | processes |",
        "|---|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|",
    ]
    for c in confs:
        n = c["name"]
        row = []
        for size in SIZES:
            p = lat.get((n, size))
            row += [f"{p[0]:.1f}", f"{p[1]:.1f}"] if p else ["-", "-"]
        for size in SIZES:
            v = cpu.get((n, size))
            row.append(f"{v:.2f} ms" if v is not None and n != "postfix" else "-")
        idle = [result.get("idle_rss", {}).get(d) for d in c.get("daemons", [])]
        idle = [v for v in idle if v]
        row.append(f"{sum(idle):.1f}" if idle else "-")
        for table in (rss, total, pss):
            v = table.get(n)
            row.append(f"{v:.1f}" if v and n != "postfix" else "-")
        row.append(str(nproc.get(n, 0)) if n != "postfix" else "-")
        lines.append(f"| {c['label']} | " + " | ".join(row) + " |")
    lines += ["", *ratios_markdown(result)]
    lines += ["## Targets (issue #18, the default configuration)", "",
              "| target | measured | met |", "|---|---|---|"]
    for name, measured, met in targets(result):
        verdict = "-" if met is None else ("yes" if met else "**no**")
        lines.append(f"| {name} | {measured} | {verdict} |")
    lines += ["", "## Checks", ""]
    for c in result["configs"]:
        if c["skipped"]:
            lines.append(f"- {c['label']}: **not measured** — {c['skipped']}")
        else:
            lines.append(f"- {c['label']}: sample delivered; {c['verified']}")
    failed = [s for s in result["samples"] if not s["ok"]]
    lines.append(f"- runs: {len(result['samples'])}, failed (excluded): {len(failed)}")
    for s in failed[:10]:
        lines.append(f"  - {s['conf']} {_size(s['size'])} c={s['conc']} round {s['round']}:"
                     f" {s['error'] or str(s['log_problems']) + ' Postfix log problems'}")
    if result.get("noop_messages") is not None:
        lines.append(f"- pymilter no-op milter counted {result['noop_messages']} messages"
                     f" (sent to it: {result['noop_expected']})")
    lines += [
        "",
        "Spread over the rounds (min-max messages/second):",
        "",
        "| configuration | " + " | ".join(f"{_size(s)} c={c}" for s, c in CELLS) + " |",
        "|---|" + "---:|" * len(CELLS),
    ]
    for c in confs:
        cells = []
        for s, k in CELLS:
            v = sp.get((c["name"], s, k))
            cells.append(f"{v[0]:.0f}-{v[1]:.0f}" if v else "-")
        lines.append(f"| {c['label']} | " + " | ".join(cells) + " |")
    lines += ["", "Versions: " + ", ".join(f"{k} {v}" for k, v in info["versions"].items())
              + ".", ""]
    lines += scoping_markdown(result)
    lines += experiments_markdown(result)
    prof = result.get("profile")
    if prof and "error" not in prof:
        lines += profile_markdown(prof)
    elif prof:
        lines += ["## Profile", "", f"py-spy failed: {prof['error']}", ""]
    micro = result.get("micro")
    if micro and "error" not in micro:
        lines += micro_markdown(micro)
    lines.append(f"`make bench` wall time of the measurement: {result['wall_seconds']:.0f} s.")
    lines.append("")
    return "\n".join(lines)


# -- profile ----------------------------------------------------------------------------------

_FRAME = re.compile(r"^(?P<func>.*?) \((?P<file>[^():]*)(?::(?P<line>\d+))?\)$")
_THREAD = re.compile(r"^thread \(\d+\): (?P<name>.*)$")

# py-spy prints paths relative to sys.path entries: "dkim/__init__.py".
CATEGORIES = [
    ("ipv6milter", ("ipv6milter/",)),
    ("dkimpy (DKIM verify)", ("dkim/",)),
    ("pyspf (SPF)", ("spf.py",)),
    ("dnspython", ("dns/",)),
    ("authres (header)", ("authres/",)),
    ("prometheus_client (metrics)", ("prometheus_client/",)),
    ("logging", ("logging/",)),
    ("pymilter (Milter)", ("Milter/",)),
    ("thread pool, threads, locks", ("concurrent/", "threading.py", "queue.py")),
    ("re (regular expressions)", ("re/",)),
    ("ipaddress", ("ipaddress.py",)),
]
CALLBACKS = ("connect", "hello", "envfrom", "envrcpt", "header", "body", "eom", "abort",
             "close")


def _category(file: str) -> str:
    for name, prefixes in CATEGORIES:
        if file.startswith(prefixes):
            return name
    return "other Python"


def _thread_group(name: str) -> str:
    if name.startswith("Dummy-"):
        return "libmilter connection threads (callbacks)"
    if name.startswith("dns_"):
        return "ipv6milter's pool (dns_N: PTR, SPF)"
    return name


def summarise_profile(raw: str, top: int = 25) -> dict[str, Any]:
    """Own and total samples per function, per library, per callback and per
    thread group, from py-spy's ``--format raw --threads`` (collapsed stacks)."""
    own: Counter[str] = Counter()
    total: Counter[str] = Counter()
    cat_own: Counter[str] = Counter()
    callbacks: Counter[str] = Counter()
    threads: Counter[str] = Counter()
    procs: Counter[str] = Counter()
    n = 0
    for line in raw.splitlines():
        stack, _, count = line.rpartition(" ")
        if not stack or not count.isdigit():
            continue
        c = int(count)
        frames = stack.split(";")
        # py-spy --subprocesses names every process from the root down (a
        # prefork worker: the parent's frame, then its own): count the last.
        proc = ""
        while frames and frames[0].startswith("process "):
            proc = frames[0].split(":", 1)[0]
            frames = frames[1:]
        if proc:
            procs[proc] += c
            if not frames:
                continue
        m = _THREAD.match(frames[0])
        if m:
            threads[_thread_group(m["name"])] += c
            frames = frames[1:]
        n += c
        if not frames:  # the thread holds the GIL in C, outside any Python frame
            own["(C code: pymilter/libmilter glue, no Python frame)"] += c
            cat_own["pymilter (Milter)"] += c
            total["(C code: pymilter/libmilter glue, no Python frame)"] += c
            callbacks["(outside Python callbacks)"] += c
            continue
        keys = []
        for f in frames:
            fm = _FRAME.match(f)
            keys.append((f"{fm['func']} ({fm['file']})", fm["file"], fm["func"]) if fm
                        else (f, "", f))
        own[keys[-1][0]] += c
        cat_own[_category(keys[-1][1])] += c
        for k in dict.fromkeys(k for k, _, _ in keys):
            total[k] += c
        label = "(other)"
        for _k, file, func in keys:
            meth = func.rsplit(".", 1)[-1]
            if file.endswith("ipv6milter/milter.py") and meth in CALLBACKS:
                label = meth
                break
            if file.endswith("ipv6milter/engine.py") and meth in ("iprev", "spf", "dkim"):
                label = f"(pool) {meth}"
                break
        callbacks[label] += c
    pct = (lambda v: round(100 * v / n, 1)) if n else (lambda v: 0.0)
    return {
        "samples": n,
        "own": [(k, v, pct(v)) for k, v in own.most_common(top)],
        "total": [(k, v, pct(v)) for k, v in total.most_common(top)],
        "categories": [(k, v, pct(v)) for k, v in cat_own.most_common()],
        "callbacks": [(k, v, pct(v)) for k, v in callbacks.most_common()],
        "threads": [(k, v, pct(v)) for k, v in threads.most_common(8)],
        "processes": [(k, v, pct(v)) for k, v in procs.most_common()],
    }


EXPERIMENT_CELLS = [(4096, 1), (4096, 8), (102400, 8), (102400, 32)]


def experiments_markdown(result: dict[str, Any]) -> list[str]:
    """The prototype variants against the baseline, measured alternately."""
    confs = measured_configs(result, "experiment")
    if not confs:
        return []
    tp = throughput(result, "experiment")
    lat = latency(result, "experiment")
    cpu = cpu_per_message(result, "experiment")
    rss = peak_rss(result, lambda s: s["size"] == 102400 and s["conc"] == 32, "experiment")
    rounds = max((s["round"] for s in _ok(result, "experiment")), default=0)
    lines = [
        "## Experiments: the proposals, measured before they are implemented",
        "",
        "bench/prototype.py runs ipv6milter with a proposal applied to the running process"
        " (nothing in ipv6milter/ changed); each variant verified like the others (its"
        f" header on a delivered sample). Median of {rounds} rounds, the baseline measured"
        " alternately with the variants; in brackets the ratio to that baseline (ipv6milter,"
        " or the no-op milter for its variant).",
        "",
        "| variant | " + " | ".join(f"{_size(s)} c={c}" for s, c in EXPERIMENT_CELLS)
        + " | p50 4 KB c=1 | p50 100 KB c=1 | CPU/msg 4 KB | CPU/msg 100 KB"
        " | peak RSS 100 KB c=32 |",
        "|---|" + "---:|" * (len(EXPERIMENT_CELLS) + 5),
    ]
    for c in confs:
        base = "noop" if c["name"].startswith("noop") else "ipv6milter"
        row = []
        for s, k in EXPERIMENT_CELLS:
            v, b = tp.get((c["name"], s, k)), tp.get((base, s, k))
            if v is None:
                row.append("-")
            elif b and c["name"] != base:
                row.append(f"{v:.0f} ({v / b:.2f})")
            else:
                row.append(f"{v:.0f}")
        for size in SIZES:
            v, b = lat.get((c["name"], size)), lat.get((base, size))
            if v is None:
                row.append("-")
            elif b and c["name"] != base:
                row.append(f"{v[0]:.1f} ({v[0] / b[0]:.2f})")
            else:
                row.append(f"{v[0]:.1f}")
        for size in SIZES:
            v, b = cpu.get((c["name"], size)), cpu.get((base, size))
            if v is None:
                row.append("-")
            elif b and c["name"] != base:
                row.append(f"{v:.2f} ({v / b:.2f})")
            else:
                row.append(f"{v:.2f}")
        v = rss.get(c["name"])
        row.append(f"{v:.1f}" if v else "-")
        lines.append(f"| {c['label']} | " + " | ".join(row) + " |")
    lines.append("")
    return lines


def profile_markdown(prof: dict[str, Any], top: int = 15) -> list[str]:
    run = prof.get("run", {})
    lines = [
        "## Profile of ipv6milter (py-spy, 4 KB, c=8)",
        "",
        f"{prof['samples']} samples of the thread holding the GIL of each process (py-spy --gil"
        " --subprocesses, 250 Hz) during"
        f" {run.get('count', '?')} messages ({run.get('rate', 0):.0f}/s under the sampler);"
        " raw stacks in bench/profile-ipv6milter.txt (collapsed format: flamegraph.pl,"
        " speedscope).",
        "",
        "Own time by library (the frame on top of the stack):",
        "",
        "| library | share |",
        "|---|---:|",
    ]
    lines += [f"| {k} | {p}% |" for k, _, p in prof["categories"]]
    if len(prof.get("processes", [])) > 1:
        lines += ["", "By process (a prefork parent and its workers):", "",
                  "| process | share |", "|---|---:|"]
        lines += [f"| {k} | {p}% |" for k, _, p in prof["processes"]]
    lines += ["", "By thread group:", "", "| threads | share |", "|---|---:|"]
    lines += [f"| {k} | {p}% |" for k, _, p in prof.get("threads", [])]
    lines += ["", "Total time by milter callback (and the checks run in the pool):", "",
              "| callback | share |", "|---|---:|"]
    lines += [f"| {k} | {p}% |" for k, _, p in prof["callbacks"]]
    lines += ["", "Top functions by own time:", "", "| function | own |", "|---|---:|"]
    lines += [f"| `{k}` | {p}% |" for k, _, p in prof["own"][:top]]
    lines += ["", "Top functions by total time (inclusive):", "", "| function | total |",
              "|---|---:|"]
    lines += [f"| `{k}` | {p}% |" for k, _, p in prof["total"][:top]]
    lines.append("")
    return lines


def micro_markdown(micro: dict[str, Any]) -> list[str]:
    lines = [
        "## ipv6milter's parts in isolation (bench/micro.py)",
        "",
        "The milter's own code driven without an MTA (a fake milter context), DNS answers"
        " from the warm cache; median of repeated calls.",
        "",
        "| operation | µs per call |",
        "|---|---:|",
    ]
    for name, us in micro.get("timings", []):
        lines.append(f"| {name} | {us:,.0f} |")
    if micro.get("cprofile"):
        lines += ["", "cProfile of whole messages through the callbacks (4 KB, in-process):",
                  "", "```", *micro["cprofile"], "```"]
    lines.append("")
    return lines


# -- results.png -------------------------------------------------------------------------------


def plot(result: dict[str, Any], path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    confs = measured_configs(result)
    tp = throughput(result)
    sp = spread(result)
    fig, ax = plt.subplots(figsize=(13, 6), dpi=110)
    width = 0.8 / max(len(confs), 1)
    xs = range(len(CELLS))
    colours = plt.get_cmap("tab10")
    for i, c in enumerate(confs):
        vals = [tp.get((c["name"], s, k), 0.0) for s, k in CELLS]
        rng = [sp.get((c["name"], s, k), (v, v, 0)) for v, (s, k) in zip(vals, CELLS, strict=True)]
        lo = [v - r[0] for v, r in zip(vals, rng, strict=True)]
        hi = [r[1] - v for v, r in zip(vals, rng, strict=True)]
        pos = [x - 0.4 + width * (i + 0.5) for x in xs]
        ax.bar(pos, vals, width, label=c["label"], color=colours(i),
               edgecolor="black" if c["name"] == "ipv6milter" else None,
               linewidth=1.2 if c["name"] == "ipv6milter" else 0,
               yerr=[lo, hi], capsize=2, error_kw={"elinewidth": 0.7})
    ax.set_xticks(list(xs))
    ax.set_xticklabels([f"{_size(s)}\nc={k}" for s, k in CELLS])
    ax.set_ylabel("messages / second (median; bars: min-max of rounds)")
    mach = result["info"]["machine"]
    ax.set_title(f"Postfix + milters, smtp-source from [::1], unix sockets —"
                 f" {mach['nproc']} cores, {mach['cpu']}, {result['info']['date']}")
    ax.legend(fontsize=8, ncol=2)
    ax.grid(axis="y", alpha=0.3)
    fig.tight_layout()
    fig.savefig(path)
    plt.close(fig)
