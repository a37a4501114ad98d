"""placeholder"""
def measure_hardware(offload_dir, quick=False):
    raise NotImplementedError
