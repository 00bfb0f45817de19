// StoryDiffusion frontend extension: widgets tell the truth, templates have real cards.
//
// 1. A widget the node ignores is hidden or disabled, following the other widgets and links:
//    - a linked multiline text box of a pack node (e.g. Comic Page `captions` fed by the Story node) is
//      hidden: the frontend would show it as an empty box although the link's text is used;
//    - Consistent Self-Attention `custom_layers` is shown only when `layers` is "custom list";
//    - PhotoMaker Fuse `text` is hidden while a `story` is linked (the panels are the prompts);
//    - PhotoMaker Fuse `trigger_word` is disabled unless `images` is linked: it only applies to those
//      photos; the trigger of each person belongs to PhotoMaker Character.
//    Widgets are never removed, so saved widgets_values keep their positions.
//    Both node renderers: the classic canvas reads `widget.hidden` / `widget.disabled` (a DOM widget's element
//    follows `hidden`); Nodes 2.0 (Vue-rendered nodes, setting Comfy.VueNodes.Enabled) reads `widget.options.hidden`
//    and, up to frontend 1.35, `widget.options.disabled` (1.47 keeps `disabled` in its widget store, behind
//    `widget.disabled`), and re-reads a node's widgets only when its widget list changes. So the state goes on
//    both, and a change re-inserts the node's last widget (same list, same order) to make Nodes 2.0 redraw it.
//    Only hide/show and enable/disable: nothing here draws on the canvas (canvas-drawn widgets break in Vue).
// 2. Template cards: ComfyUI's frontend describes a custom pack's template by its file name. The pack's
//    templates are listed instead from templates.json (next to this file, written by
//    scripts/make_workflows.py) with their title and one-line description; the files, thumbnails and
//    loading stay the server's (/api/workflow_templates/<pack folder>/<name>.json|.jpg).
import { app } from "../../scripts/app.js";
import { api } from "../../scripts/api.js";

const EXTENSION_URL = new URL(import.meta.url);
// the pack's folder name: ComfyUI serves this file at /extensions/<folder>/ and its templates under it too
const PACK = decodeURIComponent(EXTENSION_URL.pathname.split("/extensions/")[1].split("/")[0]);
const PREFIX = "StoryDiffusion";

const widget = (node, name) => node.widgets?.find((w) => w.name === name);
const linked = (node, name) => node.inputs?.some((i) => i.name === name && i.link != null) ?? false;

// node type -> (node) => {widget name: {hidden?, disabled?}}
const RULES = {
  StoryDiffusionConsistentSelfAttention: (node) => ({
    custom_layers: { hidden: widget(node, "layers")?.value !== "custom list" },
  }),
  StoryDiffusionPhotoMakerFuse: (node) => ({
    text: { hidden: linked(node, "story") },
    trigger_word: { disabled: !linked(node, "images") },
  }),
};
// widgets whose value changes another widget's state
const CONTROLS = { StoryDiffusionConsistentSelfAttention: ["layers"] };

function isPackNode(node) {
  return (node.comfyClass || node.type || "").startsWith(PREFIX);
}

// a multiline text box (a DOM textarea on the canvas, a textarea component in Nodes 2.0)
const isTextBox = (w) => w.type === "customtext" || (!!w.element && w.element.tagName === "TEXTAREA");

function setHidden(w, hidden) {
  if (!!w.hidden === hidden && !!w.options?.hidden === hidden) return false;
  w.hidden = hidden;
  if (w.options) w.options.hidden = hidden;
  return true;
}

function setDisabled(w, disabled) {
  if (!!w.disabled === disabled && !!w.options?.disabled === disabled) return false;
  w.disabled = disabled;
  if (w.options) w.options.disabled = disabled;
  return true;
}

// Nodes 2.0 maps a node's widgets to its Vue component in a computed value over the (reactive) widget list:
// taking the last widget out and putting it back invalidates it, and the next render reads the new state.
// On the classic canvas the list is a plain array and this changes nothing.
function refreshNodes2(node) {
  const widgets = node.widgets;  // one reference: some frontends rebuild the list in the getter
  if (!widgets?.length) return;
  const last = widgets.pop();
  widgets.push(last);
}

export function updateWidgets(node) {
  if (!isPackNode(node) || !node.widgets) return;
  const rules = RULES[node.comfyClass || node.type]?.(node) ?? {};
  let changed = false;
  for (const w of node.widgets) {
    const rule = rules[w.name] ?? {};
    changed = setHidden(w, !!rule.hidden || (isTextBox(w) && linked(node, w.name))) || changed;
    if ("disabled" in rule) changed = setDisabled(w, !!rule.disabled) || changed;
  }
  if (changed) {
    const min = node.computeSize();
    if (min[1] > node.size[1]) node.setSize([node.size[0], min[1]]);  // grow to show a widget, never shrink
    refreshNodes2(node);
    node.setDirtyCanvas?.(true, true);
  }
}

function watch(node) {
  if (!isPackNode(node) || node.__storydiffusionWatched) return;
  node.__storydiffusionWatched = true;
  const onConnectionsChange = node.onConnectionsChange;
  node.onConnectionsChange = function (...args) {
    const result = onConnectionsChange?.apply(this, args);
    updateWidgets(this);
    return result;
  };
  for (const name of CONTROLS[node.comfyClass] ?? []) {
    const w = widget(node, name);
    if (!w) continue;
    const callback = w.callback;
    w.callback = function (...args) {
      const result = callback?.apply(this, args);
      updateWidgets(node);
      return result;
    };
  }
  updateWidgets(node);
}

// --- template cards -----------------------------------------------------------------------------------
let servedNames = null;  // this pack's names in the server's /workflow_templates answer
let index = null;

async function templateIndex() {
  index ??= fetch(new URL("./templates.json", EXTENSION_URL)).then((r) => (r.ok ? r.json() : null)).catch(() => null);
  return index;
}

function patchTemplateApi() {
  const getCustom = api.getWorkflowTemplates?.bind(api);
  const getCore = api.getCoreWorkflowTemplates?.bind(api);
  if (!getCustom || !getCore) return;  // another frontend: keep its own cards
  api.getWorkflowTemplates = async (...args) => {
    const all = await getCustom(...args);
    const described = await templateIndex();
    if (described && all && Array.isArray(all[PACK])) {
      servedNames = all[PACK];
      delete all[PACK];  // listed once, as the category below
    }
    return all;
  };
  api.getCoreWorkflowTemplates = async (...args) => {
    const categories = await getCore(...args);
    const described = await templateIndex();
    if (!described || !servedNames || !Array.isArray(categories)) return categories;
    const byName = Object.fromEntries(described.templates.map((t) => [t.name, t]));
    const order = described.templates.map((t) => t.name);
    const names = [...order.filter((n) => servedNames.includes(n)), ...servedNames.filter((n) => !(n in byName))];
    const templates = names.map((name) => ({
      name, mediaType: "image", mediaSubtype: "jpg",
      title: byName[name]?.title ?? name, description: byName[name]?.description ?? "",
    }));
    return [...categories, { moduleName: PACK, title: described.title, type: "image", templates }];
  };
}

app.registerExtension({
  name: "StoryDiffusion.Widgets",
  async setup() {
    patchTemplateApi();
  },
  nodeCreated(node) {
    watch(node);
  },
  loadedGraphNode(node) {
    watch(node);
    updateWidgets(node);
  },
});
