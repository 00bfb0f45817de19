#!/usr/bin/env bash
# The suite on ComfyUI 0.29.0 (../shared/thirdparty/ComfyUI-0.29.0.tar.gz; its frontend pin is 1.47.10), in
# .harness/ComfyUI-0.29.0 with the venv .harness/venv-0.29.0 (plus torchaudio, which 0.29 imports: see
# scripts/setup.sh); skips with a line when the snapshot is absent. Extra arguments go to pytest.
# See scripts/test_snapshot.sh.
exec bash "$(dirname "${BASH_SOURCE[0]}")/test_snapshot.sh" 0.29.0 "$@"
