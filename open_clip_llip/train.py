"""``open_clip_train``: OpenCLIP's training entry point with Llip registered.

OpenCLIP 3.3 installs no console script; this one runs ``open_clip_train.main.main`` and accepts
exactly its arguments. Importing this package first registers Llip even when the autoload hook
is switched off (``OPEN_CLIP_LLIP_AUTOLOAD=0``).
"""
import sys


def main(argv=None):
    import open_clip_llip  # noqa: F401  (registers Llip before open_clip_train.main binds create_loss)
    from open_clip_train.main import main as open_clip_train_main
    open_clip_train_main(sys.argv[1:] if argv is None else argv)


if __name__ == '__main__':
    main()
