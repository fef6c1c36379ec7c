"""Everything that knows OpenCLIP's or CLIP_benchmark's internals: registration with OpenCLIP (``plugin``,
``autoload``), one adapter per upstream patch (``adapters``), the training loss and task, pretrained tags, and
CLIP_benchmark support."""
