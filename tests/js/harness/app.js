// Stand-in for ComfyUI's /scripts/app.js in the browser harness: collects the
// registered extensions and lets the page redraw when an extension asks for it.
export const app = {
  extensions: [],
  registerExtension(extension) {
    this.extensions.push(extension);
  },
  canvas: {
    onDirty: () => {},
    setDirty() {
      this.onDirty();
    },
  },
};
