"""The HTML report: one self-contained file (inline CSS, data and SVG-drawing script; no network)."""

from __future__ import annotations

import html
import json
from pathlib import Path
from typing import Any

from kiln.verify import headline


def from_manifest(m: dict[str, Any]) -> dict[str, Any]:
    """Report data from a build manifest (timings at the build's batch sizes)."""
    variants = []
    for c in m.get("candidates", []):
        art = c.get("artifact") or {}
        variants.append({
            "variant": c["variant"], "status": c.get("status", "?"), "reason": c.get("reason", ""),
            "selected": c["variant"] == m.get("selected"), "timings": c.get("timings", []),
            "load_s": c.get("load_s"), "size_bytes": art.get("bytes") or c.get("size_bytes"),
            "memory_mb": c.get("peak_gpu_mb") if c.get("peak_gpu_mb") is not None else c.get("memory_mb"),
            "accuracy": summarize_accuracy(c.get("accuracy", [])), "notes": c.get("notes", []),
        })
    return {
        "title": f"{m['name']} v{m['version']}", "kind": "build", "model": m["name"], "version": m["version"],
        "created": m.get("created"), "selected": m.get("selected"), "objective": m.get("objective"),
        "source": m.get("source", {}).get("text"), "inputs": [_spec(s) for s in m.get("inputs", [])],
        "outputs": [_spec(s) for s in m.get("outputs", [])], "verification": m.get("verification", {}).get("data"),
        "batch_sizes": m.get("batch_sizes", []), "variants": variants,
        "environment": {**m.get("device", {}), **{f"lib {k}": v for k, v in m.get("libraries", {}).items()}},
        "notes": m.get("notes", []),
        "distill": _distill_points(m),
        "selection": m.get("selection", {}),
    }


def _distill_points(m: dict[str, Any]) -> list[dict[str, Any]]:
    """Teacher and student variants on accuracy (or agreement with the teacher) against latency at the smallest
    build batch: the trade-off distillation buys. Empty for a model that was not distilled."""
    d = m.get("distillation")
    if not d:
        return []
    small = min(m.get("batch_sizes") or [1])
    teacher_ms = next((t["p50_ms"] for t in d.get("teacher_timings", []) if t["batch"] == small), None)
    labels = d.get("teacher_accuracy") is not None
    points = []
    if teacher_ms is not None:
        points.append({"name": "teacher eager/fp32", "latency_ms": teacher_ms,
                       "score": d["teacher_accuracy"] if labels else 1.0})
    for c in m.get("candidates", []):
        checks = c.get("teacher") or []
        first = next((x for x in checks if "top1_agreement" in x), checks[0] if checks else None)
        ms = next((t["p50_ms"] for t in c.get("timings", []) if t["batch"] == small), None)
        if first is None or ms is None:
            continue
        score = first.get("accuracy") if labels and first.get("accuracy") is not None else \
            first.get("top1_agreement", first.get("cosine"))
        points.append({"name": f"student {c['variant']}", "latency_ms": ms, "score": score})
    return points


def summarize_accuracy(checks: list[dict[str, Any]]) -> dict[str, Any]:
    """Worst case over outputs; classifier numbers from the first output. Outputs of the wrong shape have no numbers."""
    mismatched = [f"{c['name']}: {c['shape_mismatch']}" for c in checks if c.get("shape_mismatch")]
    checks = [c for c in checks if not c.get("shape_mismatch")]
    if not checks:
        return {"shape_mismatch": "; ".join(mismatched)} if mismatched else {}
    first = checks[0]
    out: dict[str, Any] = {"max_rel_err": max(c["max_rel_err"] for c in checks), "cosine": min(c["cosine"] for c in checks)}
    for k in ("top1_agreement", "accuracy", "reference_accuracy"):
        if first.get(k) is not None:
            out[k] = first[k]
    # Per output, the metric its kind is judged by: "embedding (embedding): row cos 0.9921"
    out["by_kind"] = [f"{c['name']} ({c.get('kind', '?')}): {h}" for c in checks if (h := headline(c))]
    if "accuracy" in out and "reference_accuracy" in out:
        out["accuracy_delta"] = out["accuracy"] - out["reference_accuracy"]
    return out


