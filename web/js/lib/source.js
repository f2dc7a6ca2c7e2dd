// Where the waveform picker gets its audio (pure, no DOM): file names and /view routes.

/**
 * A combo value of a file widget ("song.wav", "sub/dir/song.wav", "song.wav [output]")
 * as {filename, subfolder, type}; the folder type defaults to "input".
 */
export function parseFileValue(value) {
  const annotated = value.match(/^(.*?)\s*\[(input|output|temp)\]$/);
  const path = annotated ? annotated[1] : value;
  const cut = path.lastIndexOf("/");
  return {
    filename: path.slice(cut + 1),
    subfolder: cut < 0 ? "" : path.slice(0, cut),
    type: annotated ? annotated[2] : "input",
  };
}

/** The server route that downloads a file: /view?filename=&subfolder=&type= */
export function viewRoute({ filename, subfolder = "", type = "input" }) {
  return `/view?${new URLSearchParams({ filename, subfolder, type })}`;
}

/**
 * The first audio file of an executed message's output (the node's `ui` dict,
 * {"audio": [{"filename", "subfolder", "type"}]}), or null.
 */
export function executedAudioFile(output) {
  const entry = output?.audio?.[0];
  if (!entry || typeof entry.filename !== "string" || entry.filename === "") return null;
  return { filename: entry.filename, subfolder: entry.subfolder ?? "", type: entry.type ?? "output" };
}
