"""Entry point of the Bazel py_tests: runs pytest with the given arguments (later -m wins)."""

import sys

import pytest

if __name__ == "__main__":
    sys.exit(pytest.main(["-q", "-p", "no:cacheprovider", "-m", "not slow", *sys.argv[1:]]))