def _selection(sel: dict[str, Any]) -> str:
    """How the selected variant won: the alternating rounds, the measured noise and the margin."""
    if not sel.get("selected"):
        return ""
    e = html.escape
    unit = "ms" if sel.get("metric") == "p50_ms" else "ms per item"
    rows = "".join(
        f'<tr><td class="name">{e(v)}</td><td class="num">{next(iter(c.values())):.4g}</td>'
        f'<td class="num">{c.get("cv", 0):.1%}</td><td>{"lossy" if c.get("lossy") else "lossless"}</td></tr>'
        for v, c in sel.get("contenders", {}).items())
    margin = sel.get("margin")
    text = (f"<p><b>{e(sel['selected'])}</b> was selected at batch {sel.get('batch')}"
            + (f", {margin:.1%} ahead of the runner-up" if margin is not None else "")
            + f". Contenders were timed in {sel.get('rounds', 0)} alternating rounds; measured noise "
            f"{sel.get('noise', 0):.1%}; a lossy variant must win by more than {sel.get('required_margin', 0):.1%}.</p>")
    notes = "".join(f"<li>{e(n)}</li>" for n in sel.get("notes", []))
    table = (f'<table><thead><tr><th>contender</th><th>median {unit}</th><th>spread (cv)</th><th></th></tr></thead>'
             f"<tbody>{rows}</tbody></table>") if rows else ""
    return f'<section id="selection"><h2>Selection</h2>{text}{table}{"<ul>" + notes + "</ul>" if notes else ""}</section>'


def _spec(d: dict[str, Any]) -> str:
    return f"{d['name']}:{d['dtype']}[{','.join(map(str, d['shape']))}]"


def write_html(data: dict[str, Any], path: Path) -> Path:
    path.write_text(render(data))
    return path


def _fmt(v: Any, spec: str = "") -> str:
    if v is None or v == "":
        return "&ndash;"
    if isinstance(v, float) and spec:
        return format(v, spec)
    return html.escape(str(v))


def _timing(v: dict[str, Any], batch: int, key: str) -> float | None:
    return next((t[key] for t in v.get("timings", []) if t["batch"] == batch and key in t), None)


def render(data: dict[str, Any]) -> str:
    e = html.escape
    sizes = data.get("batch_sizes") or [1]
    small, large = sizes[0], sizes[-1]
    rows = []
    for v in data["variants"]:
        acc = v.get("accuracy") or {}
        status = v["status"]
        badge = f'<span class="badge {e(status)}">{e(status)}</span>' + (' <span class="badge selected">selected</span>' if v.get("selected") else "")
        text = v.get("reason") or ""
        if len(text) > 60:  # a long reason collapses to its first words; the whole of it is one click away
            reason = f'<details class="reason"><summary>{e(text[:48].rsplit(" ", 1)[0])} &hellip;</summary>{e(text)}</details>'
        else:
            reason = f'<div class="reason">{e(text)}</div>' if text else ""
        delta = acc.get("accuracy_delta")
        accuracy = (f'{acc["accuracy"]:.2%} <small>({delta:+.2%})</small>' if delta is not None
                    else f'{acc["accuracy"]:.2%}' if acc.get("accuracy") is not None else "&ndash;")
        size = v.get("size_bytes")
        chosen = ' class="chosen"' if v.get("selected") else ""
        by_kind = acc.get("by_kind", [])  # "name (kind): metric"; one output needs no name
        kinds = "<br>".join(e(k.split(": ", 1)[-1] if len(by_kind) == 1 else k) for k in by_kind) or "&ndash;"
        rows.append(
            f'<tr data-variant="{e(v["variant"])}" data-status="{e(status)}"{chosen}>'
            f'<td class="name">{e(v["variant"])}</td>'
            f"<td>{badge}{reason}</td>"
            f'<td class="num">{_fmt(_timing(v, small, "p50_ms"), ".3f")}</td>'
            f'<td class="num opt">{_fmt(_timing(v, small, "p99_ms"), ".3f")}</td>'
            f'<td class="num">{_fmt(_timing(v, large, "items_per_s"), ",.0f")}</td>'
            f'<td class="num">{_fmt(v.get("memory_mb"), ".1f")}</td>'
            f'<td class="num">{_fmt(v.get("load_s") if status != "skipped" else None, ".2f")}</td>'
            f'<td class="num opt">{_fmt(size / 1e6 if size else None, ".2f")}</td>'
            f'<td class="num">{_fmt(acc.get("max_rel_err"), ".1e")}</td>'
            f'<td class="kinds">{kinds}</td>'
            f'<td class="num">{accuracy}</td></tr>')
    env = "".join(f"<tr><th>{e(str(k))}</th><td>{e(str(v))}</td></tr>" for k, v in data.get("environment", {}).items())
    notes = "".join(f"<li>{e(n)}</li>" for n in dict.fromkeys(data.get("notes", []) + [n for v in data["variants"] for n in v.get("notes", [])]))
    payload = json.dumps(data, default=str).replace("</", "<\\/")
    meta = [("source", data.get("source")), ("inputs", ", ".join(data.get("inputs", []))),
            ("outputs", ", ".join(data.get("outputs", []))), ("verified on", data.get("verification")),
            ("objective", data.get("objective")), ("created", data.get("created"))]
    meta_html = "".join(f"<div><dt>{e(k)}</dt><dd>{e(str(v))}</dd></div>" for k, v in meta if v)
    return _PAGE.format(
        title=e(f"kiln report: {data['title']}"), heading=e(data["title"]), kind=e(data.get("kind", "")),
        selected=e(str(data.get("selected") or "none")), meta=meta_html, rows="".join(rows), env=env,
        notes=f"<section><h2>Notes</h2><ul>{notes}</ul></section>" if notes else "", small=small, large=large,
        payload=payload, css=_CSS, js=_JS, selection=_selection(data.get("selection") or {}),
        distill_figure='<figure><figcaption>Teacher and student: accuracy against latency</figcaption>'
                       '<div id="distill"></div></figure>' if data.get("distill") else "")


