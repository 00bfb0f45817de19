"""Story tooling core (plain Python): parse a story, map panels to characters, lay out comic pages."""
