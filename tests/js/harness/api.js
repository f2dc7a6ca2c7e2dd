// Stand-in for ComfyUI's /scripts/api.js in the browser harness.
export const api = {
  fetchApi: (route, options) => fetch(route, options),
};