_CSS = """
:root{--fg:#1d2330;--muted:#667085;--line:#e4e7ec;--bg:#f7f8fa;--card:#fff;--accent:#d9480f}
*{box-sizing:border-box}body{margin:0;font:14px/1.45 system-ui,-apple-system,"Segoe UI",Roboto,sans-serif;color:var(--fg);background:var(--bg)}
header{background:linear-gradient(120deg,#2b1d16,#5c2a12 60%,#d9480f);color:#fff;padding:28px 40px}
header h1{margin:0 0 4px;font-size:26px;letter-spacing:.2px}header .sub{opacity:.85}
header .pill{display:inline-block;background:rgba(255,255,255,.16);border-radius:999px;padding:2px 10px;margin-left:8px;font-size:13px}
main{max-width:1500px;margin:0 auto;padding:24px 32px 60px}
section{background:var(--card);border:1px solid var(--line);border-radius:10px;padding:18px 22px;margin:18px 0;box-shadow:0 1px 2px rgba(16,24,40,.04)}
h2{font-size:16px;margin:0 0 12px}dl{display:grid;grid-template-columns:repeat(auto-fit,minmax(280px,1fr));gap:6px 24px;margin:0}
dt{color:var(--muted);font-size:12px;text-transform:uppercase;letter-spacing:.5px}dd{margin:0 0 6px;font-family:ui-monospace,Menlo,monospace;font-size:13px;word-break:break-all}
.charts{display:grid;grid-template-columns:repeat(auto-fit,minmax(380px,1fr));gap:18px}
figure{margin:0}figcaption{font-weight:600;margin-bottom:6px}svg{width:100%;height:auto;overflow:visible}
svg text{font-size:11px;fill:var(--muted)}svg .grid{stroke:var(--line)}svg .axis{stroke:#98a2b3}
svg .series{fill:none;stroke-width:2.2}svg .label{fill:var(--fg);font-size:11px}
.legend{display:flex;flex-wrap:wrap;gap:6px 16px;margin-top:6px;font-size:12px}.legend span{display:inline-flex;align-items:center;gap:6px}
.legend i{width:12px;height:12px;border-radius:3px;display:inline-block}
table{border-collapse:collapse;width:100%}th,td{padding:7px 9px;border-bottom:1px solid var(--line);text-align:left;vertical-align:top}
th{font-size:12px;color:var(--muted);font-weight:600;white-space:nowrap}td.num{text-align:right;font-variant-numeric:tabular-nums;white-space:nowrap}
td.name{font-family:ui-monospace,Menlo,monospace;white-space:nowrap}tr[data-status=skipped] td,tr[data-status=failed] td{color:var(--muted)}
.badge{display:inline-block;font-size:11px;border-radius:4px;padding:1px 7px;font-weight:600}
.accepted{background:#e3f6ea;color:#0f6b35}.rejected{background:#fff4d6;color:#8a5a00}.skipped{background:#eef0f4;color:#586174}
.failed{background:#fde8e8;color:#a11a1a}.selected{background:var(--accent);color:#fff}
td.kinds{font-size:12px;min-width:140px}.reason{font-size:12px;color:var(--muted);margin-top:3px;min-width:170px;max-width:300px}
#variants{font-size:13px}
details.reason summary{cursor:pointer}details.reason[open]{max-width:520px}
tr.chosen td{background:#fff4ec}tr.chosen td.name{font-weight:700;box-shadow:inset 3px 0 0 var(--accent)}
.scroll{overflow-x:auto}th,td{padding:6px 7px}
@media (max-width:1000px){main{padding:16px 14px 40px}section{padding:14px 12px}.opt{display:none}
  .charts{grid-template-columns:1fr}header{padding:20px 16px}.reason{max-width:220px}}
svg .point.sel{stroke:#111;stroke-width:2}svg .series.sel{stroke-width:3.6}.legend b{font-weight:700}
.env th{width:200px}.empty{color:var(--muted);font-style:italic;padding:30px 0;text-align:center}
"""

