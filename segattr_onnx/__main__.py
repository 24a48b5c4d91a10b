"""``python -m segattr_onnx`` runs the CLI, as the ``segattr`` script does."""

from segattr_onnx.console import main

if __name__ == "__main__":
    main()
