"""Build the tiny random test model: `python -m cai.tiny FOLDER`."""
import sys

from cai.models import build_tiny_model

if __name__ == "__main__":
    print(build_tiny_model(sys.argv[1] if len(sys.argv) > 1 else "runs/tiny-model"))