_JS = r"""
(function(){
const D = JSON.parse(document.getElementById('kiln-data').textContent);
const NS = 'http://www.w3.org/2000/svg';
// 10 well-separated hues x 4 marker shapes: 40 series stay distinct, and neighbours differ in both.
const COLORS = ['#1f77b4','#d62728','#2ca02c','#ff7f0e','#9467bd','#17becf','#8c564b','#e377c2','#7f7f7f','#bcbd22'];
const SHAPES = ['circle','square','triangle','diamond'];
const ok = D.variants.filter(v => v.status === 'accepted' && v.timings && v.timings.length);
const color = {}, shape = {};
ok.forEach((v, i) => {color[v.variant] = COLORS[i % COLORS.length]; shape[v.variant] = SHAPES[Math.floor(i / COLORS.length + i) % SHAPES.length];});
const chosen = D.selected;
function marker(svg, x, y, r, name, cls){
  const f = color[name] || '#495057', k = shape[name] || 'circle';
  const a = {fill:f,'data-variant':name,class:'point'+(name===chosen?' sel':'')+(cls?' '+cls:'')};
  if(k==='square') return el('rect',{...a,x:x-r*0.9,y:y-r*0.9,width:r*1.8,height:r*1.8},svg);
  if(k==='triangle') return el('path',{...a,d:`M${x},${y-r*1.15}L${x+r*1.1},${y+r*0.8}L${x-r*1.1},${y+r*0.8}Z`},svg);
  if(k==='diamond') return el('path',{...a,d:`M${x},${y-r*1.2}L${x+r*1.1},${y}L${x},${y+r*1.2}L${x-r*1.1},${y}Z`},svg);
  return el('circle',{...a,cx:x,cy:y,r:r},svg);
}
function el(tag, attrs, parent){const e=document.createElementNS(NS,tag);for(const k in attrs)e.setAttribute(k,attrs[k]);if(parent)parent.appendChild(e);return e;}
function fmt(v){if(v===0)return '0';const a=Math.abs(v);if(a>=1e4)return (+(v/1e3).toPrecision(3))+'k';if(Number.isInteger(v))return String(v);if(a>=100)return v.toFixed(0);if(a>=1)return String(+v.toPrecision(3));if(a>=0.01)return String(+v.toPrecision(2));return v.toExponential(0);}
function scale(lo,hi,a,b,log){if(log){lo=Math.log10(lo);hi=Math.log10(hi);}if(hi===lo){hi=lo+1;}return v=>a+((log?Math.log10(v):v)-lo)/(hi-lo)*(b-a);}
function ticks(lo,hi,log){
  if(log){const inside=m=>{const t=[];for(let p=Math.floor(Math.log10(lo));p<=Math.ceil(Math.log10(hi));p++)for(const k of m){const x=k*Math.pow(10,p);if(x>=lo&&x<=hi)t.push(x);}return t;};
    let t=inside([1]);if(t.length<3)t=inside([1,2,5]);if(t.length<2)t=[lo,hi];return t;}
  // round steps (1, 2, 2.5 or 5 times a power of ten), never odd values like 9778
  const raw=(hi-lo)/5, p=Math.pow(10,Math.floor(Math.log10(raw))), m=raw/p;
  const step=(m<=1?1:m<=2?2:m<=2.5?2.5:m<=5?5:10)*p, t=[];
  for(let v=Math.ceil(lo/step-1e-9)*step; v<=hi+1e-9*step; v+=step) t.push(Math.round(v/step)*step);
  return t;}
function chart(id, series, o){
  const host=document.getElementById(id); if(!host) return;
  if(!series.length||!series.some(s=>s.points.length)){host.innerHTML='<div class="empty">no accepted variant was timed</div>';return;}
  const W=520,H=300,L=62,R=16,T=12,B=42;
  const xs=series.flatMap(s=>s.points.map(p=>p[0])), ys=series.flatMap(s=>s.points.map(p=>p[1]));
  let x0=Math.min(...xs),x1=Math.max(...xs),y0=Math.min(...ys),y1=Math.max(...ys);
  if(o.logX){x0/=1.25;x1*=1.25;} if(o.logY){y0/=1.5;y1*=1.5;} else if(o.yFit){const pad=Math.max((y1-y0)*0.25,0.5);y0-=pad;y1+=pad;} else {y0=0;y1*=1.12;}
  if(!o.logY){const t=ticks(y0,y1,false);y0=Math.min(y0,t[0]);y1=Math.max(y1,t[t.length-1]);}
  const sx=scale(x0,x1,L,W-R,o.logX), sy=scale(y0,y1,H-B,T,o.logY);
  const svg=el('svg',{viewBox:`0 0 ${W} ${H}`,role:'img','aria-label':o.title,'data-chart':id},host);
  (o.xTicks||ticks(x0,x1,o.logX)).forEach(t=>{const x=sx(t);el('line',{x1:x,x2:x,y1:T,y2:H-B,class:'grid'},svg);const tx=el('text',{x:x,y:H-B+16,'text-anchor':'middle'},svg);tx.textContent=fmt(t);});
  ticks(y0,y1,o.logY).forEach(t=>{const y=sy(t);el('line',{x1:L,x2:W-R,y1:y,y2:y,class:'grid'},svg);const ty=el('text',{x:L-8,y:y+4,'text-anchor':'end'},svg);ty.textContent=fmt(t);});
  el('line',{x1:L,x2:W-R,y1:H-B,y2:H-B,class:'axis'},svg);el('line',{x1:L,x2:L,y1:T,y2:H-B,class:'axis'},svg);
  const xl=el('text',{x:(L+W-R)/2,y:H-6,'text-anchor':'middle'},svg);xl.textContent=o.xLabel;
  const yl=el('text',{x:14,y:(T+H-B)/2,'text-anchor':'middle',transform:`rotate(-90 14 ${(T+H-B)/2})`},svg);yl.textContent=o.yLabel;
  const boxes=[];  // placed label and point boxes: a label goes where it overlaps none, or is left to the legend
  const hits=(b)=>b.x<L||b.x+b.w>W-R+40||b.y<0||b.y+b.h>H-B||boxes.some(q=>b.x<q.x+q.w&&q.x<b.x+b.w&&b.y<q.y+q.h&&q.y<b.y+b.h);
  const ordered=series.slice().sort((a,b)=>(a.name===chosen)-(b.name===chosen));  // the selection is drawn on top
  ordered.forEach(s=>{
    const pts=s.points.slice().sort((a,b)=>a[0]-b[0]);
    if(o.lines&&pts.length>1) el('path',{d:pts.map((p,i)=>(i?'L':'M')+sx(p[0]).toFixed(1)+','+sy(p[1]).toFixed(1)).join(' '),class:'series'+(s.name===chosen?' sel':''),stroke:color[s.name],'data-variant':s.name},svg);
    pts.forEach(p=>{const c=marker(svg,sx(p[0]),sy(p[1]),(o.lines?3.6:5.5)*(s.name===chosen?1.35:1),s.name);
      boxes.push({x:sx(p[0])-6,y:sy(p[1])-6,w:12,h:12});
      const tt=el('title',{},c);tt.textContent=`${s.name}: ${o.xLabel} ${fmt(p[0])}, ${o.yLabel} ${fmt(p[1])}`;});
  });
  if(!o.lines&&!o.noLabels){
    const labelled=series.slice().sort((a,b)=>(b.name===chosen)-(a.name===chosen));  // the selection gets first pick
    labelled.forEach(s=>{const p=s.points[0],x=sx(p[0]),y=sy(p[1]),w=6.2*s.name.length+4,h=13;
      for(const [dx,dy] of [[9,-6],[-9-w,-6],[-w/2,-20],[-w/2,8],[9,-18],[9,6],[-9-w,-18],[-9-w,6]]){
        const b={x:x+dx,y:y+dy,w:w,h:h};if(hits(b))continue;boxes.push(b);
        const lb=el('text',{x:b.x+2,y:b.y+10,class:'label','data-variant':s.name},svg);lb.textContent=s.name;
        if(s.name===chosen)lb.setAttribute('font-weight','700');break;}});
  }
  const lg=document.createElement('div');lg.className='legend';
  series.forEach(s=>{const sp=document.createElement('span');const k=document.createElementNS(NS,'svg');
    k.setAttribute('viewBox','0 0 14 14');k.setAttribute('width','14');k.setAttribute('height','14');k.style.width='14px';
    marker(k,7,7,5,s.name,'key');sp.appendChild(k);
    const t=document.createElement(s.name===chosen?'b':'span');t.textContent=s.name+(s.name===chosen?' (selected)':'');sp.appendChild(t);lg.appendChild(sp);});
  host.appendChild(lg);
}
const batches=[...new Set(ok.flatMap(v=>v.timings.map(t=>t.batch)))].sort((a,b)=>a-b);
chart('latency', ok.map(v=>({name:v.variant,points:v.timings.map(t=>[t.batch,t.p50_ms])})),
  {title:'p50 latency against batch size',xLabel:'batch size',yLabel:'p50 latency (ms)',logX:batches.length>1,logY:true,lines:true,xTicks:batches});
chart('throughput', ok.map(v=>({name:v.variant,points:v.timings.map(t=>[t.batch,t.items_per_s])})),
  {title:'throughput against batch size',xLabel:'batch size',yLabel:'items / s',logX:batches.length>1,logY:false,lines:true,xTicks:batches});
const small=batches[0];
chart('tradeoff', ok.filter(v=>v.accuracy&&v.accuracy.max_rel_err!==undefined).map(v=>({name:v.variant,points:[[v.timings.find(t=>t.batch===small).p50_ms,Math.max(v.accuracy.max_rel_err,1e-9)]]})),
  {title:'accuracy against speed',xLabel:`p50 latency at batch ${small} (ms)`,yLabel:'max relative error vs fp32 reference',logX:true,logY:true,lines:false});
if(D.distill&&D.distill.length){D.distill.forEach((p,i)=>{if(!color[p.name]){color[p.name]=i?COLORS[(i+3)%COLORS.length]:'#212529';shape[p.name]=SHAPES[i%SHAPES.length];}});
  chart('distill', D.distill.map(p=>({name:p.name,points:[[p.latency_ms,100*p.score]]})),
    {title:'teacher and student',xLabel:`p50 latency at batch ${small} (ms)`,yLabel:'accuracy on held-out data (%)',logX:true,logY:false,yFit:true,lines:false,noLabels:true});}
document.body.setAttribute('data-rendered','true');
})();
"""

