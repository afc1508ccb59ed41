#!/usr/bin/env node
// Classify PNG / JPEG images with an lpt raw-pixel export from Node.js:
//
//   node predict.mjs models/export/model.raw.onnx examples/images/ [more files or folders] [--top-k 3] [--json]
//
// model.raw.onnx (written by `lpt export`) takes decoded pixels, uint8 [N, H, W, 3] RGB: resize, centre crop
// and normalisation happen inside the graph, so this client only decodes (pngjs, jpeg-js) and feeds the
// pixels. Class names and the score scale come from the model's own metadata (metadata_props), read here
// from the ONNX protobuf (onnxruntime-node has no metadata API). Output: one line per image, as
// `lpt predict` prints it; --json: one JSON object per image (path, labels, classes, scores).
import fs from "node:fs";
import path from "node:path";
import ort from "onnxruntime-node";
import { PNG } from "pngjs";
import jpeg from "jpeg-js";

function fail(message) {
  process.stderr.write(`error: ${message}\n`);
  process.exit(2);
}

// ---------------------------------------------------------------- ONNX metadata (protobuf wire format)
function readVarint(buf, pos) {
  let value = 0n;
  let shift = 0n;
  for (;;) {
    if (pos >= buf.length) throw new Error("truncated varint");
    const byte = buf[pos++];
    value |= BigInt(byte & 0x7f) << shift;
    if (!(byte & 0x80)) return [value, pos];
    shift += 7n;
  }
}

// The fields of one protobuf message: [fieldNumber, wireType, payload (Buffer for length-delimited)].
function* fields(buf) {
  let pos = 0;
  while (pos < buf.length) {
    let key;
    [key, pos] = readVarint(buf, pos);
    const field = Number(key >> 3n);
    const wire = Number(key & 7n);
    if (wire === 0) {
      let v;
      [v, pos] = readVarint(buf, pos);
      yield [field, wire, v];
    } else if (wire === 1) {
      pos += 8;
    } else if (wire === 5) {
      pos += 4;
    } else if (wire === 2) {
      let len;
      [len, pos] = readVarint(buf, pos);
      const end = pos + Number(len);
      if (end > buf.length) throw new Error("truncated field");
      yield [field, wire, buf.subarray(pos, end)];
      pos = end;
    } else {
      throw new Error(`unsupported wire type ${wire}`);
    }
  }
}

// ModelProto.metadata_props is field 14: StringStringEntryProto { key = 1; value = 2 }.
function onnxMetadata(file) {
  const meta = {};
  for (const [field, wire, payload] of fields(fs.readFileSync(file))) {
    if (field !== 14 || wire !== 2) continue;
    let key = "";
    let value = "";
    for (const [f, w, p] of fields(payload)) {
      if (w !== 2) continue;
      if (f === 1) key = p.toString("utf8");
      if (f === 2) value = p.toString("utf8");
    }
    meta[key] = value;
  }
  return meta;
}

// ------------------------------------------------------------------------------------- decoding
function decode(file) {
  const bytes = fs.readFileSync(file);
  let width, height, rgba;
  if (bytes.length >= 8 && bytes.readUInt32BE(0) === 0x89504e47) {
    const png = PNG.sync.read(bytes); // 8-bit RGBA out, whatever the colour type (grey is replicated)
    [width, height, rgba] = [png.width, png.height, png.data];
  } else if (bytes.length >= 3 && bytes[0] === 0xff && bytes[1] === 0xd8 && bytes[2] === 0xff) {
    const img = jpeg.decode(bytes, { useTArray: true, formatAsRGBA: true, maxMemoryUsageInMB: 512 });
    [width, height, rgba] = [img.width, img.height, img.data];
  } else {
    throw new Error("not a PNG or JPEG file");
  }
  const rgb = new Uint8Array(width * height * 3);
  for (let i = 0, j = 0; i < rgba.length; i += 4, j += 3) {
    rgb[j] = rgba[i]; // alpha dropped, as lpt.runtime.to_rgb does
    rgb[j + 1] = rgba[i + 1];
    rgb[j + 2] = rgba[i + 2];
  }
  return { width, height, rgb };
}

