"""A static gallery of an output folder: ``gallery.html`` beside the manifest, WebP thumbnails, no server.

    python3 -m jobs.gallery outputs                        # outputs/gallery.html over outputs/manifest
    python3 -m jobs.gallery outputs/sweeps/2026-12-01_10-00-00   # one page over a Hydra sweep's jobs

`run.py` writes both at the end of every job. Each image is a card: its thumbnail (``thumbs/<id>-<sha8>.webp``,
at most THUMB pixels, made once per file), which links to the file itself, and its prompt, seed, size, strategy
and stages, timings and seam scores; a failed image shows its error. A box filters by prompt text (the regions'
too, and image id), a menu sorts by finish time, render time or seam score; the state lives in the URL's fragment
(``gallery.html#q=dusk&sort=seam&status=failed``), so a view can be bookmarked. Everything is inline (CSS, JS,
data attributes): the page works opened from disk, with no network.

A sweep (``python3 run.py -m ...``) writes one ``tessera-job.json`` per job into Hydra's job folder
``<sweep dir>/<job number>/`` (the job's command-line overrides, its output folder and its image ids); the sweep's
page is a table with one row per image and the swept values (overrides that differ between the jobs) as its first
columns. No torch, no Ray.
"""
from __future__ import annotations

import argparse
import html
import json
import math
import os
import sys
from datetime import datetime
from pathlib import Path
from typing import Dict, List, Optional, Sequence

from .images import atomic_write
from .manifest import Manifest

THUMB = (384, 256)  # the largest thumbnail, width x height (aspect kept)
THUMB_QUALITY = 80
GALLERY = "gallery.html"
SWEEP_JOB = "tessera-job.json"  # one per job of a sweep, in its Hydra job folder


def thumbnail(output_dir: Path, row: dict) -> Optional[str]:
    """The row's WebP thumbnail, relative to `output_dir`, made if missing; None for a row with no readable file."""
    from PIL import Image

    if row.get("status") != "ok" or not row.get("path") or not row.get("sha256"):
        return None
    src = output_dir / row["path"]
    rel = f"thumbs/{row['image_id']}-{row['sha256'][:8]}.webp"
    dst = output_dir / rel
    if dst.is_file():
        return rel
    try:
        with Image.open(src) as im:
            im.draft("RGB", THUMB)  # JPEG: decode at a fraction of the size
            im = im.convert("RGB")
            im.thumbnail(THUMB, Image.Resampling.LANCZOS)
            atomic_write(dst, lambda f: im.save(f, format="WEBP", quality=THUMB_QUALITY, method=4))
    except OSError:
        return None
    return rel


def _num(value, fmt: str) -> str:
    return "" if value is None or (isinstance(value, float) and math.isnan(value)) else format(value, fmt)


def _sort_value(value) -> str:
    """A data attribute the page sorts by: a number, or empty (sorted last)."""
    if value is None or (isinstance(value, float) and math.isnan(value)):
        return ""
    return f"{value.timestamp():.3f}" if isinstance(value, datetime) else f"{value:.6g}"


def _fields(row: dict) -> List[tuple]:
    """(label, text) pairs shown for an image."""
    stages = row.get("stages") or ""
    strategy = row.get("strategy") or "direct"
    tiling = f"{row.get('tiling_method')} {row.get('tile')}/{row.get('overlap')}"
    if row.get("wrap") not in (None, "none"):
        tiling += f", wrap {row['wrap']}"
    out = [("seed", str(row.get("seed"))), ("size", f"{row.get('width')}x{row.get('height')}"),
           ("strategy", strategy + (f" {stages}" if ">" in stages else "")),
           ("model", f"{row.get('model')}, {row.get('steps')} steps, cfg {_num(row.get('guidance'), 'g')}, "
                     f"{row.get('scheduler')}"),
           ("tiling", tiling)]
    if row.get("negative_prompt"):
        out.insert(0, ("negative", row["negative_prompt"]))
    if row.get("regions"):
        boxes = "; ".join(f"{r['prompt']} [{', '.join(f'{v:.2g}' for v in r['box'])}]"
                          + (f" x{r['weight']:g}" if r.get("weight", 1) != 1 else "")
                          for r in json.loads(row["regions"]))
        out.insert(0, ("regions", boxes))
    if row.get("status") == "ok":
        out += [("time", f"denoise {_num(row.get('seconds_denoise'), '.1f')} s, decode "
                         f"{_num(row.get('seconds_decode'), '.1f')} s"),
                ("seams", f"tiles {_num(row.get('seam_score'), '.3f')}, vae {_num(row.get('seam_score_vae'), '.3f')}")]
    if row.get("finished_at") is not None:
        out.append(("finished", row["finished_at"].strftime("%Y-%m-%d %H:%M:%S UTC")))
    out.append(("id", row.get("image_id") or ""))
    return out


