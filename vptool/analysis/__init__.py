"""Analyses of trained adapters (GateVPT selection ratio; the NMI probe comes with `probe-nmi`)."""
