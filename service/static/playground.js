// vqtok playground: pick an image, encode it (POST /v1/encode), decode the tokens (POST /v1/decode),
// and show the reconstruction, the token grid, bits per pixel and PSNR. Vanilla JS, no dependencies;
// it talks only to the server that served it, through the public routes.
"use strict";

(() => {
  const $ = (id) => document.getElementById(id);
  const state = { file: null, image: null, models: [], defaultModel: null, grid: null, last: null, resizeChosen: false };

  // ---- HTTP ------------------------------------------------------------------------------------

  class ApiError extends Error {
    constructor(status, title, detail, type) {
      super(detail || title);
      this.status = status;
      this.title = title;
      this.detail = detail;
      this.type = type || "";
    }
  }

  function headers(extra) {
    const h = Object.assign({}, extra);
    const key = $("apikey").value.trim();
    if (key) h.Authorization = "Bearer " + key;
    return h;
  }

  // fetch; a non-2xx answer becomes an ApiError carrying the problem+json title, detail and type.
  async function api(path, options) {
    let res;
    try {
      res = await fetch(path, options);
    } catch (e) {
      throw new ApiError(0, "Network error", "Could not reach the server: " + e.message);
    }
    if (res.ok) return res;
    let title = res.statusText || "Error";
    let detail = "";
    let type = "";
    const text = await res.text();
    try {
      const problem = JSON.parse(text);
      title = problem.title || title;
      detail = problem.detail || text;
      type = problem.type || "";
      if (Array.isArray(problem.errors) && problem.errors.length && !problem.detail) {
        detail = problem.errors.map((e) => (e.loc || []).join(".") + ": " + e.msg).join("\n");
      }
    } catch (_) {
      detail = text.slice(0, 500);
    }
    throw new ApiError(res.status, title, detail, type);
  }

  // ---- errors and busy state -------------------------------------------------------------------

  function showError(err) {
    const box = $("error");
    if (err instanceof ApiError) {
      $("error-title").textContent = err.status ? `${err.status} ${err.title}` : err.title;
      $("error-detail").textContent = err.detail || "";
      $("error-type").textContent = err.type;
    } else {
      $("error-title").textContent = "Something went wrong in the page";
      $("error-detail").textContent = String(err && err.message ? err.message : err);
      $("error-type").textContent = "";
    }
    box.hidden = false;
    document.body.dataset.state = "error";
  }

  function clearError() {
    $("error").hidden = true;
  }

  function setBusy(busy) {
    const go = $("go");
    go.textContent = busy ? "Tokenizing…" : "Tokenize";
    document.body.dataset.state = busy ? "busy" : document.body.dataset.state;
    updateButton(busy);
  }

  function updateButton(busy) {
    $("go").disabled = busy || !state.file || !$("model").value || $("model").disabled;
  }

  // ---- models ----------------------------------------------------------------------------------

  async function loadModels() {
    const select = $("model");
    const previous = select.value;
    select.disabled = true;
    try {
      const body = await (await api("v1/models", { headers: headers({ Accept: "application/json" }) })).json();
      state.models = body.models;
      state.defaultModel = body.default_model;
      const resize = body.limits && body.limits.default_resize;
      // the server's default resize (crop unless configured otherwise) until the user picks one
      if (resize && !state.resizeChosen && [...$("resize").options].some((o) => o.value === resize)) $("resize").value = resize;
      select.replaceChildren();
      for (const m of body.models) {
        const opt = document.createElement("option");
        opt.value = m.name;
        opt.textContent = m.ready ? m.name : `${m.name} (${m.state})`;
        opt.disabled = !m.ready;
        select.append(opt);
      }
      const pick = [previous, body.default_model].find((n) => body.models.some((m) => m.name === n && m.ready));
      if (pick) select.value = pick;
      select.disabled = !body.models.some((m) => m.ready);
      if (!$("error").hidden && $("error-type").textContent.endsWith(":unauthorized")) {
        clearError(); // the key works now
        document.body.dataset.state = "idle";
      }
    } catch (err) {
      select.replaceChildren(new Option(err.status === 401 ? "(API key needed)" : "(unavailable)", ""));
      showError(err);
    }
    showModelInfo();
    updateButton(false);
  }

  function currentModel() {
    return state.models.find((m) => m.name === $("model").value);
  }

  function showModelInfo() {
    const m = currentModel();
    $("model-info").textContent = m
      ? `${m.name}: ${m.quantizer || "?"} quantizer, codebook K = ${m.codebook_size}, downsample f = ${m.downsample}, ` +
        `native resolution ${m.resolution}×${m.resolution}. ${m.grid_rule || ""}`
      : "";
  }

  // ---- the picked image ------------------------------------------------------------------------

  function loadImage(url) {
    return new Promise((resolve, reject) => {
      const img = new Image();
      img.onload = () => resolve(img);
      img.onerror = () => reject(new Error("the browser cannot decode this image"));
      img.src = url;
    });
  }

  async function setFile(file) {
    if (!file) return;
    clearError();
    state.file = file;
    state.image = null;
    $("file-name").textContent = file.name;
    $("file-name").title = file.name;
    $("file-info").textContent = `${(file.size / 1024).toFixed(1)} KiB`;
    try {
      const img = await loadImage(URL.createObjectURL(file));
      state.image = img;
      const preview = $("preview");
      preview.src = img.src;
      preview.hidden = false;
      $("file-info").textContent = `${img.naturalWidth}×${img.naturalHeight} · ${(file.size / 1024).toFixed(1)} KiB`;
    } catch (err) {
      // The server may still decode it (and will say so if it cannot); PSNR then cannot be computed.
      $("preview").hidden = true;
    }
    updateButton(false);
  }

  // ---- geometry: what the server fed the model -------------------------------------------------

  function canvas2d(w, h) {
    const c = document.createElement("canvas");
    c.width = w;
    c.height = h;
    return c;
  }

  function ctxOf(c) {
    return c.getContext("2d", { willReadFrequently: true });
  }

  // Python's round(): halves to even (the server computes the resized size with it).
  function pyRound(x) {
    const r = Math.round(x);
    return Math.abs(x % 1) === 0.5 && r % 2 !== 0 ? r - 1 : r;
  }

  // The model input as the server prepares it, re-made from the browser's decode of the same file:
  // { canvas (H×W), compare: [w, h] region at the top-left that PSNR is computed over, note }.
  function prepareInput(img, mode, H, W, resolution) {
    const out = canvas2d(W, H);
    const ctx = ctxOf(out);
    const iw = img.naturalWidth;
    const ih = img.naturalHeight;
    if (mode === "crop") {
      // models.core.pixels.fit: scale to cover, bicubic, then the centre window.
      const R = resolution;
      const scale = Math.max(R / iw, R / ih);
      const nw = Math.max(R, pyRound(iw * scale));
      const nh = Math.max(R, pyRound(ih * scale));
      const scaled = canvas2d(nw, nh);
      const sctx = ctxOf(scaled);
      sctx.imageSmoothingEnabled = true;
      sctx.imageSmoothingQuality = "high";
      sctx.drawImage(img, 0, 0, nw, nh);
      const left = Math.floor((nw - R) / 2);
      const top = Math.floor((nh - R) / 2);
      ctx.drawImage(scaled, left, top, R, R, 0, 0, R, R);
      return {
        canvas: out,
        compare: [W, H],
        approximate: true,
        note:
          `resize=crop: the server scaled the short side of the ${iw}×${ih} image to ${R} px (Pillow, bicubic; ` +
          `a large JPEG is first decoded at a reduced DCT scale) and kept the centre ${R}×${R}. ` +
          `The browser repeats that with its own scaler, which differs slightly from Pillow's, ` +
          `so this PSNR (over all ${R}×${R} pixels) is approximate.`,
      };
    }
    ctx.drawImage(img, 0, 0);
    if (mode === "pad") {
      // models.core.pixels.pad_to_multiple: edge-replicate the bottom rows and right columns.
      const data = ctx.getImageData(0, 0, W, H);
      const px = data.data;
      for (let y = 0; y < H; y++) {
        const sy = Math.min(y, ih - 1);
        for (let x = 0; x < W; x++) {
          if (x < iw && y < ih) continue;
          const sx = Math.min(x, iw - 1);
          const d = (y * W + x) * 4;
          const s = (sy * W + sx) * 4;
          px[d] = px[s];
          px[d + 1] = px[s + 1];
          px[d + 2] = px[s + 2];
          px[d + 3] = 255;
        }
      }
      ctx.putImageData(data, 0, 0);
      const padded = iw !== W || ih !== H;
      return {
        canvas: out,
        compare: [Math.min(iw, W), Math.min(ih, H)],
        approximate: false,
        note: padded
          ? `resize=pad: the server edge-replicated the bottom and right of the ${iw}×${ih} image up to ${W}×${H} ` +
            `(multiples of f). PSNR compares only the original ${iw}×${ih} region at the top-left.`
          : `resize=pad: ${iw}×${ih} is already a multiple of f, so nothing was padded; PSNR is over all pixels.`,
      };
    }
    return {
      canvas: out,
      compare: [W, H],
      approximate: false,
      note: `resize=none: the model input is the image itself (${W}×${H}); PSNR is over all its pixels, as decoded by this browser.`,
    };
  }

  // PSNR over the top-left w×h of two same-size canvases, RGB, peak 255.
  function psnr(a, b, w, h) {
    const pa = ctxOf(a).getImageData(0, 0, w, h).data;
    const pb = ctxOf(b).getImageData(0, 0, w, h).data;
    let se = 0;
    for (let i = 0; i < pa.length; i += 4) {
      for (let c = 0; c < 3; c++) {
        const d = pa[i + c] - pb[i + c];
        se += d * d;
      }
    }
    const mse = se / (w * h * 3);
    return mse === 0 ? Infinity : 10 * Math.log10((255 * 255) / mse);
  }

  // ---- the token heat map ----------------------------------------------------------------------

  // Turbo colour map (polynomial fit), t in [0, 1] -> [r, g, b].
  function turbo(t) {
    t = Math.min(1, Math.max(0, t));
    const r = 0.13572138 + t * (4.6153926 + t * (-42.66032258 + t * (132.13108234 + t * (-152.94239396 + t * 59.28637943))));
    const g = 0.09140261 + t * (2.19418839 + t * (4.84296658 + t * (-14.18503333 + t * (4.27729857 + t * 2.82956604))));
    const b = 0.1066733 + t * (12.64194608 + t * (-60.58204836 + t * (110.36276771 + t * (-89.90310912 + t * 27.34824973))));
    return [r, g, b].map((v) => Math.round(255 * Math.min(1, Math.max(0, v))));
  }

  function drawGrid(canvas, tokens, K) {
    const h = tokens.length;
    const w = tokens[0].length;
    canvas.width = w;
    canvas.height = h;
    const ctx = ctxOf(canvas);
    const img = ctx.createImageData(w, h);
    const lut = new Map();
    for (let y = 0; y < h; y++) {
      for (let x = 0; x < w; x++) {
        const id = tokens[y][x];
        let rgb = lut.get(id);
        if (!rgb) {
          rgb = turbo(K > 1 ? id / (K - 1) : 0);
          lut.set(id, rgb);
        }
        const o = (y * w + x) * 4;
        img.data[o] = rgb[0];
        img.data[o + 1] = rgb[1];
        img.data[o + 2] = rgb[2];
        img.data[o + 3] = 255;
      }
    }
    ctx.putImageData(img, 0, 0);
  }

  function copyInto(target, source) {
    target.width = source.width;
    target.height = source.height;
    ctxOf(target).drawImage(source, 0, 0);
  }

  // Hovering any of the three panels shows the cell (row, column, id) and outlines its patch in all.
  function onHover(event) {
    const g = state.grid;
    if (!g) return;
    const rect = event.currentTarget.getBoundingClientRect();
    const col = Math.floor(((event.clientX - rect.left) / rect.width) * g.w);
    const row = Math.floor(((event.clientY - rect.top) / rect.height) * g.h);
    if (row < 0 || col < 0 || row >= g.h || col >= g.w) return onLeave();
    const tip = $("tip");
    tip.textContent = `row ${row}, column ${col} · id ${g.tokens[row][col]}`;
    tip.hidden = false;
    const flip = event.clientX + 14 + tip.offsetWidth > window.innerWidth - 8; // keep it on screen
    tip.style.left = (flip ? event.clientX - 14 - tip.offsetWidth : event.clientX + 14) + "px";
    tip.style.top = event.clientY + 14 + "px";
    for (const hl of document.querySelectorAll(".frame .hl")) {
      hl.style.left = (col / g.w) * 100 + "%";
      hl.style.top = (row / g.h) * 100 + "%";
      hl.style.width = 100 / g.w + "%";
      hl.style.height = 100 / g.h + "%";
      hl.hidden = false;
    }
  }

  function onLeave() {
    $("tip").hidden = true;
    for (const hl of document.querySelectorAll(".frame .hl")) hl.hidden = true;
  }

  // ---- tokenize --------------------------------------------------------------------------------

  async function tokenize() {
    if (!state.file) return;
    clearError();
    setBusy(true);
    try {
      if (!state.models.length) await loadModels();
      const model = $("model").value;
      const resize = $("resize").value;
      const form = new FormData();
      form.append("images", state.file, state.file.name || "image");
      form.append("model", model);
      form.append("resize", resize);
      const t0 = performance.now();
      const enc = await (await api("v1/encode", { method: "POST", body: form, headers: headers({ Accept: "application/json" }) })).json();
      const item = enc.images[0];
      const [h, w] = item.grid;
      const K = enc.codebook_size;
      const dec = await api("v1/decode", {
        method: "POST",
        headers: headers({ "Content-Type": "application/json", Accept: "image/png" }),
        body: JSON.stringify({ tokens: item.tokens, model: enc.model }),
      });
      const recon = await loadImage(URL.createObjectURL(await dec.blob()));
      const elapsed = performance.now() - t0;
      const H = recon.naturalHeight;
      const W = recon.naturalWidth;

      const info = state.models.find((m) => m.name === enc.model) || {};
      const reconCanvas = canvas2d(W, H);
      ctxOf(reconCanvas).drawImage(recon, 0, 0);
      copyInto($("recon-canvas"), reconCanvas);

      let quality = null;
      let prepared = null;
      if (state.image) {
        prepared = prepareInput(state.image, resize, H, W, info.resolution || H);
        copyInto($("input-canvas"), prepared.canvas);
        quality = psnr(prepared.canvas, reconCanvas, prepared.compare[0], prepared.compare[1]);
      }

      const tokens = h * w;
      const bitsPerToken = Math.log2(K);
      const bpp = (tokens * bitsPerToken) / (H * W);
      drawGrid($("grid-canvas"), item.tokens, K);
      state.grid = { h, w, tokens: item.tokens };

      $("stat-tokens").textContent = String(tokens);
      $("stat-grid").textContent = `${h} × ${w}`;
      $("stat-k").textContent = String(K);
      $("stat-bits").textContent = `${bitsPerToken.toFixed(2)} bits per token`;
      $("stat-bpp").textContent = bpp.toFixed(4);
      $("stat-input").textContent = `over the ${W}×${H} model input`;
      $("stat-psnr").textContent = quality === null ? "n/a" : (prepared.approximate ? "≈ " : "") + (isFinite(quality) ? quality.toFixed(2) : "∞");
      $("stat-time").textContent = elapsed.toFixed(0);
      $("legend-max").textContent = String(K - 1);
      const [sh, sw] = item.source_size;
      $("input-caption").textContent = `${W}×${H}` + (resize === "none" ? "" : ` (from ${sw}×${sh}, ${resize})`);
      $("recon-caption").textContent = `${W}×${H}, ${enc.model}`;
      $("psnr-note").textContent = prepared
        ? prepared.note
        : "The browser cannot decode this image format itself, so PSNR is not computed (the server could).";
      state.last = { model: enc.model, resize, tokens: item.tokens, grid: [h, w], size: [H, W], codebookSize: K, bpp, psnr: quality };
      $("result").hidden = false;
      document.body.dataset.state = "done";
    } catch (err) {
      $("result").hidden = true; // an earlier result would look like this image's
      state.grid = null;
      showError(err);
    } finally {
      setBusy(false);
    }
  }

  // ---- wiring ----------------------------------------------------------------------------------

  function init() {
    const drop = $("drop");
    const input = $("file");
    input.addEventListener("change", () => setFile(input.files[0]));
    drop.addEventListener("click", (e) => {
      if (e.target !== input && !e.target.closest("label")) input.click();
    });
    drop.addEventListener("keydown", (e) => {
      if (e.key === "Enter" || e.key === " ") input.click();
    });
    for (const type of ["dragenter", "dragover"]) {
      drop.addEventListener(type, (e) => {
        e.preventDefault();
        drop.classList.add("over");
      });
    }
    for (const type of ["dragleave", "drop"]) {
      drop.addEventListener(type, () => drop.classList.remove("over"));
    }
    drop.addEventListener("drop", (e) => {
      e.preventDefault();
      if (e.dataTransfer.files.length) setFile(e.dataTransfer.files[0]);
    });
    $("model").addEventListener("change", () => {
      showModelInfo();
      updateButton(false);
    });
    $("resize").addEventListener("change", () => {
      state.resizeChosen = true;
    });
    $("apikey").addEventListener("change", loadModels);
    $("controls").addEventListener("submit", (e) => {
      e.preventDefault();
      if (!$("go").disabled) tokenize();
    });
    for (const id of ["input-canvas", "recon-canvas", "grid-canvas"]) {
      $(id).addEventListener("mousemove", onHover);
      $(id).addEventListener("mouseleave", onLeave);
    }
    window.vqtokPlayground = { state, loadModels, tokenize };
    loadModels();
  }

  init();
})();