def _data(row: dict, swept: Dict[str, str]) -> str:
    regions = " ".join(r["prompt"] for r in json.loads(row["regions"])) if row.get("regions") else ""
    attrs = {"status": row.get("status") or "",
             "text": f"{row.get('prompt') or ''} {regions} {row.get('image_id') or ''}".lower(),
             "finished": _sort_value(row.get("finished_at")), "seconds": _sort_value(row.get("seconds_denoise")),
             "seam": _sort_value(row.get("seam_score")), "seam-vae": _sort_value(row.get("seam_score_vae"))}
    attrs.update({f"swept-{i}": v for i, v in enumerate(swept.values())})
    return " ".join(f'data-{k}="{html.escape(v)}"' for k, v in attrs.items())


def _picture(row: dict, thumb: Optional[str], base: str) -> str:
    e = html.escape
    if thumb:
        return (f'<a href="{e(base + row["path"])}"><img src="{e(base + thumb)}" loading="lazy" '
                f'alt="{e(row.get("prompt") or "")}"></a>')
    return f'<div class="nothumb">{"failed" if row.get("status") == "failed" else "no file"}</div>'


def _card(row: dict, thumb: Optional[str], base: str) -> str:
    e = html.escape
    dl = "".join(f"<dt>{e(k)}</dt><dd>{e(v)}</dd>" for k, v in _fields(row))
    error = f'<p class="error">{e(row.get("error") or "")}</p>' if row.get("status") == "failed" else ""
    return (f'<figure class="item {e(row.get("status") or "")}" {_data(row, {})}>{_picture(row, thumb, base)}'
            f'<figcaption><p class="prompt">{e(row.get("prompt") or "")}</p>{error}<dl>{dl}</dl></figcaption></figure>')


def _table_row(row: dict, thumb: Optional[str], base: str, swept: Dict[str, str]) -> str:
    e = html.escape
    cells = "".join(f'<td class="swept">{e(v)}</td>' for v in swept.values())
    info = "".join(f"<span><b>{e(k)}</b> {e(v)}</span> " for k, v in _fields(row))
    error = f'<p class="error">{e(row.get("error") or "")}</p>' if row.get("status") == "failed" else ""
    return (f'<tr class="item {e(row.get("status") or "")}" {_data(row, swept)}>{cells}'
            f'<td>{_picture(row, thumb, base)}</td><td><p class="prompt">{e(row.get("prompt") or "")}</p>{error}'
            f'<p class="fields">{info}</p></td></tr>')


CSS = """
body{font:14px/1.4 system-ui,sans-serif;margin:0;background:#16181c;color:#ddd}
header{position:sticky;top:0;background:#202329;padding:10px 16px;display:flex;gap:14px;align-items:center;
flex-wrap:wrap;border-bottom:1px solid #333;z-index:1}
header h1{font-size:16px;margin:0}header input,header select{background:#111;color:#ddd;border:1px solid #444;
padding:4px 6px;border-radius:4px}header input{width:22em}#count{color:#999}
main{padding:16px}.grid{display:grid;grid-template-columns:repeat(auto-fill,minmax(300px,1fr));gap:14px}
figure{margin:0;background:#202329;border-radius:6px;overflow:hidden;border:1px solid #2c3038}
figure img,td img{display:block;width:100%;height:auto;background:#000}td img{width:256px}
figcaption{padding:8px 10px}.prompt{margin:0 0 6px;color:#fff;font-weight:600;word-break:break-word}
dl{display:grid;grid-template-columns:max-content 1fr;gap:1px 8px;margin:0;font-size:12px}dt{color:#888}
dd{margin:0;word-break:break-all}.failed{border-color:#a33}.error{color:#f77;font-family:monospace;font-size:12px;
white-space:pre-wrap;margin:0 0 6px}.nothumb{height:120px;display:flex;align-items:center;justify-content:center;
color:#f77;background:#2a1d1d}table{border-collapse:collapse;width:100%}td,th{border-bottom:1px solid #333;
padding:6px;vertical-align:top;text-align:left}th{color:#aaa;font-weight:600}td.swept{font-family:monospace;
color:#9cf;white-space:nowrap}.fields span{font-size:12px;margin-right:8px;color:#bbb}.fields b{color:#888;
font-weight:normal}[hidden]{display:none!important}
"""

