"""Constants shared by the node modules (underscore: not scanned for nodes)."""

CATEGORY = "StoryDiffusion"
STORY_TYPE = "STORYDIFFUSION_STORY"  # story.model.Story
