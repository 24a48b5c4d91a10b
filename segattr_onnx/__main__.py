"""``python -m segattr_onnx`` runs the CLI."""

from segattr_onnx.cli import main

if __name__ == "__main__":
    main()
