"""The Backups page as HTML: two tables, inline SVG sparklines and RTO charts, no scripts."""

from __future__ import annotations

from collections.abc import Sequence
from datetime import datetime, timedelta
from html import escape

from erp_backup.backups_page.model import BREACHED, LATE, NO_SET, OK, SPARK_SETS, JobRow, Page, ServiceRow, SetPoint
from erp_backup.drill.ledger import DrillLedgerEntry
from erp_backup.schedules import format_duration, local_text

COLOURS = {OK: "#1a7f37", LATE: "#b35900", BREACHED: "#cf222e", NO_SET: "#6e7781"}
STYLE = """
body{font-family:system-ui,sans-serif;margin:16px;color:#1f2328}
table{border-collapse:collapse;margin-bottom:24px}th,td{padding:4px 10px;border-bottom:1px solid #d0d7de;
text-align:left;vertical-align:middle;font-size:14px}th{background:#f6f8fa}
.badge{color:#fff;border-radius:10px;padding:1px 8px;font-weight:600;white-space:nowrap}
.muted{color:#6e7781;font-size:12px}.num{text-align:right}.warn{color:#cf222e;font-weight:600}
.banner{background:#ffebe9;border:1px solid #cf222e;padding:8px;margin-bottom:12px}
"""


def size_text(value: int | None) -> str:
    if value is None:
        return "–"
    for unit, factor in (("GB", 1e9), ("MB", 1e6), ("kB", 1e3)):
        if value >= factor:
            return f"{value / factor:.2f} {unit}"
    return f"{value} B"


def seconds_text(value: float | None) -> str:
    if value is None:
        return "–"
    return f"{value:.1f} s" if value < 120 else format_duration(timedelta(seconds=round(value)))


def when(moment: datetime | None, tz: str) -> str:
    return "–" if moment is None else escape(local_text(moment, tz))


def badge(level: str) -> str:
    return f'<span class="badge" style="background:{COLOURS[level]}">{escape(level)}</span>'


def sparkline(points: Sequence[SetPoint], width: int = 120, height: int = 24) -> str:
    """The sizes of the sets, oldest capture first, as an SVG polyline."""
    if len(points) < 2:
        return ""
    top = max(p.size for p in points) or 1
    step = width / (len(points) - 1)
    coords = " ".join(f"{i * step:.1f},{height - 2 - (p.size / top) * (height - 4):.1f}" for i, p in enumerate(points))
    return (f'<svg width="{width}" height="{height}" role="img" aria-label="sizes of the last {len(points)} sets">'
            f'<polyline fill="none" stroke="#0969da" stroke-width="1.5" points="{coords}"/></svg>')


def rto_chart(drills: Sequence[DrillLedgerEntry], target_s: float, width: int = 240, height: int = 60) -> str:
    """Each drill's RTO (extrapolated, else measured) as a dot, failures as red crosses, the target as a line."""
    if not drills:
        return '<span class="muted">no drills yet</span>'
    values = [d.rto_extrapolated_s if d.rto_extrapolated_s is not None else d.rto_measured_s for d in drills]
    top = max([v for v in values if v is not None] + [target_s]) * 1.1
    step = width / max(len(drills), 1)
    parts = [f'<line x1="0" x2="{width}" y1="{_y(target_s, top, height):.1f}" y2="{_y(target_s, top, height):.1f}" '
             'stroke="#cf222e" stroke-dasharray="4 3"/>']
    for index, value in enumerate(values):
        x = step * index + step / 2
        if value is None:
            parts.append(f'<text x="{x:.1f}" y="{height - 2}" fill="#cf222e" font-size="10" text-anchor="middle">×</text>')
        else:
            colour = "#1a7f37" if value <= target_s else "#cf222e"
            parts.append(f'<circle cx="{x:.1f}" cy="{_y(value, top, height):.1f}" r="3" fill="{colour}"/>')
    return (f'<svg width="{width}" height="{height}" role="img" aria-label="RTO of {len(drills)} drills against '
            f'the target">{"".join(parts)}</svg>')


def _y(value: float, top: float, height: int) -> float:
    return height - 4 - (value / top) * (height - 8)


