"""``open_clip_train``: OpenCLIP's training entry point with Llip registered.

OpenCLIP 3.3 installs no console script; this one runs ``open_clip_train.main.main`` and accepts
its arguments (and, for a Llip ``--model``, ``--model-kwargs``: ``integration.adapters.model_kwargs``). It
exits with status 1 where OpenCLIP's ``main`` refuses to run (it returns
-1, which ``python -m open_clip_train.main`` turns into status 0). Importing this package first
registers Llip even when the autoload hook is switched off (``OPEN_CLIP_LLIP_AUTOLOAD=0``).
"""
import sys


def main(argv=None):
    from open_clip_train.main import main as open_clip_train_main

    import open_clip_llip  # noqa: F401  (registers Llip before open_clip_train.main binds create_loss)
    status = open_clip_train_main(sys.argv[1:] if argv is None else argv)
    if status not in (None, 0):  # OpenCLIP's main returns -1 when it refuses (say, an existing experiment name)
        sys.exit(1)


if __name__ == '__main__':
    main()