# Filter (prompt text), status and sort; the state is mirrored in location.hash (q=, status=, sort=).
JS = """
(function(){
const box=document.getElementById('items'),items=Array.from(box.querySelectorAll('.item'));
const q=document.getElementById('q'),st=document.getElementById('status'),so=document.getElementById('sort');
function num(el,key){const v=el.dataset[key];return v===''||v===undefined?NaN:parseFloat(v);}
function apply(){
  const words=q.value.toLowerCase().split(/\\s+/).filter(Boolean);let shown=0;
  for(const el of items){const ok=words.every(w=>el.dataset.text.includes(w))
      &&(!st.value||el.dataset.status===st.value);el.hidden=!ok;if(ok)shown++;}
  const [key,dir]=so.value.split(':'),sign=dir==='desc'?-1:1,order=items.slice();
  order.sort((a,b)=>{let x,y;if(key.startsWith('swept')){x=a.dataset[key];y=b.dataset[key];
      const nx=parseFloat(x),ny=parseFloat(y);if(!isNaN(nx)&&!isNaN(ny)){x=nx;y=ny;}
      return x<y?-sign:x>y?sign:0;}
    x=num(a,key);y=num(b,key);if(isNaN(x)&&isNaN(y))return 0;if(isNaN(x))return 1;if(isNaN(y))return -1;
    return (x-y)*sign;});
  for(const el of order)box.appendChild(el);
  document.getElementById('count').textContent=shown+' of '+items.length+' shown';
  const h=new URLSearchParams();if(q.value)h.set('q',q.value);if(st.value)h.set('status',st.value);
  if(so.value!==so.options[0].value)h.set('sort',so.value);
  history.replaceState(null,'',h.toString()?'#'+h.toString():location.pathname);}
const h=new URLSearchParams(location.hash.slice(1));
if(h.has('q'))q.value=h.get('q');if(h.has('status'))st.value=h.get('status');
if(h.has('sort')&&Array.from(so.options).some(o=>o.value===h.get('sort')))so.value=h.get('sort');
q.addEventListener('input',apply);st.addEventListener('change',apply);so.addEventListener('change',apply);apply();
})();
"""

SORTS = [("finished:desc", "newest first"), ("finished:asc", "oldest first"), ("seconds:desc", "slowest render"),
         ("seconds:asc", "fastest render"), ("seam:desc", "highest seam score"), ("seam:asc", "lowest seam score"),
         ("seamVae:desc", "highest VAE seam score")]


def page(title: str, rows: Sequence[dict], thumbs: Sequence[Optional[str]], bases: Sequence[str],
         swept: Optional[Sequence[Dict[str, str]]] = None) -> str:
    """The gallery's HTML: cards in a grid, or (a sweep: `swept[i]` the swept values of row i) a table whose first
    columns are the swept keys."""
    e = html.escape
    failed = sum(r.get("status") == "failed" for r in rows)
    sorts = list(SORTS)
    if swept is not None:
        keys = list(swept[0]) if swept else []
        sorts += [(f"swept{i}:asc", f"by {k}") for i, k in enumerate(keys)]
        head = "".join(f"<th>{e(k)}</th>" for k in keys) + "<th>image</th><th>prompt and details</th>"
        body = "".join(_table_row(r, t, b, s) for r, t, b, s in zip(rows, thumbs, bases, swept))
        items = f'<table><thead><tr>{head}</tr></thead><tbody id="items">{body}</tbody></table>'
    else:
        items = '<div class="grid" id="items">' + "".join(_card(r, t, b) for r, t, b in zip(rows, thumbs, bases)) + \
                "</div>"
    options = "".join(f'<option value="{v}">{e(label)}</option>' for v, label in sorts)
    return (f'<!doctype html><html lang="en"><head><meta charset="utf-8"><title>{e(title)}</title>'
            f'<meta name="viewport" content="width=device-width,initial-scale=1"><style>{CSS}</style></head><body>'
            f'<header><h1>{e(title)}</h1><span>{len(rows)} image(s), {failed} failed</span>'
            f'<input id="q" type="search" placeholder="filter by prompt text or image id">'
            f'<select id="status"><option value="">all</option><option value="ok">ok</option>'
            f'<option value="failed">failed</option></select><select id="sort">{options}</select>'
            f'<span id="count"></span></header><main>{items}</main><script>{JS}</script></body></html>')


