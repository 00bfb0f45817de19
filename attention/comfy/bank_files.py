"""Identity bank files in models/storydiffusion: listed, loaded and saved where Load Identity Bank finds them."""
from __future__ import annotations

import os

from ...common import comfy_adapter as glue
from ..bank import BankError, IdentityBank, looks_like_bank_file

BANK_FOLDER = "storydiffusion"  # shared with motion predictors: each loader lists only its own files
BANK_EXTENSIONS = (".safetensors",)


def list_bank_files() -> list[str]:
    return glue.model_files(BANK_FOLDER, BANK_EXTENSIONS, looks_like_bank_file)


def load_bank_file(name: str, storage: str) -> IdentityBank:
    path = glue.model_file_path(BANK_FOLDER, name, BANK_EXTENSIONS)
    if path is None:
        raise BankError(f"identity bank {name!r} is not in the models/{BANK_FOLDER} folder(s): "
                        f"{glue.model_folder(BANK_FOLDER, BANK_EXTENSIONS)}")
    return IdentityBank.load(path, storage=storage)


def save_bank_file(bank: IdentityBank, filename_prefix: str) -> str:
    """Save into models/storydiffusion as <prefix>_00001_.safetensors (the counter never overwrites), where
    Load Identity Bank lists it; returns the name the loader shows."""
    import folder_paths

    folder = os.path.abspath(glue.model_folder(BANK_FOLDER, BANK_EXTENSIONS)[0])
    prefix = (filename_prefix or "").strip() or "bank"
    inside = os.path.abspath(os.path.join(folder, os.path.dirname(os.path.normpath(prefix))))
    if os.path.isabs(prefix) or os.path.commonpath((folder, inside)) != folder:
        raise BankError(f"filename_prefix {prefix!r} must stay inside models/{BANK_FOLDER} (no '..' or absolute paths)")
    try:
        target, name, counter, subfolder, _ = folder_paths.get_save_image_path(prefix, folder)
        file = f"{name}_{counter:05}_.safetensors"
        bank.save(os.path.join(target, file))
    except OSError as e:  # permissions, a full disk: say where, never a bare traceback
        raise BankError(f"could not save the identity bank into {folder}: {e.strerror or e}. Free disk space or fix "
                        "the folder's permissions, then queue again") from None
    return f"{subfolder}/{file}" if subfolder else file
