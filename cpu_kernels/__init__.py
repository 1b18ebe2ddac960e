"""edgeq.cpu_kernels"""