// Files as given; a folder gives its PNG / JPEG files, searched recursively, sorted (as `lpt predict` does).
// (Give a folder for many images: onnxruntime-node 1.30 crashed creating its session here when the command
// line held ~1,000 paths, ~30 kB.)
function expand(args) {
  const out = [];
  for (const arg of args) {
    if (fs.existsSync(arg) && fs.statSync(arg).isDirectory()) {
      const found = fs.readdirSync(arg, { recursive: true })
        .map((name) => path.join(arg, String(name)))
        .filter((f) => /\.(png|jpe?g)$/i.test(f) && fs.statSync(f).isFile())
        .sort();
      if (found.length === 0) fail(`${arg}: no PNG or JPEG images in this folder`);
      out.push(...found);
    } else {
      out.push(arg);
    }
  }
  return out;
}

// -------------------------------------------------------------------------------------- predict
function softmaxTopK(logits, scale, k) {
  const z = Array.from(logits, (v) => v * scale);
  const max = Math.max(...z);
  const exp = z.map((v) => Math.exp(v - max));
  const sum = exp.reduce((a, b) => a + b, 0);
  // stable: ties keep the lower index first, as argmax does
  const order = Array.from(logits.keys()).sort((a, b) => logits[b] - logits[a] || a - b);
  return order.slice(0, k).map((i) => ({ label: i, score: exp[i] / sum }));
}

async function main(argv) {
  let topK = 1;
  let json = false;
  const files = [];
  for (let i = 0; i < argv.length; i++) {
    if (argv[i] === "--top-k") topK = Number(argv[++i]);
    else if (argv[i] === "--json") json = true;
    else files.push(argv[i]);
  }
  if (files.length < 2) fail("usage: node predict.mjs MODEL.raw.onnx IMAGE_OR_FOLDER... [--top-k K] [--json]");
  const [model, ...given] = files;
  const images = expand(given);
  if (!fs.existsSync(model)) fail(`${model}: no such model file`);
  const meta = onnxMetadata(model);
  if (!meta.class_names || !meta.logit_scale) fail(`${model}: no class_names / logit_scale metadata (an lpt export?)`);
  const classNames = JSON.parse(meta.class_names);
  const scale = JSON.parse(meta.logit_scale);
  if (!(Number.isInteger(topK) && topK >= 1 && topK <= classNames.length)) {
    fail(`--top-k must be between 1 and ${classNames.length}, got ${topK}`);
  }
  const session = await ort.InferenceSession.create(model);
  if (!session.inputNames.includes("pixels")) fail(`${model}: input 'pixels' missing: use the model.raw.onnx graph`);
  let failed = 0;
  for (const file of images) {
    let img;
    try {
      img = decode(file);
    } catch (err) {
      process.stderr.write(`error: ${file}: not a readable image (${err.message})\n`);
      failed += 1;
      continue; // one bad file is reported, the others are still classified
    }
    const pixels = new ort.Tensor("uint8", img.rgb, [1, img.height, img.width, 3]);
    const out = await session.run({ pixels });
    const top = softmaxTopK(out.logits.data, scale, topK);
    const row = { path: file, labels: top.map((t) => t.label), classes: top.map((t) => classNames[t.label]),
                  scores: top.map((t) => t.score) };
    if (json) process.stdout.write(JSON.stringify(row) + "\n");
    else process.stdout.write(`${file}\t` + top.map((t) => `${classNames[t.label]} ${t.score.toFixed(4)}`).join("\t") + "\n");
  }
  await session.release(); // then let Node exit on its own: process.exit() while ORT's threads wind down can crash
  process.exitCode = failed ? 1 : 0;
}

main(process.argv.slice(2)).catch((err) => fail(err.message));
