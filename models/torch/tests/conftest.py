import os
import pathlib
import sys

ROOT = pathlib.Path(__file__).resolve().parents[3]
sys.path.insert(0, str(ROOT / "models" / "torch"))


def xsrec_bin():
    path = pathlib.Path(os.environ.get("XSREC_BIN", ROOT / "target" / "release" / "xsrec"))
    assert path.exists(), f"{path} missing: run `make build` first"
    return str(path)
