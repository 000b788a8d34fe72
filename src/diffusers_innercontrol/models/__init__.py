from .readout_probe import ProbeBottleneckBlock, ReadoutProbe, ReadoutProbeOutput

__all__ = ["ReadoutProbe", "ReadoutProbeOutput", "ProbeBottleneckBlock"]
