// The pack's web extension (web/storydiffusion.js) in one node renderer: the body of an async function run in the
// page by ui_probe.mjs (tests/test_web_extension.py prepends WORKFLOWS {comic_sd15, comic_sdxl_photomaker} and
// NODES2: true = Nodes 2.0, the Vue-rendered nodes; false = the classic canvas).
//
// A widget's state is read from what the renderer shows: under Nodes 2.0 from the node's DOM (a widget row is
// there and visible; its input, textarea or combobox is enabled); on the classic canvas from the widget the canvas
// draws (hidden, computedDisabled) and, for DOM widgets (text boxes), from their element. Returns
// {frontend, setting, ...states}. A frontend without the Nodes 2.0 setting returns {frontend, setting: false} at once
// when NODES2 is asked for, and skips the renderer switch otherwise.
const SETTING = 'Comfy.VueNodes.Enabled';
const sleep = (ms) => new Promise((r) => setTimeout(r, ms));
const pinia = document.querySelector('#vue-app').__vue_app__.config.globalProperties.$pinia;
const out = { frontend: window.__COMFYUI_FRONTEND_VERSION__ ?? null,
              setting: !!pinia._s.get('setting')?.settingsById?.[SETTING] };
if (!out.setting && NODES2) return out;

const settle = async () => { app.canvas.draw(true, true); await sleep(400); };
const setRenderer = async (nodes2) => {
  if (!out.setting) return;
  await app.extensionManager.setting.set(SETTING, nodes2);
  await sleep(500);
};
const load = async (name) => { await app.loadGraphData(WORKFLOWS[name], true, true, name); await sleep(1200); await settle(); };
const node = (type) => app.graph._nodes.find((n) => n.type === type);
const vueNodes = () => document.querySelectorAll('.lg-node[data-node-id]').length;

// Nodes 2.0: the widget rows of a node, by widget name (the control's aria-label, else the row's label)
function vueRows(n) {
  const rows = {};
  for (const row of document.querySelectorAll(`.lg-node[data-node-id="${n.id}"] .lg-node-widget`)) {
    const control = row.querySelector('textarea, input, [role="combobox"]');
    const label = control?.getAttribute('aria-label') || row.querySelector('label')?.textContent
      || (row.innerText || '').split('\n')[0];
    const disabled = !control || control.disabled || control.getAttribute('aria-disabled') === 'true'
      || control.readOnly === true;
    rows[label.trim()] = { shown: row.checkVisibility({ visibilityProperty: true, opacityProperty: true }),
                           editable: !disabled };
  }
  return rows;
}

function state(n, name, nodes2) {
  if (nodes2) return vueRows(n)[name] ?? { shown: false, editable: false };
  const w = n.widgets.find((x) => x.name === name);
  const element = w.element ? w.element.checkVisibility({ visibilityProperty: true, opacityProperty: true }) : true;
  return { shown: !w.hidden && element, editable: !(w.computedDisabled ?? w.disabled) };
}

// what a user does: pick a combo value (Nodes 2.0: in the node's dropdown; classic: the canvas menu calls the
// widget's callback with the new value)
const fire = (el, type) => el.dispatchEvent(new (type.startsWith('pointer') ? PointerEvent : MouseEvent)(type, {
  bubbles: true, cancelable: true, composed: true, button: 0, pointerType: 'mouse', isPrimary: true }));
const press = (el) => { for (const t of ['pointerdown', 'mousedown', 'pointerup', 'mouseup', 'click']) fire(el, t); };
async function pick(n, name, value, nodes2) {
  if (nodes2) {
    press(document.querySelector(`.lg-node[data-node-id="${n.id}"] [role="combobox"][aria-label="${name}"]`));
    await sleep(500);
    press([...document.querySelectorAll('[role="option"]')].find((o) => (o.textContent || '').trim() === value));
  } else {
    const w = n.widgets.find((x) => x.name === name);
    w.value = value;
    w.callback?.(value, app.canvas, n);
  }
  await settle();
}
const unlink = async (n, input) => { app.graph.removeLink(n.inputs.find((i) => i.name === input).link); await settle(); };
const link = async (src, slot, dst, input) => { src.connect(slot, dst, dst.inputs.findIndex((i) => i.name === input)); await settle(); };

await setRenderer(NODES2);
// Comic Page + Consistent Self-Attention
await load('comic_sd15');
out.rendered = { vue_nodes: vueNodes(), graph_nodes: app.graph._nodes.length };
const page = node('StoryDiffusionComicPage'), csa = node('StoryDiffusionConsistentSelfAttention');
out.captions_linked = state(page, 'captions', NODES2);
out.custom_layers_default = state(csa, 'custom_layers', NODES2);
out.layers_shown = state(csa, 'layers', NODES2);
await pick(csa, 'layers', 'custom list', NODES2);
out.layers_value = csa.widgets.find((w) => w.name === 'layers').value;
out.custom_layers_custom = state(csa, 'custom_layers', NODES2);
out.csa_fits = NODES2 || csa.size[1] >= csa.computeSize()[1];  // the canvas node grows to show it
await pick(csa, 'layers', 'all blocks', NODES2);
out.custom_layers_all = state(csa, 'custom_layers', NODES2);
await unlink(page, 'captions');
out.captions_unlinked = state(page, 'captions', NODES2);
// PhotoMaker Fuse and Character
await load('comic_sdxl_photomaker');
const fuse = node('StoryDiffusionPhotoMakerFuse'), photos = node('StoryDiffusionBatchImages');
out.fuse_text_story_linked = state(fuse, 'text', NODES2);
out.fuse_trigger_without_images = state(fuse, 'trigger_word', NODES2);
out.character_trigger = state(node('StoryDiffusionPhotoMakerCharacter'), 'trigger_word', NODES2);
await link(photos, 0, fuse, 'images');
await unlink(fuse, 'story');
out.fuse_text_no_story = state(fuse, 'text', NODES2);
out.fuse_trigger_with_images = state(fuse, 'trigger_word', NODES2);
if (!out.setting) return out;
// the other renderer, switched on with this graph open: it shows the same states, and follows later changes
await setRenderer(!NODES2);
await settle();
out.switched = { vue_nodes: vueNodes(), graph_nodes: app.graph._nodes.length,
                 fuse_text_no_story: state(fuse, 'text', !NODES2),
                 fuse_trigger_with_images: state(fuse, 'trigger_word', !NODES2) };
await unlink(fuse, 'images');
out.switched.fuse_trigger_unlinked = state(fuse, 'trigger_word', !NODES2);
const story = node('StoryDiffusionStory');
await link(story, story.outputs.findIndex((o) => o.name === 'story'), fuse, 'story');
out.switched.fuse_text_story_relinked = state(fuse, 'text', !NODES2);
await setRenderer(NODES2);
return out;