def _newest_first(rows: List[dict]) -> List[dict]:
    return sorted(rows, key=lambda r: (r.get("finished_at") is None, -(r["finished_at"].timestamp()
                                                                         if r.get("finished_at") else 0)))


def write_gallery(output_dir) -> Path:
    """`<output_dir>/gallery.html` over every row of its manifest (thumbnails made as needed); its path."""
    out = Path(output_dir)
    rows = _newest_first(Manifest(out).rows())
    thumbs = [thumbnail(out, r) for r in rows]
    path = out / GALLERY
    text = page(f"Tessera: {out.resolve().name}", rows, thumbs, [""] * len(rows))
    atomic_write(path, lambda f: f.write(text.encode("utf-8")))
    return path


def record_sweep_job(job_dir, overrides: Sequence[str], output_dir, image_ids: Sequence[str]) -> Path:
    """A sweep's job writes what its gallery needs into its Hydra job folder: overrides, output folder, ids."""
    path = Path(job_dir) / SWEEP_JOB
    data = {"overrides": list(overrides), "output_dir": os.path.abspath(output_dir), "image_ids": list(image_ids)}
    atomic_write(path, lambda f: f.write(json.dumps(data, indent=1).encode("utf-8")))
    return path


def _override_map(overrides: Sequence[str]) -> Dict[str, str]:
    out = {}
    for o in overrides:
        key, _, value = o.partition("=")
        out[key.lstrip("+~")] = value
    return out


def write_sweep_gallery(sweep_dir) -> Path:
    """`<sweep_dir>/gallery.html` over every job of the sweep recorded so far (`tessera-job.json`), the swept
    values (overrides that differ between its jobs; all of a lone job's) as columns, job by job."""
    sweep = Path(sweep_dir)
    jobs = sorted((p for p in sweep.glob(f"*/{SWEEP_JOB}")), key=lambda p: (len(p.parent.name), p.parent.name))
    if not jobs:
        raise FileNotFoundError(f"{sweep}: no */{SWEEP_JOB} (not a Tessera sweep folder)")
    records = [(p.parent.name, json.loads(p.read_text(encoding="utf-8"))) for p in jobs]
    maps = [_override_map(r["overrides"]) for _, r in records]
    keys = sorted({k for m in maps for k in m})
    swept_keys = [k for k in keys if len({m.get(k) for m in maps}) > 1] if len(maps) > 1 else keys
    manifests: Dict[str, Dict[str, dict]] = {}
    rows, thumbs, bases, swept = [], [], [], []
    for (num, rec), m in zip(records, maps):
        out = Path(rec["output_dir"])
        if rec["output_dir"] not in manifests:
            manifests[rec["output_dir"]] = {r["image_id"]: r for r in Manifest(out).rows()}
        base = os.path.relpath(out, sweep).replace(os.sep, "/") + "/"
        for iid in rec["image_ids"]:
            row = manifests[rec["output_dir"]].get(iid) or {"image_id": iid, "status": "failed",
                                                            "error": "no manifest row (the job did not finish)"}
            rows.append(row)
            thumbs.append(thumbnail(out, row))
            bases.append(base)
            swept.append({"job": num, **{k: m.get(k, "") for k in swept_keys}})
    path = sweep / GALLERY
    text = page(f"Tessera sweep: {sweep.resolve().name}", rows, thumbs, bases, swept)
    atomic_write(path, lambda f: f.write(text.encode("utf-8")))
    return path


def main(argv: Optional[Sequence[str]] = None) -> int:
    ap = argparse.ArgumentParser(prog="python3 -m jobs.gallery", description=__doc__.split("\n\n")[0])
    ap.add_argument("folder", help="an output folder (with manifest/) or a sweep folder (with */tessera-job.json)")
    args = ap.parse_args(argv)
    folder = Path(args.folder)
    if any(folder.glob(f"*/{SWEEP_JOB}")):
        path = write_sweep_gallery(folder)
    elif (folder / "manifest").is_dir():
        path = write_gallery(folder)
    else:
        print(f"error: {folder}: no manifest/ and no */{SWEEP_JOB}: not a Tessera output or sweep folder",
              file=sys.stderr)
        return 2
    print(path)
    return 0


if __name__ == "__main__":
    sys.exit(main())
