"""What several packages share: plain-torch helpers, socket type names and the one ComfyUI glue module."""
