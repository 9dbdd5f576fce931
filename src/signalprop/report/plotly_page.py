"""Interactive figures in self-contained HTML: plotly.js embedded once per
page, compressed, so that the file opens offline (no CDN) and stays small.

plotly.js (the one the installed ``plotly`` package ships, so figure JSON and
library always match) is 4.8 MB minified; gzipped and base64-encoded it is
about 2 MB.  The page inflates it with the browser's own
``DecompressionStream`` (Chrome/Edge 80, Firefox 113, Safari 16.4 and later)
and runs it, then draws every figure of the page.  A browser without
``DecompressionStream`` or with JavaScript off still shows the page's tables
and a line saying why the figure is missing.

In a notebook the library is embedded in the first report shown in a Python
process; later reports wait for it (``window.signalpropPlotly``, a promise
of the ``Plotly`` object), so a notebook holds one copy however many reports
it shows.
"""

from __future__ import annotations

import base64
import functools
import gzip
import html
import itertools
import json
from typing import Any

# A figure's id on its page; a notebook page holds several reports, so ids count up per process.
_ids = itertools.count()
# Whether this process has already sent plotly.js to a notebook (see embedded_library)
_sent_to_notebook = False


@functools.lru_cache(maxsize=1)
def _library_b64() -> str:
    """plotly.min.js of the installed plotly package, gzipped (mtime 0: the same
    bytes on every run) and base64-encoded; computed once per process."""
    from plotly.offline import get_plotlyjs

    return base64.b64encode(gzip.compress(get_plotlyjs().encode(), compresslevel=9, mtime=0)).decode("ascii")


# Inflates the embedded library once per page and publishes window.signalpropPlotly, a promise of
# Plotly.  A page that already has Plotly (a notebook with plotly's own renderer) uses it.
_LOADER = """<script>(function(){
if (window.signalpropPlotly) return;
window.signalpropPlotly = (async function(){
  if (window.Plotly) return window.Plotly;
  if (typeof DecompressionStream === "undefined") throw new Error("this browser cannot inflate the embedded "
      + "plotly.js (DecompressionStream: Chrome 80, Firefox 113, Safari 16.4 or later)");
  var bin = atob(document.getElementById("%(id)s").textContent.trim());
  var bytes = new Uint8Array(bin.length);
  for (var i = 0; i < bin.length; i++) bytes[i] = bin.charCodeAt(i);
  var stream = new Blob([bytes]).stream().pipeThrough(new DecompressionStream("gzip"));
  var s = document.createElement("script");
  s.textContent = await new Response(stream).text();
  document.head.appendChild(s);
  return window.Plotly;
})();
})();</script>"""

# Draws one figure once the library is there; until then the div says what it waits for.
_DRAW = """<script>(function(){
var div = document.getElementById("%(id)s");
function fail(e){ div.textContent = "The interactive figure could not be drawn: " + e; }
if (!window.signalpropPlotly) { fail("plotly.js is not on this page (in a notebook, run the cell again)"); return; }
window.signalpropPlotly.then(function(P){
  var fig = JSON.parse(document.getElementById("%(id)s-json").textContent);
  div.innerHTML = "";
  return P.newPlot(div, fig.data, fig.layout, %(config)s);
}).then(function(){ div.dataset.drawn = "1"; }, fail);
})();</script>"""

CONFIG = {"responsive": True, "displaylogo": False, "scrollZoom": False,
          "toImageButtonOptions": {"format": "png", "scale": 2}}


def embedded_library(notebook: bool = False) -> str:
    """The compressed plotly.js and its loader, for a page's ``<head>`` or a
    notebook fragment; empty for a notebook fragment when this process has
    already sent it to the notebook."""
    global _sent_to_notebook
    if notebook:
        if _sent_to_notebook:
            return ""
        _sent_to_notebook = True
    lib_id = f"sp-plotlyjs-{next(_ids)}"
    return (f"<script type='application/octet-stream' id='{lib_id}'>{_library_b64()}</script>"
            + _LOADER % {"id": lib_id})


def figure_div(fig: Any, label: str, height: int) -> str:
    """One figure: a div of ``height`` px that fills the page's width, its JSON
    in a ``<script type=application/json>`` (never run; read by the drawing
    script) and the script that draws it.  ``label`` is the div's
    ``aria-label`` (what the figure shows, for screen readers)."""
    div_id = f"sp-figure-{next(_ids)}"
    # "</" inside JSON would end the script element early: escaped, JSON.parse reads it back unchanged
    spec = fig.to_json().replace("</", "<\\/")
    return (f"<div id='{div_id}' class='sp-figure' role='img' aria-label='{html.escape(label)}' "
            f"style='width:100%;height:{height}px'><p class='sp-wait'>Drawing the interactive figure "
            "(needs JavaScript)...</p></div>"
            f"<script type='application/json' id='{div_id}-json'>{spec}</script>"
            + _DRAW % {"id": div_id, "config": json.dumps(CONFIG)})
