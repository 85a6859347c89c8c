"""PyTorch twin of the xsrec model: same architecture, features and artifact format (see ../README.md)."""
from .artifact import Artifact, load_artifact, save_artifact
from .features import encode, gap_bucket, session_indices
from .model import XsrecModel

__all__ = ["Artifact", "load_artifact", "save_artifact", "encode", "gap_bucket", "session_indices", "XsrecModel"]
