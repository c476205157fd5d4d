"""stepdistill: diffusion step distillation. The package's folders are its layers (see CONTRIBUTING.md)."""

import logging


class _NoTorchvisionFallbackNotice(logging.Filter):
    """transformers says, once per process, that its torchvision image processors fall back to the PIL ones when
    torchvision is absent (as on our CPU installs); diffusers' pipeline modules import those processors, so every
    command would print two lines about a feature stepdistill never uses (the PIL processor serves the CLIP metric).
    Only that notice is dropped; every other transformers message passes."""

    def filter(self, record: logging.LogRecord) -> bool:
        return "requires torchvision (not installed)" not in record.getMessage()


logging.getLogger("transformers.utils.import_utils").addFilter(_NoTorchvisionFallbackNotice())