def job_cells(row: JobRow, page: Page) -> str:
    tz = page.timezone
    level = "unknown" if page.offsite_error and row.newest is None else row.freshness
    newest = (f"{escape(row.newest.backup_id)}<br><span class='muted'>captured {when(row.newest.captured_at, tz)}</span>"
              if row.newest else "–")
    rpo = f" / RPO {format_duration(row.rpo)}" if row.rpo is not None else ""
    age = (format_duration(row.age) if row.age is not None else "–") + rpo
    state = badge(level) if level in COLOURS else '<span class="muted">unknown</span>'
    why = "".join(f"<br><span class='muted'>{escape(text)}</span>" for text in row.why)
    problems = 'class="num warn"' if row.corrupt or row.incomplete or row.suspect else 'class="num"'
    return (
        f"<td>{escape(row.service)}</td><td>{escape(row.backup_type)}</td><td>{newest}</td>"
        f"<td data-freshness=\"{escape(level)}\">{state} {age}{why}</td>"
        f"<td class='num'>{size_text(row.newest.size if row.newest else None)}</td><td>{sparkline(row.sizes)}</td>"
        f"<td {problems}>{row.incomplete} / {row.unverified} / {row.corrupt}"
        + (f" <span class='warn'>({row.suspect} suspect)</span>" if row.suspect else "")
        + f"</td><td>{when(row.next_run, tz)}<br><span class='muted'>{escape(row.schedule)}</span></td>"
    )


def service_cells(row: ServiceRow, tz: str) -> str:
    drill = row.last_drill
    target = row.rto_target.total_seconds()
    if drill is None:
        last = '<span class="muted">never drilled</span>'
        rto = "–"
    else:
        colour = COLOURS[OK] if drill.status in ("passed", "prepared") else COLOURS[NO_SET if drill.status == "skipped" else BREACHED]
        last = (f'<span class="badge" style="background:{colour}">{escape(drill.status)}</span> '
                f"{when(drill.finished_at, tz)}<br><span class='muted'>{escape(drill.set_name or 'no set')}"
                + (f", failed at {escape(drill.failed_step)}" if drill.failed_step else "") + "</span>")
        rto = f"{seconds_text(drill.rto_measured_s)} / {seconds_text(drill.rto_extrapolated_s)}"
    return (f"<td>{escape(row.service)}</td><td>{last}</td><td>{rto}</td><td>{seconds_text(target)}</td>"
            f"<td>{rto_chart(row.drills, target)}</td>")


def render(page: Page, *, airflow_base: str = "") -> str:
    tz = page.timezone
    jobs = "".join(f"<tr data-job=\"{escape(r.service)}/{escape(r.backup_type)}\">{job_cells(r, page)}</tr>"
                   for r in page.jobs)
    services = "".join(f"<tr data-service=\"{escape(r.service)}\">{service_cells(r, tz)}</tr>" for r in page.services)
    banner = (f'<div class="banner">Offsite {escape(page.offsite)} unreachable: {escape(page.offsite_error)}. '
              "Freshness cannot be confirmed.</div>" if page.offsite_error else "")
    return f"""<!doctype html><html><head><meta charset="utf-8"><title>Backups</title><style>{STYLE}</style></head>
<body><h1>Backups</h1>
<p class="muted">Times in {escape(tz)}. Generated {when(page.generated_at, tz)}. Offsite: {escape(page.offsite)}.
Sets are ordered by capture time; the id is the schedule slot (a backfilled set captures today's data under a past slot).</p>
{banner}
<h2>Newest verified offsite set per service and type</h2>
<table id="jobs"><tr><th>Service</th><th>Type</th><th>Newest set (slot)</th><th>Age</th><th>Size</th>
<th>Last {SPARK_SETS} sets</th><th>Incomplete / unverified / corrupt</th><th>Next run</th></tr>{jobs}</table>
<h2>DR drills per service</h2>
<table id="drills"><tr><th>Service</th><th>Last drill</th><th>RTO measured / extrapolated</th><th>RTO target</th>
<th>RTO over the ledger</th></tr>{services}</table>
<p class="muted"><a href="{escape(airflow_base)}/dags/dr_drill" target="_top">dr_drill</a> ·
<a href="{escape(airflow_base)}/dags/backup_watchdog" target="_top">backup_watchdog</a></p>
</body></html>"""
