"""vptool: visual prompt tuning of frozen, pretrained Vision Transformers (VPT, GateVPT, SPT, VPTM)."""

__version__ = "0.1.0"
