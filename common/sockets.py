"""Socket type names and the node category: one table for every node module.

Types shared with other packs keep their names so values interchange: IPADAPTER and EMBEDS are
ComfyUI_IPAdapter_plus's (a loaded IP-Adapter state dict; a raw CLIP embedding tensor [N, D] or
[N, tokens, D]). The STORYDIFFUSION_* types are this pack's own.
"""

CATEGORY = "StoryDiffusion"

STORY_TYPE = "STORYDIFFUSION_STORY"  # story.model.Story
BANK_TYPE = "STORYDIFFUSION_BANK"  # attention.bank.IdentityBank
PHOTOMAKER_TYPE = "STORYDIFFUSION_PHOTOMAKER"  # identity.weights.PhotoMakerModel
CHARACTERS_TYPE = "STORYDIFFUSION_PHOTOMAKER_CHARACTERS"  # tuple of identity.comfy_adapter.Reference
PREDICTOR_TYPE = "STORYDIFFUSION_MOTION_PREDICTOR"  # motion.comfy_adapter.LoadedPredictor
IPADAPTER_TYPE = "IPADAPTER"  # IPAdapter_plus's loader value: loaders interchange
EMBEDS_TYPE = "EMBEDS"  # IPAdapter_plus's raw embedding tensor: [frames, D] pooled, [frames, T, D] penultimate
PANELS_TYPE = "STORYDIFFUSION_PANELS"  # story.model.PanelSelection: the story panel of each selected row
CONSISTENCY_REFERENCES_TYPE = "STORYDIFFUSION_CONSISTENCY_REFERENCES"  # tuple of consistency.score.CharacterReference
