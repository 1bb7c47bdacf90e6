"""What runs inside each rank: model, data, trainer, parallel strategies, checkpointing, metrics."""
import logging


class _TorchaoImportNoise(logging.Filter):
    """torchao (the fp8 extra), which transformers imports too, warns at import that it could not load its optional
    C++ kernels (built for another Python version, or for a GPU), and torch that the enums it registers no longer need
    registering: nothing a user can act on, and float8 training needs none of those kernels. Other warnings pass."""

    NOISE = ("Failed to load ", "Skipping import of cpp extensions")

    def filter(self, record: logging.LogRecord) -> bool:
        text = str(record.msg)
        return not (text.startswith(self.NOISE) or "is an Enum subclass and is now natively supported" in text)


for _name in ("torchao", "torch.utils._pytree"):
    logging.getLogger(_name).addFilter(_TorchaoImportNoise())
