// Tiny static server for the browser harness, laid out like ComfyUI:
//   /extensions/acestep/*  -> the pack's web/ folder (as WEB_DIRECTORY = "./web")
//   /scripts/app.js, /scripts/api.js -> stubs; /harness.html, /harness/* -> the harness
//   /view?filename=&subfolder=&type= -> synthetic WAV files (see AUDIO)
//   POST /upload/image -> reads the multipart body, answers as ComfyUI does ({name, subfolder, type})
import { readFile } from "node:fs/promises";
import http from "node:http";
import path from "node:path";
import { fileURLToPath } from "node:url";

const HERE = path.dirname(fileURLToPath(import.meta.url));
const WEB = path.resolve(HERE, "../../web");
const TYPES = { ".js": "text/javascript", ".mjs": "text/javascript", ".html": "text/html", ".wav": "audio/wav" };

/** type/subfolder/filename -> {seconds, rate, channels, hz, amplitude} of a sine WAV. */
export const AUDIO = {
  "input/harness/sine.wav": { seconds: 3, rate: 22050, channels: 1, hz: 220, amplitude: 0.5 },
  "temp//run_source.wav": { seconds: 4, rate: 22050, channels: 2, hz: 330, amplitude: 0.5 },
};

/** 16-bit PCM WAV of a sine. */
export function sineWav({ seconds, rate, channels, hz, amplitude }) {
  const frames = Math.round(seconds * rate);
  const data = Buffer.alloc(frames * channels * 2);
  for (let i = 0; i < frames; i++) {
    const v = Math.round(amplitude * 32767 * Math.sin((2 * Math.PI * hz * i) / rate));
    for (let c = 0; c < channels; c++) data.writeInt16LE(v, (i * channels + c) * 2);
  }
  const header = Buffer.alloc(44);
  header.write("RIFF", 0);
  header.writeUInt32LE(36 + data.length, 4);
  header.write("WAVEfmt ", 8);
  header.writeUInt32LE(16, 16);
  header.writeUInt16LE(1, 20);
  header.writeUInt16LE(channels, 22);
  header.writeUInt32LE(rate, 24);
  header.writeUInt32LE(rate * channels * 2, 28);
  header.writeUInt16LE(channels * 2, 32);
  header.writeUInt16LE(16, 34);
  header.write("data", 36);
  header.writeUInt32LE(data.length, 40);
  return Buffer.concat([header, data]);
}

function staticPath(pathname) {
  const routes = [
    ["/extensions/acestep/", WEB],
    ["/harness/", path.join(HERE, "harness")],
  ];
  if (pathname === "/harness.html") return path.join(HERE, "harness.html");
  if (pathname === "/scripts/app.js" || pathname === "/scripts/api.js") return path.join(HERE, "harness", path.basename(pathname));
  for (const [prefix, root] of routes) {
    if (!pathname.startsWith(prefix)) continue;
    const file = path.resolve(root, `.${decodeURIComponent(pathname.slice(prefix.length - 1))}`);
    return file.startsWith(root + path.sep) ? file : null;
  }
  return null;
}

/** Start the server on 127.0.0.1 (a free port). Returns {origin, requests, close}. */
export async function startServer() {
  const requests = [];
  const uploads = [];
  const server = http.createServer(async (request, response) => {
    const url = new URL(request.url, "http://127.0.0.1");
    requests.push(url.pathname + url.search);
    if (url.pathname === "/upload/image" && request.method === "POST") {
      const chunks = [];
      for await (const chunk of request) chunks.push(chunk);
      const body = Buffer.concat(chunks).toString("utf8");
      const name = /filename="([^"]+)"/.exec(body)?.[1];
      uploads.push({ name, body });
      if (!name) return response.writeHead(400).end();
      return response.writeHead(200, { "content-type": "application/json" })
        .end(JSON.stringify({ name, subfolder: "", type: "input" }));
    }
    if (url.pathname === "/view") {
      const q = url.searchParams;
      const spec = AUDIO[`${q.get("type")}/${q.get("subfolder") ?? ""}/${q.get("filename")}`];
      if (!spec) return response.writeHead(404).end();
      return response.writeHead(200, { "content-type": "audio/wav" }).end(sineWav(spec));
    }
    const file = staticPath(url.pathname);
    try {
      if (!file) throw new Error("not served");
      const body = await readFile(file);
      response.writeHead(200, { "content-type": TYPES[path.extname(file)] ?? "application/octet-stream" }).end(body);
    } catch {
      response.writeHead(404).end();
    }
  });
  await new Promise((resolve) => server.listen(0, "127.0.0.1", resolve));
  const { port } = server.address();
  return {
    origin: `http://127.0.0.1:${port}`,
    requests,
    uploads,
    close: () => new Promise((resolve) => server.close(resolve)),
  };
}