_PAGE = """<!doctype html>
<html lang="en"><head><meta charset="utf-8"><meta name="viewport" content="width=device-width,initial-scale=1">
<title>{title}</title><style>{css}</style></head>
<body>
<header><h1>{heading}<span class="pill">{kind}</span></h1><div class="sub">selected variant: <b id="selected">{selected}</b></div></header>
<main>
<section><h2>Model</h2><dl>{meta}</dl></section>
<section><h2>Speed and accuracy</h2><div class="charts">
<figure><figcaption>p50 latency against batch size</figcaption><div id="latency"></div></figure>
<figure><figcaption>Throughput against batch size</figcaption><div id="throughput"></div></figure>
<figure><figcaption>Accuracy against speed</figcaption><div id="tradeoff"></div></figure>
{distill_figure}
</div></section>
<section><h2>Variants</h2><div class="scroll"><table id="variants"><thead><tr><th>variant</th><th>status / reason</th>
<th>p50 ms @{small}</th><th class="opt">p99 ms @{small}</th><th>items/s @{large}</th>
<th title="CPU: peak resident memory growth while the artifact loads and runs the verification batches; GPU: peak allocated">memory MB</th>
<th>load s</th><th class="opt">size MB</th>
<th>max rel err</th><th title="each output's kind metric: top-1 (logits), row cosine and retrieval (embedding), pixels (mask), IoU (boxes)">agreement</th><th>accuracy (&Delta;)</th></tr></thead><tbody>{rows}</tbody></table></div></section>
{selection}
{notes}
<section><h2>Environment</h2><table class="env">{env}</table></section>
</main>
<script type="application/json" id="kiln-data">{payload}</script>
<script>{js}</script>
</body></html>
"""
