// hipt view: the cohort list and the slide viewer (OpenSeadragon) with attention overlays.
"use strict";

const $ = (id) => document.getElementById(id);
const CMAPS = ["coolwarm", "turbo", "jet", "viridis", "inferno", "magma", "RdYlBu_r"];
const DEFAULT_OPACITY = 0.5;

// State the browser test reads: window.hipt.idle() is true once every shown image is loaded.
window.hipt = { viewer: null, overlays: [], failed: [], idle: () => false };

function showMessage(text) {
  $("message").textContent = text;
  $("message").hidden = false;
}

async function getJSON(url) {
  const response = await fetch(url);
  if (!response.ok) throw new Error((await response.text()).trim() || response.statusText);
  return response.json();
}

function fmt(value) {
  if (value === null || value === undefined) return "–";
  if (typeof value === "number") return Number.isInteger(value) ? String(value) : value.toFixed(3);
  return String(value);
}

function escapeHtml(text) {
  return String(text).replace(/[&<>"']/g, (c) => `&#${c.charCodeAt(0)};`);
}

// ------------------------------------------------------------------------------------ cohort
const COHORT_COLUMNS = ["slide_id", "label", "prediction", "probability", "risk",
  "survival_months", "event", "fold", "case_id", "heatmap"];

function showCohort(cohort) {
  $("cohort").hidden = false;
  const rows = cohort.slides;
  const columns = COHORT_COLUMNS.filter((c) => rows.some((r) => r[c] !== undefined && r[c] !== null && r[c] !== ""));
  $("cohort-summary").textContent = `${rows.length} slides` + (cohort.run ? " with the run's predictions" : "") +
    ". Click a column to sort, a row to open the slide.";
  const head = document.querySelector("#cohort-table thead tr");
  const body = document.querySelector("#cohort-table tbody");
  let sortKey = "slide_id", ascending = true;
  function render() {
    const sorted = [...rows].sort((a, b) => {
      const x = a[sortKey], y = b[sortKey];
      const missing = (v) => v === undefined || v === null || v === "";
      if (missing(x) || missing(y)) return missing(x) - missing(y);
      const order = typeof x === "number" && typeof y === "number" ? x - y : String(x).localeCompare(String(y));
      return ascending ? order : -order;
    });
    head.innerHTML = columns.map((c) =>
      `<th data-key="${c}" class="${c === sortKey ? (ascending ? "asc" : "desc") : ""}">${c.replace("_", " ")}</th>`).join("");
    body.innerHTML = sorted.map((r) =>
      `<tr data-slide="${escapeHtml(r.slide_id)}">` + columns.map((c) =>
        `<td>${escapeHtml(c === "heatmap" ? (r[c] ? "yes" : "no") : fmt(r[c]))}</td>`).join("") + "</tr>").join("");
  }
  head.addEventListener("click", (e) => {
    const key = e.target.dataset.key;
    if (!key) return;
    ascending = key === sortKey ? !ascending : true;
    sortKey = key;
    render();
  });
  body.addEventListener("click", (e) => {
    const row = e.target.closest("tr");
    if (row) window.location.search = "?slide=" + encodeURIComponent(row.dataset.slide);
  });
  render();
}

// ------------------------------------------------------------------------------------ viewer
function tileSource(info, url) {
  return {
    width: info.width, height: info.height, tileSize: info.tile_size, tileOverlap: info.overlap,
    minLevel: 0, maxLevel: info.max_level,
    getTileUrl: (level, col, row) => url.replace("{level}", level).replace("{col}", col).replace("{row}", row),
  };
}

function niceLength(um) {
  const power = Math.pow(10, Math.floor(Math.log10(um)));
  for (const step of [5, 2, 1]) if (step * power <= um) return step * power;
  return power;
}

function updateScaleBar(viewer, mpp) {
  const slide = viewer.world.getItemAt(0);
  if (!slide || !mpp) { $("scalebar").hidden = true; return; }
  const screenPerImage = slide.viewportToImageZoom(viewer.viewport.getZoom(true));
  const umPerScreenPx = mpp / screenPerImage;
  const um = niceLength(120 * umPerScreenPx);
  $("scalebar-bar").style.width = `${um / umPerScreenPx}px`;
  $("scalebar-label").textContent = um >= 1000 ? `${um / 1000} mm` : `${um} µm`;
}

async function drawColorbar(cmap, threshold) {
  const { colors } = await getJSON(`/api/colormap/${encodeURIComponent(cmap)}`);
  const ctx = $("colorbar").getContext("2d");
  colors.forEach(([r, g, b], i) => {
    ctx.fillStyle = i / 255 < threshold ? "#ddd" : `rgb(${r},${g},${b})`;
    ctx.fillRect(i, 0, 1, 14);
  });
}

function overlayUrl(overlay, cmap, threshold) {
  return `${overlay.url}&cmap=${encodeURIComponent(cmap)}&min=${threshold}`;
}

function valuesTable(values) {
  return "<table>" + Object.entries(values).map(([k, v]) =>
    `<tr><td>${escapeHtml(k)}</td><td>${fmt(v)}</td></tr>`).join("") + "</table>";
}

function showRegion(viewer, data) {
  const box = $("region");
  viewer.clearOverlays();
  if (!data.region) { box.textContent = "no region here"; return; }
  const r = data.region;
  const [x0, y0, x1, y1] = r.bbox;
  const slide = viewer.world.getItemAt(0);
  const mark = document.createElement("div");
  mark.className = "region-box";
  viewer.addOverlay(mark, slide.imageToViewportRectangle(x0, y0, x1 - x0, y1 - y0));
  const name = r.classification && r.classification.name ? ` · ${escapeHtml(r.classification.name)}` : "";
  let html = `<div>${escapeHtml(r.objectType || "region")}${name}</div>` +
    `<div>x ${Math.round(x0)}, y ${Math.round(y0)}, ${Math.round(x1 - x0)} × ${Math.round(y1 - y0)} px</div>` +
    "<h2>Measurements</h2>" + valuesTable(r.measurements) +
    "<h2>Attention here</h2>" + valuesTable(data.values);
  if (r.top_patches.length) {
    html += "<h2>Top patches</h2><ol>" + r.top_patches.map((p, i) =>
      `<li data-i="${i}">x ${Math.round(p.bbox[0])}, y ${Math.round(p.bbox[1])}: ` +
      Object.entries(p.measurements).map(([k, v]) => `${escapeHtml(k)} ${fmt(v)}`).join(", ") + "</li>").join("") + "</ol>";
  }
  box.innerHTML = html;
  box.querySelectorAll("li").forEach((li) => li.addEventListener("click", () => {
    const [a, b, c, d] = r.top_patches[Number(li.dataset.i)].bbox;
    viewer.viewport.fitBounds(slide.imageToViewportRectangle(a, b, c - a, d - b));
  }));
}

function imagePoint(viewer, pixel) {
  const slide = viewer.world.getItemAt(0);
  return slide.viewportToImageCoordinates(viewer.viewport.pointFromPixel(pixel));
}

function hoverTracker(viewer, info) {
  let busy = false, pending = null;
  async function ask(point) {
    busy = true;
    try {
      const data = await getJSON(`/api/region/${encodeURIComponent(info.slide_id)}?x=${point.x.toFixed(1)}&y=${point.y.toFixed(1)}`);
      let html = `<div>x ${Math.round(point.x)}, y ${Math.round(point.y)}</div>` + valuesTable(data.values);
      if (data.region) html += valuesTable(data.region.measurements);
      $("hover").innerHTML = html;
    } catch (err) {
      $("hover").textContent = err.message;
    }
    busy = false;
    if (pending) { const p = pending; pending = null; ask(p); }
  }
  new OpenSeadragon.MouseTracker({
    element: viewer.canvas,
    moveHandler: (e) => {
      const point = imagePoint(viewer, e.position);
      if (point.x < 0 || point.y < 0 || point.x > info.width || point.y > info.height) return;
      if (busy) pending = point; else ask(point);
    },
  });
}

function overlayControls(viewer, info) {
  const state = { cmap: info.cmap, threshold: 0 };
  const list = $("overlay-list");
  const cmaps = CMAPS.includes(info.cmap) ? CMAPS : [info.cmap, ...CMAPS];
  $("cmap").innerHTML = cmaps.map((c) => `<option${c === info.cmap ? " selected" : ""}>${c}</option>`).join("");

  function add(overlay) {
    viewer.addTiledImage({
      tileSource: tileSource(info, overlayUrl(overlay, state.cmap, state.threshold)),
      opacity: overlay.opacity,
      success: (e) => { overlay.item = e.item; },
    });
  }
  function remove(overlay) {
    if (overlay.item) viewer.world.removeItem(overlay.item);
    overlay.item = null;
  }
  function reloadShown() {
    drawColorbar(state.cmap, state.threshold);
    for (const o of window.hipt.overlays) if (o.shown) { remove(o); add(o); }
  }
  info.overlays.forEach((overlay, k) => {
    overlay.opacity = DEFAULT_OPACITY;
    overlay.shown = k === 0;  // the coarsest level is on at first
    const row = document.createElement("div");
    row.className = "overlay-row";
    row.innerHTML = `<label><input type="checkbox" id="overlay-${k}"${overlay.shown ? " checked" : ""}> ${escapeHtml(overlay.label)}</label>` +
      `<input type="range" id="opacity-${k}" min="0" max="1" step="0.05" value="${DEFAULT_OPACITY}" title="opacity">`;
    list.appendChild(row);
    row.querySelector("input[type=checkbox]").addEventListener("change", (e) => {
      overlay.shown = e.target.checked;
      if (overlay.shown) add(overlay); else remove(overlay);
    });
    row.querySelector("input[type=range]").addEventListener("input", (e) => {
      overlay.opacity = Number(e.target.value);
      if (overlay.item) overlay.item.setOpacity(overlay.opacity);
    });
    window.hipt.overlays.push(overlay);
    if (overlay.shown) add(overlay);
  });
  $("cmap").addEventListener("change", (e) => { state.cmap = e.target.value; reloadShown(); });
  $("threshold").addEventListener("change", (e) => {
    state.threshold = Number(e.target.value);
    $("threshold-value").textContent = state.threshold.toFixed(2);
    reloadShown();
  });
  drawColorbar(state.cmap, state.threshold);
}

async function showSlide(slideId, cohortSize, infoRequest) {
  const info = await (infoRequest || getJSON(`/api/slides/${encodeURIComponent(slideId)}`));
  $("viewer-page").hidden = false;
  $("cohort-link").hidden = cohortSize < 2;
  $("title").textContent = info.slide_id;
  const facts = [`${info.width} × ${info.height} px`, info.mpp ? `${info.mpp.toFixed(3)} µm/px` : "no µm/px"];
  for (const k of ["label", "prediction", "probability", "risk"]) if (info.info[k] !== undefined) facts.push(`${k} ${fmt(info.info[k])}`);
  $("slide-meta").textContent = facts.join(" · ");
  const viewer = OpenSeadragon({
    id: "osd", prefixUrl: "/osd/images/", showNavigator: true, navigatorPosition: "TOP_LEFT",
    tileSources: tileSource(info, info.tile_url), maxZoomPixelRatio: 2, visibilityRatio: 0.5,
    gestureSettingsMouse: { clickToZoom: false },
    // The canvas drawer: with WebGL on a machine without a GPU (software GL, headless browsers)
    // OpenSeadragon 6 left some tiles loading forever.
    drawer: "canvas",
    autoHideControls: false,
    maxTilesPerFrame: 16,  // the default (1) paces a screen of cached tiles over seconds
  });
  window.hipt.viewer = viewer;
  viewer.addHandler("tile-load-failed", (e) => window.hipt.failed.push(`${e.tile.getUrl()}: ${e.message}`));
  window.hipt.idle = () => {
    const n = viewer.world.getItemCount();
    for (let i = 0; i < n; i++) if (!viewer.world.getItemAt(i).getFullyLoaded()) return false;
    return n === 1 + window.hipt.overlays.filter((o) => o.shown).length;
  };
  viewer.addHandler("open", () => updateScaleBar(viewer, info.mpp));
  viewer.addHandler("animation", () => updateScaleBar(viewer, info.mpp));
  viewer.addHandler("resize", () => updateScaleBar(viewer, info.mpp));
  viewer.addHandler("canvas-click", async (e) => {
    if (!e.quick) return;
    const p = imagePoint(viewer, e.position);
    try {
      showRegion(viewer, await getJSON(`/api/region/${encodeURIComponent(info.slide_id)}?x=${p.x.toFixed(1)}&y=${p.y.toFixed(1)}`));
    } catch (err) {
      $("region").textContent = err.message;
    }
  });
  if (info.overlays.length) {
    viewer.addOnceHandler("open", () => overlayControls(viewer, info));
  } else {
    $("overlay-list").textContent = "no attention overlay for this slide";
  }
  if (info.overlay_error) { $("overlay-error").textContent = info.overlay_error; $("overlay-error").hidden = false; }
  hoverTracker(viewer, info);
}

async function start() {
  if (typeof OpenSeadragon === "undefined") {
    showMessage("OpenSeadragon is not installed: run 'make setup' (it runs npm install), then restart hipt view.");
    return;
  }
  try {
    const wanted = new URLSearchParams(window.location.search).get("slide");
    // Both at once: opening the slide on the server is the slow part of a first view.
    const infoRequest = wanted ? getJSON(`/api/slides/${encodeURIComponent(wanted)}`) : null;
    if (infoRequest) infoRequest.catch(() => {});  // reported by showSlide
    const cohort = await getJSON("/api/slides");
    if (wanted) await showSlide(wanted, cohort.slides.length, infoRequest);
    else if (cohort.slides.length === 1) await showSlide(cohort.slides[0].slide_id, 1);
    else showCohort(cohort);
  } catch (err) {
    showMessage(err.message);
  }
}

start();
